"""LoRA on the model's own fused linears (qkv, o, gate_up, down), merged in the forward.

The engine serves MERGED weights: W' = round_to_dtype(W + scale * B A), computed once when an
adapter is applied (`apply_adapter`), then packed and streamed exactly like a base weight, so
serving an adapted model costs nothing extra. For the sampler's log-probabilities to stay the
trainer's bit for bit, the trainer's forward computes that same W' every step (`merged_weight`,
autograd through the merge so the gradient reaches A and B) and runs it through the same
packed kernel. Two details make W' the same bits wherever it is computed:

- B A goes through our row-invariant linear kernel (one FMA chain over the rank per output),
  not a library matmul whose blocking may change with the thread count;
- the scale and the add are separate elementwise ops (each rounds once in every lane), then a
  single rounding to the model's dtype.

A and B are fp32 whatever the model's dtype; base weights stay frozen. An adapter file is one
safetensors file: `lora.<module>.a|b`, optionally the trained front-end (`frontend.*`), and
the `LoRAConfig` in its metadata.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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
        delta = ops.linear(b, a_t, None, lambda: _pack(a_t))
    return (weight.float() + delta * scale).to(weight.dtype)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return build.load().pack_linear_weight(weight.detach())


class MergedLoRA(torch.autograd.Function):
    """y = x W'^T + bias with W' = merged_weight(W, A, B): the forward is the serving kernel on
    the merged weight (the sampler's bits); the backward goes straight to the adapter in low
    rank, dL/dA = s (G B)^T X and dL/dB = s G^T (X A^T), never forming the full-size dL/dW'
    (the rounding of W' is taken as the identity, as autograd through the merge would)."""

    @staticmethod
    def forward(ctx, x, a, b, weight, bias, scale):
        with torch.no_grad():
            w = merged_weight(weight, a, b, scale)
            kernels = ops.kernels_for(x)
            y = (kernels.packed_linear(x, _pack(w), w.shape[0], bias) if kernels
                 else torch.nn.functional.linear(x, w, bias))
        ctx.save_for_backward(x, a, b, w)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        x, a, b, w = ctx.saved_tensors
        g = grad.flatten(0, -2).float()
        xs = x.flatten(0, -2).float()
        grad_x = (g @ w.float()).view(*grad.shape[:-1], w.shape[1]).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        grad_a = ctx.scale * (g @ b).T @ xs if ctx.needs_input_grad[1] else None
        grad_b = ctx.scale * g.T @ (xs @ a.T) if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None, None


class LoRALinear(nn.Module):
    """A frozen `Linear` and its adapter; the forward runs the merged weight through the
    packed kernel, exactly as the engine will run the merged `Linear`."""

    def __init__(self, base: Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), scale
        bound = 1.0 / math.sqrt(base.in_features)  # PEFT's init: A uniform, B zero
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a.to(base.weight.device))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def merged_weight(self) -> torch.Tensor:
        return merged_weight(self.base.weight, self.a, self.b, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            w = self.merged_weight()
            return ops.linear(x, w, self.base.bias, lambda: _pack(w))
        return MergedLoRA.apply(x, self.a, self.b, self.base.weight, self.base.bias, self.scale)


    def merged_linear(self) -> Linear:
        """A plain `Linear` holding the merged weight (built on meta: no second allocation)."""
        base = self.base
        linear = Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device="meta")
        with torch.no_grad():
            linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        linear.bias = base.bias
        return linear


def add_lora(model: Decoder, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Wrap the target linears of every layer in place and freeze everything else."""
    if lora_modules(model):
        raise MicroturnError("this model already carries a LoRA adapter")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    for layer in model.layers:
        for target in config.targets:
            owner, attr = TARGETS[target]
            parent = getattr(layer, owner)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.scale,
                                             generator))
    return lora_modules(model)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@contextmanager
def serving(model: Decoder) -> Iterator[Decoder]:
    """The model as the engine serves it, for the duration: every adapter swapped for a plain
    merged `Linear` (the engine's native pass reads plain linears), put back afterwards."""
    wrapped = lora_modules(model)
    for name, module in wrapped.items():
        _set_module(model, name, module.merged_linear())
    try:
        yield model
    finally:
        for name, module in wrapped.items():
            _set_module(model, name, module)


# -- files -------------------------------------------------------------------------------------

def save_adapter(path: str | Path, model: Decoder, config: LoRAConfig,
                 frontend: FrontEnd | None = None, metadata: dict | None = None) -> None:
    """One small safetensors file: the adapter, the front-end if given, the config."""
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"lora.{name}.a"] = module.a.detach().contiguous()
        tensors[f"lora.{name}.b"] = module.b.detach().contiguous()
    if not tensors:
        raise MicroturnError("save_adapter: the model carries no LoRA adapter")
    if frontend is not None:
        tensors |= {f"frontend.{k}": v.detach().contiguous()
                    for k, v in frontend.state_dict().items()}
    info = {"format": FORMAT, "config": config.to_json(),
            "base": json.dumps(_shape_of(model))} | (metadata or {})
    save_file(tensors, str(path), info)


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


def load_adapter(path: str | Path, model: Decoder,
                 frontend: FrontEnd | None = None) -> LoRAConfig:
    """Into a model that carries the same adapter (`add_lora` with the file's config): the
    trainer's side. Front-end weights, when the file has them, go into `frontend`."""
    config, tensors, _ = read_adapter(path)
    modules = lora_modules(model)
    with torch.no_grad():
        for name, module in modules.items():
            module.a.copy_(_take(tensors, f"lora.{name}.a", module.a.shape, path))
            module.b.copy_(_take(tensors, f"lora.{name}.b", module.b.shape, path))
    _load_frontend(tensors, frontend, path)
    return config


def apply_adapter(loaded: LoadedModel, path: str | Path) -> LoRAConfig:
    """Merge an adapter into a loaded model for serving (in place): each target `Linear`
    gets W' = `merged_weight`, the same bits the trainer's forward ran. The front-end, when
    the file has one, becomes the model's."""
    config, tensors, _ = read_adapter(path)
    model = loaded.model
    if lora_modules(model):
        raise MicroturnError("apply_adapter: the model carries unmerged adapters")
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for target in config.targets:
                owner, attr = TARGETS[target]
                linear = getattr(getattr(layer, owner), attr)
                name = f"lora.layers.{i}.{owner}.{attr}"
                rank = config.rank
                a = _take(tensors, f"{name}.a", (rank, linear.in_features), path)
                b = _take(tensors, f"{name}.b", (linear.out_features, rank), path)
                merged = merged_weight(linear.weight, a.to(linear.weight.device),
                                       b.to(linear.weight.device), config.scale)
                linear.weight = nn.Parameter(merged, requires_grad=False)  # repacks panels
    if any(k.startswith("frontend.") for k in tensors):
        frontend = loaded.load_frontend()  # replaced by the adapter's weights below
        _load_frontend(tensors, frontend, path)
        frontend.to(device=model.device, dtype=model.dtype).requires_grad_(False)
    return config


def _take(tensors: dict, name: str, shape, path) -> torch.Tensor:
    if name not in tensors:
        raise MicroturnError(f"{path}: adapter lacks {name}")
    if tuple(tensors[name].shape) != tuple(shape):
        raise MicroturnError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, this "
                             f"model needs {tuple(shape)}")
    return tensors[name]


def _load_frontend(tensors: dict, frontend: FrontEnd | None, path) -> None:
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


def _shape_of(model: Decoder) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "num_layers": c.num_layers,
            "vocab_size": c.vocab_size}
