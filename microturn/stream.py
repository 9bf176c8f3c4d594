"""`microturn stream`: stream timed text to a server and show both lanes live.

Timed text files have one chunk per line, `SECONDS TEXT`: the chunk arrives SECONDS after the
session's start (slice k covers [k, k+1) x slice_ms). Blank lines and lines starting with `#`
are skipped. Each chunk is sent with a leading space, so chunks join as words.

    # seconds  text
    0.0  Hi there!
    0.9  Could you tell me
    1.4  what the capital of France is?

In real time (the default) every chunk is sent at its time, naming its slice, on the server's
clock. With --fast the session is client-clocked and slices are sent as fast as the server
answers them; both give the same slices, so in deterministic mode the same output. --stdin
sends each line typed as it arrives, into the slice open then.
"""

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from microturn.client import StreamSession
from microturn.errors import MicroturnError
from microturn.lanes import print_slice
from microturn.server.protocol import (
    EndedEvent,
    ErrorEvent,
    NoticeEvent,
    OutputEvent,
    SessionOptions,
)

IN_FLIGHT = 2  # --fast: slices sent ahead of the outputs received (one computing, one next)
KEEPALIVE_S = 10.0  # a ping after this long without sending (the server's idle timeout: 60 s)


@dataclass(frozen=True)
class Chunk:
    seconds: float
    text: str


def read_timed_text(path: str) -> list[Chunk]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise MicroturnError(f"{path}: cannot read ({exc.strerror})") from None
    chunks = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        stamp, _, text = line.strip().partition(" ")
        try:
            seconds = float(stamp)
        except ValueError:
            raise MicroturnError(f"{path}:{number}: a line starts with its time in seconds, "
                                 f"got {stamp!r}") from None
        if seconds < 0 or (chunks and seconds < chunks[-1].seconds):
            raise MicroturnError(f"{path}:{number}: times must be >= 0 and never go back")
        chunks.append(Chunk(seconds, " " + text.strip()))
    return chunks


def slices_of(chunks: list[Chunk], slice_ms: int, tail: int) -> list[str]:
    """Text per slice index, silent slices included, plus `tail` silent slices at the end."""
    count = (int(chunks[-1].seconds * 1000 // slice_ms) + 1 if chunks else 0) + tail
    texts = [""] * count
    for chunk in chunks:
        texts[int(chunk.seconds * 1000 // slice_ms)] += chunk.text
    return texts


def run_stream(args: argparse.Namespace) -> None:
    if args.fast and not args.text_file:
        raise MicroturnError("--fast needs --text-file (stdin is typed in real time)")
    options = SessionOptions(slice_ms=args.slice_ms, max_output_tokens=args.max_output_tokens,
                             temperature=args.temperature, seed=args.seed,
                             deterministic=args.deterministic)
    console = Console(highlight=False, soft_wrap=True)
    try:
        asyncio.run(stream(args, options, console))
    except KeyboardInterrupt:
        console.print("[dim]interrupted[/]")


async def stream(args: argparse.Namespace, options: SessionOptions, console: Console) -> None:
    chunks = read_timed_text(args.text_file) if args.text_file else None
    session = await StreamSession.connect(args.url, options,
                                          clock="client" if args.fast else "server",
                                          api_key=args.api_key)
    started = session.started
    pace = "client clock, --fast" if args.fast else "real time"
    console.print(f"[bold]microturn stream[/]: session {started.session} on {args.url}, "
                  f"{started.slice_ms} ms slices ({pace}), "
                  f"deterministic {'on' if started.deterministic else 'off'}")
    if chunks is not None:
        texts = slices_of(chunks, started.slice_ms, args.tail_slices)
        sender = send_fast(session, texts) if args.fast else send_timed(session, texts)
    else:
        sender = send_stdin(session, args.tail_slices)
    send_task = asyncio.create_task(sender)
    latencies = []
    async for event in events_until_done(session, send_task):
        if isinstance(event, OutputEvent):
            latencies.append(event.latency_ms)
            print_slice(console, event.slice, event.input_text, event.text, event.latency_ms,
                        started.slice_ms)
        elif isinstance(event, NoticeEvent | ErrorEvent):
            console.print(f"[yellow]{event.type}[/] {event.code}: {event.message}")
    await send_task
    ended = await session.end(export=bool(args.export))
    s = ended.summary
    console.print(f"[bold]ended[/] ({ended.reason}): {s.slices} slices, {s.input_tokens} tokens "
                  f"in, {s.output_tokens} out; server latency p50 {s.latency_p50_ms} ms, "
                  f"p99 {s.latency_p99_ms} ms; {s.deadline_misses} deadline misses")
    if args.export:
        Path(args.export).write_text(json.dumps(ended.export))
        console.print(f"export written to {args.export}")


async def events_until_done(session: StreamSession, sender: asyncio.Task):
    """Events until the sender is done and every slice it sent is answered."""
    recv = None
    while not (sender.done() and session.answered >= sender.result()):
        recv = recv or asyncio.create_task(session.recv())
        waiting = {recv} if sender.done() else {recv, sender}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if recv not in done:
            continue  # the sender finished; the pending recv goes on
        event, recv = recv.result(), None
        if isinstance(event, EndedEvent):
            raise MicroturnError(f"the server ended the session ({event.reason})")
        yield event
    if recv is not None:  # websockets: a cancelled recv loses no message
        recv.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recv


async def send_timed(session: StreamSession, texts: list[str]) -> int:
    """Real time: slice k's text is sent while slice k is open, naming k. Returns the number
    of slices to wait for."""
    slice_s = session.started.slice_ms / 1e3
    for k, text in enumerate(texts):  # a quarter into slice k's window (t = 0 is its start)
        await asyncio.sleep(max(0.0, session.slice_closes_at(k) - 0.75 * slice_s
                                - time.monotonic()))
        if text:
            await session.send(text, slice=k)
        elif time.monotonic() - session.last_sent > KEEPALIVE_S:
            await session.ping()  # silence needs no message; this keeps the session alive
    return len(texts)


async def send_fast(session: StreamSession, texts: list[str]) -> int:
    for k, text in enumerate(texts):
        while k - session.answered >= IN_FLIGHT:
            await asyncio.sleep(0.002)
        await session.send(text, slice=k)
    return len(texts)


async def send_stdin(session: StreamSession, tail: int) -> int:
    slice_s = session.started.slice_ms / 1e3
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), KEEPALIVE_S)
        except TimeoutError:
            await session.ping()
            continue
        if not line:
            break
        if text := line.decode().strip():
            await session.send(" " + text)
    await asyncio.sleep(tail * slice_s)
    return int((time.monotonic() - session.slice_closes_at(0)) / slice_s) + 1  # slices closed
