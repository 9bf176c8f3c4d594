"""Run the workload on each peer: one long session (latency per micro-turn as the session
grows, tail/head), then a real-time capacity search (N sessions served as well as the engine
can; the largest N whose p99 cycle time stays under the slice)."""

import gc
import statistics
import time
from dataclasses import dataclass, field

from microturn.bench.peers.base import Peer, Shape

WARMUP = 3  # micro-turns not counted
HEAD_TAIL = 10


@dataclass
class PeerRecord:
    engine: str
    config: str
    shape: str
    input_tokens: int
    output_tokens: int
    audio_positions: int  # per slice: microturn's audio, the others' extra text tokens
    turns: int  # micro-turns measured in the long session
    stopped_early: bool  # the long session hit the per-engine time budget
    p50_ms: float
    p99_ms: float
    tail_head_ratio: float
    capacity_sessions: int
    capacity_limited_by_search: bool  # capacity reached --max-capacity without failing
    memory_per_session_mb: float
    tokens_per_s: float
    latency_ms: list[float] = field(repr=False)  # per measured micro-turn
    context_tokens: list[int] = field(repr=False)  # session length after that micro-turn
    process: dict = field(default_factory=dict)  # the process it ran in (process.py)


class Workload:
    """Input tokens for micro-turn k of session s: real text, cycled, different per session;
    at a shape with audio, as many more tokens as the audio's positions (a peer with an audio
    front-end feeds its audio there instead)."""

    def __init__(self, text_tokens: list[int], shape: Shape):
        self.tokens, self.shape = text_tokens, shape
        self.per_turn = shape.input_tokens + shape.audio_positions + shape.output_tokens

    def inputs(self, turn: int, session: int) -> list[int]:
        n = self.shape.input_tokens + self.shape.audio_positions
        start = (turn * n + session * 131) % len(self.tokens)
        return (self.tokens[start:] + self.tokens)[:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def long_session(peer: Peer, work: Workload, turns: int, budget_s: float, log):
    """Per-micro-turn latency of one session alone, until `turns` or the time budget."""
    shape, per_turn = work.shape, work.per_turn
    reserve(peer, 1, (turns + WARMUP + 1) * (per_turn + 4))
    session = peer.open()
    latencies, contexts, started, stopped = [], [], time.perf_counter(), False
    try:
        for k in range(turns + WARMUP):
            t0 = time.perf_counter()
            peer.turn([session], [work.inputs(k, 0)], shape.output_tokens)
            latency = time.perf_counter() - t0
            if k >= WARMUP:
                latencies.append(latency * 1e3)
                contexts.append((k + 1) * per_turn)
            if k % 100 == 0:
                log(f"{peer.name} {shape.name}: micro-turn {k}, {latency * 1e3:.0f} ms")
            if time.perf_counter() - started > budget_s and k >= WARMUP + 2 * HEAD_TAIL:
                stopped = k + 1 < turns + WARMUP
                break
        memory = peer.resident_bytes(session)
    finally:
        peer.close(session)
    return latencies, contexts, memory, stopped


def cycle_p99(peer: Peer, work: Workload, sessions: int, turns: int) -> float:
    """p99 time (ms) to serve one micro-turn of every one of `sessions` sessions."""
    reserve(peer, sessions, (turns + 3) * (work.per_turn + 4))
    opened = [peer.open() for _ in range(sessions)]
    cycles = []
    try:
        for k in range(turns + 2):
            t0 = time.perf_counter()
            peer.turn(opened, [work.inputs(k, s) for s in range(sessions)],
                      work.shape.output_tokens)
            if k >= 2:
                cycles.append((time.perf_counter() - t0) * 1e3)
    finally:
        for session in opened:
            peer.close(session)
        gc.collect()
    return percentile(cycles, 0.99)


def reserve(peer: Peer, sessions: int, tokens_per_session: int) -> None:
    """Peers that size one shared context up front (llama.cpp batched) are told the load."""
    if hasattr(peer, "reserve"):
        peer.reserve(sessions, tokens_per_session)


def capacity(peer: Peer, work: Workload, slice_ms: int, turns: int, max_sessions: int,
             log) -> tuple[int, bool]:
    """Largest N with p99 cycle < slice: doubling, then bisection; (N, hit the search cap)."""
    def fits(n: int) -> bool:
        p99 = cycle_p99(peer, work, n, turns)
        log(f"{peer.name} {work.shape.name}: {n} sessions, p99 cycle {p99:.0f} ms")
        return p99 < slice_ms

    if not fits(1):
        return 0, False
    low, high = 1, 2
    while high <= max_sessions and fits(high):
        low, high = high, high * 2
    if high > max_sessions:
        return low, True
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, False


def measure(peer: Peer, work: Workload, turns: int, slice_ms: int, capacity_turns: int,
            max_sessions: int, budget_s: float, log) -> PeerRecord:
    shape = work.shape
    latencies, contexts, memory, stopped = long_session(peer, work, turns, budget_s, log)
    n = min(HEAD_TAIL, max(1, len(latencies) // 2))
    head, tail = statistics.mean(latencies[:n]), statistics.mean(latencies[-n:])
    sessions, capped = capacity(peer, work, slice_ms, capacity_turns, max_sessions, log)
    per_turn = work.per_turn
    return PeerRecord(
        engine=peer.name, config=peer.config, shape=shape.name,
        input_tokens=shape.input_tokens, output_tokens=shape.output_tokens,
        audio_positions=shape.audio_positions,
        turns=len(latencies), stopped_early=stopped,
        p50_ms=round(statistics.median(latencies), 2),
        p99_ms=round(percentile(latencies, 0.99), 2), tail_head_ratio=round(tail / head, 3),
        capacity_sessions=sessions, capacity_limited_by_search=capped,
        memory_per_session_mb=round(memory / 2**20, 2),
        tokens_per_s=round(len(latencies) * per_turn / (sum(latencies) / 1e3), 1),
        latency_ms=[round(x, 2) for x in latencies], context_tokens=contexts)
