"""`/v1/realtime`: the OpenAI Realtime WebSocket protocol (GA event names) over a micro-turn
session, so that clients written for that API work with only the base URL changed.

The Realtime API fakes full duplex with server VAD and turn-based responses; here a micro-turn
session runs underneath on the server clock and the model decides when to speak. A response
begins in the slice where the model starts speaking and ends in the first slice it is silent.
Turn events are derived from what the model did: when it takes the turn after audio, the
user's speech has stopped (`speech_stopped`, `committed`); when it falls silent mid-sentence,
it was interrupted (`speech_started`, and the response ends `cancelled`, `turn_detected`).
docs/PROTOCOL.md maps every event, including what is not supported and what it answers.
"""

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microturn.errors import MicroturnError
from microturn.protocol import AudioOptions, EndedEvent, OutputEvent, SessionOptions
from microturn.server.errors import ServerError
from microturn.server.limits import ServerLimits
from microturn.server.live_session import LiveSession
from microturn.server.scheduler import Scheduler
from microturn.server.speech import Speaker, Voice, cut_off

RATE = 24_000  # the Realtime API's PCM16 rate, in and out
WORDS_PER_SLICE = 2  # typed text goes in at a speaking pace


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the API's many other fields: accepted, unused


class AudioFormat(Loose):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = RATE


class AudioInput(Loose):
    format: AudioFormat | None = None
    turn_detection: dict | None = None  # accepted and ignored: the model takes turns itself


class AudioOutput(Loose):
    format: AudioFormat | None = None
    voice: str | None = Field(None, max_length=40)
    speed: float | None = Field(None, ge=0.25, le=4.0)


class AudioConfig(Loose):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class MicroturnConfig(BaseModel):
    """Our extension of `session`: the micro-turn session underneath (set before input)."""
    model_config = ConfigDict(extra="forbid")
    slice_ms: int = Field(200, ge=20, le=10_000)
    max_output_tokens: int = Field(4, ge=1, le=256, description="per slice")
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class SessionConfig(Loose):
    type: Literal["realtime"] = "realtime"
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1,
                                                                     max_length=1)
    audio: AudioConfig | None = None
    microturn: MicroturnConfig | None = None


class ContentPart(Loose):
    type: Literal["input_text", "input_audio", "text"]
    text: str | None = None
    audio: str | None = None


class MessageItem(Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "system"]
    content: list[ContentPart] = Field(min_length=1, max_length=64)
    id: str | None = Field(None, max_length=64)


@dataclass
class Response:
    id: str
    item_id: str
    started_slice: int
    text: str = ""
    tokens: int = 0


@dataclass
class RealtimeState:
    session_id: str = field(default_factory=lambda: _id("sess"))
    conversation_id: str = field(default_factory=lambda: _id("conv"))
    instructions: str = ""
    modality: str = "audio"
    voice: str = "alloy"
    speed: float = 1.0
    microturn: MicroturnConfig = field(default_factory=MicroturnConfig)
    response: Response | None = None
    muted: bool = False  # response.cancel: quiet until the model next falls silent
    unheard_audio: bool = False  # audio appended since the last commit
    audio_samples: int = 0  # input samples received, at RATE
    last_item: str | None = None
    items: dict[str, dict] = field(default_factory=dict)  # the latest items, for retrieve


MAX_ITEMS = 256


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class RealtimeSession:
    """One `/v1/realtime` WebSocket: the reader (this coroutine) and a writer task."""

    def __init__(self, ws: WebSocket, scheduler: Scheduler, limits: ServerLimits, model: str):
        self.ws, self.scheduler, self.limits, self.model = ws, scheduler, limits, model
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.state = RealtimeState()
        self.live: LiveSession | None = None
        self.speaker = Speaker(None, self._send, self._audio_delta)

    # -- the connection -----------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        self._emit("session.created", session=self._session())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if self.live is not None and not self.live.open:
                    break
                event_id = None
                try:
                    event = self._parse(message)
                    event_id = event.get("event_id")
                    await self._handle(event)
                except ServerError as exc:
                    self.scheduler.metrics.client_errors.labels(exc.code).inc()
                    self._error(exc, event_id)
        except WebSocketDisconnect:
            pass
        finally:
            if self.live is not None and self.live.open:
                await self.scheduler.close(self.live, "client", notify=False)
            self.speaker.event(None)  # the writer stops after what is queued
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(writer, 5.0)
            self.speaker.close()

    def _parse(self, message: dict) -> dict:
        text = message.get("text")
        if text is None:
            raise ServerError("invalid_event", "send JSON text frames; audio goes base64 in "
                              "input_audio_buffer.append", 400, "message")
        if len(text) > self.limits.max_message_bytes:
            raise ServerError("limit", f"event of {len(text)} bytes, over max_message_bytes "
                              f"{self.limits.max_message_bytes}", 413, "message",
                              self.limits.max_message_bytes)
        try:
            event = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ServerError("invalid_json", f"not valid JSON: {exc}", 400) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ServerError("invalid_event", "an event is a JSON object with a string "
                              "'type'", 400, "type")
        return event

    async def _write(self) -> None:
        with contextlib.suppress(Exception):
            while (event := await self.outbox.get()) is not None:
                await self.ws.send_text(json.dumps(event))
            await self.ws.close(1000)

    def _send(self, event: object) -> None:
        if isinstance(event, MicroturnError):  # the speaker lost its voice
            self._error(ServerError("speech_unavailable", str(event), 503, "session.audio"))
            return
        self.outbox.put_nowait(event)

    def _emit(self, kind: str, **fields: Any) -> None:
        """A server event, in order with the session's speech."""
        self.speaker.event({"type": kind, "event_id": _id("event")} | fields)

    def _error(self, exc: ServerError, event_id: str | None = None) -> None:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        self._emit("error", error={"type": kind, "code": exc.code, "message": exc.message,
                                   "param": exc.field, "event_id": event_id})

    # -- client events ------------------------------------------------------------------------

    async def _handle(self, event: dict) -> None:
        kind = event["type"]
        handler = {"session.update": self._session_update,
                   "input_audio_buffer.append": self._append,
                   "input_audio_buffer.commit": self._commit,
                   "input_audio_buffer.clear": self._clear,
                   "conversation.item.create": self._item_create,
                   "response.create": self._response_create,
                   "response.cancel": self._response_cancel,
                   "conversation.item.truncate": self._item_truncate,
                   "conversation.item.retrieve": self._item_retrieve}.get(kind)
        if handler is None:
            raise ServerError("unsupported_event", f"type: {kind!r} is not supported by "
                              "microturn's Realtime endpoint (docs/PROTOCOL.md)", 400, "type")
        await handler(event)

    async def _session_update(self, event: dict) -> None:
        config = _validate(SessionConfig, event.get("session"), "session")
        s = self.state
        if config.microturn is not None:
            if self.live is not None and config.microturn != s.microturn:
                raise ServerError("session_started", "session.microturn is set before the first"
                                  " input; the micro-turn session is already running", 409,
                                  "session.microturn")
            s.microturn = config.microturn
        if config.output_modalities is not None:
            s.modality = config.output_modalities[0]
        output = config.audio.output if config.audio and config.audio.output else None
        if output is not None:
            if output.voice is not None:
                s.voice = output.voice
            if output.speed is not None:
                s.speed = output.speed
        self.speaker.voice = self._voice()
        if config.instructions is not None and config.instructions != s.instructions:
            s.instructions = config.instructions  # clients resend the session: type it once
            if self.live is not None and config.instructions:
                self._type(self.live, config.instructions, "session.instructions")
        self._emit("session.updated", session=self._session())

    async def _append(self, event: dict) -> None:
        pcm = _base64(event.get("audio"), "audio")
        live = await self._started()
        self.scheduler.inputs.audio(live, pcm)
        self.state.audio_samples += len(pcm) // 2
        self.state.unheard_audio = True

    async def _commit(self, event: dict) -> None:
        self._commit_audio()

    async def _clear(self, event: dict) -> None:
        self.state.unheard_audio = False  # what reached slices is in the timeline for good
        self._emit("input_audio_buffer.cleared")

    async def _item_create(self, event: dict) -> None:
        item = _validate(MessageItem, event.get("item"), "item")
        live = await self._started()
        for part in item.content:
            if part.type == "input_audio":
                pcm = _base64(part.audio, "item.content.audio")
                self.scheduler.inputs.audio(live, pcm)
                self.state.audio_samples += len(pcm) // 2
            elif part.text:
                self._type(live, part.text, "item.content.text")
        item_id = item.id or _id("item")
        done = item.model_dump(exclude_none=True) | {"id": item_id, "object": "realtime.item",
                                                     "status": "completed"}
        previous = self._remember(done)
        self._emit("conversation.item.added", previous_item_id=previous, item=done)
        self._emit("conversation.item.done", previous_item_id=previous, item=done)

    async def _item_truncate(self, event: dict) -> None:
        """A client that stopped playing an answer (its user barged in): the rest of that
        answer's speech is not sent. The timeline keeps the words (the model said them)."""
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms", 0)
        if not isinstance(item_id, str) or item_id not in self.state.items:
            raise ServerError("item_truncate_invalid_item_id", f"item_id: no item {item_id!r}",
                              400, "item_id")
        if not isinstance(end_ms, int) or end_ms < 0:
            raise ServerError("invalid_value", "audio_end_ms: a whole number >= 0", 400,
                              "audio_end_ms", 0)
        r = self.state.response
        if r is not None and r.item_id == item_id:
            self.speaker.cut()
        self._emit("conversation.item.truncated", item_id=item_id, audio_end_ms=end_ms,
                   content_index=event.get("content_index", 0))

    async def _item_retrieve(self, event: dict) -> None:
        item = self.state.items.get(event.get("item_id"))
        if item is None:
            raise ServerError("item_retrieve_invalid_item_id",
                              f"item_id: no item {event.get('item_id')!r}", 400, "item_id")
        self._emit("conversation.item.retrieved", item=item)

    async def _response_create(self, event: dict) -> None:
        await self._started()  # the model decides when to speak; nothing to trigger

    async def _response_cancel(self, event: dict) -> None:
        if self.state.response is not None:
            self.state.muted = True
            self._finish(self.state.response, "cancelled", "client_cancelled")

    # -- the micro-turn session underneath ----------------------------------------------------

    async def _started(self) -> LiveSession:
        if self.live is None:
            m = self.state.microturn
            options = SessionOptions(slice_ms=m.slice_ms, max_output_tokens=m.max_output_tokens,
                                     temperature=m.temperature, seed=m.seed,
                                     audio=AudioOptions(sample_rate=RATE))
            self.live = await self.scheduler.open(options, "server", self._sink,
                                                  owner="websocket")
            if self.state.instructions:
                self._type(self.live, self.state.instructions, "session.instructions")
        if not self.live.open:
            raise ServerError("session_ended", "the micro-turn session has ended", 409)
        self.live.last_seen = time.monotonic()
        return self.live

    def _type(self, live: LiveSession, text: str, name: str) -> None:
        """Typed text at a speaking pace: WORDS_PER_SLICE words a slice from the open slice
        on. The model learnt words as they are spoken; a whole sentence landing in one slice
        is not what it was trained to answer."""
        words = text.split()
        slices = -(-len(words) // WORDS_PER_SLICE)
        if slices > self.limits.max_buffered_slices:
            raise ServerError("limit", f"{name}: {len(words)} words would take {slices} slices "
                              f"at {WORDS_PER_SLICE} a slice, over max_buffered_slices "
                              f"{self.limits.max_buffered_slices}", 413, name,
                              self.limits.max_buffered_slices * WORDS_PER_SLICE)
        first = None
        for i in range(slices):
            chunk = " " + " ".join(words[i * WORDS_PER_SLICE:(i + 1) * WORDS_PER_SLICE])
            placed = self.scheduler.put_input(live, chunk, None,
                                              None if first is None else first + i)
            first = placed.slice if first is None else first

    def _sink(self, event: BaseModel) -> None:
        if isinstance(event, OutputEvent):
            self._slice(event)
        elif isinstance(event, EndedEvent):
            if self.state.response is not None:
                self._finish(self.state.response, "incomplete", event.reason)
            busy = event.reason in ("shutdown", "kv_pool_full", "moved")
            self._error(ServerError("session_ended", f"the session ended: {event.reason}",
                                    503 if busy else 400))
            self.speaker.event(None)

    def _slice(self, out: OutputEvent) -> None:
        s = self.state
        if not out.speech:  # silent (or only asking the background): a response has ended
            s.muted = False
            if s.response is not None:
                interrupted = cut_off(s.response.text)
                self._finish(s.response, "cancelled" if interrupted else "completed",
                             "turn_detected" if interrupted else None, out.slice)
            return
        if s.muted:
            return
        r = s.response or self._begin(out.slice)
        r.text += out.speech
        r.tokens += len(out.tokens)
        ids = dict(response_id=r.id, item_id=r.item_id, output_index=0, content_index=0)
        if s.modality == "text":
            self._emit("response.output_text.delta", delta=out.speech, **ids)
        else:
            self._emit("response.output_audio_transcript.delta", delta=out.speech, **ids)
            self.speaker.say(out.speech, ids)

    def _begin(self, slice_index: int) -> Response:
        s = self.state
        if s.unheard_audio:  # taking the turn says the user's speech has ended
            self._emit("input_audio_buffer.speech_stopped", audio_end_ms=self._ms(slice_index),
                       item_id=_id("item"))
            self._commit_audio()
        r = s.response = Response(_id("resp"), _id("item"), slice_index)
        self._emit("response.created", response=self._response(r, "in_progress"))
        item = self._item(r, "in_progress")
        self._emit("response.output_item.added", response_id=r.id, output_index=0, item=item)
        previous = self._remember(item)
        self._emit("conversation.item.added", previous_item_id=previous, item=item)
        self._emit("response.content_part.added", response_id=r.id, item_id=r.item_id,
                   output_index=0, content_index=0, part=self._part(r))
        return r

    def _finish(self, r: Response, status: str, reason: str | None,
                slice_index: int | None = None) -> None:
        s = self.state
        s.response = None
        ids = dict(response_id=r.id, item_id=r.item_id, output_index=0, content_index=0)
        if reason == "turn_detected":  # the model stopped for the user
            self.speaker.cut()
            self._emit("input_audio_buffer.speech_started", item_id=_id("item"),
                       audio_start_ms=self._ms(slice_index or r.started_slice))
        elif status == "cancelled":
            self.speaker.cut()
        else:
            self.speaker.flush()
        if s.modality == "text":
            self._emit("response.output_text.done", text=r.text, **ids)
        else:
            self._emit("response.output_audio.done", **ids)
            self._emit("response.output_audio_transcript.done", transcript=r.text, **ids)
        self._emit("response.content_part.done", part=self._part(r), **ids)
        item = self._item(r, "completed" if status == "completed" else "incomplete")
        s.items[r.item_id] = item
        self._emit("response.output_item.done", response_id=r.id, output_index=0, item=item)
        self._emit("conversation.item.done", previous_item_id=None, item=item)
        details = None if reason is None else {"type": status, "reason": reason}
        self._emit("response.done", response=self._response(r, status, details, [item]))

    def _commit_audio(self) -> None:
        s = self.state
        if not s.unheard_audio:
            return
        s.unheard_audio = False
        item_id = _id("item")
        item = {"id": item_id, "type": "message", "role": "user", "object": "realtime.item",
                "status": "completed", "content": [{"type": "input_audio", "transcript": None}]}
        previous = self._remember(item)
        self._emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self._emit("conversation.item.added", previous_item_id=previous, item=item)
        self._emit("conversation.item.done", previous_item_id=previous, item=item)

    def _remember(self, item: dict) -> str | None:
        """Keep the item (the latest MAX_ITEMS) and make it the last; the previous last."""
        s = self.state
        s.items[item["id"]] = item
        if len(s.items) > MAX_ITEMS:
            del s.items[next(iter(s.items))]
        previous, s.last_item = s.last_item, item["id"]
        return previous

    # -- shapes -------------------------------------------------------------------------------

    def _voice(self) -> Voice | None:
        s = self.state
        if s.modality != "audio":
            return None
        name = s.voice if s.voice.startswith(("en", "mb-")) else "en-us"  # OpenAI's names
        return Voice(name, round(175 * s.speed), RATE)

    def _audio_delta(self, pcm: bytes, ids: dict) -> dict:
        return {"type": "response.output_audio.delta", "event_id": _id("event"),
                "delta": base64.b64encode(pcm).decode()} | ids

    def _ms(self, slice_index: int) -> int:
        return slice_index * self.state.microturn.slice_ms

    def _session(self) -> dict:
        s = self.state
        fmt = {"type": "audio/pcm", "rate": RATE}
        return {"type": "realtime", "object": "realtime.session", "id": s.session_id,
                "model": self.model, "instructions": s.instructions,
                "output_modalities": [s.modality], "max_output_tokens": "inf",
                "audio": {"input": {"format": fmt, "turn_detection": None},
                          "output": {"format": fmt, "voice": s.voice, "speed": s.speed}},
                "microturn": s.microturn.model_dump()}

    def _part(self, r: Response) -> dict:
        if self.state.modality == "text":
            return {"type": "text", "text": r.text}
        return {"type": "audio", "transcript": r.text}

    def _item(self, r: Response, status: str) -> dict:
        kind = "output_text" if self.state.modality == "text" else "output_audio"
        content = {"type": kind, ("text" if kind == "output_text" else "transcript"): r.text}
        return {"id": r.item_id, "type": "message", "role": "assistant",
                "object": "realtime.item", "status": status,
                "content": [content] if r.text else []}

    def _response(self, r: Response, status: str, details: dict | None = None,
                  output: list | None = None) -> dict:
        return {"id": r.id, "object": "realtime.response", "status": status,
                "status_details": details, "output": output or [],
                "conversation_id": self.state.conversation_id,
                "output_modalities": [self.state.modality], "max_output_tokens": "inf",
                "usage": {"total_tokens": r.tokens, "input_tokens": 0,
                          "output_tokens": r.tokens}}


def _validate(model: type[BaseModel], data: Any, name: str) -> BaseModel:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([name, *(str(p) for p in first.get("loc", ()))])
        ctx = first.get("ctx") or {}
        limit = next((ctx[k] for k in ("le", "ge", "max_length", "min_length", "expected")
                      if k in ctx), None)
        raise ServerError("invalid_value", f"{where}: {first['msg']}", 400, where,
                          limit if isinstance(limit, int | float | str) else None) from None


def _base64(data: Any, name: str) -> bytes:
    if not isinstance(data, str):
        raise ServerError("invalid_value", f"{name}: base64 PCM16 expected", 400, name)
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ServerError("invalid_value", f"{name}: not valid base64", 400, name) from None
    if len(pcm) % 2:
        raise ServerError("invalid_value", f"{name}: PCM16 has an even number of bytes", 400,
                          name)
    return pcm
