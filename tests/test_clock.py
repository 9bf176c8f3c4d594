"""The quiet clock: silent input slices tell the whole seconds since text last arrived, the
same in a hand-built timeline, a streamed engine session, its export and the training
targets; the adapter that was trained with it turns it on where it is served."""

import copy

import pytest
from test_engine import tiny_loaded

from microturn.checkpoint.adapter import LoRAConfig, apply_adapter
from microturn.checkpoint.loader import load_tokenizer
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.eval.generator import ACK_SLICES, generate
from microturn.eval.metrics import score
from microturn.sequence.timeline import MicroTurn, SliceLayout, Timeline
from microturn.train.lora import add_lora, save_adapter
from microturn.train.targets import TargetConfig, build_target


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return tiny_loaded(tokenizer)


def clock_reading(timeline: Timeline, turn: MicroTurn) -> str:
    """The digits after <silence> in the turn's input, as text ('' when none)."""
    m = timeline.markers
    ids = timeline.input_tokens(turn)
    digits = ids[2:-1] if ids[1] == m.silence else []
    return "".join(str(m.digits.index(t)) for t in digits)


def test_silent_slices_tell_the_seconds_of_quiet_and_text_resets_them(loaded, tokenizer):
    text = tokenizer.encode(" hi")
    inputs = [text] + [[]] * 11 + [text] + [[]] * 6
    timeline = Timeline(loaded.markers, [MicroTurn(k, ids) for k, ids in enumerate(inputs)],
                        SliceLayout(200, clock=True))
    readings = [clock_reading(timeline, t) for t in timeline.turns]
    assert readings == ["", "", "", "", "", "1", "", "", "", "", "2", "", "",
                        "", "", "", "", "1", ""]
    assert len(loaded.markers.number(12)) == 2  # "12" is the tokens "1" "2", as text spells it
    at_300 = Timeline(loaded.markers, [MicroTurn(k, []) for k in range(10)],
                      SliceLayout(300, clock=True))  # 1.2 s, 2.1 s, 3.0 s
    assert [k for k, t in enumerate(at_300.turns) if clock_reading(at_300, t)] == [3, 6, 9]
    plain = Timeline(loaded.markers, copy.deepcopy(timeline.turns), SliceLayout(200))
    assert all(clock_reading(plain, t) == "" for t in plain.turns)  # negative control: off


def test_a_streamed_session_feeds_the_clock_and_its_export_replays_it(tokenizer):
    loaded = tiny_loaded(tokenizer)
    loaded.clock = True
    engine = Engine(loaded, EngineConfig(kv_budget_mb=16))
    sid = engine.open(SessionParams(max_output_tokens=2))
    for text in ["Say yes in two seconds"] + [""] * 12:
        engine.append(sid, tokenizer.encode(text))
        engine.tick()
    session = engine.sessions[sid]
    exported = engine.close(sid)
    rebuilt = Timeline.from_export(exported)
    assert rebuilt.layout.clock and rebuilt.tokens() == session.fed + session.unfed
    assert [clock_reading(rebuilt, t) for t in rebuilt.turns if clock_reading(rebuilt, t)] == \
        ["1", "2"]
    exported["layout"].pop("clock")  # negative control: without it the replay differs
    assert Timeline.from_export(exported).tokens() != session.fed + session.unfed


def test_timed_targets_speak_when_the_clock_reads_the_number(tokenizer):
    scenarios = generate("train", seed=5, per_family=24, families=["time"])
    on_tick = 0
    for sc in scenarios:
        target = build_target(sc, None, tokenizer, TargetConfig(clock=True))
        assert score(sc, list(target.outputs)).passed, sc.note
        timeline = Timeline(None, [MicroTurn(k, [1] if text else [])
                                   for k, text in enumerate(sc.text_slices())],
                            SliceLayout(sc.slice_ms, clock=True))
        spoken = [k for k in target.moments if target.outputs[k]]
        ticks = {k for k, t in enumerate(timeline.turns)
                 if timeline.layout.clock_seconds(t.quiet) is not None}
        assert len(spoken) == len(sc.expect.events)
        on_tick += sum(k in ticks for k in spoken)
        after = sc.expect.quiet_from - ACK_SLICES
        assert ticks & set(target.moments) == {k for k in ticks if k > after}
    events = sum(len(sc.expect.events) for sc in scenarios)
    assert on_tick == events  # every timed word falls on a clock tick, and every tick weighs


def test_the_adapter_carries_the_clock_to_serving(loaded, tmp_path):
    model = copy.deepcopy(loaded.model)
    add_lora(model, LoRAConfig(rank=2))
    for clock in (True, False):
        path = tmp_path / f"{clock}.safetensors"
        save_adapter(path, model, LoRAConfig(rank=2), metadata={"clock": str(clock).lower()})
        served = copy.deepcopy(loaded)
        apply_adapter(served, path)
        assert served.clock is clock
        engine = Engine(served, EngineConfig(kv_budget_mb=8))
        assert engine.layout(engine.open()).clock is clock
