"""`microturn bench scale`: a discrete-event model of many replicas, fed by measured costs.

Time advances a slice at a time. Sessions arrive (Poisson) and end (exponential lengths);
the router sends a new session to the replica with the most headroom (live sessions plus
resume work); replicas fail (exponential lifetimes) and come back after a restart. A failed
replica's sessions resume on the others from their last checkpoint: each re-prefills its
history a chunk per tick on its new replica (the engine's `resume_chunk`), which costs that
replica's ticks until done, and loses what came after the checkpoint (uniform in
[0, interval)). A replica's tick costs `base + per_session * sessions + per_token *
resumed tokens`, times log-normal jitter; a slice's latency is its tick plus the router hop.

The per-session cost is set from the measured capacity (`bench engine --find-capacity`: the
sessions one replica serves under a 200 ms p99), so the model reproduces one replica; the
rest (router, failures, checkpoints) is arithmetic on measured sizes.
"""

import argparse
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScaleModel:
    slice_ms: float = 200.0
    capacity: int = 18  # sessions a replica serves under a 200 ms p99 (text, measured)
    tick_base_ms: float = 30.0  # a tick's fixed cost (one session's tick)
    jitter: float = 0.10  # log-normal sigma of a tick's time
    resume_chunk: int = 256  # tokens of history re-fed per tick
    resume_ms_per_token: float = 0.4  # prefill cost per token in a batched tick
    tokens_per_s: float = 110.0  # a session's sequence growth (text: ~22 positions a slice)
    context: int = 8192  # tokens kept resident (older ones evicted)
    export_bytes_per_s: float = 1_120.0  # a session's export growth (text; audio ~10.7 kB/s)
    checkpoint_s: float = 10.0
    session_mean_s: float = 180.0
    mtbf_h: float = 24.0  # a replica's mean time between failures
    restart_s: float = 60.0
    router_ms: float = 0.3  # the ingress hop per slice
    headroom: float = 0.8  # replicas are provisioned to this share of their capacity

    @property
    def per_session_ms(self) -> float:
        """So that `capacity` sessions hit the deadline at the jitter's p99."""
        p99 = math.exp(2.326 * self.jitter)
        return (self.slice_ms / p99 - self.tick_base_ms) / max(1, self.capacity - 1)


@dataclass(frozen=True)
class ScaleResult:
    sessions: int  # concurrent, on average
    replicas: int
    p50_ms: float
    p99_ms: float
    missed: float  # share of slices past the deadline
    failures: int
    resumed: int  # sessions moved by failures
    lost_s_max: float  # the longest gap a resumed session lost
    rejected: int
    checkpoint_mb_s: float  # full exports every interval, all sessions
    incremental_mb_s: float  # only what each interval added


def simulate(model: ScaleModel, sessions: int, minutes: float, seed: int = 0) -> ScaleResult:
    rng = np.random.default_rng(seed)
    replicas = max(1, math.ceil(sessions / (model.capacity * model.headroom)))
    dt = model.slice_ms / 1000
    ticks = int(minutes * 60 / dt)
    live = np.zeros(replicas, dtype=np.int64)
    backlog = np.zeros(replicas)  # resume tokens left to feed on each replica
    down_until = np.full(replicas, -1.0)
    arrival_rate = sessions / model.session_mean_s
    end_p = dt / model.session_mean_s
    fail_p = dt / (model.mtbf_h * 3600)
    per_session = model.per_session_ms
    latencies, missed, failures, resumed, rejected, lost = [], 0, 0, 0, 0, 0.0
    warm = rng.multinomial(sessions, np.ones(replicas) / replicas)  # start at steady state
    live += warm
    for t in range(ticks):
        now = t * dt
        up = down_until <= now
        live -= rng.binomial(live, end_p)
        for _ in range(rng.poisson(arrival_rate * dt)):
            room = np.where(up & (live < model.capacity), live + backlog / model.resume_chunk,
                            np.inf)
            target = int(np.argmin(room))
            if math.isinf(room[target]):
                rejected += 1
                continue
            live[target] += 1
        failing = up & (rng.random(replicas) < fail_p)
        for r in np.flatnonzero(failing):
            failures += 1
            moved, live[r], backlog[r] = int(live[r]), 0, 0.0
            down_until[r] = now + model.restart_s
            up[r] = False
            history = min(model.context, model.tokens_per_s * model.session_mean_s)
            for _ in range(moved):
                room = np.where(up, live + backlog / model.resume_chunk, np.inf)
                target = int(np.argmin(room))
                if math.isinf(room[target]):
                    rejected += 1
                    continue
                live[target] += 1
                backlog[target] += history
                resumed += 1
                lost = max(lost, float(rng.uniform(0, model.checkpoint_s)))
        fed = np.minimum(backlog, model.resume_chunk * np.maximum(1, live))
        backlog -= fed
        tick = (model.tick_base_ms + per_session * np.maximum(live - 1, 0)
                + model.resume_ms_per_token * fed) * rng.lognormal(0, model.jitter, replicas)
        served = up & (live > 0)
        missed += int((tick[served] > model.slice_ms).sum() * 1)
        latencies.append(np.repeat(tick[served] + model.router_ms, live[served]))
    lat = np.concatenate(latencies) if latencies else np.zeros(1)
    weighted_misses = float((lat - model.router_ms > model.slice_ms).mean())
    age = model.session_mean_s  # a live session's mean age (exponential lengths)
    full = sessions * model.export_bytes_per_s * age / model.checkpoint_s / 1e6
    return ScaleResult(sessions, replicas, float(np.percentile(lat, 50)),
                       float(np.percentile(lat, 99)), weighted_misses, failures, resumed, lost,
                       rejected, full, sessions * model.export_bytes_per_s / 1e6)


def run_scale_sim(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    model = ScaleModel(capacity=args.capacity, mtbf_h=args.mtbf_h,
                       checkpoint_s=args.checkpoint_s,
                       export_bytes_per_s=args.export_bytes_per_s)
    table = Table("sessions", "replicas", "slice p50 ms", "slice p99 ms", "missed", "failures",
                  "resumed", "max gap s", "rejected", "full ckpt MB/s", "incremental MB/s")
    for sessions in args.sessions:
        r = simulate(model, sessions, args.minutes, args.seed)
        table.add_row(str(r.sessions), str(r.replicas), f"{r.p50_ms:.0f}", f"{r.p99_ms:.0f}",
                      f"{r.missed:.2%}", str(r.failures), str(r.resumed),
                      f"{r.lost_s_max:.1f}", str(r.rejected), f"{r.checkpoint_mb_s:.1f}",
                      f"{r.incremental_mb_s:.2f}")
    console = Console(width=160)
    console.print(f"{args.minutes:g} simulated minutes; a replica: {model.capacity} sessions at "
                  f"{model.headroom:.0%} headroom, tick {model.tick_base_ms:.0f} ms + "
                  f"{model.per_session_ms:.1f} ms a session; MTBF {model.mtbf_h:g} h, restart "
                  f"{model.restart_s:g} s; checkpoints every {model.checkpoint_s:g} s")
    console.print(table)
