"""Loading: any supported checkpoint path (or the default model) -> a `Checkpoint` (the model as
trained) or a `LoadedModel` (an interaction model: markers installed, front-end on request)."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from microturn.checkpoint.default_model import default_model_path
from microturn.checkpoint.gguf_file import open_gguf, read_gguf
from microturn.checkpoint.interaction import (
    frontend_weights_path,
    install_markers,
    load_frontend,
)
from microturn.checkpoint.safetensors_dir import read_config_json, read_safetensors_dir
from microturn.checkpoint.tokenizer import (
    Tokenizer,
    tokenizer_from_directory,
    tokenizer_from_gguf,
)
from microturn.checkpoint.weights import build_decoder
from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.model.config import ModelConfig
from microturn.model.decoder import Decoder
from microturn.sequence.markers import MarkerTokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Checkpoint:
    """A checkpoint as trained: the language model and its tokenizer, nothing added
    (`microturn generate`, `bench model`, comparisons against other implementations)."""
    model: Decoder
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path | None
    load_seconds: float


@dataclass
class LoadedModel(Checkpoint):
    """A finished interaction model: the checkpoint with the timeline's marker tokens in its
    vocabulary (`config.vocab_size` counts them) and, on request, its audio/video front-end.
    Engines read it and never change it."""
    markers: MarkerTokens
    # its sessions' silent slices tell the seconds of quiet (`SliceLayout.clock`): set by the
    # adapter it was trained with, or by the trainer
    clock: bool = field(default=False, init=False)
    clock_both_lanes: bool = field(default=False, init=False)  # `SliceLayout.clock_both_lanes`
    _frontend: FrontEnd | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, frontend: bool = False) -> "LoadedModel":
        """Install the marker tokens into `checkpoint`'s model and tokenizer (in place: they
        become this model's), then load the front-end if asked."""
        markers = install_markers(checkpoint.model, checkpoint.tokenizer)
        loaded = cls(checkpoint.model, checkpoint.tokenizer, checkpoint.model.config,
                     checkpoint.path, checkpoint.load_seconds, markers)
        if frontend:
            loaded.load_frontend()
        return loaded

    @property
    def frontend(self) -> FrontEnd | None:
        """The front-end if it has been loaded (`load_frontend`), else None."""
        return self._frontend

    def load_frontend(self, path: str | Path | None = None, notice: bool = True) -> FrontEnd:
        """The audio/video front-end, loaded on the first call (weights from `path` or beside
        the checkpoint, else fresh ones with a notice unless the caller brings its own) and
        shared by every engine after."""
        if self._frontend is None:
            if path is None and self.path is not None:
                path = frontend_weights_path(Path(self.path))
            self._frontend = load_frontend(self.model, self.markers.media,
                                           Path(path) if path is not None else None, notice)
        return self._frontend


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MicroturnError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
                    device: torch.device | str | None = None) -> Checkpoint:
    """Load a GGUF file or a safetensors directory as trained; None means the default model."""
    started = time.perf_counter()
    path = Path(path) if path is not None else default_model_path()
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device) if device is not None else default_device()
    if path.is_dir():
        config, tensors, raw = read_safetensors_dir(path)
        tokenizer = tokenizer_from_directory(path, raw)
    elif path.is_file():
        config, tensors, reader = read_gguf(path)
        tokenizer_fields = {k: f.contents() for k, f in reader.fields.items()
                            if k.startswith("tokenizer.")}
        tokenizer = tokenizer_from_gguf(tokenizer_fields, path)
    else:
        raise MicroturnError(f"{path}: no such file or directory")
    model = build_decoder(config, tensors, dtype, device)
    return Checkpoint(model, tokenizer, config, path, time.perf_counter() - started)


def load_model(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = None, frontend: bool = False) -> LoadedModel:
    """The interaction model of a checkpoint (None: the default model): marker tokens
    installed; with `frontend`, the audio/video front-end loaded too (else on first use)."""
    return LoadedModel.from_checkpoint(load_checkpoint(path, dtype, device), frontend)


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of a checkpoint (no weights read): for clients and benchmarks."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        return tokenizer_from_directory(path, read_config_json(path))
    if not path.is_file():
        raise MicroturnError(f"{path}: no such file or directory")
    reader = open_gguf(path)
    return tokenizer_from_gguf({k: f.contents() for k, f in reader.fields.items()
                                if k.startswith("tokenizer.")}, path)
