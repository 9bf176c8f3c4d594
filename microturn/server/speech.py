"""Spoken output: the model's output lane through espeak-ng (Debian's `espeak-ng`, no
downloads), one short utterance at a time, as PCM16 at the rate a client asked for.

`Speaker` keeps a session's events and speech in one order, and its speech cuttable.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr

from microturn.errors import MicroturnError
from microturn.frontend.espeak import ESPEAK_RATE, espeak_argv, wav_samples

SENTENCE_ENDS = (".", "!", "?", "…", '"', "'", ")")


def cut_off(said: str) -> bool:
    """Did speech that has just stopped stop mid-sentence? A model that falls silent there
    was interrupted; one that falls silent after a full stop had finished."""
    return bool(said.strip()) and not said.rstrip().endswith(SENTENCE_ENDS)


@dataclass(frozen=True)
class Voice:
    name: str = "en-us"  # an espeak-ng voice (`espeak-ng --voices`)
    words_per_minute: int = 175
    rate: int = 24_000  # Hz of the PCM16 handed out

    def __post_init__(self):
        if not self.name.replace("-", "").replace("+", "").isalnum() or len(self.name) > 40:
            raise MicroturnError(f"voice: {self.name!r} is not an espeak-ng voice name")
        if not 80 <= self.words_per_minute <= 450:
            raise MicroturnError(f"voice speed must be in [80, 450] words per minute, got "
                                 f"{self.words_per_minute}")

    async def synthesize(self, text: str) -> bytes:
        """PCM16 mono at `self.rate` for `text` (empty for nothing speakable)."""
        if not text.strip():
            return b""
        process = await asyncio.create_subprocess_exec(
            *espeak_argv(self.name, self.words_per_minute, text, "spoken output"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        wav, _ = await process.communicate()
        samples = wav_samples(wav)
        if self.rate != ESPEAK_RATE and samples.size:
            samples = soxr.resample(samples, ESPEAK_RATE, self.rate, quality="HQ")
        return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class Speaker:
    """One session's ordered output channel: events (`event`) and speech (`say`) leave in the
    order they were put in, so an utterance's audio always precedes what was queued after
    it. `say` takes text as it streams; whole words are synthesised as soon as they are
    complete (a word split across slices waits for its end), `flush()` speaks the rest, and
    `cut()` drops every word not yet sent, the moment the model stops. `send` gets each
    event; `audio(pcm, tag)` turns a piece of speech into an event (`tag` is `say`'s)."""

    def __init__(self, voice: Voice | None, send: Callable[[object], None],
                 audio: Callable[[bytes, object], object]):
        self.voice, self.send, self.audio = voice, send, audio
        self._pending, self._tag = "", None  # the start of a word whose end has not arrived
        self._queue: asyncio.Queue[tuple[int, str | None, object]] = asyncio.Queue()
        self._generation = 0  # bumped by cut(): queued speech of older generations is dropped
        self._task: asyncio.Task | None = None

    def event(self, event: object) -> None:
        self._put(None, event)

    def say(self, text: str, tag: object = None) -> None:
        if self.voice is None:
            return
        words, self._tag = self._pending + text, tag
        cut = max(words.rfind(" "), words.rfind("\n"))
        self._pending = words[cut + 1:] if cut >= 0 else words
        if cut > 0:
            self._put(words[:cut], tag)

    def flush(self) -> None:
        if self._pending.strip():
            self._put(self._pending, self._tag)
        self._pending = ""

    def cut(self) -> None:
        self._pending = ""
        self._generation += 1

    async def drained(self) -> None:
        """Wait until everything put so far has been sent (or cut)."""
        await self._queue.join()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _put(self, text: str | None, item: object) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        self._queue.put_nowait((self._generation, text, item))

    async def _run(self) -> None:
        while True:
            generation, text, item = await self._queue.get()
            try:
                if text is None:
                    self.send(item)
                elif generation == self._generation:
                    pcm = await self.voice.synthesize(text)
                    if pcm and generation == self._generation:
                        self.send(self.audio(pcm, item))
            except MicroturnError as exc:  # no espeak-ng: say so once, go on without speech
                self.voice = None
                self.send(exc)
            finally:
                self._queue.task_done()
