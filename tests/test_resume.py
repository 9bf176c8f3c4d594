"""Portable sessions: a session opened from another's export is fed its history again (a
chunk a tick, evictions replayed where they happened) and then goes on bit for bit as the
original did, in deterministic mode, among other sessions; with a changed history it does
not (negative control)."""

import copy
import random

import pytest
from test_engine import tiny_loaded

from microturn.checkpoint.loader import load_tokenizer
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams, params_from_export
from microturn.errors import MicroturnError
from microturn.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(load_tokenizer())


def slices(n: int, seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 5000) for _ in range(rng.randint(0, 6))] for _ in range(n)]


def config(**changes) -> EngineConfig:
    return EngineConfig(**({"kv_budget_mb": 16, "block_size": 16, "deterministic": True,
                            "resume_chunk": 32} | changes))


PARAMS = SessionParams(max_output_tokens=3,
                       sampling=SamplingParams(temperature=0.9, top_p=0.95, seed=11))


def stream(engine: Engine, sid: int, inputs: list[list[int]], others: int = 0,
           rng: random.Random | None = None) -> list[list[int]]:
    """Feed one slice a tick (other sessions alongside); the outputs of `sid`'s slices."""
    rng = rng or random.Random(0)
    extra = [engine.open(SessionParams(max_output_tokens=2)) for _ in range(others)]
    out = []
    for ids in inputs:
        engine.append(sid, ids)
        for o in extra:
            engine.append(o, [rng.randrange(3, 5000)])
        result = engine.tick()
        while sid not in result:  # still feeding its history back: the slice waits
            result = engine.tick()
        out.append(result[sid].output_ids)
    for o in extra:
        engine.close(o)
    return out


def tail(export: dict, after: int) -> tuple[list, list]:
    """The tokens and log-probabilities of an export from sequence index `after` on."""
    from microturn.sequence.timeline import Timeline
    tokens = Timeline.from_export(export).tokens()
    return tokens[after:], export["logprobs"][after:]


@pytest.mark.parametrize("context_limit", [None, 96])  # 96: evictions before and after
def test_a_resumed_session_goes_on_bitwise(loaded, context_limit):
    inputs = slices(40)
    original = Engine(loaded, config(context_limit=context_limit))
    sid = original.open(PARAMS)
    stream(original, sid, inputs[:25])
    midway = original.export(sid)
    stream(original, sid, inputs[25:])
    whole = original.close(sid)
    if context_limit:
        assert midway["evictions"] and len(whole["evictions"]) > len(midway["evictions"])

    elsewhere = Engine(loaded, config(context_limit=context_limit))  # another replica
    busy = elsewhere.open(SessionParams(max_output_tokens=2))
    stream(elsewhere, busy, slices(5, seed=9))
    resumed = elsewhere.open(params_from_export(midway), from_export=midway)
    stream(elsewhere, resumed, inputs[25:], others=2, rng=random.Random(3))
    again = elsewhere.close(resumed)
    n = len(midway["logprobs"])
    assert tail(again, n) == tail(whole, n) and len(again["logprobs"]) == len(whole["logprobs"])
    assert again["logprobs"][:n] == midway["logprobs"]
    assert again["evictions"] == whole["evictions"]

    changed = copy.deepcopy(midway)  # negative control: one history token differs
    turn = next(t for t in changed["turns"][3:] if t["input_ids"])
    turn["input_ids"][0] += 1
    other = elsewhere.open(params_from_export(changed), from_export=changed)
    stream(elsewhere, other, inputs[25:])
    assert tail(elsewhere.close(other), n) != tail(whole, n)


def test_history_is_fed_a_chunk_a_tick_while_others_are_served(loaded):
    engine = Engine(loaded, config(resume_chunk=16))
    sid = engine.open(PARAMS)
    stream(engine, sid, slices(30))
    export = engine.close(sid)
    history = len(export["logprobs"]) - export["unfed"]
    other = engine.open(SessionParams(max_output_tokens=2))
    resumed = engine.open(params_from_export(export), from_export=export)
    ticks = 0
    while engine.sessions[resumed].resume is not None:
        engine.append(other, [7])
        result = engine.tick()
        assert other in result and resumed not in result  # the others' slices go on
        ticks += 1
    assert ticks == -(-history // 16)
    assert engine.session_info(resumed).sequence_tokens == len(export["logprobs"])


def test_an_export_that_cannot_resume_here_is_refused_by_name(loaded):
    engine = Engine(loaded, config())
    sid = engine.open(PARAMS)
    stream(engine, sid, slices(4))
    export = engine.export(sid)
    with pytest.raises(MicroturnError, match="layout"):
        engine.open(SessionParams(slice_ms=100), from_export=export)
    no_unfed = {k: v for k, v in export.items() if k != "unfed"}
    with pytest.raises(MicroturnError, match="not a resumable session export"):
        engine.open(PARAMS, from_export=no_unfed)
    other = tiny_loaded(load_tokenizer())
    other.markers = type(other.markers)(**{**other.markers.to_dict(), "silence": 1,
                                           "added": (), "digits": ()})
    with pytest.raises(MicroturnError, match="marker tokens"):
        Engine(other, config()).open(PARAMS, from_export=export)
