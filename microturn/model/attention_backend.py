"""Where attention keys and values live. The decoder computes q/k/v; a backend stores and attends.

A backend sees one forward pass as `prepare(num_new_tokens)` once, then `attend(layer, q, k, v)`
for every layer, so per-pass work (masks, slot ranges) is done once, not once per layer.
Shapes: q [B, Hq, T, D]; k, v [B, Hkv, T, D]; result [B, Hq, T, D].
"""

from typing import Protocol

import torch
import torch.nn.functional as F

from microturn.errors import MicroturnError
from microturn.kernels import ops, policy
from microturn.kernels.windowed_attention import ResidentWindows, windowed_attention
from microturn.model.config import ModelConfig

# Decode-sized passes (measured: up to ~4 queries) use the CPU kernel; longer fp32 passes use
# torch's flash attention unless in deterministic mode. In bf16 the kernel always wins: torch
# has no fast bf16 path here.
KERNEL_MAX_QUERIES = 4


class PagedKV(Protocol):
    """A block pool's memory as the native all-layers pass reads it (`engine.kv_pool.KVPool`)."""
    k: torch.Tensor  # keys, in the pool's layout
    v: torch.Tensor  # values [layers, blocks, kv heads, block_size, head_dim]
    block_table: torch.Tensor  # [rows, blocks per row] int32, -1 where unused


class PagedBatchMetadata(Protocol):
    """One pass's tokens on the pool (`engine.paged_attention.PagedBatch`)."""
    rows: torch.Tensor  # [N] int32 table row per token
    keys: torch.Tensor  # [N] int32 slots each token sees
    starts: torch.Tensor  # [S + 1] int32 first token of each segment, then N
    write_blocks: torch.Tensor  # [N] int64 physical block of each token's slot
    write_offsets: torch.Tensor  # [N] int64 offset inside that block


class PagedPass(Protocol):
    """What a paged backend hands the native pass: the pool and this pass's metadata."""

    @property
    def pool(self) -> PagedKV: ...

    @property
    def batch(self) -> PagedBatchMetadata: ...


class AttentionBackend(Protocol):
    # the paged path: K/V in a block pool that the native all-layers pass reads directly
    # (`model/native_layers.py`); None where K/V live elsewhere
    @property
    def paged(self) -> PagedPass | None: ...

    def prepare(self, num_new_tokens: int) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...


class CausalAttention:
    """No cache: the tokens of this pass attend causally to each other (whole-sequence forward)."""

    paged = None

    def prepare(self, num_new_tokens: int) -> None:
        pass

    def attend(self, layer, q, k, v):
        return ops.causal_attention(q, k, v)


class WindowedAttention:
    """No cache, like `CausalAttention`, but each token sees only what its session had
    resident when the engine computed it (`kernels/windowed_attention.py`): the trainer's
    replay of a long session with evictions."""

    paged = None

    def __init__(self, windows: ResidentWindows):
        self.windows = windows

    def prepare(self, num_new_tokens: int) -> None:
        pass

    def attend(self, layer, q, k, v):
        return windowed_attention(q, k, v, self.windows)


class DenseKVCache:
    """A contiguous KV buffer per batch row, allocated once; each pass appends in place.

    All rows advance together (same number of new tokens per pass). Slot i holds the i-th token
    fed; a token attends to every slot up to and including its own.
    """

    paged = None

    def __init__(self, config: ModelConfig, batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if capacity <= 0:
            raise MicroturnError(f"kv cache: capacity must be > 0, got {capacity}")
        shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self._start = 0
        self._mask: torch.Tensor | None = None

    def prepare(self, num_new_tokens: int) -> None:
        start, end = self.length, self.length + num_new_tokens
        if end > self.capacity:
            raise MicroturnError(
                f"kv cache: {end} tokens exceed its capacity of {self.capacity}")
        self._mask = None
        if num_new_tokens > 1 and start > 0:  # queries see all earlier slots, causal among new ones
            slot = torch.arange(end, device=self.k.device)
            query_slot = torch.arange(start, end, device=self.k.device).unsqueeze(1)
            self._mask = slot <= query_slot
        self._start, self.length = start, end

    def attend(self, layer, q, k, v):
        start, end = self._start, self.length
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        if (kernel := ops.kernels_for(q)) and (policy.deterministic() or q.dtype == torch.bfloat16
                                               or q.shape[2] <= KERNEL_MAX_QUERIES):
            return kernel.cached_attention(q, self.k[layer], self.v[layer], start)
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        causal = self._mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask,
                                              is_causal=causal, enable_gqa=True)
