"""load_model: any supported checkpoint path (or the default model) -> model + tokenizer."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from microturn.checkpoint.default_model import default_model_path
from microturn.checkpoint.gguf_file import open_gguf, read_gguf
from microturn.checkpoint.safetensors_dir import read_config_json, read_safetensors_dir
from microturn.checkpoint.tokenizer import (
    Tokenizer,
    tokenizer_from_directory,
    tokenizer_from_gguf,
)
from microturn.checkpoint.weights import build_decoder
from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig
from microturn.model.decoder import Decoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Decoder
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    load_seconds: float
    markers: object | None = None  # the timeline's MarkerTokens, once an engine installed them
    frontend: object | None = None  # the audio/video FrontEnd, once a session needed it


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MicroturnError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str | None = None) -> LoadedModel:
    """Load a GGUF file or a safetensors directory; None means the default model."""
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
    return LoadedModel(model, tokenizer, config, path, time.perf_counter() - started)


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
