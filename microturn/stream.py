"""`microturn stream`: stream timed text, audio and video to a server; show both lanes live.

Timed text files have one chunk per line, `SECONDS TEXT`: the chunk arrives SECONDS after the
session's start (slice k covers [k, k+1) x slice_ms). Blank lines and lines starting with `#`
are skipped. Each chunk is sent with a leading space, so chunks join as words.

    # seconds  text
    0.0  Hi there!
    0.9  Could you tell me
    1.4  what the capital of France is?

--wav streams audio: the file is resampled to 16 kHz mono here and sent as PCM16, 3,200
samples per slice (the last slice padded with silence). --video streams a video file sampled at
--fps on the session clock, each frame resized to 160x120 and sent as PNG (lossless, so the
server sees exactly these pixels). Any mix of --text-file, --wav and --video can be combined.

In real time (the default) every slice's input is sent during its slice, text naming its
slice, on the server's clock. With --fast the session is client-clocked and slices are sent
as fast as the server answers them; both give the same slices, so in deterministic mode the
same output. --stdin sends each line typed as it arrives, into the slice open then.
"""

import argparse
import asyncio
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from microturn.client import StreamSession
from microturn.errors import MicroturnError
from microturn.frontend.audio import read_audio
from microturn.frontend.video import read_video
from microturn.lanes import print_slice
from microturn.protocol import (
    AudioOptions,
    EndedEvent,
    ErrorEvent,
    NoticeEvent,
    OutputEvent,
    SessionOptions,
    VideoOptions,
)
from microturn.sequence.media_specs import AUDIO_RATE, FrameSpec

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


def slices_of(chunks: list[Chunk], slice_ms: int, tail: int, at_least: int = 0) -> list[str]:
    """Text per slice index, silent slices included, covering at least `at_least` slices,
    plus `tail` silent slices at the end."""
    count = max(int(chunks[-1].seconds * 1000 // slice_ms) + 1 if chunks else 0, at_least)
    texts = [""] * (count + tail)
    for chunk in chunks:
        texts[int(chunk.seconds * 1000 // slice_ms)] += chunk.text
    return texts


@dataclass(frozen=True)
class SliceSend:
    """Everything one slice sends: its text, its audio (PCM16 bytes) and its images (PNG)."""
    text: str = ""
    audio: bytes = b""
    images: tuple[bytes, ...] = ()


def audio_chunks(path: str, slice_ms: int) -> list[bytes]:
    """The file as 16 kHz mono PCM16, one chunk per slice, the last padded with silence."""
    samples = read_audio(path)
    per_slice = slice_ms * AUDIO_RATE // 1000
    padded = np.zeros(-(-len(samples) // per_slice) * per_slice, dtype=np.float32)
    padded[:len(samples)] = samples
    pcm = (np.clip(padded, -1.0, 1.0) * 32767).astype("<i2")
    return [pcm[i:i + per_slice].tobytes() for i in range(0, len(pcm), per_slice)]


def video_images(path: str, spec: FrameSpec, slice_ms: int) -> list[list[bytes]]:
    """The file's frames as PNG, grouped by the slice they are due in."""
    frames = [png(frame) for frame in read_video(path, spec)]
    slices, k = [], 0
    while frames:
        due = spec.frames_due(k, slice_ms)
        slices.append(frames[:due])
        frames = frames[due:]
        k += 1
    return slices


def png(frame) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def plan_slices(args: argparse.Namespace, slice_ms: int) -> list[SliceSend]:
    audio = audio_chunks(args.wav, slice_ms) if args.wav else []
    images = video_images(args.video, FrameSpec(fps=args.fps), slice_ms) if args.video else []
    chunks = read_timed_text(args.text_file) if args.text_file else []
    texts = slices_of(chunks, slice_ms, args.tail_slices, max(len(audio), len(images)))
    return [SliceSend(text, audio[k] if k < len(audio) else b"",
                      tuple(images[k]) if k < len(images) else ())
            for k, text in enumerate(texts)]


def run_stream(args: argparse.Namespace) -> None:
    files = [f for f in (args.text_file, args.wav, args.video) if f]
    if not files and not args.stdin:
        raise MicroturnError("give what to stream: --text-file, --wav, --video or --stdin")
    if args.stdin and files:
        raise MicroturnError("--stdin streams typed text alone; drop --text-file/--wav/--video")
    if args.fast and args.stdin:
        raise MicroturnError("--fast needs files (stdin is typed in real time)")
    for name in ("text_file", "wav", "video"):
        path = getattr(args, name)
        if path and not (Path(path).is_file() or (name == "video" and Path(path).is_dir())):
            raise MicroturnError(f"{path}: no such file (--{name.replace('_', '-')})")
    options = SessionOptions(slice_ms=args.slice_ms, max_output_tokens=args.max_output_tokens,
                             temperature=args.temperature, seed=args.seed,
                             deterministic=args.deterministic,
                             audio=AudioOptions() if args.wav else None,
                             video=VideoOptions(fps=args.fps) if args.video else None)
    console = Console(highlight=False, soft_wrap=True)
    try:
        asyncio.run(stream(args, options, console))
    except KeyboardInterrupt:
        console.print("[dim]interrupted[/]")


async def stream(args: argparse.Namespace, options: SessionOptions, console: Console) -> None:
    plan = None if args.stdin else plan_slices(args, options.slice_ms)
    session = await StreamSession.connect(args.url, options,
                                          clock="client" if args.fast else "server",
                                          api_key=args.api_key)
    started = session.started
    pace = "client clock, --fast" if args.fast else "real time"
    console.print(f"[bold]microturn stream[/]: session {started.session} on {args.url}, "
                  f"{started.slice_ms} ms slices ({pace}), "
                  f"deterministic {'on' if started.deterministic else 'off'}")
    if plan is not None:
        sender = send_fast(session, plan) if args.fast else send_timed(session, plan)
    else:
        sender = send_stdin(session, args.tail_slices)
    send_task = asyncio.create_task(sender)
    latencies = []
    async for event in events_until_done(session, send_task):
        if isinstance(event, OutputEvent):
            latencies.append(event.latency_ms)
            heard = (("♪ " if event.input_audio else "")
                     + "▣ " * (event.input_frames or 0) + event.input_text)
            print_slice(console, event.slice, heard, event.speech, event.latency_ms,
                        started.slice_ms)
            for ask in event.asks:
                console.print(f"          [blue]→ asks the {ask.tool}: {escape(ask.query)!r}[/]")
            if event.result is not None:
                console.print(f"          [blue]← result ({event.result.state}): "
                              f"{escape(event.result.text)!r}[/]")
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


async def send_media(session: StreamSession, part: SliceSend) -> None:
    if part.audio:
        await session.send_audio(part.audio)
    for image in part.images:
        await session.send_image(image)


async def send_timed(session: StreamSession, plan: list[SliceSend]) -> int:
    """Real time: slice k's input is sent while slice k is open, its text naming k. Returns
    the number of slices to wait for."""
    slice_s = session.started.slice_ms / 1e3
    for k, part in enumerate(plan):  # a quarter into slice k's window (t = 0 is its start)
        await asyncio.sleep(max(0.0, session.slice_closes_at(k) - 0.75 * slice_s
                                - time.monotonic()))
        await send_media(session, part)
        if part.text:
            await session.send(part.text, slice=k)
        elif time.monotonic() - session.last_sent > KEEPALIVE_S:
            await session.ping()  # silence needs no message; this keeps the session alive
    return len(plan)


async def send_fast(session: StreamSession, plan: list[SliceSend]) -> int:
    """Client clock: a slice's media, then its input message, which closes it."""
    for k, part in enumerate(plan):
        while k - session.answered >= IN_FLIGHT:
            await asyncio.sleep(0.002)
        await send_media(session, part)
        await session.send(part.text, slice=k)
    return len(plan)


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
