"""CPU kernels against float64 references; bitwise batch invariance; the torch fallback."""

import pytest
import torch

from microturn.kernels import build

kernels = build.load()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable here")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference).abs().max() / reference.abs().max())


def linear(x, w, bias=None):
    return kernels.packed_linear(x, kernels.pack_linear_weight(w), w.shape[0], bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 3072, 576), (3, 576, 1536), (8, 97, 37), (1, 5, 8),
                                      (2, 49152, 576), (100, 960, 576), (7, 17, 3)])
def test_packed_linear_matches_reference(dtype, rows, n, k):
    generator = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    reference = x.double() @ w.double().T + bias.double()
    out = linear(x, w, bias)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert rel_error(out, reference) < TOLERANCE[dtype]
    # negative control: a perturbed weight is caught by the same check
    w[-1] += 1.0
    assert rel_error(linear(x, w, bias), reference) > TOLERANCE[dtype]


# Every linear shape of the default model (SmolLM2-135M: qkv, o, gate/up, down; the 49k-wide
# head separately below), at every batch size from 1 to 512.
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", MODEL_SHAPES)
def test_packed_linear_is_batch_invariant_for_every_batch_size(dtype, n, k):
    generator = torch.Generator().manual_seed(n + k)
    x = (torch.randn(1024, k, generator=generator) * torch.logspace(-3, 3, k)).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    panels = kernels.pack_linear_weight(w)
    full = kernels.packed_linear(x, panels, n, None)
    for rows in range(1, 513):
        at = (rows * 389) % (1024 - rows)  # the row block sits anywhere in the big batch
        part = kernels.packed_linear(x[at:at + rows], panels, n, None)
        assert torch.equal(part, full[at:at + rows]), f"batch of {rows} rows at {at} differs"
    # negative control: torch's own matmul does change a row's bits with the batch here
    if dtype == torch.float32:
        whole = torch.nn.functional.linear(x, w)
        assert any(not torch.equal(torch.nn.functional.linear(x[:rows], w), whole[:rows])
                   for rows in (1, 2, 3, 5, 7, 16, 33))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_head_and_logprobs_are_batch_invariant(dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(64, 576, generator=generator).to(dtype)
    w = (torch.randn(49152, 576, generator=generator) * 0.05).to(dtype)
    # (rows beyond 64 take the same 6-row tiles as rows 32-64: the per-output chain is the same)
    panels = kernels.pack_linear_weight(w)
    full = kernels.packed_linear(x, panels, 49152, None)
    targets = torch.randint(0, 49152, (64,), generator=generator)
    logprobs = kernels.token_logprobs(full, targets)
    reference = full.double().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert float((logprobs.double() - reference).abs().max()) < 1e-4
    for rows in [*range(1, 33), 47, 61, 64]:  # the 49k head: every decode batch to 32, then some
        part = kernels.packed_linear(x[rows:2 * rows] if rows < 32 else x[:rows], panels,
                                     49152, None)
        if rows >= 32:
            assert torch.equal(part, full[:rows])
            continue
        assert torch.equal(part, full[rows:2 * rows])
        assert torch.equal(kernels.token_logprobs(part, targets[rows:2 * rows]),
                           logprobs[rows:2 * rows])


def test_rms_norm_and_rotary_angles_are_batch_invariant():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 576, generator=generator) * 10
    weight = torch.randn(576, generator=generator)
    full = kernels.rms_norm(x, weight, 1e-5)
    positions = torch.arange(5000, 5300)
    inv_freq = 1.0 / (100000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    cos, sin = kernels.rotary_angles(positions, inv_freq)
    x = torch.cat([x, x])  # 600 rows
    full = kernels.rms_norm(x, weight, 1e-5)
    for rows in range(1, 513):  # every batch size of the sweep, anywhere in the batch
        at = (rows * 389) % (600 - rows)
        assert torch.equal(kernels.rms_norm(x[at:at + rows], weight, 1e-5), full[at:at + rows])
    for rows in (1, 2, 7, 64, 129):
        c, s = kernels.rotary_angles(positions[rows:2 * rows], inv_freq)
        assert torch.equal(c, cos[rows:2 * rows]) and torch.equal(s, sin[rows:2 * rows])
    angles = positions.float()[:, None] * inv_freq
    assert float((cos - angles.cos()).abs().max()) < 1e-6


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_in_16_lanes_gives_the_8_lane_bits(dtype):
    # f = 40: columns 0-31 take the 16-lane loop (where the CPU has AVX-512) and 32-39 the
    # 8-lane one; each 8-column slice alone (f = 8) takes the 8-lane loop
    generator = torch.Generator().manual_seed(3)
    gate = torch.randn(3, 40, generator=generator) * 4
    up = torch.randn(3, 40, generator=generator)
    whole = kernels.silu_mul(torch.cat([gate, up], -1).to(dtype))
    for j in range(0, 40, 8):
        part = kernels.silu_mul(torch.cat([gate[:, j:j + 8], up[:, j:j + 8]], -1).to(dtype))
        assert torch.equal(whole[:, j:j + 8], part)
    # negative control: one input's last bit moved changes that output's bits
    nudged = gate.to(dtype).clone()
    nudged.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[1, 5] += 1
    moved = kernels.silu_mul(torch.cat([nudged, up.to(dtype)], -1))
    assert not torch.equal(moved[1, 5], whole[1, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_in_16_lanes_gives_the_scalar_bits(dtype, interleaved):
    # a 32-wide head takes the 16-lane loop (where the CPU has AVX-512); the same pairs cut into
    # 8-wide heads of 4 pairs each take the scalar loop
    generator = torch.Generator().manual_seed(5)
    tokens, d = 3, 32
    x = (torch.randn(tokens, d, generator=generator) * 3).to(dtype)
    angles = torch.rand(tokens, d // 2, generator=generator) * 6
    cos, sin = angles.cos(), angles.sin()
    whole = x.clone()
    kernels.rotary_qkv_(whole, cos, sin, 1, 0, d, interleaved)
    for p in range(0, d // 2, 4):  # pairs p .. p + 3
        cols = (torch.arange(2 * p, 2 * p + 8) if interleaved
                else torch.cat([torch.arange(p, p + 4), torch.arange(d // 2 + p, d // 2 + p + 4)]))
        part = x[:, cols].contiguous()
        kernels.rotary_qkv_(part, cos[:, p:p + 4].contiguous(), sin[:, p:p + 4].contiguous(), 1, 0,
                            8, interleaved)
        assert torch.equal(whole[:, cols], part)
    # negative controls: one input's last bit moved changes the bits; in fp32, the same
    # rotation with two roundings instead of a fused multiply-add differs somewhere
    moved = x.clone()
    moved.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[1, 2] += 1
    kernels.rotary_qkv_(moved, cos, sin, 1, 0, d, interleaved)
    assert not torch.equal(moved, whole)
    if dtype == torch.float32:
        pairs = (x.view(tokens, d // 2, 2) if interleaved
                 else x.view(tokens, 2, d // 2).transpose(1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        unfused = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        unfused = unfused.flatten(1) if interleaved else unfused.transpose(1, 2).flatten(1)
        assert not torch.equal(unfused, whole)


def paged_case(dtype, block_size, dim, lengths, news, seed):
    """A block pool holding sessions of `lengths` slots (blocks in shuffled order), and the last
    `news[i]` tokens of session i as queries: (pool args, per-token reference in float64)."""
    generator = torch.Generator().manual_seed(seed)
    heads, kv_heads = 9, 3
    per_session = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(per_session), generator=generator).to(torch.int32)
    table = torch.full((len(lengths), max(per_session)), -1, dtype=torch.int32)
    k_rows, v_rows, used = [], [], 0
    blocks, offsets = [], []
    for i, n in enumerate(lengths):
        table[i, :per_session[i]] = order[used:used + per_session[i]]
        used += per_session[i]
        k_rows.append(torch.randn(n, kv_heads, dim, generator=generator))
        v_rows.append(torch.randn(n, kv_heads, dim, generator=generator))
        slots = torch.arange(n)
        blocks.append(table[i, slots // block_size].long())
        offsets.append(slots % block_size)
    panel = block_size % 16 == 0
    # channel-pair panels span gcd(block, 64) slots (KVPool.key_width), the others 16
    width = kernels.key_panel_slots(block_size, dtype == torch.bfloat16
                                    and kernels.dot_attention(dim))
    v_pool = torch.zeros(used, kv_heads, block_size, dim, dtype=dtype)
    k_pool = (torch.zeros(used, kv_heads, block_size // width, dim, width, dtype=dtype) if panel
              else torch.zeros_like(v_pool))
    kernels.paged_write_(k_pool, v_pool, torch.cat(k_rows).to(dtype), torch.cat(v_rows).to(dtype),
                         torch.cat(blocks), torch.cat(offsets))
    q = torch.randn(sum(news), heads, dim, generator=generator).to(dtype)
    rows = torch.cat([torch.full((t,), i, dtype=torch.int32) for i, t in enumerate(news)])
    keys = torch.cat([torch.arange(n - t + 1, n + 1, dtype=torch.int32)
                      for n, t in zip(lengths, news, strict=True)])
    starts = torch.tensor([0] + news, dtype=torch.int32).cumsum(0).to(torch.int32)
    reference = []
    for token in range(len(rows)):
        i, n = int(rows[token]), int(keys[token])
        k = k_rows[i][:n].to(dtype).double().repeat_interleave(heads // kv_heads, 1)
        v = v_rows[i][:n].to(dtype).double().repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("hd,nhd->hn", q[token].double(), k) / dim ** 0.5
        reference.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return (q, k_pool, v_pool, table, rows, keys, starts), torch.stack(reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,dim", [(16, 64), (32, 16), (256, 16), (7, 8), (7, 16)])
def test_paged_attention_across_chunks_and_splits(dtype, block_size, dim):
    """Histories crossing the kernel's 256-slot chunks and 512-slot splits, a 25-token segment
    (75 query rows: two row groups), ragged lengths: against float64, and every token's row
    bitwise equal when it is computed alone (a decode step) or with its segment alone. (Odd
    blocks of 16 channels: the bf16 dot-product kernel's slot pairs straddle blocks.)"""
    lengths, news = [1, 130, 600, 1100, 514], [1, 20, 25, 13, 2]
    args, reference = paged_case(dtype, block_size, dim, lengths, news, seed=block_size + dim)
    q, k_pool, v_pool, table, rows, keys, starts = args
    out = kernels.paged_attention(*args)
    assert rel_error(out, reference) < TOLERANCE[dtype] * 10
    for token in range(len(rows)):  # alone: one token, one segment
        alone = kernels.paged_attention(q[token:token + 1], k_pool, v_pool, table,
                                        rows[token:token + 1], keys[token:token + 1],
                                        torch.tensor([0, 1], dtype=torch.int32))
        assert torch.equal(alone[0], out[token]), f"token {token} differs alone"
    first, end = int(starts[2]), int(starts[3])  # the 25-token segment without the others
    segment = kernels.paged_attention(q[first:end], k_pool, v_pool, table, rows[first:end],
                                      keys[first:end], torch.tensor([0, end - first],
                                                                    dtype=torch.int32))
    assert torch.equal(segment, out[first:end])
    # negative control: one visible value changed moves the result past the tolerance
    v_pool[table[3, 1]] += 3.0
    assert rel_error(kernels.paged_attention(*args), reference) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,dim", [(16, 64), (256, 64), (32, 16)])
def test_attention_in_16_lane_vectors_gives_the_8_lane_bits(dtype, block_size, dim):
    """Where the CPU has AVX-512, attention runs in 16-lane vectors: decode steps reading K/V
    in place (few rows) and segments widening them (25 tokens: 75 rows). It must give the
    8-lane code's bits, or a result would depend on which CPU computed it."""
    lengths, news = [1, 130, 600, 1100, 300], [1, 1, 3, 2, 25]
    args, reference = paged_case(dtype, block_size, dim, lengths, news, seed=dim)
    if dtype == torch.bfloat16 and kernels.dot_attention(dim):
        pytest.skip("bf16 attention takes the bf16 dot-product kernel here (one width)")
    if not kernels.wide_attention(False):
        kernels.wide_attention(True)
        pytest.skip("this CPU has no AVX-512: the 8-lane code is the only one")
    try:
        narrow = kernels.paged_attention(*args)
    finally:
        kernels.wide_attention(True)
    wide = kernels.paged_attention(*args)
    assert rel_error(wide, reference) < TOLERANCE[dtype] * 10
    assert torch.equal(wide, narrow)
    # negative control: one visible key nudged by ~1e-3 of itself (one bf16 step) changes bits
    q, k_pool, v_pool, table, rows, keys, starts = args
    key = k_pool[table[2, 0], 1, 0, 3]
    if dtype == torch.bfloat16:
        key.view(torch.int16)[5] += 1
    else:
        key.view(torch.int32)[5] += 1 << 13
    assert not torch.equal(kernels.paged_attention(*args), wide)


def test_bf16_attention_keys_are_channel_pairs_where_the_cpu_has_bf16_dot_products():
    """The pool's key panels hold what the attention kernel multiplies: channel pairs
    [dim/2, W, 2] (W = gcd(block, 64) slots) for the bf16 dot-product kernel, slots j and
    8 + j per word for the widening one; KVPool.keys() reads either back in slot order."""
    from microturn.engine.kv_pool import KVPool
    from microturn.model.config import ModelConfig

    config = ModelConfig(vocab_size=8, hidden_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=64, intermediate_size=8, rms_norm_eps=1e-6,
                         rope_theta=10000.0, rope_layout="half", max_position=64,
                         tie_word_embeddings=True)
    pool = KVPool(config, 1 << 20, 32, 1, 4, torch.bfloat16)
    assert pool.pair_channels == kernels.dot_attention(64) == kernels.cpu_has_bf16_dot()
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(40, 1, 64, generator=generator).bfloat16()
    v = torch.randn(40, 1, 64, generator=generator).bfloat16()
    slots = torch.arange(40)
    blocks, offsets = torch.tensor([2, 0])[slots // 32], slots % 32
    pool.write(0, blocks, offsets, k, v)
    if pool.pair_channels:  # one 32-slot panel: slot 19, channels 10 and 11 are word 5 * 32 + 19
        assert pool.key_width == 32 and pool.k.shape[3:] == (1, 64, 32)
        panel = pool.k[0, 2, 0, 0]
        assert torch.equal(panel.flatten()[2 * (5 * 32 + 19):][:2], k[19, 0, 10:12])
    else:  # block 2's slots 16..31 as [dim, 16]: slot 16 + 3 in column 2 * 3 of every row
        panel = pool.k[0, 2, 0, 1]
        assert torch.equal(panel[:, 6], k[16 + 3, 0])
    keys = pool.keys(0, torch.tensor([2, 0]))
    assert torch.equal(keys[0, 0], k[:32, 0]) and torch.equal(keys[1, 0, :8], k[32:, 0])


def test_bf16_linear_takes_the_cpus_bf16_dot_product_where_there_is_one():
    """bf16 weights are packed for vdpbf16ps on CPUs with AVX512-BF16 ([groups, K/2, 128]) and
    for the widening kernel elsewhere ([groups, K, 64]); fp32 weights always for the latter.
    Either way the result is the bf16 product summed in fp32 (the reference test above)."""
    w = torch.randn(100, 37)
    dot = kernels.cpu_has_bf16_dot()
    assert kernels.pack_linear_weight(w).shape == (2, 37, 64)
    assert kernels.pack_linear_weight(w.bfloat16()).shape == ((2, 19, 128) if dot else (2, 37, 64))
