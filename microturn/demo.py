"""`microturn demo`: scripted sessions streaming text word by word, served in real time.

Every slice (default 200 ms) each session receives the words that "arrived" in that slice (or
silence), the engine runs one tick for all of them, and the live view prints both lanes of
every session and the tick's latency against the deadline.

The default model is a chat model that has never seen micro-turns, so what it says is not yet
conversation; the demo shows the machinery: the clock, the two lanes, the latency budget.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from rich.console import Console

from microturn.checkpoint.loader import load_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.lanes import lane_row, latency_mark
from microturn.sampling import SamplingParams

# What arrives in each slice, separated by "|"; an empty slice is silence.
SCRIPTS = {
    "ana": "Hi there! | | Could you tell me | what the capital of France is? | | | |",
    "ben": "I will count | to five: one, | two, | three, | four, | five. | | Done!",
    "cleo": "| | | Sorry to | interrupt, | is anyone | listening? | |",
}


def slices_of(script: str) -> list[str]:
    return [part.strip() for part in script.split("|")]


def run_demo(args: argparse.Namespace) -> None:
    console = Console(highlight=False, soft_wrap=True)
    with console.status("loading the model"):
        loaded = load_model(args.model, args.dtype, "cpu")
    engine = Engine(loaded, EngineConfig(kv_budget_mb=args.kv_budget_mb))
    tokenizer = loaded.tokenizer
    scripts = {name: slices_of(words) for name, words in SCRIPTS.items()}
    sessions = {name: engine.open(session_params(args, i)) for i, name in enumerate(scripts)}
    turns = max(len(s) for s in scripts.values()) + args.extra_slices
    deadline = args.slice_ms / 1e3
    engine.warm_up()  # not shown: the first tick loads kernels and packs weights
    console.print(f"[bold]microturn demo[/]: {len(sessions)} sessions, {args.slice_ms} ms slices, "
                  f"up to {args.max_output_tokens} output tokens per slice, {args.dtype}, "
                  f"{loaded.path.name}")
    latencies, misses = [], 0
    next_tick = time.perf_counter()
    for k in range(turns):
        inputs = {name: (script[k] if k < len(script) else "") for name, script in
                  scripts.items()}
        for name, text in inputs.items():
            engine.append(sessions[name], tokenizer.encode(" " + text) if text else [])
        started = time.perf_counter()
        outputs = engine.tick()
        latency = time.perf_counter() - started
        latencies.append(latency)
        missed = latency > deadline
        misses += missed
        console.print(f"[bold]slice {k:2d}[/] tick {latency_mark(latency * 1e3, args.slice_ms)}")
        for name, sid in sessions.items():
            console.print(lane_row(inputs[name], tokenizer.decode(outputs[sid].output_ids),
                                   name))
        next_tick += deadline
        time.sleep(max(0.0, next_tick - time.perf_counter()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = engine.pool_stats()
    ms = sorted(x * 1e3 for x in latencies)
    console.print(
        f"\n[bold]summary[/]: {turns} ticks; tick latency p50 {statistics.median(ms):.0f} ms, "
        f"p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.0f} ms against a {args.slice_ms} ms "
        f"deadline; {misses} deadline misses; KV pool {pool.blocks_in_use}/{pool.blocks_total} "
        f"blocks ({pool.bytes_in_use / 2**20:.1f} MiB of "
        f"{pool.bytes_total / 2**20:.0f} MiB); peak RSS {rss:.0f} MiB")
    exports = {name: engine.close(sid) for name, sid in sessions.items()}
    if args.export_dir:
        folder = Path(args.export_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, export in exports.items():
            (folder / f"{name}.json").write_text(json.dumps(export))
        console.print(f"exported {len(exports)} sessions to {folder}/ "
                      f"(check one: microturn verify-alignment {folder}/ana.json"
                      f"{' --model ' + str(args.model) if args.model else ''})")


def session_params(args: argparse.Namespace, index: int) -> SessionParams:
    return SessionParams(max_output_tokens=args.max_output_tokens, slice_ms=args.slice_ms,
                         sampling=SamplingParams(temperature=args.temperature,
                                                 seed=args.seed + index))
