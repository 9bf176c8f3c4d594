"""One client's session as the server sees it: its clock, its queued input, where output goes."""

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from microturn.background.lane import BackgroundLane
from microturn.checkpoint.tokenizer import StreamingDecoder
from microturn.frontend.assembler import MediaAssembler
from microturn.frontend.audio import Pcm16Stream
from microturn.protocol import EndedEvent, SessionOptions, SessionSummary
from microturn.server.input_queue import InputQueue


@dataclass
class SliceRequest:
    """A client-clocked slice: its input, when it arrived, who waits for its output."""
    tokens: list[int]
    arrived: float
    reply: asyncio.Future | None


@dataclass
class LiveSession:
    id: str  # public, unguessable
    engine_id: int
    options: SessionOptions
    clock: str  # "server" | "client"
    deterministic: bool
    sink: Callable[[BaseModel], None]  # where events go (a WebSocket's outbox; HTTP: nowhere)
    decoder: StreamingDecoder
    inbox: InputQueue  # server clock: input waiting for its slice
    requests: deque[SliceRequest] = field(default_factory=deque)  # client clock
    media: MediaAssembler | None = None  # audio/video sessions: media waiting for its slice
    pcm: Pcm16Stream | None = None  # audio sessions: the wire's PCM16 -> 16 kHz mono
    next_close: float = 0.0  # server clock: when the open slice closes (time.monotonic)
    opened_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    open: bool = True
    ended: asyncio.Future | None = None  # resolves to the EndedEvent once closed
    submitted: int = 0  # client clock: slices accepted so far
    answered: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    deadline_misses: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    owner: str = "http"  # "websocket": only its connection may feed or end it
    lane: BackgroundLane | None = None  # its asks and background results
    awaiting: deque = field(default_factory=deque)  # slices appended, output not yet out
    resumed_from: int | None = None  # opened from an export: its first new slice

    @property
    def slice_s(self) -> float:
        return self.options.slice_ms / 1e3

    @property
    def pending_slices(self) -> int:
        return len(self.requests) if self.clock == "client" else self.inbox.queued_slices

    def summary(self) -> SessionSummary:
        ms = sorted(self.latencies_ms)
        return SessionSummary(
            slices=self.answered, input_tokens=self.input_tokens,
            output_tokens=self.output_tokens, deadline_misses=self.deadline_misses,
            latency_p50_ms=round(statistics.median(ms), 2) if ms else None,
            latency_p99_ms=round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None,
            seconds=round(time.monotonic() - self.opened_at, 3))

    def ended_event(self, reason: str, export: dict | None) -> EndedEvent:
        return EndedEvent(reason=reason, summary=self.summary(), export=export)
