"""Tensor parallelism over `torch.distributed` whose logits are bitwise one device's.

Each rank holds a contiguous share of the attention heads (whole key/value groups with their
query heads) and of the MLP's intermediate columns:

- column-parallel (q/k/v, gate/up): a rank computes its own output columns. Every output of
  the packed kernel is its own fp32 chain over the whole input, so those columns are the bits
  one device computes; nothing to reduce.
- row-parallel (o, down): a rank holds a K-slice, and the one-device output is a chain over
  all of K. The ranks rebuild exactly that chain (`ordered_chain_reduce`): rank 0 runs its
  slice from zero, hands its fp32 accumulators to rank 1, which continues them over its
  slice, and so on; the last rank adds the bias and rounds once, as the one-device kernel
  does, and broadcasts. The order is the rank order, which is the K order: fixed, whatever
  arrives when. `plain_all_reduce` (each rank's partial from zero, summed by torch's
  all-reduce, then rounded) is what a Megatron-style layer does; it differs in the last bits.
- sequence-parallel (`sequence=True`): the residual adds and norms run on a rank's share of
  the rows and are gathered before the next column-parallel matmul. They are row-wise, so the
  bits are the same.

Norms, embeddings and the output head are replicated. The ranks' outputs are identical.
"""

import copy
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from microturn.errors import MicroturnError
from microturn.kernels import build, ops
from microturn.model.attention import SelfAttention
from microturn.model.decoder import Decoder, DecoderLayer
from microturn.model.linear import Linear
from microturn.model.mlp import SwiGLU

REDUCES = ("chain", "all_reduce")


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    kv_heads: tuple[int, int]  # [first, end)
    q_heads: tuple[int, int]
    columns: tuple[int, int]  # the MLP's intermediate columns


def plan_shards(num_heads: int, num_kv_heads: int, intermediate: int,
                world: int) -> list[Shard]:
    """Contiguous shares, as even as whole key/value groups and 64-column groups allow."""
    if not 1 <= world <= num_kv_heads:
        raise MicroturnError(f"tp: {world} ranks for {num_kv_heads} key/value heads (each rank "
                             "needs at least one)")
    group = num_heads // num_kv_heads
    kv = [num_kv_heads * r // world for r in range(world + 1)]
    blocks = -(-intermediate // 64)
    cols = [min(intermediate, 64 * (blocks * r // world)) for r in range(world + 1)]
    return [Shard(r, world, (kv[r], kv[r + 1]), (kv[r] * group, kv[r + 1] * group),
                  (cols[r], cols[r + 1])) for r in range(world)]


class RowParallelLinear(nn.Module):
    """A K-slice of a linear [out, K]: the ranks' slices reduced in rank (= K) order."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce: str):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.reduce = reduce
        self._panels = build.load().pack_linear_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = ops.kernels_for(x)
        out = self.weight.shape[0]
        if self.reduce == "chain":
            return ordered_chain_reduce(kernels, x, self._panels, out, self.bias)
        return plain_all_reduce(kernels, x, self._panels, out, self.bias)


def ordered_chain_reduce(kernels, x: torch.Tensor, panels: torch.Tensor, out: int,
                         bias: torch.Tensor | None) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = x.numel() // x.shape[-1]
    acc = None
    if rank > 0:
        acc = torch.empty(rows, out, dtype=torch.float32)
        dist.recv(acc, src=rank - 1)
    acc = kernels.packed_linear_chain(x, panels, out, acc).reshape(rows, out)
    y = torch.empty(rows, out, dtype=x.dtype)
    if rank < world - 1:
        dist.send(acc, dst=rank + 1)
    else:
        y = _finish(acc, bias, x.dtype)
    dist.broadcast(y, src=world - 1)
    return y.view(*x.shape[:-1], out)


def plain_all_reduce(kernels, x: torch.Tensor, panels: torch.Tensor, out: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The conventional row-parallel reduce (the negative control): partials summed by torch."""
    acc = kernels.packed_linear_chain(x, panels, out, None).reshape(-1, out)
    dist.all_reduce(acc)
    return _finish(acc, bias, x.dtype).view(*x.shape[:-1], out)


def _finish(acc: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Bias added in fp32, then one rounding: the one-device kernel's epilogue."""
    return (acc + bias.float() if bias is not None else acc).to(dtype)


class SequenceParallelLayer(nn.Module):
    """A decoder layer whose residual adds and norms run on this rank's rows (gathered before
    each column-parallel matmul)."""

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        self.inner = layer

    def forward(self, x, rotary, backend):
        layer = self.inner
        mine, rows = _my_rows(x)
        h = _gather_rows(layer.input_layernorm(x[:, mine]), rows)
        x = x + layer.self_attn(h, rotary, backend)
        h = _gather_rows(layer.post_attention_layernorm(x[:, mine]), rows)
        return x + layer.mlp(h)


def _my_rows(x: torch.Tensor) -> tuple[slice, list[int]]:
    steps, world, rank = x.shape[1], dist.get_world_size(), dist.get_rank()
    edges = [steps * r // world for r in range(world + 1)]
    return slice(edges[rank], edges[rank + 1]), [edges[r + 1] - edges[r] for r in range(world)]


def _gather_rows(h: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Every rank's rows, in rank order (padded to equal shares on the wire: gloo's
    all-gather takes equal sizes)."""
    most = max(rows)
    padded = torch.nn.functional.pad(h, (0, 0, 0, most - h.shape[1]))
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:, :n] for part, n in zip(parts, rows, strict=True)], dim=1)


def shard_model(model: Decoder, reduce: str = "chain", sequence: bool = False) -> Decoder:
    """This rank's part of `model` (the process group must be up): a Decoder whose attention
    and MLP hold the rank's heads and columns."""
    if reduce not in REDUCES:
        raise MicroturnError(f"tp: reduce must be one of {', '.join(REDUCES)}")
    c = model.config
    if c.moe is not None:
        raise MicroturnError("tp: mixture-of-experts layers are not sharded yet")
    shard = plan_shards(c.num_heads, c.num_kv_heads, c.intermediate_size,
                        dist.get_world_size())[dist.get_rank()]
    (kv0, kv1), (q0, q1), (c0, c1) = shard.kv_heads, shard.q_heads, shard.columns
    mine = replace(c, num_heads=q1 - q0, num_kv_heads=kv1 - kv0, intermediate_size=c1 - c0)
    out = copy.copy(model)
    out._modules = dict(model._modules)
    layers = []
    d = c.head_dim
    for i, layer in enumerate(model.layers):
        new = copy.copy(layer)
        new._modules = dict(layer._modules)
        attn = SelfAttention(mine, i)
        w = layer.self_attn.qkv_proj.weight
        q, k, v = w.split((c.q_size, c.kv_size, c.kv_size))
        attn.qkv_proj = _linear(torch.cat([q[q0 * d:q1 * d], k[kv0 * d:kv1 * d],
                                           v[kv0 * d:kv1 * d]]),
                                _qkv_bias(layer.self_attn.qkv_proj.bias, c, (q0, q1), (kv0, kv1)))
        attn.o_proj = RowParallelLinear(layer.self_attn.o_proj.weight[:, q0 * d:q1 * d], None,
                                        reduce)
        if c.qk_norm:
            attn.q_norm, attn.k_norm = layer.self_attn.q_norm, layer.self_attn.k_norm
        mlp = SwiGLU.__new__(SwiGLU)
        nn.Module.__init__(mlp)
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        mlp.gate_up_proj = _linear(torch.cat([gate[c0:c1], up[c0:c1]]), None)
        mlp.down_proj = RowParallelLinear(layer.mlp.down_proj.weight[:, c0:c1], None, reduce)
        new.self_attn, new.mlp = attn, mlp
        layers.append(SequenceParallelLayer(new) if sequence else new)
    out.layers = nn.ModuleList(layers)
    out.sharded = True  # the native pass knows nothing of ranks: the modules' path runs
    return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    linear = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=False)
    return linear


def _qkv_bias(bias: torch.Tensor | None, c, q: tuple[int, int],
              kv: tuple[int, int]) -> torch.Tensor | None:
    if bias is None:
        return None
    d = c.head_dim
    qb, kb, vb = bias.split((c.q_size, c.kv_size, c.kv_size))
    return torch.cat([qb[q[0] * d:q[1] * d], kb[kv[0] * d:kv[1] * d], vb[kv[0] * d:kv[1] * d]])
