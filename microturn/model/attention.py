"""Grouped-query self-attention: fused q/k/v projection, optional q/k norm, rotary, backend."""

import torch
from torch import nn

from microturn.kernels import build
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
        rotated = False
        if not c.qk_norm and (kernels := build.inference_kernels(qkv)):
            kernels.rotary_qkv_(qkv, rotary.cos, rotary.sin, c.num_heads, c.num_kv_heads,
                                c.head_dim, c.rope_layout == "interleaved")
            rotated = True
        q, k, v = qkv.split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = q.view(batch, steps, c.num_heads, c.head_dim)
        k = k.view(batch, steps, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if not rotated:
            q = apply_rotary(q, rotary.cos_heads, rotary.sin_heads, c.rope_layout)
            k = apply_rotary(k, rotary.cos_heads, rotary.sin_heads, c.rope_layout)
        v = v.view(batch, steps, c.num_kv_heads, c.head_dim).transpose(1, 2)
        out = backend.attend(self.layer, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, c.q_size))
