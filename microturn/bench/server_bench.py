"""`microturn bench server`: N real-time WebSocket clients against a real `microturn serve`.

Each client streams I input tokens per slice on the server's clock and receives exactly O output
tokens per slice. A slice's input goes out as one message `--send-ahead-ms` before the slice
closes (naming its slice); the end-to-end latency of a slice is output received - input sent,
so it holds the wait for the slice to close, the tick, and the network both ways. Without
--url the benchmark starts `microturn serve` on a free port in a separate process.
"""

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from microturn.checkpoint.loader import load_tokenizer
from microturn.client import SessionsClient, StreamSession
from microturn.errors import MicroturnError
from microturn.protocol import NoticeEvent, OutputEvent, SessionOptions

WARMUP_SLICES = 3  # per client, not counted
TEXT = ("The quick brown fox jumps over a lazy dog while we talk about the weather and the "
        "time it takes to answer in real time. ")


@dataclass
class ServerBenchResult:
    clients: int
    seconds: float
    slice_ms: int
    input_tokens: int
    output_tokens: int
    slices: int
    e2e_p50_ms: float
    e2e_p99_ms: float
    e2e_max_ms: float
    server_latency_p50_ms: float
    server_latency_p99_ms: float
    tick_p50_ms: float | None
    tick_p99_ms: float | None
    ticks: int
    sessions_per_tick: float | None
    deadline_misses: int  # slices the server answered later than slice_ms after they closed
    e2e_over_goal: int  # slices whose end-to-end latency exceeded slice_ms + 20 ms
    late_inputs: int
    tokens_per_s: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def histogram_quantile(before: dict, after: dict, q: float) -> float | None:
    """Quantile of what a Prometheus histogram counted between two scrapes (linear within
    the bucket, as Prometheus' histogram_quantile does)."""
    buckets = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = le, count
    return lower


def scrape(text: str) -> tuple[dict, float, float]:
    buckets = {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'^microturn_tick_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}
    count = re.search(r"^microturn_tick_sessions_count (\S+)$", text, re.M)
    total = re.search(r"^microturn_tick_sessions_sum (\S+)$", text, re.M)
    return buckets, float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0


async def one_client(url: str, index: int, args: argparse.Namespace, stop_at: float,
                     tokens: list[int]) -> tuple[list[tuple[float, float]], int]:
    """(e2e ms, server latency ms) per counted slice, and late-input notices."""
    options = SessionOptions(slice_ms=args.slice_ms, max_output_tokens=args.output_tokens,
                             force_output=True, seed=index)
    session = await StreamSession.connect(url, options, api_key=args.api_key)
    sent: dict[int, float] = {}
    ahead = args.send_ahead_ms / 1e3

    async def sender() -> int:
        k = 0
        while session.slice_closes_at(k) <= stop_at:
            await asyncio.sleep(max(0.0, session.slice_closes_at(k) - ahead - time.monotonic()))
            start = (k * args.input_tokens + index * 7) % len(tokens)
            chunk = (tokens[start:] + tokens)[:args.input_tokens]
            await session.send(tokens=chunk, slice=k)
            sent[k] = time.monotonic()
            k += 1
        return k

    send_task = asyncio.create_task(sender())
    samples, late = [], 0
    while not (send_task.done() and session.answered >= send_task.result()):
        event = await session.recv()
        if isinstance(event, OutputEvent) and event.slice in sent:
            if event.slice >= WARMUP_SLICES:
                samples.append(((time.monotonic() - sent[event.slice]) * 1e3,
                                event.latency_ms))
        elif isinstance(event, NoticeEvent) and event.code == "late_input":
            late += 1
    await session.end()
    return samples, late


async def measure(url: str, args: argparse.Namespace, tokens: list[int]) -> ServerBenchResult:
    async with SessionsClient(url, args.api_key) as http:
        before = scrape(await http.metrics())
        stop_at = time.monotonic() + args.seconds
        results = await asyncio.gather(*(one_client(url, i, args, stop_at, tokens)
                                          for i in range(args.clients)))
        after = scrape(await http.metrics())
    samples = [s for client, _ in results for s in client]
    if not samples:
        raise MicroturnError("no slice was answered; raise --seconds")
    e2e = [s[0] for s in samples]
    server = [s[1] for s in samples]
    tick = {q: histogram_quantile(before[0], after[0], q) for q in (0.5, 0.99)}
    ticks = after[1] - before[1]
    goal = args.slice_ms + 20
    return ServerBenchResult(
        clients=args.clients, seconds=args.seconds, slice_ms=args.slice_ms,
        input_tokens=args.input_tokens, output_tokens=args.output_tokens, slices=len(samples),
        e2e_p50_ms=round(statistics.median(e2e), 1), e2e_p99_ms=round(percentile(e2e, 0.99), 1),
        e2e_max_ms=round(max(e2e), 1),
        server_latency_p50_ms=round(statistics.median(server), 1),
        server_latency_p99_ms=round(percentile(server, 0.99), 1),
        tick_p50_ms=None if tick[0.5] is None else round(tick[0.5] * 1e3, 1),
        tick_p99_ms=None if tick[0.99] is None else round(tick[0.99] * 1e3, 1),
        ticks=int(ticks),
        sessions_per_tick=round((after[2] - before[2]) / ticks, 2) if ticks else None,
        deadline_misses=sum(s > args.slice_ms for s in server),
        e2e_over_goal=sum(x > goal for x in e2e), late_inputs=sum(late for _, late in results),
        tokens_per_s=round(len(samples) * (args.input_tokens + args.output_tokens)
                           / args.seconds, 1))


def start_server(args: argparse.Namespace, console: Console) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "microturn", "serve", "--port", "0", "--dtype", args.dtype,
               "--max-sessions", str(max(16, args.clients))]
    if args.model:
        command += ["--model", args.model]
    if args.api_key:
        command += ["--api-key", args.api_key]
    with console.status("starting microturn serve (loading the model)"):
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        for line in server.stderr:
            if found := re.search(r"on (http://\S+) ", line):
                return server, found.group(1)
            if "error" in line:
                break
    server.kill()
    raise MicroturnError(f"microturn serve did not start: {line.strip()}")


def run_server_bench(args: argparse.Namespace) -> None:
    console = Console(highlight=False, soft_wrap=True)
    server, url = (None, args.url) if args.url else start_server(args, console)
    try:
        tokens = load_tokenizer(args.model).encode(TEXT * 4)
        with console.status(f"{args.clients} real-time clients for {args.seconds:.0f} s"):
            result = asyncio.run(measure(url, args, tokens))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    table = Table(title=f"microturn bench server: {args.clients} clients, {args.input_tokens} in "
                        f"/ {args.output_tokens} out per {args.slice_ms} ms slice, "
                        f"{args.seconds:.0f} s, {args.dtype}")
    for column in ("", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row("end-to-end (input sent -> output received)", f"{result.e2e_p50_ms}",
                  f"{result.e2e_p99_ms}")
    table.add_row("server latency (slice closed -> output ready)",
                  f"{result.server_latency_p50_ms}", f"{result.server_latency_p99_ms}")
    table.add_row("server tick", f"{result.tick_p50_ms}", f"{result.tick_p99_ms}")
    console.print(table)
    goal = args.slice_ms + 20
    console.print(f"{result.slices} slices ({WARMUP_SLICES} warm-up slices per client not "
                  f"counted), {result.ticks} ticks, {result.sessions_per_tick} sessions per tick; "
                  f"deadline misses {result.deadline_misses}; end-to-end over {goal} ms: "
                  f"{result.e2e_over_goal}; late inputs {result.late_inputs}; "
                  f"{result.tokens_per_s} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
