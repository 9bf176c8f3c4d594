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


@pytest.mark.parametrize("both_lanes", [False, True])
def test_a_streamed_session_feeds_the_clock_and_its_export_replays_it(tokenizer, both_lanes):
    loaded = tiny_loaded(tokenizer)
    loaded.clock, loaded.clock_both_lanes = True, both_lanes
    engine = Engine(loaded, EngineConfig(kv_budget_mb=16))
    sid = engine.open(SessionParams(max_output_tokens=2))
    for text in ["Say yes in two seconds"] + [""] * 12:
        engine.append(sid, tokenizer.encode(text))
        engine.tick()
    session = engine.sessions[sid]
    exported = engine.close(sid)
    rebuilt = Timeline.from_export(exported)
    assert rebuilt.layout.clock and rebuilt.tokens() == session.fed + session.unfed
    assert rebuilt.layout.clock_both_lanes is both_lanes
    spoke = any(rebuilt.spoke(t) for t in rebuilt.turns[:-1])
    if not both_lanes or not spoke:
        assert [clock_reading(rebuilt, t) for t in rebuilt.turns if clock_reading(rebuilt, t)] \
            == ["1", "2"]
    # negative control: without the clock (or, where the model spoke, with the text lane's
    # clock in place of both lanes') the replay differs
    exported["layout"].pop("clock_both_lanes" if both_lanes and spoke else "clock")
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


def test_a_both_lanes_clock_starts_again_after_the_model_speaks(loaded, tokenizer):
    m, said = loaded.markers, tokenizer.encode(" one.")
    silent = [m.silence]
    outputs = [silent] * 5 + [said] + [silent] * 10  # it speaks at slice 5 (1 s of quiet)
    turns = lambda: [MicroTurn(k, [], list(out)) for k, out in enumerate(outputs)]  # noqa: E731
    both = Timeline(m, turns(), SliceLayout(200, clock=True, clock_both_lanes=True))
    readings = [clock_reading(both, t) for t in both.turns]
    assert readings == ["", "", "", "", "1", "", "", "", "", "", "1", "", "", "", "", "2"]
    assert Timeline.from_export(both.export()).tokens() == both.tokens()
    exported = both.export()
    exported["layout"].pop("clock_both_lanes")  # negative control: the text lane's clock
    text_only = Timeline.from_export(exported)
    assert [clock_reading(text_only, t) for t in text_only.turns] == \
        ["", "", "", "", "1", "", "", "", "", "2", "", "", "", "", "3", ""]


def test_on_a_both_lanes_clock_a_count_is_one_wait_a_number(tokenizer):
    scenarios = [sc for sc in generate("train", seed=5, per_family=40, families=["time"])
                 if len(sc.expect.events) > 1]
    assert len(scenarios) >= 10
    config = TargetConfig(clock=True, clock_both_lanes=True)
    for sc in scenarios:
        target = build_target(sc, None, tokenizer, config)
        assert score(sc, list(target.outputs)).passed, sc.note
        spoken = [k for k, out in enumerate(target.outputs) if out]
        assert len(spoken) == len(sc.expect.events)  # the numbers, and no ack
        interval = int(sc.note.split("+")[1].split("s")[0])  # "speak at +3s, +6s, ..."
        # every number after the first is said when the both-lanes clock reads the interval:
        # exactly `interval` seconds of quiet since the number before
        gaps = [b - a for a, b in zip(spoken, spoken[1:], strict=False)]
        assert all(g * sc.slice_ms == interval * 1000 for g in gaps), (sc.note, spoken)
    text_clock = build_target(scenarios[0], None, tokenizer, TargetConfig(clock=True))
    assert [o for o in text_clock.outputs if o][0] == "Okay."  # negative control: acked


def test_the_adapter_carries_the_both_lanes_clock(loaded, tmp_path):
    model = copy.deepcopy(loaded.model)
    add_lora(model, LoRAConfig(rank=2))
    for both in (True, False):
        path = tmp_path / f"{both}.safetensors"
        save_adapter(path, model, LoRAConfig(rank=2),
                     metadata={"clock": "true", "clock_both_lanes": str(both).lower()})
        served = copy.deepcopy(loaded)
        apply_adapter(served, path)
        engine = Engine(served, EngineConfig(kv_budget_mb=8))
        assert engine.layout(engine.open()).clock_both_lanes is both
