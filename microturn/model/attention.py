"""Grouped-query self-attention: fused q/k/v projection, optional q/k norm, rotary, backend."""

import torch
from torch import nn

from microturn.model.attention_backend import AttentionBackend
from microturn.model.config import ModelConfig
from microturn.model.linear import Linear
from microturn.model.rmsnorm import RMSNorm
from microturn.model.rotary import apply_rotary


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        c = self.config
        batch, steps, _ = x.shape
        q, k, v = self.qkv_proj(x).split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = q.view(batch, steps, c.num_heads, c.head_dim)
        k = k.view(batch, steps, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin, c.rope_layout)
        k = apply_rotary(k.transpose(1, 2), cos, sin, c.rope_layout)
        v = v.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
        out = backend.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, c.q_size))
