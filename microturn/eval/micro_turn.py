"""A model in micro-turn mode: scenarios streamed through the real engine, many sessions a tick.

Each scenario is one session. Every tick, each running session gets its next input slice: the
words that ended in it (tokenized with a leading space), the slice's dMel codes when the
scenario has audio, the frames due when it has video, and, where the scenario scripts the
model's own earlier speech, that speech as the slice's output (fed, not sampled).

Every session has a background lane (`background/lane.py`) with the built-in tools and no
background model: an ask the model makes is answered by a tool, and the result lands a fixed
number of slices later (the scenario's `result_delay`, else the next slice), so a run does not
depend on how fast the tool was.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from microturn.background.lane import BackgroundLane
from microturn.background.worker import BackgroundWorker
from microturn.checkpoint.loader import LoadedModel
from microturn.checkpoint.tokenizer import Tokenizer
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.eval.scenario import Scenario, Transcript, render_audio, render_frames
from microturn.frontend.dmel import dmel
from microturn.frontend.video import frame_to_patches
from microturn.sampling import SamplingParams
from microturn.sequence.markers import MarkerTokens
from microturn.sequence.media_specs import DMelSpec, FrameSpec


@dataclass(frozen=True)
class MicroTurnSettings:
    max_output_tokens: int = 4  # per 200 ms slice
    batch: int = 16  # sessions streamed together (one tick serves all of them)
    temperature: float = 0.0
    seed: int = 0
    kv_budget_mb: int = 1024


def script_ids(text: str, tokenizer: Tokenizer, markers: MarkerTokens, budget: int) -> list[int]:
    """A scripted output slice as the model would emit it: the words, closed by
    <end_of_slice> when they leave room; an empty slice is <silence>."""
    if not text.strip():
        return [markers.silence]
    ids = tokenizer.encode(" " + text.strip())[:budget]
    return ids + [markers.end_of_slice] if len(ids) < budget else ids


class SlicedMedia:
    """A scenario's audio and video cut into the engine's per-slice inputs."""

    def __init__(self, scenario: Scenario, frame_spec: FrameSpec):
        self.frames_per_slice = DMelSpec().frames_per_slice(scenario.slice_ms)
        self.codes = dmel(render_audio(scenario)) if scenario.has_audio else None
        self.frames: dict[int, list[torch.Tensor]] = {}
        for at_ms, frame in render_frames(scenario, frame_spec.fps, frame_spec.height,
                                          frame_spec.width):
            self.frames.setdefault(at_ms // scenario.slice_ms, []).append(
                frame_to_patches(frame, frame_spec))

    def audio(self, k: int) -> torch.Tensor | None:
        if self.codes is None:
            return None
        return self.codes[k * self.frames_per_slice:(k + 1) * self.frames_per_slice].contiguous()


@dataclass
class _Running:
    scenario: Scenario
    handle: int
    media: SlicedMedia
    text: list[str]
    spoken: list[str | None]
    transcript: Transcript
    lane: BackgroundLane
    index: int  # in the caller's list
    k: int = 0  # the next slice


def run_micro_turn(loaded: LoadedModel, scenarios: list[Scenario], system: str,
                   settings: MicroTurnSettings | None = None,
                   progress: Callable[[int], None] | None = None,
                   on_close: Callable[[int, dict], None] | None = None) -> list[Transcript]:
    """Stream every scenario through one engine, up to `settings.batch` sessions in every
    tick: a finished session's place goes to the next scenario at once (as sessions come and
    go on a server). `progress(n)` is called as scenarios finish; `on_close(i, export)` with
    the engine's export of scenario i's session (a scenario may appear several times: each
    is its own session, seeded by its place in the list)."""
    settings = settings or MicroTurnSettings()
    engine = Engine(loaded, EngineConfig(kv_budget_mb=settings.kv_budget_mb))
    tokenizer, markers, budget = loaded.tokenizer, engine.markers, settings.max_output_tokens
    frame_spec = FrameSpec()
    worker = BackgroundWorker()
    waiting = list(reversed(list(enumerate(scenarios))))
    running: list[_Running] = []
    done: dict[int, Transcript] = {}
    while waiting or running:
        while waiting and len(running) < settings.batch:
            i, sc = waiting.pop()
            params = SessionParams(
                max_output_tokens=budget, slice_ms=sc.slice_ms,
                sampling=SamplingParams(temperature=settings.temperature, seed=settings.seed + i),
                audio=sc.has_audio, video=frame_spec if sc.has_video else None)
            handle = engine.open(params)
            running.append(_Running(sc, handle, SlicedMedia(sc, frame_spec),
                                    sc.text_slices(), sc.spoken_slices(),
                                    Transcript(sc.id, system, [], [], []),
                                    BackgroundLane(worker, handle, tokenizer,
                                                   sc.result_delay), i))
        for r in running:
            k, text, spoken = r.k, r.text[r.k], r.spoken[r.k]
            ids = tokenizer.encode(" " + text) if text else []
            scripted = None if spoken is None else script_ids(spoken, tokenizer, markers, budget)
            r.lane.listen(text)
            result, job = r.lane.next_result()
            r.transcript.results.append(job.result if job else "")
            engine.append(r.handle, ids, r.media.audio(k), r.media.frames.get(k, []), scripted,
                          result)
        outputs = engine.tick()
        for r in running:
            out = outputs[r.handle].output_ids
            r.transcript.outputs.append(tokenizer.decode(out))
            r.lane.heard(r.transcript.outputs[-1])
            r.transcript.output_ids.append(list(out))
            r.transcript.scripted.append(r.spoken[r.k] is not None)
            r.k += 1
            if r.k == r.scenario.slices:
                export = engine.close(r.handle)
                r.lane.close()
                done[r.index] = r.transcript
                if on_close:
                    on_close(r.index, export)
                if progress:
                    progress(1)
        running = [r for r in running if r.k < r.scenario.slices]
    worker.close()
    return [done[i] for i in range(len(scenarios))]


@dataclass(frozen=True)
class QuietSlices:
    """The slices a system kept quiet in (its own, printing nothing) and how many of them it
    closed with a marker alone (<silence>, or <end_of_slice> at once): a model can also print
    nothing with other tokens that decode to nothing, which the metrics cannot see but its
    next slices are fed."""
    quiet: int
    by_marker: int

    @property
    def share(self) -> float:
        return self.by_marker / self.quiet if self.quiet else 1.0


def quiet_slices(transcripts: list[Transcript], markers: MarkerTokens) -> QuietSlices:
    quiet = by_marker = 0
    for t in transcripts:
        for text, scripted, ids in zip(t.outputs, t.scripted, t.output_ids, strict=True):
            if scripted or text.strip():
                continue
            quiet += 1
            by_marker += len(ids) == 1 and markers.ends_output(ids[0])
    return QuietSlices(quiet, by_marker)
