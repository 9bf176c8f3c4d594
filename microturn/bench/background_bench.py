"""`microturn bench background`: does background work leave the ticks on time?

N sessions stream at the speech shape (16 input / 2 output tokens a slice) on the slice clock,
twice: once with nothing else running, once with the background model answering one long
question after another in the time the ticks leave (`BackgroundWorker.use_idle`, the server's
policy). A tick's latency is measured from the slice's close (when its input was due) to its
output, so a background step that runs past the close shows up as latency, as it would for a
client. Printed: tick p50 / p99 and deadline misses for both, and what the background got
(decode steps, tokens/s, the share of the idle time it used).
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table

from microturn.background.tools import Tools
from microturn.background.worker import BackgroundWorker, WorkerConfig
from microturn.checkpoint.shipped import load_interaction_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.errors import MicroturnError

QUESTION = ("Explain in detail how a steam engine works, from the fire to the wheels, and "
            "why it changed the way people travelled.")
MARGIN_S = 0.005  # background steps stop this long before a slice closes (as the server)


@dataclass
class RunResult:
    background: bool
    ticks: int
    p50_ms: float
    p99_ms: float
    worst_ms: float
    misses: int
    background_steps: int = 0
    background_tokens_per_s: float = 0.0
    idle_used: float = 0.0  # background time / (wall time - tick time)


def run_background_bench(args: argparse.Namespace) -> None:
    if not 1 <= args.sessions <= 64:
        raise MicroturnError(f"--sessions must be in [1, 64], got {args.sessions}")
    if not 10 <= args.turns <= 100_000:
        raise MicroturnError(f"--turns must be in [10, 100000], got {args.turns}")
    console = Console(highlight=False)
    with console.status("loading the model"):
        loaded = load_interaction_model(args.model, args.adapter, args.dtype, "cpu")
    results = [_run(loaded, args, background=False), _run(loaded, args, background=True)]
    table = Table(title=f"{args.sessions} sessions, 16 in / 2 out per {args.slice_ms} ms slice, "
                        f"{args.turns} slices; {platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads", title_justify="left")
    for column in ("background model", "tick p50", "tick p99", "worst", "misses",
                   "background steps", "background tok/s", "idle time used"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row("answering" if r.background else "off", f"{r.p50_ms:.1f} ms",
                      f"{r.p99_ms:.1f} ms", f"{r.worst_ms:.1f} ms", str(r.misses),
                      str(r.background_steps), f"{r.background_tokens_per_s:.1f}",
                      f"{r.idle_used:.0%}")
    console.print(table)
    with_bg = results[1]
    verdict = "within" if with_bg.p99_ms <= args.slice_ms else "OVER"
    console.print(f"tick p99 with background work: {with_bg.p99_ms:.1f} ms, {verdict} the "
                  f"{args.slice_ms} ms slice ({results[0].p99_ms:.1f} ms without)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sessions": args.sessions, "slice_ms": args.slice_ms,
                       "runs": [asdict(r) for r in results]}, f, indent=1)


def _run(loaded, args: argparse.Namespace, background: bool) -> RunResult:
    engine = Engine(loaded, EngineConfig(kv_budget_mb=args.kv_budget_mb))
    worker = BackgroundWorker(Tools([]), loaded, WorkerConfig(timeout_s=3600,
                                                              answer_tokens=256))
    generator = torch.Generator().manual_seed(0)
    vocab = loaded.config.vocab_size
    sids = [engine.open(SessionParams(max_output_tokens=2, force_output=True,
                                      slice_ms=args.slice_ms)) for _ in range(args.sessions)]
    engine.warm_up()
    slice_s = args.slice_ms / 1e3
    latencies, tick_seconds = [], 0.0
    started = time.perf_counter()
    close = started + slice_s
    for _ in range(args.turns):
        if background and not worker.thinking:
            worker.ask("bench", QUESTION)
            worker.ready("bench")  # the finished one is given out and forgotten
        while True:  # the time until the slice closes: the background's, or nobody's
            if background and worker.use_idle(close - MARGIN_S):
                continue
            time.sleep(max(0.0, close - time.perf_counter()))
            break
        for sid in sids:
            engine.append(sid, torch.randint(0, vocab, (16,), generator=generator).tolist())
        tick_start = time.perf_counter()
        engine.tick()
        done = time.perf_counter()
        tick_seconds += done - tick_start
        latencies.append((done - close) * 1e3)
        close += slice_s
        if close < done:  # fell behind: the next slice is due now
            close = done
    wall = time.perf_counter() - started
    for sid in sids:
        engine.close(sid)
    worker.close()
    ms = sorted(latencies)
    steps = worker.model_steps
    return RunResult(background, len(ms), statistics.median(ms),
                     ms[min(len(ms) - 1, int(0.99 * len(ms)))], ms[-1],
                     sum(x > args.slice_ms for x in ms), steps,
                     steps / wall if background else 0.0,
                     worker.model_seconds / max(1e-9, wall - tick_seconds))
