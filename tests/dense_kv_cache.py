"""A contiguous KV cache in plain torch: the reference the tests hold the engine's paged pool
and the model's incremental decoding against (nothing in the package needs it)."""

import torch
import torch.nn.functional as F

from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig


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
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        causal = self._mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask,
                                              is_causal=causal, enable_gqa=True)
