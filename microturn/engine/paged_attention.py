"""Attention backend for a ragged batch of sessions whose KV lives in the block pool.

The batch is one row of N tokens from many sessions (grouped by session, in order). For each
token the engine supplies its session's table row, its logical slot (where its K/V is written)
and how many slots it sees (its own and every earlier one). Metadata is built once per forward
from per-session counters; nothing here depends on the length of any history.
"""

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from microturn.engine.kv_pool import KVPool
from microturn.errors import MicroturnError
from microturn.kernels import ops
from microturn.model.config import ModelConfig


@dataclass(frozen=True)
class Segment:
    """The tokens [start, end) of the batch belong to table row `row` at slots first_slot..."""

    row: int
    start: int
    end: int
    first_slot: int


@dataclass(frozen=True)
class PagedBatch:
    rows: torch.Tensor  # [N] int32 table row per token
    keys: torch.Tensor  # [N] int32 slots each token sees (its own slot + 1)
    write_blocks: torch.Tensor  # [N] int64 physical block of each token's slot
    write_offsets: torch.Tensor  # [N] int64 offset inside that block
    starts: torch.Tensor  # [S + 1] int32 first token of each segment, then N

    @classmethod
    def build(cls, pool: KVPool, segments: list[Segment]) -> "PagedBatch":
        # numpy on the host: a decode step's metadata is a few dozen numbers, where each torch
        # op would cost more in dispatch (~10 of them, ~0.2 ms) than the step's attention
        n = segments[-1].end
        rows = np.empty(n, np.int32)
        slots = np.empty(n, np.int64)
        for s in segments:
            rows[s.start:s.end] = s.row
            slots[s.start:s.end] = np.arange(s.first_slot, s.first_slot + s.end - s.start)
        blocks = pool.host_table()[rows, slots // pool.block_size].astype(np.int64)
        starts = np.array([s.start for s in segments] + [n], np.int32)
        arrays = (rows, (slots + 1).astype(np.int32), blocks, slots % pool.block_size, starts)
        device = pool.block_table.device
        if device.type == "cpu":  # shares the arrays' memory: no copy, no dispatch
            return cls(*map(torch.from_numpy, arrays))
        return cls(*(torch.from_numpy(a).to(device) for a in arrays))

    def segments(self) -> list[Segment]:
        """The segments this batch was built from (the torch reference path reads them)."""
        starts, rows, keys = self.starts.tolist(), self.rows.tolist(), self.keys.tolist()
        return [Segment(rows[a], a, b, keys[a] - 1) for a, b in pairwise(starts)]


class PagedAttention:
    def __init__(self, pool: KVPool, batch: PagedBatch):
        self.pool, self.batch = pool, batch

    @property
    def paged(self) -> "PagedAttention":
        """This backend's pool and batch metadata (the native all-layers path reads them)."""
        return self

    def prepare(self, num_new_tokens: int) -> None:
        if num_new_tokens != self.batch.rows.numel():
            raise ValueError(f"batch metadata covers {self.batch.rows.numel()} tokens, "
                             f"the pass has {num_new_tokens}")

    def attend(self, layer, q, k, v):
        # q [1, Hq, N, D]; k, v [1, Hkv, N, D]: write every token's K/V at its slot, in place
        b = self.batch
        self.pool.write(layer, b.write_blocks, b.write_offsets, k[0].transpose(0, 1),
                        v[0].transpose(0, 1))
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]
        if kernels := ops.kernels_for(q):
            out = kernels.paged_attention(q[0].transpose(0, 1).contiguous(), k_pool, v_pool,
                                          self.pool.block_table, b.rows, b.keys, b.starts)
            return out.transpose(0, 1).unsqueeze(0)
        return self.attend_reference(q, layer)

    def attend_reference(self, q, layer):
        """torch path: gather each session's KV and run causal attention (one call per
        session; the fallback and the kernel's reference, not the fast path)."""
        pool, out = self.pool, torch.empty_like(q)
        for s in self.batch.segments():
            seen = s.first_slot + (s.end - s.start)
            blocks = pool.block_table[s.row, :(seen + pool.block_size - 1) // pool.block_size]
            keys = pool.keys(layer, blocks.long()).transpose(0, 1).flatten(1, 2)[:, :seen]
            values = pool.v[layer, blocks.long()].transpose(0, 1).flatten(1, 2)[:, :seen]
            query_slot = torch.arange(s.first_slot, seen).unsqueeze(1)
            visible = torch.arange(seen).unsqueeze(0) <= query_slot
            out[:, :, s.start:s.end] = F.scaled_dot_product_attention(
                q[:, :, s.start:s.end], keys.unsqueeze(0), values.unsqueeze(0),
                attn_mask=visible, enable_gqa=True)
        return out


class PagedSequence:
    """One sequence (batch 1) on a block pool of its own: the engine's KV layout and attention
    kernel for plain generation (`microturn generate`, `microturn bench model`). All blocks are
    taken up front; `length` may be set back to drop the tail (the slots are rewritten).
    Blocks are 256 slots: one sequence shares its pool with nobody, and each kv head's history
    then comes in 32 KiB runs, which a decode step's attention reads faster than 8 KiB ones."""

    def __init__(self, config: ModelConfig, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_size: int = 256):
        if capacity <= 0:
            raise MicroturnError(f"kv cache: capacity must be > 0, got {capacity}")
        blocks = -(-capacity // block_size)
        block_bytes = (2 * config.num_layers * config.num_kv_heads * block_size
                       * config.head_dim * dtype.itemsize)
        self.pool = KVPool(config, blocks * block_bytes, block_size, 1, blocks, dtype, device)
        self.row = self.pool.take_row()
        for have in range(blocks):
            self.pool.grow(self.row, have)
        self.capacity, self.length = capacity, 0
        self._attention: PagedAttention | None = None
        self._table = self.pool.host_table()[self.row]
        self._decode: PagedAttention | None = None  # reused by every one-token pass
        self._decode_arrays: tuple[np.ndarray, ...] = ()  # its keys, blocks, offsets

    def prepare(self, num_new_tokens: int) -> None:
        end = self.length + num_new_tokens
        if end > self.capacity:
            raise MicroturnError(f"kv cache: {end} tokens exceed its capacity of {self.capacity}")
        if num_new_tokens == 1 and self._decode is not None:
            # a decode step: the last one's metadata, three numbers rewritten in place. After a
            # pass over the weights every Python op runs on cold caches (~10-25 us each), and a
            # fresh build takes ~15 of them.
            keys, blocks, offsets = self._decode_arrays
            keys[0] = end
            blocks[0] = self._table[self.length // self.pool.block_size]
            offsets[0] = self.length % self.pool.block_size
            self._attention = self._decode
        else:
            segment = Segment(self.row, 0, num_new_tokens, self.length)
            self._attention = PagedAttention(self.pool, PagedBatch.build(self.pool, [segment]))
            if num_new_tokens == 1 and self.pool.block_table.is_cpu:
                b = self._attention.batch
                self._decode = self._attention
                self._decode_arrays = (b.keys.numpy(), b.write_blocks.numpy(),
                                       b.write_offsets.numpy())
        self.length = end

    @property
    def paged(self) -> PagedAttention:
        return self._attention

    def attend(self, layer, q, k, v):
        return self._attention.attend(layer, q, k, v)
