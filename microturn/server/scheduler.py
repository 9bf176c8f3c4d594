"""The one tick loop every session shares.

Server-clocked sessions close a slice every slice_ms on a grid shared by the whole server
(multiples of slice_ms since the server started), so sessions with the same slice length close
their slices together and share one engine tick. Client-clocked sessions (HTTP, or a WebSocket
started with clock "client") have a slice as soon as the client sends one. Each loop turn takes
every slice that is due, appends them all to the engine and runs ONE tick for them on a worker
thread (the event loop keeps serving meanwhile); what arrives during the tick waits for the
next. A server that falls behind catches up one slice per session per tick, counting misses.
"""

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel

from microturn.background.lane import BackgroundLane
from microturn.background.worker import BackgroundWorker, Job
from microturn.checkpoint.tokenizer import StreamingDecoder
from microturn.engine.engine import Engine
from microturn.engine.session import SessionParams, SliceOutput, params_from_export
from microturn.engine.torch_thread import on_torch_thread
from microturn.errors import MicroturnError
from microturn.frontend.assembler import MediaAssembler, SliceMedia
from microturn.frontend.audio import Pcm16Stream
from microturn.protocol import AskInfo, EndedEvent, OutputEvent, ResultInfo, SessionOptions
from microturn.sampling import SamplingParams
from microturn.sequence.media_specs import FrameSpec
from microturn.server.checkpoints import CheckpointStore
from microturn.server.errors import ServerError
from microturn.server.input_decoding import InputDecoder
from microturn.server.input_queue import InputQueue, Placement
from microturn.server.limits import ServerLimits
from microturn.server.live_session import LiveSession, SliceRequest
from microturn.server.metrics import ServerMetrics

log = logging.getLogger("microturn.server")
IDLE_CHECK_S = 0.5
THINK_MARGIN_S = 0.005  # background steps stop this long before a slice closes
THINK_CHUNK_S = 0.05  # and hand the loop back this often (a client's slice may have come)
NO_MEDIA = SliceMedia(None)  # a text-only session's slice
SAVED_AT_CLOSE = ("disconnected", "shutdown", "moved")  # ends a client may resume from


@dataclass
class DueSlice:
    live: LiveSession
    tokens: list[int]
    closed_at: float  # slice closed (server clock) or request arrived (client clock)
    reply: asyncio.Future | None = None
    media: SliceMedia | None = None  # audio/video sessions: the slice's media
    result: Job | None = None  # the background result fed in the slice


class Scheduler:
    def __init__(self, engine: Engine, limits: ServerLimits, metrics: ServerMetrics,
                 worker: BackgroundWorker | None = None,
                 checkpoints: "CheckpointStore | None" = None, id_prefix: str = ""):
        """id_prefix: starts every session id minted here (a replica's name, so a router can
        tell a session's home from its id alone)."""
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self.id_prefix = id_prefix
        self.worker = worker if worker is not None else BackgroundWorker()
        self.checkpoints: CheckpointStore | None = checkpoints
        self.tokenizer = engine.loaded.tokenizer
        self.inputs = InputDecoder(self.tokenizer, engine.loaded.config.vocab_size, limits,
                                   metrics)
        self.sessions: dict[str, LiveSession] = {}
        self.draining = False
        self._engine_lock = asyncio.Lock()  # the engine is touched by one coroutine at a time
        self._wake = asyncio.Event()
        self._origin = time.monotonic()
        self._task: asyncio.Task | None = None
        self._saver: asyncio.Task | None = None
        self.recent_ticks: deque[float] = deque(maxlen=64)  # seconds, for tick_headroom()
        metrics.kv_blocks_total.set(engine.pool_stats().blocks_total)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._origin = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="microturn-tick-loop")
        if self.checkpoints is not None:
            self._saver = asyncio.create_task(self._checkpoint_loop(), name="microturn-saver")

    async def _checkpoint_loop(self) -> None:
        """Every `every_s`, each live session's export to the checkpoint store."""
        while not self.draining:
            await asyncio.sleep(self.checkpoints.every_s)
            for live in list(self.sessions.values()):
                async with self._engine_lock:
                    if not live.open:
                        continue
                    export = self.engine.export(live.engine_id)
                try:
                    await self.checkpoints.write(live.id, export)
                    self.metrics.checkpoints.inc()
                except Exception:  # a full disk must not stop the server
                    log.exception("checkpoint of a session failed")

    async def drain(self, reason: str = "shutdown") -> list[str]:
        """Graceful stop: refuse new sessions, let the current tick finish, close every session
        with `reason` ("shutdown"; or "moved" for a rolling restart's hand-over, which saves
        each checkpoint as it stands so its client resumes elsewhere losing nothing). The ids
        closed."""
        if reason == "moved" and self.checkpoints is None:
            raise MicroturnError("hand-over needs a checkpoint store (--checkpoint-dir)")
        self.draining = True
        self._wake.set()
        if self._saver is not None:
            self._saver.cancel()
        if self._task is not None:
            await self._task
        closing = list(self.sessions.values())
        await asyncio.gather(*(self.close(live, reason) for live in closing))
        return [live.id for live in closing]

    def tick_headroom(self) -> float:
        """The part of a 200 ms slice the recent ticks leave free at their 90th percentile
        (1.0 when idle, below 0 when ticks overrun)."""
        if not self.recent_ticks:
            return 1.0
        ordered = sorted(self.recent_ticks)
        return 1.0 - ordered[int(0.9 * (len(ordered) - 1))] / 0.2

    def _check_room(self) -> None:
        if len(self.sessions) >= self.limits.max_sessions:
            self.metrics.sessions_refused.labels("max_sessions").inc()
            raise ServerError("max_sessions", f"the server already has max_sessions "
                              f"{self.limits.max_sessions} open sessions; try again later",
                              503, "max_sessions", self.limits.max_sessions)

    async def open(self, options: SessionOptions, clock: str, sink,
                   owner: str = "http") -> LiveSession:
        if self.draining:
            raise ServerError("draining", "the server is shutting down", 503)
        self._check_room()
        options_resume_id = options.resume_session
        export = await self._resume_export(options)
        if export is not None:
            options = _resumed_options(options, export)
        try:
            params = SessionParams(
                max_output_tokens=options.max_output_tokens, slice_ms=options.slice_ms,
                sampling=SamplingParams(temperature=options.temperature, top_k=options.top_k,
                                        top_p=options.top_p, seed=options.seed),
                force_output=options.force_output, deterministic=options.deterministic,
                audio=options.audio is not None,
                video=FrameSpec(fps=options.video.fps) if options.video else None)
        except MicroturnError as exc:
            raise ServerError("invalid", str(exc), 422, "slice_ms") from None
        async with self._engine_lock:
            self._check_room()  # opens that waited behind a tick: the count may be full now
            if options_resume_id in self.sessions:  # a second resume of it won the race
                raise ServerError("session_open", f"session {options_resume_id} is still open", 409,
                                  "resume_session")
            try:
                engine_id = self.engine.open(params, from_export=export)
            except MicroturnError as exc:
                if export is not None and "from_export" in str(exc):
                    raise ServerError("invalid", str(exc), 422, "resume") from None
                self.metrics.sessions_refused.labels("kv_pool").inc()
                raise ServerError("kv_pool_full", str(exc), 503) from exc
            layout = self.engine.layout(engine_id)
        # a session resumed from its checkpoint keeps its id: its clients and router know it
        session_id = options_resume_id or f"{self.id_prefix}{secrets.token_urlsafe(12)}"
        live = LiveSession(
            id=session_id, engine_id=engine_id, options=options, clock=clock,
            deterministic=self.engine.deterministic or bool(options.deterministic), sink=sink,
            decoder=StreamingDecoder(self.tokenizer),
            inbox=InputQueue(self.limits.max_input_tokens, self.limits.max_buffered_slices),
            ended=asyncio.get_running_loop().create_future(), owner=owner)
        live.lane = BackgroundLane(self.worker, live.id, self.tokenizer)
        if export is not None:  # slices go on from the export's; so does their numbering
            live.resumed_from = first = len(export["turns"])
            live.inbox.open = live.inbox.tail = live.submitted = live.answered = first
        if params.audio or params.video:
            live.media = MediaAssembler(layout, self.limits.max_buffered_slices)
        if options.audio is not None:
            live.pcm = Pcm16Stream(options.audio.sample_rate, options.audio.channels)
        if clock == "server":  # slice 0 closes at the first grid point >= half a slice away
            now = time.monotonic()
            live.next_close = self._origin + live.slice_s * math.floor(
                (now - self._origin) / live.slice_s + 1.5)
        self.sessions[live.id] = live
        if self.checkpoints is not None:  # resumable from its first slice, not its first save
            async with self._engine_lock:
                export = self.engine.export(engine_id)
            await self.checkpoints.write(live.id, export)
        self.metrics.sessions_opened.inc()
        self.metrics.live_sessions.set(len(self.sessions))
        self._pool_metrics()
        self._wake.set()
        return live

    async def _resume_export(self, options: SessionOptions) -> dict | None:
        """The export a session resumes from: given inline, or the last checkpoint of a
        session id (which must not be open)."""
        if options.resume is not None and options.resume_session is not None:
            raise ServerError("invalid", "give resume or resume_session, not both", 422,
                              "resume_session")
        if options.resume_session is None:
            return options.resume
        if self.checkpoints is None:
            raise ServerError("invalid", "this server keeps no checkpoints (serve "
                              "--checkpoint-dir)", 422, "resume_session")
        if options.resume_session in self.sessions:
            raise ServerError("session_open", f"session {options.resume_session} is still open",
                              409, "resume_session")
        export = await self.checkpoints.read(options.resume_session)
        if export is None:
            raise ServerError("no_session", f"no checkpoint of session "
                              f"{options.resume_session!r}", 404, "resume_session")
        return export

    async def close(self, live: LiveSession, reason: str, notify: bool = True) -> EndedEvent:
        """Close once (later callers get the same event, with the export); the KV blocks are
        free when this returns. With notify, the sink gets the event without the export."""
        if not live.open:
            return await live.ended
        live.open = False
        self.sessions.pop(live.id, None)
        async with self._engine_lock:
            export = self.engine.close(live.engine_id)
        for request in live.requests:
            if request.reply is not None and not request.reply.done():
                request.reply.set_exception(ServerError("closed", f"session closed ({reason})",
                                                        409))
        live.requests.clear()
        for d in live.awaiting:
            if d.reply is not None and not d.reply.done():
                d.reply.set_exception(ServerError("closed", f"session closed ({reason})", 409))
        live.awaiting.clear()
        live.lane.close()  # its background jobs are cancelled: nothing is delivered
        if self.checkpoints is not None and reason in ("client", "idle"):
            await self.checkpoints.forget(live.id)  # ended on purpose: nothing to resume
        elif self.checkpoints is not None and reason in SAVED_AT_CLOSE:
            try:  # resumable from exactly here, not from the last periodic checkpoint
                await self.checkpoints.write(live.id, export)
                self.metrics.checkpoints.inc()
            except Exception:
                log.exception("checkpoint of a closing session failed")
        event = live.ended_event(reason, export)
        live.ended.set_result(event)
        self.metrics.sessions_closed.labels(reason).inc()
        self.metrics.live_sessions.set(len(self.sessions))
        self._pool_metrics()
        if notify:
            live.sink(event.model_copy(update={"export": None}))
        return event

    def get(self, session_id: str, to_change: bool = False) -> LiveSession:
        """The open session `session_id`; `to_change` (an HTTP call that would feed or end
        it): refused for a session its WebSocket connection owns."""
        live = self.sessions.get(session_id)
        if live is None:
            raise ServerError("no_session", f"no open session {session_id!r} (closed or idle "
                              f"longer than idle_timeout_s {self.limits.idle_timeout_s})", 404,
                              "session", self.limits.idle_timeout_s)
        if to_change and live.owner != "http":
            raise ServerError("not_owner", "this session belongs to the WebSocket connection "
                              "that opened it: feed and end it there", 403, "session")
        return live

    # -- input (decoded by `input_decoding.py`, placed here) --------------------------------

    def put_input(self, live: LiveSession, text: str, tokens: list[int] | None,
                  slice_index: int | None) -> Placement:
        """Server clock: queue input for its slice (see InputQueue); nothing is queued if it
        is refused."""
        ids, field_name = self.inputs.tokens(text, tokens)
        live.last_seen = time.monotonic()
        return live.inbox.put(ids, slice_index, field_name)

    def put_slice(self, live: LiveSession, text: str, tokens: list[int] | None,
                  slice_index: int | None, want_reply: bool) -> asyncio.Future | None:
        """Client clock: one whole slice, answered at the next tick."""
        ids = self.inputs.slice_request(live, text, tokens, slice_index)
        reply = asyncio.get_running_loop().create_future() if want_reply else None
        live.requests.append(SliceRequest(ids, time.monotonic(), reply))
        live.submitted += 1
        self._wake.set()
        return reply

    def retract(self, live: LiveSession, ask: int) -> None:
        """Cancel the session's background job `ask` (a running one: nothing will land)."""
        if not self.worker.cancel(live.id, ask):
            raise ServerError("no_ask", f"ask {ask} of this session is not running (unknown, "
                              "already answered or already retracted)", 404, "ask")

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.draining:
            self._wake.clear()
            now = time.monotonic()
            self._expire_idle(now)
            due = self._due(now)
            if due or self._catching_up():
                await self._tick(due)
                continue
            wake_at = min((s.next_close for s in self.sessions.values() if s.clock == "server"),
                          default=now + IDLE_CHECK_S)
            if self.worker.thinking and not any(s.requests for s in self.sessions.values()):
                await self._think(wake_at)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(wake_at - now,
                                                                       IDLE_CHECK_S)))

    def _catching_up(self) -> bool:
        """A session is being fed its history back, or has slices waiting for output."""
        return any(live.awaiting or self.engine.resuming(live.engine_id)
                   for live in self.sessions.values())

    async def _think(self, wake_at: float) -> None:
        """Background-model steps in the time left before the next slice closes (minus a
        margin), on the torch thread, between ticks: the interaction model's deadline first."""
        left = min(wake_at - time.monotonic() - THINK_MARGIN_S, THINK_CHUNK_S)
        if left <= 0:
            await asyncio.sleep(0)
            return
        async with self._engine_lock:
            steps = await on_torch_thread(self.worker.use_idle, time.perf_counter() + left)
        if not steps:  # a step would not fit: wait for the slice like an idle loop would
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, wake_at - time.monotonic()))

    def _due(self, now: float) -> list[DueSlice]:
        due = []
        for live in self.sessions.values():
            if live.clock == "server":
                if now >= live.next_close:
                    _, tokens = live.inbox.take()
                    due.append(DueSlice(live, tokens, live.next_close,
                                        media=live.media.take() if live.media else None))
                    live.next_close += live.slice_s
            elif live.requests:
                request = live.requests.popleft()
                due.append(DueSlice(live, request.tokens, request.arrived, request.reply,
                                    live.media.take() if live.media else None))
        return due

    async def _tick(self, due: list[DueSlice]) -> None:
        async with self._engine_lock:
            due = [d for d in due if d.live.open]  # a close may have won the lock first
            for d in due:
                media = d.media or NO_MEDIA
                d.live.lane.listen(self.tokenizer.decode(d.tokens) if d.tokens else "")
                result, d.result = d.live.lane.next_result()
                self.engine.append(d.live.engine_id, d.tokens, media.audio, media.frames,
                                   result_ids=result)
                d.live.awaiting.append(d)
            started = time.monotonic()
            try:
                outputs = await self.engine.tick_async()
            except Exception:  # the loop must outlive any one tick
                log.exception("engine tick failed; its sessions are closed")
                for d in due:
                    asyncio.create_task(self.close(d.live, "shutdown"))
                return
            done = time.monotonic()
        self.metrics.tick_seconds.observe(done - started)
        self.recent_ticks.append(done - started)
        self.metrics.tick_sessions.observe(len(due))
        # a session resuming takes no slice until its history is fed; then one a tick
        answered = [live.awaiting.popleft() for live in list(self.sessions.values())
                    if live.awaiting and live.engine_id in outputs]
        for d in answered:
            output = outputs[d.live.engine_id]
            if output.failed is None:
                self._deliver(d, output, done)
                continue
            # this session alone could not take its slice: it ends, the others were served
            if d.reply is not None and not d.reply.done():
                d.reply.set_exception(ServerError(
                    output.failed, "the KV pool is full and this session has no turns of "
                    "its own to evict; open a new session later", 503))
            asyncio.create_task(self.close(d.live, output.failed))
        self._pool_metrics()

    def _deliver(self, d: DueSlice, output: SliceOutput, done: float) -> None:
        live = d.live
        latency_ms = (done - d.closed_at) * 1e3
        missed = latency_ms > live.options.slice_ms
        text = live.decoder.push_all(output.output_ids)
        speech, asked = live.lane.heard(text)
        result = d.result
        event = OutputEvent(slice=output.index, input_tokens=d.tokens,
                            input_text=self.tokenizer.decode(d.tokens),
                            input_audio=(d.media.audio is not None
                                         if live.options.audio is not None else None),
                            input_frames=(len(d.media.frames)
                                          if live.options.video is not None else None),
                            tokens=output.output_ids, text=text, speech=speech,
                            asks=[AskInfo(id=j.id, tool=j.tool, query=j.query) for j in asked],
                            result=None if result is None else ResultInfo(
                                id=result.id, tool=result.tool, state=result.state,
                                text=result.result, seconds=round(result.seconds, 3)),
                            latency_ms=round(latency_ms, 3), missed_deadline=missed)
        live.answered += 1
        if live.clock == "client":  # the idle clock starts again once the client is answered
            live.last_seen = max(live.last_seen, done)
        live.input_tokens += len(d.tokens)
        live.output_tokens += len(output.output_ids)
        live.deadline_misses += missed
        live.latencies_ms.append(latency_ms)
        self.metrics.input_tokens.inc(len(d.tokens))
        self.metrics.output_tokens.inc(len(output.output_ids))
        self.metrics.slice_latency.observe(latency_ms / 1e3)
        self.metrics.deadline_misses.inc(missed)
        if d.reply is not None and not d.reply.done():
            d.reply.set_result(event)
        self.send(live, event)

    def send(self, live: LiveSession, event: BaseModel) -> None:
        if live.open:
            live.sink(event)

    def _expire_idle(self, now: float) -> None:
        """Idle: no client activity for idle_timeout_s while the server owed it nothing (a
        client-clocked slice waiting for the engine is the server's debt, not idleness)."""
        for live in list(self.sessions.values()):
            if live.requests or live.awaiting:
                continue
            if now - live.last_seen > self.limits.idle_timeout_s:
                live.last_seen = math.inf  # closing now; not picked again
                asyncio.create_task(self.close(live, "idle"))

    def _pool_metrics(self) -> None:
        pool = self.engine.pool_stats()
        self.metrics.kv_blocks_used.set(pool.blocks_in_use)
        self.metrics.kv_bytes_used.set(pool.bytes_in_use)


def _resumed_options(options: SessionOptions, export: dict) -> SessionOptions:
    """The client's options with the exported session's own: its slice length, output budget
    and sampling (what makes the continuation the same), and a check that the media match."""
    try:
        params = params_from_export(export)
    except (MicroturnError, TypeError, ValueError) as exc:
        raise ServerError("invalid", f"resume: not a session export ({exc})", 422,
                          "resume") from None
    for kind, wanted in (("audio", params.audio), ("video", params.video is not None)):
        if (getattr(options, kind) is not None) != wanted:
            raise ServerError("invalid", f"the exported session {'had' if wanted else 'had no'}"
                              f" {kind}: open it with{'' if wanted else 'out'} {kind} options",
                              422, kind)
    s = params.sampling
    return options.model_copy(update={
        "slice_ms": params.slice_ms, "max_output_tokens": params.max_output_tokens,
        "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
        "force_output": params.force_output, "deterministic": params.deterministic,
        "resume": None})
