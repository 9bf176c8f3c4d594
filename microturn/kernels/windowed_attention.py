"""Whole-sequence attention that sees what a long streamed session saw after its evictions.

The engine keeps a session's first `sink_slots` KV slots forever and, when the context is
full, drops whole blocks right after them (`Engine._evict`); kept tokens keep their positions.
So from an eviction on, token p attends to the sink and to the tokens from `sink_slots +
evicted` to p, where `evicted` counts every slot dropped so far. `windowed_attention` computes
exactly that for whole sequences: in deterministic mode through the engine's paged kernel, each
epoch between two evictions one segment whose block table lists the sink's blocks and then
the resident ones, so every query's arithmetic is the one it had while streaming (bit for bit);
its gradient is autograd through the masked torch formula.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from microturn.kernels import autograd, policy
from microturn.kernels.ops import _needs_grad, kernels_for


@dataclass(frozen=True)
class ResidentWindows:
    block_size: int
    sink_slots: int  # a whole number of blocks
    # per batch row: (first token after the eviction, slots evicted so far), in order
    evictions: tuple[tuple[tuple[int, int], ...], ...]

    def epochs(self, row: int, steps: int) -> list[tuple[int, int, int]]:
        """(first token, end token, slots evicted before it) of each stretch of row `row`."""
        cuts = [(0, 0), *[(at, e) for at, e in self.evictions[row] if at < steps]]
        ends = [at for at, _ in cuts[1:]] + [steps]
        return [(at, end, e) for (at, e), end in zip(cuts, ends, strict=True)]

    def mask(self, steps: int, device=None) -> torch.Tensor:
        """[B, 1, T, T] bool: query p sees key j."""
        j = torch.arange(steps, device=device)
        rows = []
        for b in range(len(self.evictions)):
            evicted = torch.zeros(steps, dtype=torch.long, device=device)
            for at, end, e in self.epochs(b, steps):
                evicted[at:end] = e
            p = j.unsqueeze(1)
            seen = (j <= p) & ((j < self.sink_slots) | (j >= self.sink_slots + evicted[p]))
            rows.append(seen)
        return torch.stack(rows).unsqueeze(1)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       windows: ResidentWindows) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]."""
    def reference(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=windows.mask(
            q_.shape[2], q_.device), enable_gqa=True)

    if policy.deterministic() and (kernels := kernels_for(q)):
        def attend(q_, k_, v_):
            return _paged_windows(kernels, q_, k_, v_, windows)

        if _needs_grad(q, k, v):
            return autograd.with_reference_grad(attend, reference, q, k, v)
        return attend(q, k, v)
    return reference(q, k, v)


def _paged_windows(kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   windows: ResidentWindows) -> torch.Tensor:
    batch, q_heads, steps, dim = q.shape
    kv_heads, bs = k.shape[1], windows.block_size
    blocks = -(-steps // bs)
    pad = blocks * bs - steps

    def pool(t):  # [B, Hkv, T, D] -> [B * blocks, Hkv, bs, D]: block i of row b is b * blocks + i
        t = F.pad(t, (0, 0, 0, pad)).view(batch, kv_heads, blocks, bs, dim)
        return t.permute(0, 2, 1, 3, 4).reshape(batch * blocks, kv_heads, bs, dim).contiguous()

    flat_q = q.transpose(1, 2).reshape(batch * steps, q_heads, dim).contiguous()
    out = kernels.paged_attention(flat_q, pool(k), pool(v), *_metadata(windows, batch, steps))
    return out.view(batch, steps, q_heads, dim).transpose(1, 2)


@functools.lru_cache(maxsize=8)
def _metadata(windows: ResidentWindows, batch: int, steps: int) -> tuple[torch.Tensor, ...]:
    """(table, rows, keys, starts) for the paged kernel: one segment per stretch between
    evictions, its table row the sink's blocks then the resident ones. The same for every
    layer of a pass, so built once."""
    bs = windows.block_size
    blocks, sink_blocks = -(-steps // bs), windows.sink_slots // bs
    table, rows, keys, starts = [], [], [], [0]
    for b in range(batch):
        for first, end, evicted in windows.epochs(b, steps):
            resident = [*range(sink_blocks), *range(sink_blocks + evicted // bs, blocks)]
            table.append([b * blocks + i for i in resident])
            rows += [len(table) - 1] * (end - first)
            keys += [p + 1 - evicted for p in range(first, end)]
            starts.append(starts[-1] + end - first)
    width = max(len(t) for t in table)
    padded = [t + [0] * (width - len(t)) for t in table]
    return tuple(torch.tensor(x, dtype=torch.int32) for x in (padded, rows, keys, starts))
