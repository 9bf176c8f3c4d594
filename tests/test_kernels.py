"""CPU kernels against float64 references; bitwise batch invariance; the torch fallback."""

import pytest
import torch

from microturn.kernels import build

kernels = build.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable here")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 3072, 576), (3, 576, 1536), (8, 97, 37), (1, 5, 8),
                                      (2, 49152, 576)])
def test_small_batch_linear_matches_reference(dtype, rows, n, k):
    generator = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    reference = x.double() @ w.double().T + bias.double()
    out = kernels.small_batch_linear(x, w, bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert rel_error(out, reference) < TOLERANCE[dtype]
    # negative control: a perturbed weight is caught by the same check
    w[0] += 1.0
    assert rel_error(kernels.small_batch_linear(x, w, bias), reference) > TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_linear_row_result_is_batch_invariant(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 576, generator=generator).to(dtype)
    w = torch.randn(1536, 576, generator=generator).to(dtype)
    alone = kernels.small_batch_linear(x[3:4], w, None)
    for rows in (slice(0, 8), slice(3, 5), slice(1, 4)):
        batched = kernels.small_batch_linear(x[rows], w, None)
        assert torch.equal(batched[3 - rows.start], alone[0])
    # negative control: the bitwise check sees a small change of one input
    nudged = x[3:4].clone()
    nudged[0, 0] += 0.05
    assert not torch.equal(kernels.small_batch_linear(nudged, w, None), alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start,steps", [(0, 1), (0, 6), (13, 1), (40, 9), (99, 1)])
def test_cached_attention_matches_reference(dtype, start, steps):
    generator = torch.Generator().manual_seed(start + steps)
    batch, heads, kv_heads, dim, capacity = 2, 6, 2, 64, 100
    k_cache = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(dtype)
    v_cache = torch.randn(batch, kv_heads, capacity, dim, generator=generator).to(dtype)
    q = torch.randn(batch, heads, steps, dim, generator=generator).to(dtype)
    end = start + steps
    visible = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k_cache[:, :, :end].double(), v_cache[:, :, :end].double(),
        attn_mask=visible, enable_gqa=True)
    out = kernels.cached_attention(q, k_cache, v_cache, start)
    assert rel_error(out, reference) < TOLERANCE[dtype] * 10
    # negative control: a changed value inside the visible range moves the result
    v_cache[:, :, 0] += 3.0
    assert rel_error(kernels.cached_attention(q, k_cache, v_cache, start), reference) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_kernels_match_torch(dtype):
    from microturn.model.rotary import RotaryAngles, apply_rotary

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 576, generator=generator)
    weight = torch.randn(576, generator=generator)
    reference = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert rel_error(kernels.rms_norm(x.to(dtype), weight.to(dtype), 1e-5),
                     reference.double()) < TOLERANCE[dtype]

    gate_up = torch.randn(2, 5, 2 * 48, generator=generator)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert rel_error(kernels.silu_mul(gate_up.to(dtype)), expected.double()) < TOLERANCE[dtype]

    heads, kv_heads, dim = 4, 2, 16
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 900, 901]])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = RotaryAngles.at(positions, inv_freq, torch.float32)
    for layout in ("half", "interleaved"):
        qkv = torch.randn(2, 5, (heads + 2 * kv_heads) * dim, generator=generator)
        q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
        want_q = apply_rotary(q.view(2, 5, heads, dim).transpose(1, 2), angles.cos_heads,
                              angles.sin_heads, layout)
        want_k = apply_rotary(k.view(2, 5, kv_heads, dim).transpose(1, 2), angles.cos_heads,
                              angles.sin_heads, layout)
        rotated = qkv.to(dtype)
        kernels.rotary_qkv_(rotated, angles.cos, angles.sin, heads, kv_heads, dim,
                            layout == "interleaved")
        got_q, got_k, got_v = rotated.split((heads * dim, kv_heads * dim, kv_heads * dim), -1)
        assert rel_error(got_q.view(2, 5, heads, dim).transpose(1, 2), want_q.double()) < \
            TOLERANCE[dtype]
        assert rel_error(got_k.view(2, 5, kv_heads, dim).transpose(1, 2), want_k.double()) < \
            TOLERANCE[dtype]
        assert torch.equal(got_v, v.to(dtype))  # values are not rotated
