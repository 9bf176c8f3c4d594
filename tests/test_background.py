"""The interaction / background split: the ask and result segments, the tools, the worker's
scheduling, cancellation, timeouts and errors, and the trainer replaying a session with a
background result bit for bit."""

import threading
import time

import pytest
import torch
from test_engine import tiny_loaded

from microturn.background.grounding import ground, ground_numbers
from microturn.background.lane import BackgroundLane
from microturn.background.tools import Tool, Tools, arithmetic, calculate
from microturn.background.worker import MODEL, BackgroundWorker, WorkerConfig, answer_steps
from microturn.checkpoint.loader import load_tokenizer
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.errors import MicroturnError
from microturn.eval.metrics import score
from microturn.generate import generate_tokens
from microturn.sampling import SamplingParams
from microturn.sequence.segments import AskReader, result_segment, result_text
from microturn.sequence.timeline import MicroTurn, Timeline
from microturn.train import verify_alignment


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_asks_are_taken_out_of_speech_even_across_slices():
    reader = AskReader()
    slices = [" Let me", " check. <as", "k> what is", " 4,817 times", " 23? </ask> Hmm", " ok"]
    said = [reader.push(s) for s in slices]
    assert "".join(s for s, _ in said) == " Let me check.  Hmm ok"
    assert [q for _, qs in said for q in qs] == ["what is 4,817 times 23?"]
    assert said[4][1] == ["what is 4,817 times 23?"]  # given out when it closes, not before
    assert AskReader().push(" I ask you <b>this</b>") == (" I ask you <b>this</b>", [])


def test_result_segment_round_trips_and_is_cut_to_its_limit(tokenizer):
    ids = result_segment(tokenizer, "4,817 times 23 is 110,791.")
    assert result_text(tokenizer, ids) == "4,817 times 23 is 110,791."
    long = result_segment(tokenizer, "word " * 500, limit=24)
    assert len(long) <= 24 and tokenizer.decode(long).strip().endswith("</result>")


def test_the_calculator_reads_spoken_arithmetic():
    assert calculate("what is 4,817 times 23?") == "4,817 times 23 is 110,791."
    assert calculate("Add 3 to 10, what do you get?") == "3 plus 10 is 13."
    assert calculate("subtract 5 from 12") == "12 minus 5 is 7."
    assert calculate("what's 7 divided by 2") == "7 divided by 2 is 3.5."
    assert arithmetic("what is the capital of France?") is None
    with pytest.raises(ValueError, match="divides by zero"):
        calculate("what is 12 divided by 0")
    with pytest.raises(ValueError, match="too large"):
        calculate("2 to the power of 1000")


def test_an_asks_numbers_are_read_against_what_the_user_said():
    heard = "hey so what is 91,333 times 636 and also 4,817 plus 2"
    assert ground_numbers("calculator: 9,1333 times 636", heard) == "calculator: 91333 times 636"
    assert ground_numbers("91383 times 663", heard) == "91333 times 636"  # a digit, a swap
    assert ground_numbers("4871 plus 2", heard) == "4817 plus 2"
    # far from anything said, too short to tell, or nothing said: left as written
    assert ground_numbers("5000 times 7", heard) == "5000 times 7"
    assert ground_numbers("17 plus 3", "21 plus 5") == "17 plus 3"
    assert ground_numbers("calculator: 9,1333 times 636", "") == "calculator: 9,1333 times 636"


def test_an_ask_no_tool_takes_goes_where_the_users_last_question_does():
    tools = Tools()
    heard = "Could you figure out 1,558 added to 694 for me? I will look for my glasses."
    garbled = "Can you help me figure out what I'm missing in my life?"
    assert ground(garbled, heard, tools) == ("calculator: Could you figure out 1,558 added to "
                                             "694 for me?")
    assert ground("what time is it", heard, tools) == "what time is it"  # a tool takes it
    assert ground(garbled, "tell me about dragons", tools) == garbled  # nothing to go by


def test_the_calculator_finds_the_sum_in_a_slipped_sentence():
    assert arithmetic("What is 6,279 multiplied 257?") == "6279 * 257"
    assert arithmetic("2165 plus 244 adds up to 244?") == "2165 + 244"
    assert arithmetic("9042 plus 39 is added to?") == "9042 + 39"
    assert arithmetic("what is the time") is None and arithmetic("3 +") is None


def test_a_lane_grounds_its_asks_in_the_input_it_heard(tokenizer):
    worker = BackgroundWorker()
    lane = BackgroundLane(worker, "s", tokenizer, delay=0)
    lane.listen("what is 4,817")
    lane.listen("times 23?")
    _, jobs = lane.heard("One moment. <ask> calculator: 4871 times 23 </ask>")
    assert jobs[0].query == "4817 times 23"
    ids, job = lane.next_result()
    assert "110,791" in job.result
    control = BackgroundLane(worker, "t", tokenizer, delay=0)  # heard nothing: as written
    _, jobs = control.heard("<ask> calculator: 4871 times 23 </ask>")
    assert jobs[0].query == "4871 times 23"
    worker.close()


def test_routing_prefix_auto_and_registered_tools():
    tools = Tools()
    tools.register(Tool("weather", lambda q: "Sunny.", lambda q: "weather" in q.lower()))
    assert tools.route("what is 9 x 8")[0].name == "calculator"
    assert tools.route("what time is it?")[0].name == "clock"
    assert tools.route("How is the weather in Oslo?")[0].name == "weather"
    assert tools.route("weather: Oslo") == (tools.route("weather: Oslo")[0], "Oslo")
    assert tools.route("who wrote Hamlet?")[0] is None
    with pytest.raises(MicroturnError, match="already registered"):
        tools.register(Tool("clock", str))
    with pytest.raises(MicroturnError, match="tool name"):
        Tool("Bad Name", str)


def wait_ready(worker: BackgroundWorker, session, timeout: float = 5.0):
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if ready := worker.ready(session):
            return ready
        time.sleep(0.01)
    return []


def test_worker_answers_errors_times_out_and_cancels():
    release = threading.Event()
    tools = Tools()
    tools.register(Tool("slow", lambda q: release.wait(5) and "late"))
    tools.register(Tool("broken", lambda q: 1 / 0))
    worker = BackgroundWorker(tools, config=WorkerConfig(timeout_s=0.3))
    try:
        job = worker.ask("a", "what is 4,817 times 23?")
        (done,) = wait_ready(worker, "a")
        assert done is job and done.state == "done" and done.result.endswith("110,791.")
        assert worker.ready("a") == []  # given out once
        worker.ask("a", "broken: x")
        (err,) = wait_ready(worker, "a")
        assert err.state == "error" and err.result.startswith("Sorry, division by zero")
        worker.ask("a", "who wrote Hamlet?")
        (nothing,) = wait_ready(worker, "a")
        assert nothing.tool == MODEL and nothing.state == "error"  # no background model
        slow = worker.ask("a", "slow: x")
        (late,) = wait_ready(worker, "a")
        assert late is slow and late.state == "timeout" and "too long" in late.result
        kept = worker.ask("b", "slow: y")
        cancelled = worker.ask("a", "slow: z")
        assert worker.cancel("a") == [cancelled] and cancelled.state == "cancelled"
        release.set()
        (other,) = wait_ready(worker, "b")  # another session's job is untouched
        assert other is kept and other.state == "done"
        assert worker.ready("a") == [] and all(j.session != "a" for j in worker.jobs.values())
    finally:
        release.set()
        worker.close()


def test_background_model_steps_only_in_the_time_left(tokenizer):
    loaded = tiny_loaded(tokenizer)
    worker = BackgroundWorker(Tools([]), loaded, WorkerConfig(answer_tokens=6))
    try:
        job = worker.ask("s", "who wrote Hamlet?")
        assert job.tool == MODEL
        assert worker.use_idle(time.perf_counter()) == 0  # no time left: no step
        steps = 0
        while job.state == "running" and steps < 50:
            steps += worker.use_idle(time.perf_counter() + 1.0)
        assert job.state == "done" and 1 <= len(job.tokens) <= 6
        assert worker.ready("s") == [job]
    finally:
        worker.close()


def stream_with_result(tokenizer, loaded) -> tuple[dict, Engine, int]:
    engine = Engine(loaded, EngineConfig(kv_budget_mb=16, keep_logits=True, deterministic=True))
    sid = engine.open(SessionParams(max_output_tokens=3,
                                    sampling=SamplingParams(temperature=0.9, seed=3)))
    worker = BackgroundWorker()
    lane = BackgroundLane(worker, sid, tokenizer)
    lane.heard(" <ask> what is 4,817 times 23? </ask>")  # as if the model had asked
    time.sleep(0.05)
    landed = None
    for k, text in enumerate(["What is 4,817 times 23?", "", "", ""]):
        ids, job = lane.next_result()
        landed = landed if job is None else k
        engine.append(sid, tokenizer.encode(" " + text) if text else [], result_ids=ids)
        engine.tick()
    worker.close()
    return engine.close(sid), engine, landed


def test_a_result_segment_is_fed_exported_and_replayed_bitwise(tokenizer):
    loaded = tiny_loaded(tokenizer)
    export, engine, landed = stream_with_result(tokenizer, loaded)
    assert landed is not None
    turn = export["turns"][landed]
    assert result_text(tokenizer, turn["result_ids"]) == "4,817 times 23 is 110,791."
    timeline = Timeline.from_export(export)
    fed = timeline.input_tokens(timeline.turns[landed])
    assert fed[-1 - len(turn["result_ids"]):-1] == turn["result_ids"]
    report = verify_alignment(export, loaded.model)
    assert report.aligned and report.compared > 0
    # negative control: another result of the same length, and the replay differs
    other = result_segment(tokenizer, "4,817 times 23 is 110,792.")
    assert len(other) == len(turn["result_ids"]) and other != turn["result_ids"]
    turn["result_ids"] = other
    assert not verify_alignment(export, loaded.model).aligned


def test_bad_result_ids_are_refused_by_name(tokenizer):
    engine = Engine(tiny_loaded(tokenizer), EngineConfig(kv_budget_mb=16))
    sid = engine.open()
    with pytest.raises(MicroturnError, match="result_ids: at most 96"):
        engine.append(sid, [], result_ids=[1] * 97)
    with pytest.raises(MicroturnError, match="result_ids"):
        engine.append(sid, [], result_ids=[-1])
    engine.append(sid, [])  # the session still takes slices
    assert engine.tick()[sid].failed is None


def test_timeline_places_the_result_after_the_text(tokenizer):
    loaded = tiny_loaded(tokenizer)
    ids = result_segment(tokenizer, "It is 12:00.")
    timeline = Timeline(loaded.markers, [MicroTurn(0, [5, 6], result_ids=ids)])
    m = loaded.markers
    assert timeline.input_tokens(timeline.turns[0]) == [m.input_start, 5, 6, *ids,
                                                         m.output_start]
    again = Timeline.from_export(timeline.export())
    assert again.tokens() == timeline.tokens()


def test_background_answer_in_short_steps_equals_plain_generation(tokenizer):
    """The prompt fed a few tokens a step (so each step fits a gap between ticks) gives the
    tokens that one whole-prompt prefill gives."""
    loaded = tiny_loaded(tokenizer, dtype=torch.float32)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote Hamlet?"}]))
    plain = list(generate_tokens(loaded, prompt, 12, SamplingParams(temperature=0.0),
                                 stop_at_eos=False))
    steps = list(answer_steps(loaded, prompt, 12, chunk=5))
    assert steps.count(None) == -(-len(prompt) // 5) - 1  # one step per prompt chunk
    assert [t for t in steps if t is not None] == plain


def background_scenarios(should: bool, aside: bool):
    from microturn.eval.generator import generate
    return [sc for sc in generate("heldout", 0, 40, ["background"])
            if sc.expect.delegation.should == should and (sc.expect.hold is not None) == aside]


def delegating(sc, speak_during_aside: bool = False, answer_early: bool = False) -> list[str]:
    """Hand-made outputs: "One moment.", an ask over two slices, the answer once it lands
    (after the aside when there is one)."""
    d, out = sc.expect.delegation, [""] * sc.slices
    question = " ".join(w.text for w in sc.words
                        if (w.end_ms - 1) // sc.slice_ms <= d.question_end)
    out[d.question_end] = " One moment."
    out[d.question_end + 1], out[d.question_end + 2] = " <ask> " + question, " </ask>"
    landed = d.question_end + 2 + 1 + d.result_delay
    at = landed if sc.expect.hold is None else max(landed, sc.expect.turn_end)
    if answer_early:
        at = landed - 1
    out[at], out[at + 1] = f" It is {sc.expect.answer[0][:3]}", sc.expect.answer[0][3:] + "."
    if speak_during_aside:
        out[sc.expect.hold[0] + 1] = " Still working on it."
    return out


def test_background_metrics_and_their_negative_controls():
    sc = background_scenarios(True, aside=True)[0]
    good = score(sc, delegating(sc))
    assert good.passed and good.values["recall"] and good.values["precision"], good.reason
    assert good.values["ack_ms"] is not None and good.values["delivery_ms"] > 0
    assert good.values["barged"] is False
    barged = score(sc, delegating(sc, speak_during_aside=True))
    assert not barged.passed and barged.values["barged"]
    plain = score(sc, [""] * sc.slices)  # never asked
    assert not plain.passed and plain.values["recall"] is False
    quick = background_scenarios(True, aside=False)[0]
    early = score(quick, delegating(quick, answer_early=True))  # said before it could know
    assert not early.passed and early.values["correct"] is False
    known = background_scenarios(False, aside=False)[0]
    answered = [""] * known.slices
    answered[known.expect.turn_end] = f" {known.expect.answer[0]}."
    direct = score(known, answered)
    assert direct.passed and direct.values["precision"] is None
    asked = list(answered)
    asked[known.expect.turn_end + 1] = " <ask> what is it </ask>"
    needless = score(known, asked)
    assert not needless.passed and needless.values["precision"] is False
    assert score(known, [" <ask> x </ask>"] + [""] * (known.slices - 1)).values["delegated"]
