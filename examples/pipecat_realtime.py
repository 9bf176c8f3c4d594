"""Drive microturn's `/v1/realtime` from Pipecat's OpenAI Realtime service, headless.

A Pipecat pipeline with no audio transport: a WAV file is fed in as `InputAudioRawFrame`s in
real time (40 ms chunks at the file's rate; the service resamples them to 24 kHz PCM16 for
`input_audio_buffer.append`), then silence; optionally a typed question goes in after the
audio (a user message in an `LLMContext`, which the service sends as `conversation.item.create`
followed by `response.create`). Whatever comes out of the service (transcript text, TTS audio,
response start/end) is collected and summarised. Exit status 1 when nothing came out within
`--timeout` seconds, 2 on a pipeline error.

Pipecat's pins clash with microturn's venv, so it runs from its own:

    python3 -m venv /work/pipecat-venv
    /work/pipecat-venv/bin/pip install 'pipecat-ai[openai]==1.14.0'
    microturn serve --port 8765 &                       # from microturn's venv
    espeak-ng -w /tmp/hello.wav "Hello there."
    /work/pipecat-venv/bin/python examples/pipecat_realtime.py \\
        --url ws://127.0.0.1:8765/v1/realtime --wav /tmp/hello.wav \\
        --text "When you hear a beep, say lantern."

`--url` also takes the HTTP base (`http://127.0.0.1:8765`); `--api-key` is the server's
`--api-key`, if it has one.
"""

import argparse
import asyncio
import base64
import collections
import sys
import time
import wave

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner

CHUNK_MS = 40


def realtime_url(url: str) -> str:
    """ws(s)://…/v1/realtime from either that or the server's HTTP base."""
    url = url.rstrip("/")
    if url.startswith("http"):
        url = "ws" + url[4:]
    return url if url.endswith("/v1/realtime") else url + "/v1/realtime"


def read_wav(path: str) -> tuple[bytes, int]:
    """Mono PCM16 bytes and the sample rate (the service resamples to 24 kHz itself)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit(f"{path}: PCM16 WAV expected")
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
        return pcm.mean(axis=1).astype("<i2").tobytes(), w.getframerate()


class Collector(FrameProcessor):
    """The pipeline's end: notes what the service produced."""

    def __init__(self):
        super().__init__()
        self.frames = collections.Counter()
        self.audio_bytes = 0
        self.transcript = ""
        self.responses_done = 0

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        name = type(frame).__name__
        if not isinstance(frame, InputAudioRawFrame):  # our own input, passed through
            self.frames[name] += 1
        if isinstance(frame, TTSAudioRawFrame):
            self.audio_bytes += len(frame.audio)
        elif isinstance(frame, TTSTextFrame) or (  # audio: TTSTextFrame; text: LLMTextFrame
                isinstance(frame, LLMTextFrame) and frame.append_to_context):
            self.transcript += frame.text
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.responses_done += 1
        await self.push_frame(frame, direction)


def count_server_events(counter: collections.Counter) -> None:
    """Tally the server events the service parses (for the summary)."""
    parse = events.parse_server_event

    def counting(message):
        event = parse(message)
        counter[event.type if event is not None else "(unmodelled)"] += 1
        return event

    events.parse_server_event = counting  # llm.py looks it up on the module at each call


class CountingService(OpenAIRealtimeLLMService):
    """The stock service, tallying the client events it sends and the audio it appends."""

    def __init__(self, sent: collections.Counter, **kwargs):
        super().__init__(**kwargs)
        self.sent, self.appended = sent, 0

    async def send_client_event(self, event):
        self.sent[event.type] += 1
        if isinstance(event, events.InputAudioBufferAppendEvent):
            self.appended += len(base64.b64decode(event.audio))
        await super().send_client_event(event)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime")
    ap.add_argument("--wav", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--text", default=None, help="a typed user message after the audio")
    ap.add_argument("--modality", choices=["audio", "text"], default="audio")
    ap.add_argument("--instructions", default=None)
    ap.add_argument("--silence", type=float, default=1.0,
                    help="seconds of a quiet room streamed after the WAV")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="seconds after the WAV ends to wait for the responses")
    ap.add_argument("--responses", type=int, default=1, help="how many responses to wait for")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")

    pcm, rate = read_wav(args.wav)
    received, sent, errors = collections.Counter(), collections.Counter(), []
    count_server_events(received)
    llm = CountingService(
        sent, api_key=args.api_key, base_url=realtime_url(args.url),
        settings=OpenAIRealtimeLLMService.Settings(
            model="microturn", system_instruction=args.instructions,
            session_properties=events.SessionProperties(
                output_modalities=[args.modality],
                audio=events.AudioConfiguration(output=events.AudioOutput(voice="alloy")))))
    collector = Collector()
    worker = PipelineWorker(Pipeline([llm, collector]),
                            params=PipelineParams(audio_in_sample_rate=rate),
                            idle_timeout_secs=None, enable_rtvi=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    @worker.event_handler("on_pipeline_error")
    async def on_error(worker, frame: ErrorFrame):
        errors.append(frame.error)

    async def feed():
        await started.wait()
        t0, chunk = time.monotonic(), rate * 2 * CHUNK_MS // 1000
        total = len(pcm) + int(args.silence * rate) * 2
        room = np.random.default_rng(0)  # after the words a room's quiet, not digital zeros
        for i, at in enumerate(range(0, total, chunk)):  # the WAV, then quiet, in real time
            piece = pcm[at:at + chunk]
            quiet = (room.standard_normal((chunk - len(piece)) // 2) * 300).astype("<i2")
            await worker.queue_frame(InputAudioRawFrame(audio=piece + quiet.tobytes(),
                                                        sample_rate=rate, num_channels=1))
            if at < len(pcm) <= at + chunk and args.text:  # the audio is in: ask in text
                context = LLMContext(messages=[{"role": "user", "content": args.text}])
                await worker.queue_frame(LLMContextFrame(context))
            if errors or collector.responses_done >= args.responses:
                break
            await asyncio.sleep(max(0.0, t0 + (i + 1) * CHUNK_MS / 1000 - time.monotonic()))
        # then no more input: wait for a response to end (or the timeout)
        deadline = t0 + len(pcm) / 2 / rate + args.timeout
        while (not errors and collector.responses_done < args.responses
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), feed())

    got = bool(collector.audio_bytes or collector.transcript)
    print(f"pipecat OpenAIRealtimeLLMService -> {realtime_url(args.url)}")
    print(f"input: {len(pcm) / 2 / rate:.2f} s of {args.wav} at {rate} Hz"
          f"{', then text ' + repr(args.text) if args.text else ''}")
    print(f"on the wire: {llm.appended} bytes of PCM16 appended "
          f"({llm.appended / 2 / 24000:.2f} s at 24 kHz)")
    print(f"output audio: {collector.audio_bytes} bytes "
          f"({collector.audio_bytes / 2 / 24000:.2f} s at 24 kHz)")
    print(f"transcript: {collector.transcript.strip()!r}")
    print(f"responses ended: {collector.responses_done}")
    print("frames out:", dict(collector.frames))
    print("client events sent:", dict(sent))
    print("server events received:", dict(received))
    if errors:
        print("errors:", *errors, sep="\n  ")
    return 2 if errors else (0 if got else 1)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
