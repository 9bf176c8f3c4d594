"""Grouped-query self-attention: fused q/k/v projection, optional q/k norm, rotary, backend."""

import torch
from torch import nn

from microturn.kernels import ops
from microturn.model.attention_backend import AttentionBackend
from microturn.model.config import ModelConfig
from microturn.model.linear import Linear
from microturn.model.rmsnorm import RMSNorm
from microturn.model.rotary import RotaryAngles, apply_rotary


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.config = config
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size,
                               bias=config.attention_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: RotaryAngles,
                backend: AttentionBackend) -> torch.Tensor:
        c = self.config
        batch, steps, _ = x.shape
        qkv = self.qkv_proj(x)
        if not c.qk_norm:  # rotate q and k inside the fused projection (one kernel call)
            qkv = ops.rotary_qkv(qkv, rotary.cos, rotary.sin, c.num_heads, c.num_kv_heads,
                                 c.head_dim, c.rope_layout == "interleaved",
                                 lambda t: self._rotate_fused(t, rotary))
        q, k, v = qkv.split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = q.view(batch, steps, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if c.qk_norm:  # Qwen3: norm each head, then rotate
            q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rotary(q, rotary.cos_heads, rotary.sin_heads, c.rope_layout)
            k = apply_rotary(k, rotary.cos_heads, rotary.sin_heads, c.rope_layout)
        out = backend.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, c.q_size))

    def _rotate_fused(self, qkv: torch.Tensor, rotary: RotaryAngles) -> torch.Tensor:
        """torch form of the fused rotary (the fallback, and the trainer's backward)."""
        c = self.config
        batch, steps, _ = qkv.shape
        q, k, v = qkv.split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = apply_rotary(q.view(batch, steps, c.num_heads, c.head_dim).transpose(1, 2),
                         rotary.cos_heads, rotary.sin_heads, c.rope_layout)
        k = apply_rotary(k.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2),
                         rotary.cos_heads, rotary.sin_heads, c.rope_layout)
        return torch.cat((q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2), v), -1)
