"""Adapter files (LoRA, from `microturn train`) and merging one into a model for serving.

A merged weight is W' = round_to_dtype(W + scale * B A), computed once at load time, then packed
and streamed exactly like a base weight, so serving an adapted model costs nothing extra. Two
details make W' the same bits wherever it is computed, the trainer's forward included
(`microturn/train/lora.py` computes it every step through `merged_weight`):

- B A goes through our row-invariant linear kernel (one FMA chain over the rank per output),
  not a library matmul whose blocking may change with the thread count;
- the scale and the add are separate elementwise ops (each rounds once in every lane), then a
  single rounding to the model's dtype.

An adapter file is one safetensors file: `lora.<module>.a|b` (fp32), optionally the trained
front-end (`frontend.*`) and the markers' trained embedding rows (`rows.ids`, `rows.weight`:
`train/marker_rows.py`), and the `LoRAConfig` in its metadata.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from microturn.checkpoint.loader import LoadedModel
from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.kernels import build, ops, policy
from microturn.model.decoder import Decoder
from microturn.model.linear import Linear

FORMAT = "microturn-lora"
# target name -> (submodule of a decoder layer, linear inside it)
TARGETS = {"qkv": ("self_attn", "qkv_proj"), "o": ("self_attn", "o_proj"),
           "gate_up": ("mlp", "gate_up_proj"), "down": ("mlp", "down_proj")}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)
    seed: int = 0  # A's initialisation (B starts at zero: the adapted model starts as the base)

    def __post_init__(self):
        if not 1 <= self.rank <= 1024:
            raise MicroturnError(f"lora rank must be in [1, 1024], got {self.rank}")
        if not self.alpha > 0:
            raise MicroturnError(f"lora alpha must be > 0, got {self.alpha}")
        if not self.targets or (bad := set(self.targets) - set(TARGETS)):
            raise MicroturnError(f"lora targets: unknown {sorted(bad) if self.targets else '()'};"
                                 f" choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoRAConfig":
        data = json.loads(text)
        return cls(**(data | {"targets": tuple(data["targets"])}))


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """W + scale * (B A) in fp32, rounded to W's dtype once: the weight the engine serves."""
    a_t = a.t().contiguous()  # B A = linear(x=B, weight=A^T): rows of B, one chain over rank
    with policy.deterministic_mode(True):
        delta = ops.linear(b, a_t, None, lambda: pack(a_t))
    return (weight.float() + delta * scale).to(weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    return build.load().pack_linear_weight(weight.detach())


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict]:
    """(config, tensors, metadata) of an adapter file, refusing anything else by name."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own types for a corrupt file
        raise MicroturnError(f"{path}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != FORMAT:
        raise MicroturnError(f"{path}: not a microturn LoRA adapter (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return LoRAConfig.from_json(metadata["config"]), tensors, metadata


def apply_adapter(loaded: LoadedModel, path: str | Path) -> LoRAConfig:
    """Merge an adapter into a loaded model for serving (in place): each target `Linear`
    gets W' = `merged_weight`, the same bits the trainer's forward ran. The front-end, when
    the file has one, becomes the model's."""
    config, tensors, metadata = read_adapter(path)
    if "parent" in metadata:  # trained on top of another adapter: that one goes in first
        apply_adapter(loaded, parent_adapter(path, metadata["parent"]))
    model = loaded.model
    loaded.clock = metadata.get("clock") == "true"
    loaded.clock_both_lanes = metadata.get("clock_both_lanes") == "true"
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for target in config.targets:
                owner, attr = TARGETS[target]
                linear = getattr(getattr(layer, owner), attr)
                if not isinstance(linear, Linear):  # e.g. a model carrying a trainer's adapter
                    raise MicroturnError(f"apply_adapter: layer {i} {owner}.{attr} is not a "
                                         "plain linear; merge into a model without adapters")
                name = f"lora.layers.{i}.{owner}.{attr}"
                rank = config.rank
                a = take(tensors, f"{name}.a", (rank, linear.in_features), path)
                b = take(tensors, f"{name}.b", (linear.out_features, rank), path)
                merged = merged_weight(linear.weight, a.to(linear.weight.device),
                                       b.to(linear.weight.device), config.scale)
                linear.weight = nn.Parameter(merged, requires_grad=False)  # repacks panels
    if "rows.ids" in tensors:
        write_rows(model, tensors, path)
    if any(k.startswith("frontend.") for k in tensors):
        frontend = loaded.load_frontend(notice=False)  # the adapter's weights replace it below
        load_frontend_tensors(tensors, frontend, path)
        frontend.to(device=model.device, dtype=model.dtype).requires_grad_(False)
    return config


def written_weight(weight: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> nn.Parameter:
    """A frozen copy of `weight` with `rows` (fp32) rounded over the rows `ids`."""
    out = weight.detach().clone()
    out[ids.to(out.device)] = rows.to(device=out.device, dtype=out.dtype)
    return nn.Parameter(out, requires_grad=False)


def write_rows(model: Decoder, tensors: dict, path) -> None:
    """The adapter's marker rows over the (tied) embedding and head: the trainer's W'."""
    ids, rows = tensors["rows.ids"], tensors.get("rows.weight")
    vocab, width = model.config.vocab_size, model.config.hidden_size
    if rows is None or rows.shape != (ids.numel(), width) or ids.dim() != 1:
        raise MicroturnError(f"{path}: rows.weight must be [{ids.numel()}, {width}] beside "
                             f"rows.ids")
    if not model.config.tie_word_embeddings or not bool(((ids >= 0) & (ids < vocab)).all()):
        raise MicroturnError(f"{path}: marker rows need a tied model with every id in "
                             f"[0, {vocab})")
    weight = written_weight(model.embed_tokens.weight, ids, rows)
    model.embed_tokens.weight = weight
    model.lm_head.weight = weight


def parent_adapter(path: str | Path, parent: str) -> Path:
    """The adapter a stacked adapter was trained on top of: the recorded path, or a file of
    that name beside it (the two shipped or moved together)."""
    recorded, beside = Path(parent), Path(path).parent / Path(parent).name
    for candidate in (recorded, beside):
        if candidate.is_file() and candidate.resolve() != Path(path).resolve():
            return candidate
    raise MicroturnError(f"{path}: trained on top of {parent}, which is not there (nor "
                         f"beside it as {beside.name})")


def take(tensors: dict, name: str, shape, path) -> torch.Tensor:
    if name not in tensors:
        raise MicroturnError(f"{path}: adapter lacks {name}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise MicroturnError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, this "
                             f"model needs {tuple(shape)}")
    return tensors[name]


def load_frontend_tensors(tensors: dict, frontend: FrontEnd | None, path) -> None:
    state = {k.removeprefix("frontend."): v for k, v in tensors.items()
             if k.startswith("frontend.")}
    if not state or frontend is None:
        return
    if missing := set(frontend.state_dict()) ^ set(state):
        raise MicroturnError(f"{path}: front-end weights do not match this model "
                             f"(mismatched tensors: {', '.join(sorted(missing))})")
    with torch.no_grad():
        for name, value in frontend.state_dict().items():
            value.copy_(state[name])


def shape_of(model: Decoder) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "num_layers": c.num_layers,
            "vocab_size": c.vocab_size}
