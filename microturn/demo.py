"""`microturn demo`: one session per behaviour, served together in real time.

The sessions are held-out benchmark scenarios (`microturn.eval`): a pause inside a sentence, a
question to answer, being talked over, a timed reminder, a beep in the audio, a colour change
in the video, a sum the model hands to the calculator, and one whose result lands while the
user talks on. Every slice each session gets what arrived in it (words, dMel, frames, a
background result, or the model's own earlier speech where the scenario scripts it), the
engine runs ONE tick for all of them, and the live view prints each session's two lanes and
the tick's latency against the deadline. At the end each session is scored by the
benchmark's own metric.
"""

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from microturn.background.lane import BackgroundLane
from microturn.background.worker import BackgroundWorker
from microturn.checkpoint.shipped import load_interaction_model, resolve_adapter
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.errors import MicroturnError
from microturn.eval.generator import generate
from microturn.eval.metrics import score
from microturn.eval.micro_turn import SlicedMedia, script_ids
from microturn.eval.scenario import Scenario
from microturn.lanes import latency_mark
from microturn.sampling import SamplingParams
from microturn.sequence.media_specs import FrameSpec


@dataclass(frozen=True)
class Show:
    family: str
    longest: int  # slices: short enough to watch
    shows: Callable[[Scenario], bool] = lambda sc: True  # the scenario shows the behaviour


# the reminder is one word at one time ("say X in N seconds"), not a count; the interruption
# asks something (so the reply after it shows); the delegated sum is asked and waited for,
# the talked-on one is a sum whose result lands while the user talks on (it waits for them)
SESSIONS = {
    "pause": Show("pause", 40), "reply": Show("content", 30),
    "interrupt": Show("interruption", 40, lambda sc: bool(sc.expect.answer)),
    "reminder": Show("time", 40, lambda sc: len(sc.expect.events) == 1
                     and bool(sc.expect.events[0].keywords)),
    "beep": Show("cue_audio", 40), "colour": Show("cue_visual", 40),
    "delegate": Show("background", 40, lambda sc: sc.expect.delegation.should
                     and sc.expect.hold is None),
    "talk-on": Show("background", 70, lambda sc: sc.expect.delegation.should
                    and sc.expect.hold is not None)}


@dataclass
class DemoSession:
    name: str
    scenario: Scenario
    handle: int
    media: SlicedMedia
    text: list[str]
    spoken: list[str | None]
    lane: BackgroundLane


def pick(show: Show, slice_ms: int) -> Scenario:
    """The first held-out scenario of the show's family (seeds 0, 1, ...) that fits in its
    length and shows its behaviour."""
    for seed in range(100):
        scenario = generate("heldout", seed, 1, [show.family], slice_ms)[0]
        if scenario.slices <= show.longest and show.shows(scenario):
            return scenario
    raise MicroturnError(f"no {show.family} scenario of at most {show.longest} slices")


def run_demo(args: argparse.Namespace) -> None:
    console = Console(highlight=False, soft_wrap=True)
    with console.status("loading the model"):
        loaded = load_interaction_model(args.model, args.adapter, args.dtype, "cpu")
    engine = Engine(loaded, EngineConfig(kv_budget_mb=args.kv_budget_mb))
    tokenizer, markers, budget = loaded.tokenizer, engine.markers, args.max_output_tokens
    frames = FrameSpec()
    worker = BackgroundWorker()
    sessions = []
    for i, (name, show) in enumerate(SESSIONS.items()):
        sc = pick(show, args.slice_ms)
        params = SessionParams(max_output_tokens=budget, slice_ms=args.slice_ms,
                               sampling=SamplingParams(temperature=args.temperature,
                                                       seed=args.seed + i),
                               audio=sc.has_audio, video=frames if sc.has_video else None)
        handle = engine.open(params)
        sessions.append(DemoSession(name, sc, handle, SlicedMedia(sc, frames), sc.text_slices(),
                                    sc.spoken_slices(), BackgroundLane(worker, handle, tokenizer,
                                                                       sc.result_delay)))
    engine.warm_up(media=True)  # not shown: the first tick loads kernels and packs weights
    adapter = resolve_adapter(args.model, args.adapter)
    adapter = adapter.name if adapter else "none (the base model)"
    console.print(f"[bold]microturn demo[/]: {len(sessions)} sessions, {args.slice_ms} ms "
                  f"slices, up to {budget} output tokens a slice, {args.dtype}, "
                  f"{loaded.path.name}, adapter {adapter}")
    for s in sessions:
        words = " ".join(w.text for w in s.scenario.words)
        console.print(f"  [bold]{s.name:>9}[/]: {escape(words)}  "
                      f"[dim]({escape(s.scenario.note)})[/]")
    turns = max(s.scenario.slices for s in sessions) + args.extra_slices
    outputs = {s.name: [] for s in sessions}
    latencies, misses = [], 0
    next_tick = time.perf_counter()
    for k in range(turns):
        results = {}
        for s in sessions:
            heard = s.text[k] if k < s.scenario.slices else ""
            ids = tokenizer.encode(" " + heard) if heard else []
            spoken = s.spoken[k] if k < s.scenario.slices else None
            scripted = None if spoken is None else script_ids(spoken, tokenizer, markers, budget)
            s.lane.listen(heard)
            result, job = s.lane.next_result()
            results[s.name] = job.result if job else ""
            engine.append(s.handle, ids, s.media.audio(k) if k < s.scenario.slices else None,
                          s.media.frames.get(k, []), scripted, result)
        started = time.perf_counter()
        result = engine.tick()
        latency = time.perf_counter() - started
        latencies.append(latency)
        misses += latency > args.slice_ms / 1e3
        console.print(f"[bold]slice {k:2d}[/] tick {latency_mark(latency * 1e3, args.slice_ms)}")
        for s in sessions:
            said = tokenizer.decode(result[s.handle].output_ids)
            outputs[s.name].append(said)
            speech, asked = s.lane.heard(said)
            heard = s.text[k] if k < s.scenario.slices else ""
            if heard or said.strip() or results[s.name] or _event(s.scenario, k):
                console.print(_row(s, k, heard, speech, results[s.name], asked))
        if not args.fast:
            next_tick += args.slice_ms / 1e3
            time.sleep(max(0.0, next_tick - time.perf_counter()))
    worker.close()
    _summary(console, engine, sessions, outputs, latencies, misses, turns, args)


def _row(s: DemoSession, k: int, heard: str, said: str, result: str = "",
         asked: list = ()) -> str:
    """One session's two lanes in slice k; an ask (not speech) and a result that landed are
    shown beside them."""
    mark = _event(s.scenario, k)
    cell = escape(f"{heard:<30}") if heard else f"[dim]{'· silence ·':<30}[/]"
    own = "[dim](scripted)[/] " if k < s.scenario.slices and s.spoken[k] is not None else ""
    extra = "".join(f" [blue]→ asks the {job.tool}: {escape(job.query)!r}[/]" for job in asked)
    if result:
        extra += f" [blue]← result: {escape(result)!r}[/]"
    return (f"   {s.name:>9} [cyan]in[/] {cell} [magenta]out[/] {own}{escape(repr(said))}"
            + extra + (f" [yellow]{escape(mark)}[/]" if mark else ""))


def _event(sc: Scenario, k: int) -> str:
    e = sc.expect
    marks = {e.turn_end: "← the user is done", e.stop_onset: "← talked over",
             e.keep_talking: "← backchannel"}
    if e.hold is not None and sc.family == "pause":
        marks[e.hold[0]] = "← pause"
    if e.delegation is not None and e.delegation.should:
        marks[e.delegation.question_end] = "← a sum for the calculator"
    for event in e.events:
        marks[event.slice] = f"← now: {'/'.join(event.keywords) or 'anything'}"
    return marks.get(k, "")


def _summary(console, engine, sessions, outputs, latencies, misses, turns, args) -> None:
    console.print("\n[bold]what each session shows[/] (scored by the benchmark's metric):")
    for s in sessions:
        verdict = score(s.scenario, outputs[s.name][:s.scenario.slices])
        colour = "green" if verdict.passed else "red"
        console.print(f"  {s.name:>9} ({s.scenario.family}): [{colour}]"
                      f"{'pass' if verdict.passed else 'fail'}[/] — {escape(verdict.reason)}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = engine.pool_stats()
    ms = sorted(x * 1e3 for x in latencies)
    console.print(
        f"\n[bold]summary[/]: {turns} ticks; tick latency p50 {statistics.median(ms):.0f} ms, "
        f"p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.0f} ms against a {args.slice_ms} ms "
        f"deadline; {misses} deadline misses; KV pool {pool.blocks_in_use}/{pool.blocks_total} "
        f"blocks ({pool.bytes_in_use / 2**20:.1f} MiB of {pool.bytes_total / 2**20:.0f} MiB); "
        f"peak RSS {rss:.0f} MiB")
    exports = {s.name: engine.close(s.handle) for s in sessions}
    if args.export_dir:
        folder = Path(args.export_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, export in exports.items():
            (folder / f"{name}.json").write_text(json.dumps(export))
        console.print(f"exported {len(exports)} sessions to {folder}/ "
                      f"(check one: microturn verify-alignment {folder}/reply.json)")
