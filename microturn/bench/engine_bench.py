"""`microturn bench engine`: N sessions streaming T micro-turns of I input and exactly O output
tokens each, timed per tick and set against the floor of the work each tick must do.

Floor of a tick = (weight bytes × forward passes + KV bytes every attention reads) / measured
read bandwidth + (matmul FLOPs + attention FLOPs) / measured matmul peak. Attention's share
grows with context, so raw latency cannot stay flat on a CPU; measured/floor (efficiency) stays
flat when the engine has no O(history) overhead.
"""

import argparse
import bisect
import json
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from microturn.bench.machine import best_seconds, measure_machine, thread_round_trip_ns
from microturn.checkpoint.loader import DTYPES, LoadedModel, load_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionInfo, SessionParams
from microturn.engine.tick_profile import TickProfile
from microturn.errors import MicroturnError
from microturn.frontend.assembler import MediaAssembler
from microturn.frontend.video import fit_frame
from microturn.kernels import policy
from microturn.kernels.build import cpu_has_bf16_gemm
from microturn.sequence.media_specs import AUDIO_RATE, FrameSpec

SHAPES = {"sglang": (16, 8), "speech": (16, 2)}
HEAD_TAIL = 10  # micro-turns averaged at each end for the tail/head ratios


@dataclass
class ShapeResult:
    shape: str
    deterministic: bool
    sessions: int
    turns: int
    input_tokens: int
    output_tokens: int
    p50_ms: float
    p99_ms: float
    mean_turn_ms_head: float
    mean_turn_ms_tail: float
    tail_head_ratio: float
    floor_ms: float  # mean floor per tick
    floor_ratio: float  # median measured / floor
    efficiency_tail_head_ratio: float
    tokens_per_s: float
    deadline_misses: int
    peak_rss_mb: float
    kv_blocks_peak: int
    kv_blocks_total: int
    evictions: int
    mean_feed: float  # positions one session feeds in a tick's input step (markers, media)
    mean_context: float  # KV slots one session's input step reads back
    p99_feed: float  # the same at the tick of the p99 rank (by context)
    p99_context: float
    # the threads' cache-line round trip before the run and after it: the ends of a long run
    # may fall in different kinds of a VM's minutes (machine.thread_round_trip_ns), which
    # moves the tail/head ratios by up to ~1.2x
    round_trip_ns_start: float | None = None
    round_trip_ns_end: float | None = None
    capacity_sessions: int | None = None
    roofline_sessions: int | None = None  # the most sessions whose tick floor fits the slice
    # the machine as measured before the capacity probe, which the roofline takes
    roofline_bandwidth_gbs: float | None = None
    roofline_peak_gflops: float | None = None
    roofline_round_trip_ns: float | None = None
    # --audio / --video: the front-end's work per tick (dMel, patching, embedding) and the
    # positions each modality adds to one input slice, on average
    frontend_ms: float | None = None
    frontend_share: float | None = None  # of the mean tick
    audio_positions_per_slice: float | None = None
    video_positions_per_slice: float | None = None
    # how far back the first session's text (every text and marker token since) and media
    # reach at the end, in seconds of session time; None before anything was evicted
    text_reach_s: float | None = None
    media_reach_s: float | None = None


def engine_linear_peak(model, rows: int = 256, repeats: int = 8) -> float:
    """FLOP/s of the best of `repeats` runs of the model's first gate/up projection, as the
    engine calls it (deterministic kernels), over `rows` rows: compute-bound."""
    linear = model.layers[0].mlp.gate_up_proj
    x = torch.randn(rows, linear.weight.shape[1]).to(linear.weight.dtype)
    with policy.deterministic_mode(True), torch.inference_mode():
        seconds = best_seconds(lambda: linear(x), repeats, warmup=1)
    return 2 * rows * linear.weight.numel() / seconds


def threads_apart(round_trip_ns: float | None, separator: str = ", ") -> str:
    """How far apart the threads sat, for a report line ("" where not measured)."""
    return "" if round_trip_ns is None else f"{separator}threads {round_trip_ns:.0f} ns round trip"


@dataclass(frozen=True)
class Floors:
    bandwidth: float  # bytes/s
    peak: float  # FLOP/s
    weights: int  # parameters read by every forward (the tied embedding once)
    layer_weights: int  # matmul parameters of the layers (2 FLOPs each per token)
    # how far apart the two threads sit (machine.thread_round_trip_ns): not in the floor, but
    # ticks at the same floor run ~1.2x longer in a VM's far minutes
    round_trip_ns: float | None = None

    @classmethod
    def measure(cls, loaded: LoadedModel, compute: torch.dtype) -> "Floors":
        peaks = measure_machine({"compute": compute})
        model = loaded.model
        # the peak is what the machine can do: torch's square matmul, or the engine's own
        # linear on a compute-bound batch where that is faster (a floor from a lower peak
        # would let phases run "under" it)
        peak = max(peaks.matmul_flops_per_second["compute"], engine_linear_peak(model))
        return cls(peaks.read_bytes_per_second, peak,
                   sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in model.layers.parameters() if p.dim() == 2),
                   thread_round_trip_ns())

    def describe(self) -> str:
        return (f"{self.bandwidth / 1e9:.1f} GB/s, {self.peak / 1e9:.0f} GFLOP/s"
                f"{threads_apart(self.round_trip_ns)}")


    def tick(self, loaded: LoadedModel, passes: list[list[tuple[int, int]]]) -> float:
        """passes: per forward, (new tokens, context after them) for each session in it."""
        c, size = loaded.config, loaded.model.dtype.itemsize
        weights, layer_weights = self.weights, self.layer_weights
        total_bytes = total_flops = 0.0
        for rows in passes:
            total_bytes += weights * size
            for new, ctx in rows:
                total_bytes += 2 * c.num_layers * c.kv_size * ctx * size
                total_flops += 2 * layer_weights * new
                total_flops += 4 * c.num_layers * c.num_heads * c.head_dim * new * ctx
                total_flops += 2 * c.vocab_size * c.hidden_size  # one logits row
        return total_bytes / self.bandwidth + total_flops / self.peak

    def phases(self, loaded: LoadedModel, passes: list[list[tuple[int, int]]]) -> dict:
        """The same floor as `tick`, split as the profile splits a pass: each linear (its
        weights read once a pass, 2 FLOPs a weight a row), attention (the KV read back and its
        FLOPs), the head (one logits row a session); the rest has no floor of its own."""
        c, size = loaded.config, loaded.model.dtype.itemsize
        matrices = {"qkv": c.hidden_size * (c.q_size + 2 * c.kv_size),
                    "o": c.q_size * c.hidden_size,
                    "gate/up": c.hidden_size * 2 * c.intermediate_size,
                    "down": c.intermediate_size * c.hidden_size}
        floors = dict.fromkeys([*matrices, "attention", "head"], 0.0)
        for rows in passes:
            new = sum(n for n, _ in rows)
            for name, params in matrices.items():
                floors[name] += (c.num_layers * params * (size / self.bandwidth
                                                          + 2 * new / self.peak))
            for n, ctx in rows:
                floors["attention"] += (2 * c.num_layers * c.kv_size * ctx * size / self.bandwidth
                                        + 4 * c.num_layers * c.q_size * n * ctx / self.peak)
            floors["head"] += c.vocab_size * c.hidden_size * (size / self.bandwidth
                                                              + 2 * len(rows) / self.peak)
        return floors

    def roofline(self, loaded: LoadedModel, feed: float, context: float, output_tokens: int,
                 slice_ms: float, most: int = 4096) -> int:
        """Roofline capacity: the most sessions, each feeding `feed` positions at `context`
        and then sampling `output_tokens`, whose tick floor fits in the slice."""
        def fits(n: int) -> bool:
            rows = [(round(feed), round(context))] * n
            steps = [[(1, round(context) + s)] * n for s in range(1, output_tokens)]
            return self.tick(loaded, [rows, *steps]) * 1e3 <= slice_ms
        n = 0
        while n < most and fits(n + 1):
            n += 1
        return n


def p99_rank(values: list) -> int:
    """The index of the 99th percentile in `values` sorted (nearest rank, rounded down)."""
    return min(len(values) - 1, int(0.99 * len(values)))


class ShapeRun:
    """One engine streaming the load shape, a tick at a time (so that two modes can be
    ticked in lockstep and see the same machine noise)."""

    def __init__(self, loaded: LoadedModel, floors: Floors, shape: str, sessions: int,
                 turns: int, input_tokens: int, output_tokens: int, slice_ms: int,
                 kv_budget_mb: int, deterministic: bool, warmup: int = 3,
                 audio: bool = False, video: bool = False, context_limit: int | None = None):
        self.loaded, self.floors, self.shape = loaded, floors, shape
        self.turns, self.warmup, self.slice_ms = turns, warmup, slice_ms
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.deterministic = deterministic
        self.engine = Engine(loaded, EngineConfig(kv_budget_mb=kv_budget_mb,
                                                  max_sessions=sessions,
                                                  deterministic=deterministic,
                                                  context_limit=context_limit))
        self.rng = random.Random(0)
        self.vocab = loaded.config.vocab_size - len(self.engine.markers.added)
        params = SessionParams(max_output_tokens=output_tokens, slice_ms=slice_ms,
                               force_output=True, audio=audio,
                               video=FrameSpec() if video else None)
        self.ids = [self.engine.open(params) for _ in range(sessions)]
        self.media = ({sid: MediaSource(self.engine.layout(sid), sid)
                       for sid in self.ids} if audio or video else {})
        self.frontend_s = 0.0
        self.media_positions = {"audio": 0, "video": 0}
        self.latencies: list[float] = []
        self.floors_ms: list[float] = []
        self.fed = self.read = 0.0  # sums over sessions and measured ticks, for the means
        self.samples = 0
        self.tokens = self.misses = self.peak_blocks = 0
        self.busy = 0.0  # seconds spent in ticks (throughput excludes the other mode's turns)
        self.phase_floors: dict[str, float] = {}  # with a profile: each phase's floor, summed
        self.turn_ends: list[int] = []  # the first session's sequence length after each turn
        self.tick_loads: list[tuple[float, float]] = []  # per measured tick: mean feed, context

    def turn(self, index: int) -> float:
        engine, ids = self.engine, self.ids
        host_s = embed_s = 0.0
        for sid in ids:
            text = [self.rng.randrange(300, self.vocab) for _ in range(self.input_tokens)]
            if sid in self.media:
                started = time.perf_counter()
                media = self.media[sid].next_slice()
                host_s += time.perf_counter() - started
                engine.append(sid, text, media.audio, media.frames)
            else:
                engine.append(sid, text)
        embedded = engine.frontend_seconds
        t0 = time.perf_counter()
        engine.tick()
        latency = time.perf_counter() - t0
        embed_s = engine.frontend_seconds - embedded
        # the work this tick did: one input step (carried token, the input slice with its
        # markers and media), then output_tokens - 1 decode steps; contexts read back after
        # any eviction
        info = {sid: engine.session_info(sid) for sid in ids}
        self.turn_ends.append(info[ids[0]].sequence_tokens)
        feeds = {sid: len(info[sid].last_input) + (1 if index else 0) for sid in ids}
        after = {sid: info[sid].kv_slots - (self.output_tokens - 1) for sid in ids}
        passes = [[(feeds[sid], after[sid]) for sid in ids]]
        passes += [[(1, after[sid] + step) for sid in ids]
                   for step in range(1, self.output_tokens)]
        if index >= self.warmup:
            self.latencies.append(latency)
            self.floors_ms.append(self.floors.tick(self.loaded, passes) * 1e3)
            if engine.profile is not None:
                for name, seconds in self.floors.phases(self.loaded, passes).items():
                    self.phase_floors[name] = self.phase_floors.get(name, 0.0) + seconds
            self.tokens += sum(feeds.values()) + len(ids) * (self.output_tokens - 1)
            self.fed += sum(feeds.values())
            self.read += sum(after.values())
            self.tick_loads.append((statistics.mean(feeds.values()),
                                    statistics.mean(after.values())))
            self.samples += len(ids)
            self.misses += latency * 1e3 > self.slice_ms
            self.busy += latency
            self.frontend_s += host_s + embed_s
            if self.media:
                self._count_media_positions(info[ids[0]])
        self.peak_blocks = max(self.peak_blocks, engine.pool_stats().blocks_in_use)
        return latency

    def _count_media_positions(self, info: SessionInfo) -> None:
        tokens, media = info.last_input, self.engine.markers.media
        audio = (tokens.index(media.audio_start) if info.layout.audio else None)
        video = (tokens.index(media.video_start) if info.layout.video else None)
        if audio is not None:  # from <audio> to the next segment (or <out>)
            self.media_positions["audio"] += (video or len(tokens) - 1) - audio
        if video is not None:
            self.media_positions["video"] += len(tokens) - 1 - video

    def result(self) -> ShapeResult:
        engine, ids = self.engine, self.ids
        evictions = sum(engine.session_info(sid).evictions for sid in ids)
        first = engine.session_info(ids[0])
        reach = {"text_reach_s": self._reach(first.text_since),
                 "media_reach_s": self._reach(first.media_since)} if first.evictions else {}
        for sid in ids:
            engine.close(sid)
        ms = [x * 1e3 for x in self.latencies]
        ratio = [m / f for m, f in zip(ms, self.floors_ms, strict=True)]
        n = min(HEAD_TAIL, max(1, len(ms) // 2))
        head, tail = statistics.mean(ms[:n]), statistics.mean(ms[-n:])
        # the load of the tick at the p99 rank of the floors: what the roofline fits in the
        # slice, so that it asks of the floor what capacity asks of the ticks
        p99_feed, p99_context = sorted(self.tick_loads, key=lambda load: load[1])[p99_rank(ms)]
        return ShapeResult(
            shape=self.shape, deterministic=self.deterministic, sessions=len(ids),
            turns=self.turns, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            p50_ms=statistics.median(ms), p99_ms=sorted(ms)[p99_rank(ms)],
            mean_turn_ms_head=head, mean_turn_ms_tail=tail, tail_head_ratio=tail / head,
            floor_ms=statistics.mean(self.floors_ms), floor_ratio=statistics.median(ratio),
            efficiency_tail_head_ratio=statistics.mean(ratio[-n:]) / statistics.mean(ratio[:n]),
            tokens_per_s=self.tokens / self.busy, deadline_misses=self.misses,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            kv_blocks_peak=self.peak_blocks, kv_blocks_total=engine.pool_stats().blocks_total,
            evictions=evictions, mean_feed=self.fed / max(1, self.samples),
            mean_context=self.read / max(1, self.samples), p99_feed=p99_feed,
            p99_context=p99_context, round_trip_ns_start=self.floors.round_trip_ns,
            round_trip_ns_end=thread_round_trip_ns(), **self._media_result(ms), **reach)

    def _reach(self, token: int) -> float:
        """Session seconds from the turn that holds sequence index `token` to the end."""
        turn = bisect.bisect_right(self.turn_ends, token)
        return (len(self.turn_ends) - turn) * self.slice_ms / 1e3

    def _media_result(self, ms: list[float]) -> dict:
        if not self.media:
            return {}
        frontend_ms = self.frontend_s * 1e3 / len(ms)
        layout = next(iter(self.media.values())).layout
        per_slice = {k: v / len(ms) for k, v in self.media_positions.items()}
        return {"frontend_ms": frontend_ms, "frontend_share": frontend_ms / statistics.mean(ms),
                "audio_positions_per_slice": per_slice["audio"] if layout.audio else None,
                "video_positions_per_slice": per_slice["video"] if layout.video else None}


class MediaSource:
    """One bench session's audio and video: a synthetic voice-like signal (a gliding
    harmonic tone, syllable-rate amplitude, breath noise) and a few decoded camera-sized
    frames, resized and pushed through the same `MediaAssembler` the server uses."""

    def __init__(self, layout, seed: int):
        self.layout, self.assembler = layout, MediaAssembler(layout)
        self.rng = np.random.default_rng(seed)
        self.samples = layout.slice_ms * AUDIO_RATE // 1000
        self.t = 0
        self.frames = [Image.fromarray(self.rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
                       for _ in range(3)]  # decoded 640x480 camera frames

    def next_slice(self):
        if self.layout.audio:
            t = (self.t + np.arange(self.samples)) / AUDIO_RATE
            pitch = 140 + 40 * np.sin(2 * np.pi * 0.3 * t)
            voice = sum(np.sin(2 * np.pi * h * pitch * t) / h for h in (1, 2, 3))
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
            wave = 0.2 * voice * envelope + self.rng.normal(0, 0.01, self.samples)
            self.assembler.push_audio(wave.astype(np.float32))
            self.t += self.samples
        if self.layout.video is not None:
            spec = self.layout.video
            for _ in range(spec.frames_due(self.assembler.index, self.layout.slice_ms)):
                image = self.frames[self.assembler.index % len(self.frames)]
                self.assembler.push_frame(fit_frame(image, spec))
        return self.assembler.take()


def run_shape(loaded: LoadedModel, floors: Floors, shape: str, sessions: int, turns: int,
              input_tokens: int, output_tokens: int, slice_ms: int, realtime: bool,
              kv_budget_mb: int, console: Console, modes: list[bool], audio: bool = False,
              video: bool = False, context_limit: int | None = None) -> list[ShapeResult]:
    """Run the shape once per mode, the modes ticked in lockstep (alternating which goes
    first), so a comparison between them is not a comparison between two stretches of time."""
    runs = [ShapeRun(loaded, floors, shape, sessions, turns, input_tokens, output_tokens,
                     slice_ms, kv_budget_mb, deterministic, audio=audio, video=video,
                     context_limit=context_limit)
            for deterministic in modes]
    next_tick = time.perf_counter()
    for index in range(turns + runs[0].warmup):
        order = runs if index % 2 == 0 else runs[::-1]
        latencies = {run.deterministic: run.turn(index) for run in order}
        if realtime:
            next_tick += slice_ms / 1e3
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        if index % 50 == 0:
            console.log(f"{shape} x{sessions}: turn {index}/{turns + runs[0].warmup}, tick " +
                        ", ".join(f"{t * 1e3:.0f} ms {mode_name(m)}"
                                  for m, t in latencies.items()))
    return [run.result() for run in runs]


def profile_shape(loaded: LoadedModel, floors: Floors, shape: str, sessions: int, turns: int,
                  input_tokens: int, output_tokens: int, args, console: Console) -> dict:
    """Where a tick's time goes at `sessions` sessions: the profile's phases per tick, each
    beside its floor; ticks after the warm-up only."""
    run = ShapeRun(loaded, floors, shape, sessions, turns, input_tokens, output_tokens,
                   args.slice_ms, args.kv_budget_mb, policy.deterministic(), audio=args.audio,
                   video=args.video)
    for index in range(run.warmup):
        run.turn(index)
    run.engine.profile, frontend = TickProfile(), run.engine.frontend_seconds
    for index in range(run.warmup, run.warmup + turns):
        run.turn(index)
        if index % 50 == 0:
            console.log(f"profile {shape} x{sessions}: turn {index}")
    profile, run.engine.profile = run.engine.profile, None
    per = 1e3 / turns
    rows = [{"phase": name, "ms": ms,
             "floor_ms": run.phase_floors.get(name.removeprefix("forward: "), 0.0) * per}
            for name, ms in profile.rows(run.engine.frontend_seconds - frontend)]
    result = run.result()
    return {"shape": shape, "sessions": sessions, "turns": turns, "tick_ms": result.p50_ms,
            "mean_tick_ms": profile.tick_seconds * per, "floor_ms": result.floor_ms,
            "bandwidth_GBps": floors.bandwidth / 1e9, "matmul_GFLOPs": floors.peak / 1e9,
            "round_trip_ns": floors.round_trip_ns,
            "rows": rows}


def print_profile(out: Console, profile: dict) -> None:
    table = Table(title=f"where a tick goes: {profile['shape']}, {profile['sessions']} "
                        f"sessions, mean of {profile['turns']} ticks "
                        f"({profile['mean_tick_ms']:.1f} ms; floor {profile['floor_ms']:.1f} ms "
                        f"at {profile['bandwidth_GBps']:.0f} GB/s, "
                        f"{profile['matmul_GFLOPs']:.0f} GFLOP/s"
                        f"{threads_apart(profile['round_trip_ns'], '; ')})")
    for column in ("phase", "ms per tick", "share", "floor ms", "x floor", "over floor ms"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for row in profile["rows"]:
        floor = row["floor_ms"]
        table.add_row(row["phase"], f"{row['ms']:.2f}",
                      f"{row['ms'] / profile['mean_tick_ms']:.1%}",
                      f"{floor:.2f}" if floor else "-",
                      f"{row['ms'] / floor:.2f}" if floor else "-",
                      f"{row['ms'] - floor:.2f}")
    out.print(table)


def mode_name(deterministic: bool) -> str:
    return "deterministic" if deterministic else "shape-dependent"


def find_capacity(loaded, compute, shape, args, console,
                  deterministic: bool) -> tuple[int, int, Floors]:
    """Largest N whose p99 tick latency stays under the slice (doubling, then bisection),
    and the roofline capacity: the most sessions whose floor, at the load of the probe's p99
    tick (its context), fits the slice, as capacity asks of that tick's latency. Each probe
    measures the machine first and the roofline takes the capacity probe's measurement: this
    VM's bandwidth and sustained speed move by a third within minutes, and a roofline from
    another minute than its probe's compares two machines."""
    in_tokens, out_tokens = SHAPES[shape]
    probes: dict[int, tuple[ShapeResult, Floors]] = {}

    def fits(n: int) -> bool:
        floors = Floors.measure(loaded, compute)
        result, = run_shape(loaded, floors, shape, n, args.capacity_turns, in_tokens,
                            out_tokens, args.slice_ms, False, args.kv_budget_mb, console,
                            [deterministic], args.audio, args.video)
        probes[n] = result, floors
        console.log(f"capacity probe {shape}: {n} sessions, p99 {result.p99_ms:.0f} ms "
                    f"({floors.describe()})")
        return result.p99_ms < args.slice_ms

    low = 0
    if fits(1):
        low, high = 1, 2
        while fits(high):
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    probe, floors = probes[max(low, 1)]
    return low, floors.roofline(loaded, probe.p99_feed, probe.p99_context, out_tokens,
                                args.slice_ms), floors


@torch.inference_mode()
def run_engine_bench(args: argparse.Namespace) -> None:
    console = Console(stderr=True)
    if args.sessions < 1 or args.turns < 2 * HEAD_TAIL:
        raise MicroturnError(f"--sessions must be >= 1 and --turns >= {2 * HEAD_TAIL}")
    if args.input_tokens is not None or args.output_tokens is not None:
        shapes = {"custom": (args.input_tokens or 16, args.output_tokens or 2)}
    else:
        shapes = {name: SHAPES[name] for name in SHAPES if args.shape in (name, "both")}
    dtype = DTYPES[args.dtype]
    compute = torch.float32 if dtype == torch.bfloat16 and not cpu_has_bf16_gemm() else dtype
    with console.status(f"loading the model in {args.dtype}"):
        loaded = load_model(args.model, args.dtype, "cpu")
    with console.status("measuring memory bandwidth and matmul peak"):
        floors = Floors.measure(loaded, compute)
    # --deterministic: both modes side by side, in one run
    modes = [True, False] if args.compare_modes else [policy.deterministic()]
    results = []
    for shape, (in_tokens, out_tokens) in shapes.items():
        for result in run_shape(loaded, floors, shape, args.sessions, args.turns, in_tokens,
                                out_tokens, args.slice_ms, args.realtime, args.kv_budget_mb,
                                console, modes, args.audio, args.video,
                                args.context_limit):
            if args.find_capacity and shape in SHAPES:
                result.capacity_sessions, result.roofline_sessions, machine = find_capacity(
                    loaded, compute, shape, args, console, result.deterministic)
                result.roofline_bandwidth_gbs = machine.bandwidth / 1e9
                result.roofline_peak_gflops = machine.peak / 1e9
                result.roofline_round_trip_ns = machine.round_trip_ns
            results.append(result)
    out = Console(width=160)
    out.print(f"machine {floors.describe()} ({compute}); {args.dtype}; "
              f"{'real time' if args.realtime else 'as fast as possible'}; "
              f"slice {args.slice_ms} ms")
    table = Table(title=f"microturn bench engine: {args.sessions} session(s) x {args.turns} "
                        "micro-turns")
    columns = ["shape", "mode", "p50 ms", "p99 ms", "floor ms", "x floor", "tail/head",
               "eff. tail/head", "tokens/s", "misses", "capacity", "roofline", "cap/roof",
               "evictions", "RSS MiB"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r.shape} {r.input_tokens}/{r.output_tokens}",
                      mode_name(r.deterministic), f"{r.p50_ms:.1f}",
                      f"{r.p99_ms:.1f}", f"{r.floor_ms:.1f}", f"{r.floor_ratio:.2f}",
                      f"{r.tail_head_ratio:.2f}", f"{r.efficiency_tail_head_ratio:.2f}",
                      f"{r.tokens_per_s:.0f}", str(r.deadline_misses),
                      "-" if r.capacity_sessions is None else str(r.capacity_sessions),
                      "-" if r.roofline_sessions is None else str(r.roofline_sessions),
                      "-" if not r.roofline_sessions else
                      f"{r.capacity_sessions / r.roofline_sessions:.0%}",
                      str(r.evictions), f"{r.peak_rss_mb:.0f}")
    out.print(table)
    for r in results:
        if r.roofline_sessions is not None:
            out.print(f"{r.shape} roofline: the machine before the capacity probe, "
                      f"{r.roofline_bandwidth_gbs:.1f} GB/s, {r.roofline_peak_gflops:.0f} "
                      f"GFLOP/s{threads_apart(r.roofline_round_trip_ns)}; the floor at the "
                      "load of that probe's p99 tick")
        if r.frontend_ms is not None:
            positions = ", ".join(f"{name} {value:.1f}" for name, value in (
                ("audio", r.audio_positions_per_slice), ("video", r.video_positions_per_slice))
                if value is not None)
            out.print(f"{r.shape} {mode_name(r.deterministic)}: front-end {r.frontend_ms:.2f} "
                      f"ms per tick = {r.frontend_share * 100:.1f}% of the tick (dMel, frame "
                      f"resize and patching, embedding); positions per input slice: "
                      f"{positions}")
    for r in results:
        if r.text_reach_s is not None:
            out.print(f"{r.shape} {mode_name(r.deterministic)}: long session: every text and "
                      f"marker token of the last {r.text_reach_s:.0f} s is resident, media of "
                      f"the last {r.media_reach_s:.0f} s ({r.evictions} evictions)")
    for r in results:
        if r.round_trip_ns_start and r.round_trip_ns_end:
            out.print(f"{r.shape} {mode_name(r.deterministic)}: threads "
                      f"{r.round_trip_ns_start:.0f} ns round trip before the run, "
                      f"{r.round_trip_ns_end:.0f} ns after it (far minutes run ~1.2x slower: "
                      "compare the tail/head ratios of runs whose ends agree)")
    for det, fast in zip(results[::2], results[1::2], strict=True) if args.compare_modes else ():
        out.print(f"{det.shape}: deterministic mode costs "
                  f"{(det.p50_ms / fast.p50_ms - 1) * 100:+.1f}% p50 tick latency, "
                  f"{(fast.tokens_per_s / det.tokens_per_s - 1) * 100:+.1f}% throughput")
    profiles = []
    if args.profile:
        for shape, (in_tokens, out_tokens) in shapes.items():
            found = [r.capacity_sessions for r in results if r.shape == shape
                     and r.capacity_sessions]
            sessions = found[0] if found else args.sessions  # at capacity where it was found
            # the floors of the profile's own minute (see find_capacity)
            profiles.append(profile_shape(loaded, Floors.measure(loaded, compute), shape,
                                          sessions, args.turns, in_tokens, out_tokens, args,
                                          console))
            print_profile(out, profiles[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "slice_ms": args.slice_ms,
                       "bandwidth_GBps": floors.bandwidth / 1e9,
                       "matmul_GFLOPs": floors.peak / 1e9,
                       "round_trip_ns": floors.round_trip_ns,
                       "results": [asdict(r) for r in results], "profiles": profiles}, f,
                      indent=2)
