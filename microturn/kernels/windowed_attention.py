"""Whole-sequence attention that sees what a long streamed session saw after its evictions.

The engine keeps a session's first `sink_slots` KV slots forever; when the context is full it
compacts old slices (their media positions go, their text stays, packed into whole blocks) or
drops whole blocks right after the sink (`sequence/residency.py`); kept tokens keep their
positions. So token p attends to the sink, to the compacted tokens of its epoch, and to the raw
tokens from the epoch's `raw_start` to p. `windowed_attention` computes exactly that for whole
sequences: in deterministic mode through the engine's paged kernel, each epoch one segment
whose block table lists the sink's blocks, the compacted blocks (gathered from the sequence
into blocks of their own, as the engine packed them) and the raw ones, so every query's
arithmetic is the one it had while streaming (bit for bit); its gradient is autograd through
the masked torch formula.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from microturn.kernels import autograd, policy
from microturn.kernels.ops import _needs_grad, kernels_for
from microturn.sequence.residency import Epoch


@dataclass(frozen=True)
class ResidentWindows:
    block_size: int
    sink_slots: int  # a whole number of blocks
    epochs: tuple[tuple[Epoch, ...], ...]  # per batch row, from token 0, in order

    def stretches(self, row: int, steps: int) -> list[tuple[int, int, Epoch]]:
        """(first token, end token, residency) of each stretch of row `row`."""
        epochs = [e for e in self.epochs[row] if e.at < steps]
        ends = [e.at for e in epochs[1:]] + [steps]
        return [(e.at, end, e) for e, end in zip(epochs, ends, strict=True)]

    def mask(self, steps: int, device=None) -> torch.Tensor:
        """[B, 1, T, T] bool: query p sees key j."""
        j = torch.arange(steps, device=device)
        causal = j.unsqueeze(0) <= j.unsqueeze(1)
        rows = []
        for b in range(len(self.epochs)):
            seen = torch.zeros(steps, steps, dtype=torch.bool, device=device)
            for first, end, epoch in self.stretches(b, steps):
                resident = (j < self.sink_slots) | (j >= epoch.raw_start)
                for start, n in epoch.compacted:
                    resident[start:start + n] = True
                seen[first:end] = resident
            rows.append(seen & causal)
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
    table, rows, keys, starts, gather = _metadata(windows, batch, steps)

    def pool(t):  # [B, Hkv, T, D] -> [B * blocks + compacted, Hkv, bs, D]: the sequence's
        # blocks (block i of row b is b * blocks + i), then the compacted ones
        slots = F.pad(t, (0, 0, 0, blocks * bs - steps)).transpose(1, 2).flatten(0, 1)
        packed = torch.cat([slots, slots[gather]]) if len(gather) else slots
        return packed.view(-1, bs, kv_heads, dim).transpose(1, 2).contiguous()

    flat_q = q.transpose(1, 2).reshape(batch * steps, q_heads, dim).contiguous()
    out = kernels.paged_attention(flat_q, pool(k), pool(v), table, rows, keys, starts)
    return out.view(batch, steps, q_heads, dim).transpose(1, 2)


@functools.lru_cache(maxsize=8)
def _metadata(windows: ResidentWindows, batch: int, steps: int) -> tuple[torch.Tensor, ...]:
    """(table, rows, keys, starts) for the paged kernel, and the slots (row-major over the
    padded batch) gathered into compacted blocks: one segment per stretch, its table row the
    sink's blocks, the compacted blocks, then the raw ones. The same for every layer of a
    pass, so built once."""
    bs = windows.block_size
    blocks, sink_blocks = -(-steps // bs), windows.sink_slots // bs
    table, rows, keys, starts, gather = [], [], [], [0], []
    packed: dict[tuple[int, ...], int] = {}  # a compacted block's slots -> its pool block
    for b in range(batch):
        for first, end, epoch in windows.stretches(b, steps):
            compacted = [b * blocks * bs + t for start, n in epoch.compacted
                         for t in range(start, start + n)]
            ids = []
            for i in range(0, len(compacted), bs):
                block = tuple(compacted[i:i + bs])
                if block not in packed:
                    packed[block] = batch * blocks + len(packed)
                    gather += block
                ids.append(packed[block])
            table.append([*(b * blocks + i for i in range(sink_blocks)), *ids,
                          *(b * blocks + i for i in range(epoch.raw_start // bs, blocks))])
            rows += [len(table) - 1] * (end - first)
            before = windows.sink_slots + len(compacted) - epoch.raw_start
            keys += [p + 1 + before for p in range(first, end)]
            starts.append(starts[-1] + end - first)
    width = max(len(t) for t in table)
    padded = [t + [0] * (width - len(t)) for t in table]
    return (*(torch.tensor(x, dtype=torch.int32) for x in (padded, rows, keys, starts)),
            torch.tensor(gather, dtype=torch.long))
