"""Rotary position embedding for explicit token positions, in either channel layout."""

from dataclasses import dataclass

import torch

from microturn.kernels import ops
from microturn.model.config import RopeLayout


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


@dataclass(frozen=True)
class RotaryAngles:
    """cos/sin of one forward pass, computed once and shared by every layer."""

    cos: torch.Tensor  # [B, T, head_dim/2] float32 (the CPU kernel's input)
    sin: torch.Tensor
    cos_heads: torch.Tensor  # [B, 1, T, head_dim/2] in the model dtype (torch path)
    sin_heads: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        cos, sin = ops.rotary_angles(positions, inv_freq)
        return cls(cos, sin, cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 layout: RopeLayout) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles in cos/sin [B, 1, T, D/2]."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
