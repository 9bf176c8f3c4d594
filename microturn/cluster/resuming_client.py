"""A client-clocked WebSocket session that survives its replica: when the connection drops (the
replica died) or the server hands the session over (`ended` reason "moved"), it resumes the
session from its checkpoint (`StreamSession.resume`) and sends again from `resumed_from`, so
the finished timeline is the one an undisturbed run gives (bit for bit in deterministic mode).
"""

import asyncio
import time
from dataclasses import dataclass, field

from websockets.exceptions import ConnectionClosed

from microturn.client import StreamSession
from microturn.errors import MicroturnError
from microturn.protocol import EndedEvent, OutputEvent, SessionOptions


@dataclass
class Resume:
    at: float  # time.monotonic() when the new replica said `started`
    answered: int  # slices answered before the session was lost
    resumed_from: int  # the first slice sent again

    @property
    def lost(self) -> int:
        return self.answered - self.resumed_from


RESUMABLE = ("moved", "shutdown")  # ends that leave a checkpoint as the session stood


class _HandedOver(Exception):
    pass


@dataclass
class ResumingSession:
    url: str
    options: SessionOptions
    api_key: str | None = None
    session: str = ""
    outputs: dict[int, list[int]] = field(default_factory=dict)  # slice -> output tokens
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() per answer
    resumes: list[Resume] = field(default_factory=list)

    async def run(self, inputs: list[str], pace_s: float = 0.0,
                  started: asyncio.Event | None = None) -> EndedEvent:
        """Send one input a slice, each after the previous slice's answer (plus `pace_s`);
        the `ended` event with the export."""
        s = await StreamSession.connect(self.url, self.options, "client", self.api_key)
        self.session = s.session_id
        if started is not None:
            started.set()
        k = 0
        while k < len(inputs):
            try:
                await s.send(inputs[k])
                while not isinstance(event := await s.recv(), OutputEvent):
                    if isinstance(event, EndedEvent):
                        if event.reason not in RESUMABLE:
                            raise MicroturnError(f"session {self.session} ended: "
                                                 f"{event.reason}")
                        raise _HandedOver(event.reason)
            except (ConnectionClosed, _HandedOver):
                s = await StreamSession.resume(self.url, self.session, "client", self.api_key)
                self.resumes.append(Resume(time.monotonic(), k, s.started.resumed_from))
                k = s.started.resumed_from
                continue
            self.outputs[event.slice] = event.tokens
            self.answered_at.append(time.monotonic())
            k += 1
            if pace_s:
                await asyncio.sleep(pace_s)
        return await s.end(export=True)
