"""The streaming-session engine against one full-sequence forward pass, on tiny models."""

import copy
import random

import pytest
import torch
from conftest import relative_error
from dense_kv_cache import DenseKVCache

from microturn import MicroturnError
from microturn.checkpoint.loader import Checkpoint, LoadedModel
from microturn.engine import paged_attention
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.model import CausalAttention, Decoder, ModelConfig
from microturn.model.decoder import init_random_weights
from microturn.sampling import SamplingParams
from microturn.sequence.timeline import Timeline

TOLERANCE = 1e-5


def tiny_loaded(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32,
                **overrides) -> LoadedModel:
    fields = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=48, rms_norm_eps=1e-6,
                  rope_theta=10000.0, rope_layout="interleaved", max_position=4096,
                  tie_word_embeddings=True)
    config = ModelConfig(**(fields | overrides))
    model = init_random_weights(Decoder(config), seed=seed).eval().requires_grad_(False)
    return LoadedModel.from_checkpoint(Checkpoint(model.to(dtype), copy.deepcopy(tokenizer),
                                                  config, path=None, load_seconds=0.0))


@pytest.fixture
def tiny(smollm_fp32):
    return tiny_loaded(smollm_fp32.tokenizer)


def full_forward_logits(loaded: LoadedModel, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0),
                            CausalAttention())[0]


def random_slice(rng: random.Random, vocab: int) -> list[int]:
    return [] if rng.random() < 0.25 else [rng.randrange(200, vocab) for _ in
                                           range(rng.randint(1, 12))]


def stream(engine: Engine, rng: random.Random, sessions: int, ticks: int, churn: bool):
    """Random slices for `sessions` live sessions; with churn, sessions close and new ones open
    at random ticks. Returns every session's (fed tokens, logits) when it closed or at the end."""
    vocab = engine.loaded.config.vocab_size - 2
    live = [engine.open(SessionParams(max_output_tokens=rng.randint(1, 4)))
            for _ in range(sessions)]
    finished = []
    for _ in range(ticks):
        for sid in live:
            engine.append(sid, random_slice(rng, vocab))
        engine.tick()
        if churn and rng.random() < 0.3:
            sid = live.pop(rng.randrange(len(live)))
            s = engine.sessions[sid]
            finished.append((list(s.fed), torch.cat(s.logits)))
            engine.close(sid)
            live.append(engine.open(SessionParams(max_output_tokens=rng.randint(1, 4))))
    for sid in live:
        s = engine.sessions[sid]
        if s.fed:
            finished.append((list(s.fed), torch.cat(s.logits)))
    return finished


# block 16: keys stored as the kernel's 16-slot panels; block 8: rows, gathered per pass
@pytest.mark.parametrize("sessions,churn,block", [(1, False, 16), (3, False, 8), (16, False, 16),
                                                  (3, True, 16), (16, True, 8)])
def test_streamed_logits_match_full_forward(tiny, kernel_choice, sessions, churn, block):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=64, block_size=block, keep_logits=True))
    rng = random.Random(sessions * 7 + churn)
    results = stream(engine, rng, sessions, ticks=12, churn=churn)
    assert len(results) >= sessions
    for fed, logits in results:
        assert relative_error(logits, full_forward_logits(tiny, fed)) < TOLERANCE


def test_negative_control_off_by_one_kv_write_fails(tiny, monkeypatch):
    real_build = paged_attention.PagedBatch.build

    def shifted(pool, segments):  # every K/V lands one slot later than it should
        batch = real_build(pool, segments)
        return paged_attention.PagedBatch(batch.rows, batch.keys, batch.write_blocks,
                                          (batch.write_offsets + 1) % pool.block_size,
                                          batch.starts)

    monkeypatch.setattr(paged_attention.PagedBatch, "build", staticmethod(shifted))
    engine = Engine(tiny, EngineConfig(kv_budget_mb=64, block_size=8, keep_logits=True))
    (fed, logits), *_ = stream(engine, random.Random(1), 3, ticks=6, churn=False)
    assert relative_error(logits, full_forward_logits(tiny, fed)) > TOLERANCE


def test_timeline_round_trip(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=16))
    tokenizer = tiny.tokenizer
    sid = engine.open(SessionParams(max_output_tokens=3))
    for text in ["Hello", "", "how are you", ""]:
        engine.append(sid, tokenizer.encode(text))
        engine.tick()
    session = engine.sessions[sid]
    exported = engine.close(sid)
    rebuilt = Timeline.from_export(exported)
    assert rebuilt.tokens() == session.fed + session.unfed  # exactly what the model saw
    m = engine.markers
    assert rebuilt.tokens()[:1] == [m.input_start]
    assert [m.input_start, m.silence, m.output_start] == rebuilt.input_tokens(rebuilt.turns[1])
    assert set(exported["markers"]["added"]) == {"input_start", "output_start"}
    assert tokenizer.decode([m.end_of_slice], skip_special=False) == "<|im_end|>"


def test_kv_memory_never_moves_and_blocks_return(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=16, block_size=4))
    pool = engine.pool
    pointers = (pool.k.data_ptr(), pool.v.data_ptr(), pool.block_table.data_ptr())
    sid = engine.open(SessionParams(max_output_tokens=2))
    tables = []
    for _ in range(10):
        engine.append(sid, [300, 301, 302])
        engine.tick()
        s = engine.sessions[sid]
        tables.append(pool.block_table[s.row, :s.num_blocks].tolist())
    for before, after in zip(tables, tables[1:], strict=False):
        assert after[:len(before)] == before  # a block table only ever grows at its end
    assert (pool.k.data_ptr(), pool.v.data_ptr(), pool.block_table.data_ptr()) == pointers
    used = pool.blocks_in_use
    assert used == len(tables[-1]) > 0
    engine.close(sid)
    assert pool.blocks_in_use == 0


def test_metadata_per_tick_is_o_new_tokens(tiny, monkeypatch):
    sizes = []
    real_build = paged_attention.PagedBatch.build

    def counting(pool, segments):
        batch = real_build(pool, segments)
        sizes.append(batch.rows.numel())
        return batch

    monkeypatch.setattr(paged_attention.PagedBatch, "build", staticmethod(counting))
    engine = Engine(tiny, EngineConfig(kv_budget_mb=16))
    sid = engine.open(SessionParams(max_output_tokens=2, force_output=True))
    for _ in range(30):
        engine.append(sid, [400, 401, 402, 403])
        engine.tick()
    # every input step is 1 carried token + <in> + 4 + <out>, every decode step 1 token,
    # however long the history has become
    assert sizes[0] == 6 and set(sizes[2::2]) == {7} and set(sizes[1::2]) == {1}


def test_pool_full_refuses_new_sessions_and_spares_others(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=1, block_size=64))
    assert engine.pool.num_blocks >= 2
    first = engine.open(SessionParams(max_output_tokens=1))
    engine.append(first, [500] * 10)
    engine.tick()
    while engine.pool.free_blocks:
        engine.pool.grow(engine.sessions[first].row, engine.sessions[first].num_blocks)
        engine.sessions[first].num_blocks += 1
    with pytest.raises(MicroturnError, match="kv pool full"):
        engine.open()
    engine.close(first)
    assert engine.open() > 0  # blocks came back at once


def test_same_seed_same_output_whatever_the_batch(tiny):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, seed=11)

    def run(neighbours: int) -> list[int]:
        engine = Engine(copy.deepcopy(tiny), EngineConfig(kv_budget_mb=16))
        sid = engine.open(SessionParams(max_output_tokens=4, sampling=sampling))
        others = [engine.open(SessionParams(max_output_tokens=4,
                                            sampling=SamplingParams(temperature=1.0, seed=i)))
                  for i in range(neighbours)]
        for k in range(5):
            engine.append(sid, [600 + k, 601 + k])
            for o in others:
                engine.append(o, [700 + k])
            engine.tick()
        return engine.sessions[sid].fed

    alone = run(0)
    assert run(3) == alone
    assert len(set(alone)) > 5


def test_bad_input_names_the_field(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=16))
    sid = engine.open()
    with pytest.raises(MicroturnError, match="input_ids"):
        engine.append(sid, [10**9])
    with pytest.raises(MicroturnError, match="max_output_tokens"):
        SessionParams(max_output_tokens=0)
    with pytest.raises(MicroturnError, match="no such open session"):
        engine.append(12345, [1])


def dense_replay_logits(loaded: LoadedModel, fed: list[int], evictions) -> torch.Tensor:
    """Reference for the long-session policy: a plain contiguous KV cache fed the same tokens
    at the same positions, dropping the same slots at the same moments."""
    cache = DenseKVCache(loaded.config, batch=1, capacity=len(fed), dtype=torch.float32)
    pieces, done = [], 0
    with torch.inference_mode():
        for at, slot, count in [*evictions, (len(fed), 0, 0)]:
            if at > done:
                pieces.append(loaded.model(torch.tensor([fed[done:at]]),
                                           torch.arange(done, at).unsqueeze(0), cache)[0])
                done = at
            if count:
                keep = torch.cat([torch.arange(slot), torch.arange(slot + count, cache.length)])
                cache.k[:, :, :, :len(keep)] = cache.k[:, :, :, keep].clone()
                cache.v[:, :, :, :len(keep)] = cache.v[:, :, :, keep].clone()
                cache.length = len(keep)
    return torch.cat(pieces)


@pytest.mark.parametrize("sessions,block", [(1, 8), (3, 16)])
def test_long_sessions_evict_and_match_the_dense_reference(tiny, kernel_choice, sessions, block):
    config = EngineConfig(kv_budget_mb=64, block_size=block, context_limit=96, sink_tokens=16,
                          keep_logits=True)
    engine = Engine(tiny, config)
    results = stream(engine, random.Random(5), sessions, ticks=40, churn=False)
    for sid, (fed, logits) in zip(engine.sessions, results, strict=True):
        s = engine.sessions[sid]
        assert len(fed) > 2 * config.context_limit and s.evictions  # the policy really ran
        assert s.length <= config.context_limit
        reference = dense_replay_logits(tiny, fed, [(e.at_token, e.first_slot, e.slots)
                                                    for e in s.evictions])
        assert relative_error(logits, reference) < TOLERANCE
        # the sink survives: the first block of the table is the one it started with
        assert s.evictions[0].first_slot == engine.sink_blocks * config.block_size
    # negative control: a reference that forgets to evict disagrees
    s = engine.sessions[next(iter(engine.sessions))]
    assert relative_error(torch.cat(s.logits), full_forward_logits(tiny, s.fed)) > TOLERANCE


def test_a_session_the_full_pool_cannot_grow_fails_alone(tiny):
    """The pool is full, and session B needs a block it cannot take or free (it has only its
    sink): B alone is marked `kv_pool_full` and takes no step; A and C, in the same tick, get
    exactly what they get in a run where B asked for nothing. Negative control: C fed
    something else does differ."""
    def run(b_grows: bool, c_word: int = 11):
        engine = Engine(tiny, EngineConfig(kv_budget_mb=1, block_size=256, max_sessions=4,
                                           deterministic=True))
        params = SessionParams(max_output_tokens=3)
        b, c, a = engine.open(params), engine.open(params), engine.open(params)
        for sid in (b, c):
            engine.append(sid, [5, 6, 7])
        engine.tick()
        while engine.pool.free_blocks:  # A takes every block left
            engine.append(a, list(range(100, 350)))
            engine.tick()
        engine.append(b, list(range(400, 700)) if b_grows else [])
        engine.append(c, [c_word, 12])
        engine.append(a, [13])
        outputs = engine.tick()
        return engine, outputs, (a, b, c)

    engine, outputs, (a, b, c) = run(b_grows=True)
    assert outputs[b].failed == "kv_pool_full" and outputs[a].failed is None
    quiet, quiet_outputs, _ = run(b_grows=False)
    assert quiet_outputs[b].failed is None
    for sid in (a, c):
        assert outputs[sid] == quiet_outputs[sid]
        assert engine.export(sid)["logprobs"] == quiet.export(sid)["logprobs"]
    engine.append(b, [1])  # a failed session takes no more steps; closing it frees its blocks
    assert engine.tick()[b].failed == "kv_pool_full"
    free = len(engine.pool.free_blocks)
    engine.close(b)
    assert len(engine.pool.free_blocks) > free
    other, other_outputs, _ = run(b_grows=True, c_word=99)
    assert other.export(c)["logprobs"] != engine.export(c)["logprobs"]


def test_export_carries_the_policy_logprob_of_every_sampled_token(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=8, block_size=16, deterministic=True))
    sid = engine.open(SessionParams(max_output_tokens=3, sampling=SamplingParams(
        temperature=0.5, top_p=0.8, seed=3)))
    for k in range(4):
        engine.append(sid, [200 + k])
        engine.tick()
    export = engine.close(sid)
    policy, model = export["policy_logprobs"], export["logprobs"]
    sampled = [i for i, v in enumerate(policy) if v is not None]
    assert sampled and sampled == [i for i, v in enumerate(model) if v is not None]
    assert all(policy[i] <= 0.0 for i in sampled)
    assert any(abs(policy[i] - model[i]) > 1e-3 for i in sampled)  # two different numbers
