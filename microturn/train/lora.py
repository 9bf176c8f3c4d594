"""LoRA on the model's own fused linears (qkv, o, gate_up, down), merged in the forward.

The engine serves MERGED weights (`checkpoint/adapter.py`: W' = round(W + s B A), computed
once). For the sampler's log-probabilities to stay the trainer's bit for bit, the trainer's
forward computes that same W' every step (`merged_weight`) and runs it through the same packed
kernel; the backward reaches A and B in low rank (`MergedLoRA`). A and B are fp32 whatever the
model's dtype; base weights stay frozen.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from microturn.checkpoint.adapter import (
    FORMAT,
    TARGETS,
    LoRAConfig,
    load_frontend_tensors,
    merged_weight,
    pack,
    read_adapter,
    shape_of,
    take,
)
from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.kernels import ops, policy
from microturn.model.decoder import Decoder
from microturn.model.linear import Linear
from microturn.train.marker_rows import marker_rows, rows_off, rows_served


class MergedLoRA(torch.autograd.Function):
    """y = x W'^T + bias with W' = merged_weight(W, A, B): the forward is the serving kernel on
    the merged weight (the sampler's bits); the backward goes straight to the adapter in low
    rank, dL/dA = s (G B)^T X and dL/dB = s G^T (X A^T), never forming the full-size dL/dW'
    (the rounding of W' is taken as the identity, as autograd through the merge would)."""

    @staticmethod
    def forward(ctx, x, a, b, weight, bias, scale):
        with torch.no_grad():
            w = merged_weight(weight, a, b, scale)
            kernels = ops.kernels_for(x) if policy.deterministic() else None
            y = (kernels.packed_linear(x, pack(w), w.shape[0], bias) if kernels
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
            return ops.linear(x, w, self.base.bias, lambda: pack(w))
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
    for i, layer in enumerate(model.layers):
        for target in config.targets:
            owner, attr = TARGETS[target]
            parent = getattr(layer, owner)
            if not isinstance(getattr(parent, attr, None), Linear):
                raise MicroturnError(f"LoRA target {target!r}: layer {i} has no {owner}.{attr} "
                                     f"(a mixture-of-experts layer: adapt qkv,o only)")
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
        with rows_served(model):
            yield model
    finally:
        for name, module in wrapped.items():
            _set_module(model, name, module)


@contextmanager
def adapters_off(model: Decoder) -> Iterator[Decoder]:
    """The model without its adapters for the duration (each `LoRALinear` swapped for the
    frozen linear it wraps): the reference a KL penalty measures against."""
    wrapped = lora_modules(model)
    for name, module in wrapped.items():
        _set_module(model, name, module.base)
    try:
        with rows_off(model):
            yield model
    finally:
        for name, module in wrapped.items():
            _set_module(model, name, module)


# -- files -------------------------------------------------------------------------------------

def save_adapter(path: str | Path, model: Decoder, config: LoRAConfig,
                 frontend: FrontEnd | None = None, metadata: dict | None = None) -> None:
    """One small safetensors file: the adapter, the marker rows if the model trains them, the
    front-end if given, the config."""
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"lora.{name}.a"] = module.a.detach().contiguous()
        tensors[f"lora.{name}.b"] = module.b.detach().contiguous()
    if not tensors:
        raise MicroturnError("save_adapter: the model carries no LoRA adapter")
    if (rows := marker_rows(model)) is not None:
        tensors |= {"rows.ids": rows.ids.detach().cpu().contiguous(),
                    "rows.weight": rows.rows.detach().contiguous()}
    if frontend is not None:
        tensors |= {f"frontend.{k}": v.detach().contiguous()
                    for k, v in frontend.state_dict().items()}
    info = {"format": FORMAT, "config": config.to_json(),
            "base": json.dumps(shape_of(model))} | (metadata or {})
    save_file(tensors, str(path), info)


def load_adapter(path: str | Path, model: Decoder,
                 frontend: FrontEnd | None = None) -> LoRAConfig:
    """Into a model that carries an adapter on the same targets (`add_lora`): the trainer's
    side. An adapter of a lower rank than the model's grows into it: its A and B fill the
    first rows and columns (B rescaled to the model's alpha / rank), the rest keep their
    initialisation (B zero), so the model computes what the file's adapter computes and has
    room to learn more. Marker rows and front-end weights, when the file has them, go into the
    model's trainable rows (`add_marker_rows`) and `frontend`."""
    config, tensors, _ = read_adapter(path)
    modules = lora_modules(model)
    with torch.no_grad():
        for name, module in modules.items():
            rank = module.a.shape[0]
            if config.rank > rank:
                raise MicroturnError(f"{path}: rank {config.rank} does not fit an adapter of "
                                     f"rank {rank}")
            a = take(tensors, f"lora.{name}.a", (config.rank, module.a.shape[1]), path)
            b = take(tensors, f"lora.{name}.b", (module.b.shape[0], config.rank), path)
            module.a[:config.rank].copy_(a)
            module.b[:, :config.rank].copy_(b if config.scale == module.scale
                                            else b * (config.scale / module.scale))
    load_rows(tensors, model, path)
    load_frontend_tensors(tensors, frontend, path)
    return config


def load_rows(tensors: dict, model: Decoder, path) -> None:
    rows = marker_rows(model)
    if "rows.ids" not in tensors:
        return
    if rows is None or not torch.equal(tensors["rows.ids"], rows.ids.cpu()):
        have = "none" if rows is None else rows.ids.tolist()
        raise MicroturnError(f"{path}: carries trained rows for tokens "
                             f"{tensors['rows.ids'].tolist()}; this run trains {have} "
                             "(train the marker rows too: --train-markers)")
    with torch.no_grad():
        rows.rows.copy_(take(tensors, "rows.weight", tuple(rows.rows.shape), path))
