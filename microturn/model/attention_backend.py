"""Where attention keys and values live. The decoder computes q/k/v; a backend stores and attends.

A backend sees one forward pass as `prepare(num_new_tokens)` once, then `attend(layer, q, k, v)`
for every layer, so per-pass work (masks, slot ranges) is done once, not once per layer.
Shapes: q [B, Hq, T, D]; k, v [B, Hkv, T, D]; result [B, Hq, T, D].
"""

from typing import Protocol

import torch

from microturn.kernels import ops
from microturn.kernels.windowed_attention import ResidentWindows, windowed_attention


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
