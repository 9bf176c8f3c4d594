"""Which implementation each op of the model runs: one of our CPU kernels or torch's operator.

Inference on the CPU always takes the kernels where they are fastest (decode shapes). In
deterministic mode every op takes its batch-invariant kernel whatever the shape, with autograd
when the trainer needs gradients (`microturn.kernels.autograd`). Elsewhere (CUDA, no compiler,
MICROTURN_KERNELS=0, or deterministic mode off for big shapes) torch's operators run.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from microturn.kernels import autograd, build, policy

# With deterministic mode off, matmuls of more rows than this go to torch (MKL), the old
# fastest-per-shape rule. Measured since: the packed kernel matches MKL in fp32 at every size
# (e.g. 138-143 vs 131-152 GFLOP/s at 256 rows) and beats torch in bf16 (widen + MKL), which
# is why deterministic mode, which always takes the kernel, is the default.
SMALL_BATCH_ROWS = 32


def kernels_for(x: torch.Tensor):
    """The compiled kernels if x lives where they run (the CPU), else None."""
    return build.load() if x.is_cpu else None  # (is_cpu: no device object per call)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_applies(x: torch.Tensor, *params: torch.Tensor | None):
    """The kernels, if this op should run one: always without autograd, and with autograd
    only in deterministic mode (the trainer must see the sampler's arithmetic)."""
    kernels = kernels_for(x)
    if kernels and (policy.deterministic() or not _needs_grad(x, *params)):
        return kernels
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           panels: Callable[[], torch.Tensor]) -> torch.Tensor:
    kernels = kernels_for(x)
    small = x.numel() <= SMALL_BATCH_ROWS * x.shape[-1]
    if kernels and (policy.deterministic() or (small and not _needs_grad(x, weight, bias))):
        if _needs_grad(x, weight, bias):
            return autograd.PackedLinear.apply(x, weight, bias, panels())
        return kernels.packed_linear(x, panels(), weight.shape[0], bias)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not build.cpu_has_bf16_gemm():
        # torch's bf16 GEMM has no fast path without bf16 hardware (~1 GFLOP/s):
        # widen to fp32 for the big matmuls, one copy per call.
        return F.linear(x.float(), weight.float(),
                        None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernels := _kernel_applies(x, weight):
        if _needs_grad(x, weight):
            return autograd.with_reference_grad(
                lambda a, w: kernels.rms_norm(a, w, eps),
                lambda a, w: rms_norm_reference(a, w, eps), x, weight)
        return kernels.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if kernels := _kernel_applies(gate_up):
        if _needs_grad(gate_up):
            return autograd.with_reference_grad(kernels.silu_mul, silu_mul_reference, gate_up)
        return kernels.silu_mul(gate_up)
    return silu_mul_reference(gate_up)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_angles(positions: torch.Tensor,
                  inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [*positions.shape, D/2] fp32, the same bits for a position in any batch."""
    if positions.device.type == "cpu" and (kernels := build.load()):
        return tuple(kernels.rotary_angles(positions, inv_freq))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
               kv_heads: int, head_dim: int, interleaved: bool,
               reference: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rotate the q and k heads of a fused qkv projection [B, T, (q + 2 kv) * D]."""
    if kernels := _kernel_applies(qkv):
        def rotate(t: torch.Tensor) -> torch.Tensor:
            out = t.clone() if _needs_grad(qkv) else t
            kernels.rotary_qkv_(out, cos, sin, q_heads, kv_heads, head_dim, interleaved)
            return out

        if _needs_grad(qkv):
            return autograd.with_reference_grad(rotate, reference, qkv)
        return rotate(qkv)
    return reference(qkv)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whole-sequence causal attention, q [B, Hq, T, D], k/v [B, Hkv, T, D]. In deterministic
    mode it runs the engine's paged kernel (each sequence one segment), so every query's
    arithmetic is the one it gets when streamed."""
    if policy.deterministic() and (kernels := kernels_for(q)):
        def attend(q_, k_, v_):
            return paged_full_sequence(kernels, q_, k_, v_)

        if _needs_grad(q, k, v):
            return autograd.with_reference_grad(attend, causal_attention_reference, q, k, v)
        return attend(q, k, v)
    return causal_attention_reference(q, k, v)


def causal_attention_reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)


def paged_full_sequence(kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    batch, q_heads, steps, dim = q.shape
    # each sequence is one block of `steps` slots: pool [B, Hkv, T, D], table row b = [b]
    table = torch.arange(batch, dtype=torch.int32).unsqueeze(1)
    rows = torch.arange(batch, dtype=torch.int32).repeat_interleave(steps)
    keys = torch.arange(1, steps + 1, dtype=torch.int32).repeat(batch)
    starts = torch.arange(0, batch * steps + 1, max(steps, 1), dtype=torch.int32)
    flat_q = q.transpose(1, 2).reshape(batch * steps, q_heads, dim)
    out = kernels.paged_attention(flat_q.contiguous(), k.contiguous(), v.contiguous(), table,
                                  rows, keys, starts)
    return out.view(batch, steps, q_heads, dim).transpose(1, 2)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under logits[i] ([M, V], [M]) -> [M] fp32."""
    if kernels := _kernel_applies(logits):
        if _needs_grad(logits):
            return autograd.with_reference_grad(
                lambda x: kernels.token_logprobs(x, targets),
                lambda x: token_logprobs_reference(x, targets), logits)
        return kernels.token_logprobs(logits, targets)
    return token_logprobs_reference(logits, targets)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
