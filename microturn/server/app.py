"""The ASGI app: WebSocket /v1/stream, the HTTP sessions API, /healthz, /metrics, OpenAPI.

Every refusal is a JSON body {"error": {code, field, message, limit}} (HTTP) or an `error`
event (WebSocket) naming the field and the limit; a refused message changes nothing, and the
session and every other session carry on.
"""

import asyncio
import contextlib
import hmac
import json
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from microturn.background.worker import BackgroundWorker
from microturn.engine.engine import Engine
from microturn.errors import MicroturnError
from microturn.protocol import (
    MEDIA_AUDIO,
    MEDIA_IMAGE,
    DrainReply,
    DrainRequest,
    EndedEvent,
    EndMessage,
    ErrorBody,
    Health,
    InputMessage,
    Limits,
    NoticeEvent,
    OutputEvent,
    PingMessage,
    PongEvent,
    RetractedEvent,
    RetractMessage,
    SessionOptions,
    SessionState,
    SliceRequest,
    SpeechCutEvent,
    StartedEvent,
    StartMessage,
    client_message,
)
from microturn.server import logs
from microturn.server.checkpoints import CheckpointStore
from microturn.server.errors import ServerError
from microturn.server.limits import ServerLimits
from microturn.server.live_session import LiveSession
from microturn.server.metrics import ServerMetrics
from microturn.server.realtime import RealtimeSession
from microturn.server.scheduler import Scheduler
from microturn.server.speech import Speaker, Voice, cut_off

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
STATIC = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorBody} for status in (401, 403, 404, 409, 413, 422, 429,
                                                        503)}


def validation_error(exc: ValidationError | RequestValidationError) -> ServerError:
    """The first problem pydantic found, as one ServerError naming the field and the limit."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    kind = first.get("type", "")
    ctx = first.get("ctx") or {}
    limit = next((ctx[k] for k in ("le", "ge", "lt", "gt", "max_length", "expected_tags")
                  if k in ctx), None)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return ServerError("unknown_type", f"type: {first['msg']}", 422, "type",
                           str(ctx.get("expected_tags", "")))
    if kind == "json_invalid":
        return ServerError("bad_json", f"not valid JSON: {ctx.get('error', first['msg'])}", 400)
    field = ".".join(loc[1:] if loc and loc[0] in ("start", "input", "end", "ping") else loc)
    return ServerError("invalid", f"{field or 'message'}: {first['msg']}", 422, field or None,
                       limit if isinstance(limit, int | float | str) else None)


def create_app(engine: Engine, limits: ServerLimits | None = None,
               api_key: str | None = None, model_name: str = "microturn",
               worker: BackgroundWorker | None = None,
               checkpoints: CheckpointStore | None = None, id_prefix: str = "",
               cluster=None) -> FastAPI:
    """worker: answers the model's asks (default: the built-in tools, no background model);
    checkpoints: where live sessions are saved every few seconds (default: nowhere);
    id_prefix: starts every session id (a replica's name); cluster: this app is one replica
    of several (`cluster/replica.py`'s ClusterView: /healthz lists the replicas, /metrics
    carries all of theirs, POST /v1/cluster/drain hands one replica's sessions over)."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics()
    logs.install(lambda code: metrics.client_errors.labels(code).inc())
    scheduler = Scheduler(engine, limits, metrics, worker, checkpoints, id_prefix)
    public_limits = Limits(**limits.public())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        if scheduler.draining:
            return
        if cluster is not None and checkpoints is not None:  # a replica stopped: hand over
            await scheduler.drain("moved")
        else:
            await scheduler.drain()

    app = FastAPI(title="microturn", version="0.1.0", lifespan=lifespan,
                  description="Streaming micro-turn sessions over WebSocket and HTTP; "
                              "see docs/PROTOCOL.md.")
    app.state.scheduler, app.state.metrics, app.state.limits = scheduler, metrics, limits

    def authorized(headers, query) -> bool:
        if api_key is None:
            return True
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else query.get("api_key", "")
        return hmac.compare_digest(token.encode(), api_key.encode())

    def require_key(request: Request) -> None:
        if not authorized(request.headers, request.query_params):
            raise ServerError("unauthorized", "missing or wrong API key: send "
                              "'Authorization: Bearer KEY'", 401)

    async def body_of(request: Request, model: type[BaseModel]) -> BaseModel:
        """The request body, size-checked before it is parsed."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > \
                limits.max_message_bytes:
            raise ServerError("limit", "request body over max_message_bytes", 413, "body",
                              limits.max_message_bytes)
        raw = bytearray()
        try:
            async with asyncio.timeout(limits.body_timeout_s):  # a slow body holds no worker
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limits.max_message_bytes:
                        raise ServerError("limit", "request body over max_message_bytes", 413,
                                          "body", limits.max_message_bytes)
        except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log
            raise ServerError("client_disconnected", "the client left mid-body", 400,
                              "body") from None
        except TimeoutError:
            raise ServerError("body_timeout", f"the request body took longer than "
                              f"body_timeout_s {limits.body_timeout_s}", 408, "body",
                              limits.body_timeout_s) from None
        try:
            return model.model_validate_json(bytes(raw) or b"{}")
        except ValidationError as exc:
            raise validation_error(exc) from None

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError):
        metrics.client_errors.labels(exc.code).inc()
        return JSONResponse(ErrorBody(error=exc.info()).model_dump(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Routing's refusals (no such path, wrong method) in the same `{"error": ...}` shape."""
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return await server_error(request, ServerError(code, str(exc.detail), exc.status_code,
                                                       "path" if exc.status_code == 404 else
                                                       "method" if exc.status_code == 405
                                                       else None))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError):
        return await server_error(request, validation_error(exc))

    keyed = [Depends(require_key)]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The browser client (`server/static/`): it asks for the API key itself."""
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True)
    async def healthz() -> Health:
        pool = engine.pool_stats()
        health = Health(status="draining" if scheduler.draining else "ok",
                        sessions=len(scheduler.sessions), kv_blocks_free=pool.blocks_free,
                        kv_blocks_total=pool.blocks_total)
        if cluster is None:
            return health
        return health.model_copy(update={"replica": cluster.name,
                                         "replicas": await cluster.replicas()})

    @app.get("/metrics", dependencies=keyed, response_class=Response)
    async def prometheus() -> Response:
        text = metrics.render() if cluster is None else await cluster.metrics()
        return Response(text, media_type="text/plain; version=0.0.4")

    if cluster is not None:
        @app.post("/v1/cluster/drain", dependencies=keyed, response_model=DrainReply,
                  responses=ERRORS, openapi_extra=body_schema(DrainRequest))
        async def drain_replica(request: Request) -> DrainReply:
            """Hand one replica's sessions over (a rolling restart): it refuses new sessions,
            checkpoints and closes its live ones (reason "moved"), then Ray replaces it."""
            wanted = await body_of(request, DrainRequest)
            if not await cluster.drain(wanted.replica):
                raise ServerError("no_replica", f"no live replica {wanted.replica!r}", 404,
                                  "replica")
            return DrainReply(replica=wanted.replica)

    @app.post("/v1/sessions", dependencies=keyed, status_code=201, response_model=StartedEvent,
              responses=ERRORS, openapi_extra=body_schema(SessionOptions))
    async def open_session(request: Request) -> StartedEvent:
        options = await body_of(request, SessionOptions)
        if options.audio is not None or options.video is not None or options.speech:
            media = ("audio" if options.audio is not None else "video"
                     if options.video is not None else "speech")
            raise ServerError("invalid", f"{media} streams over the WebSocket /v1/stream (binary "
                              "frames); HTTP slices carry text", 422, media)
        live = await scheduler.open(options, "client", lambda event: None)
        return started_event(live, public_limits)

    @app.post("/v1/sessions/{session_id}/slices", dependencies=keyed, response_model=OutputEvent,
              responses=ERRORS, openapi_extra=body_schema(SliceRequest))
    async def append_slice(session_id: str, request: Request) -> OutputEvent:
        live = scheduler.get(session_id, to_change=True)
        body = await body_of(request, SliceRequest)
        reply = scheduler.put_slice(live, body.text, body.tokens, None, want_reply=True)
        return await asyncio.shield(reply)  # a client that hangs up does not undo its slice

    @app.get("/v1/sessions/{session_id}", dependencies=keyed, response_model=SessionState,
             responses=ERRORS)
    async def session_state(session_id: str) -> SessionState:
        return state_of(scheduler.get(session_id), engine)

    @app.delete("/v1/sessions/{session_id}", dependencies=keyed, response_model=EndedEvent,
                responses=ERRORS)
    async def close_session(session_id: str, export: bool = False) -> EndedEvent:
        ended = await scheduler.close(scheduler.get(session_id, to_change=True), "client",
                                      notify=False)
        return ended if export else ended.model_copy(update={"export": None})

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        if not authorized(ws.headers, ws.query_params):
            metrics.client_errors.labels("unauthorized").inc()
            body = ErrorBody(error=ServerError("unauthorized", "missing or wrong API key",
                                               401).info())
            await ws.send_denial_response(JSONResponse(body.model_dump(), status_code=401))
            return
        await ws.accept()
        await WebSocketSession(ws, scheduler, limits, public_limits).run()

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        """The OpenAI Realtime protocol over a micro-turn session (`server/realtime.py`)."""
        if not authorized(ws.headers, ws.query_params):
            metrics.client_errors.labels("unauthorized").inc()
            body = {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                              "message": "missing or wrong API key", "param": None}}
            await ws.send_denial_response(JSONResponse(body, status_code=401))
            return
        await ws.accept()
        model = ws.query_params.get("model") or model_name
        await RealtimeSession(ws, scheduler, limits, model[:200]).run()

    return app


def body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI request body for routes that read (and size-check) the body themselves."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def started_event(live: LiveSession, limits: Limits, closes_in_ms: float | None = None):
    o = live.options
    layout = live.media.layout if live.media else None
    return StartedEvent(session=live.id, clock=live.clock, slice_ms=o.slice_ms,
                        max_output_tokens=o.max_output_tokens, deterministic=live.deterministic,
                        first_slice_closes_in_ms=closes_in_ms, limits=limits,
                        audio_frames_per_slice=layout.audio_frames if o.audio else None,
                        video_patches_per_frame=layout.frame_shape[0] if o.video else None,
                        resumed_from=live.resumed_from)


def state_of(live: LiveSession, engine: Engine) -> SessionState:
    s = engine.session_info(live.engine_id)
    return SessionState(session=live.id, clock=live.clock, slices=live.answered,
                        pending_slices=live.pending_slices, input_tokens=live.input_tokens,
                        output_tokens=live.output_tokens,
                        sequence_tokens=s.sequence_tokens, kv_slots=s.kv_slots,
                        kv_blocks=s.kv_blocks, evictions=s.evictions,
                        idle_s=round(time.monotonic() - live.last_seen, 3))


class WebSocketSession:
    """One WebSocket: a reader (this coroutine) and a writer task draining the outbox."""

    def __init__(self, ws: WebSocket, scheduler: Scheduler, limits: ServerLimits,
                 public_limits: Limits):
        self.ws, self.scheduler, self.limits = ws, scheduler, limits
        self.public_limits = public_limits
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.live: LiveSession | None = None
        self.speaker: Speaker | None = None  # `speech` sessions: events and speech, in order
        self.said = ""  # the utterance being spoken

    def sink(self, event: BaseModel) -> None:
        live = self.live
        if (live is not None and live.open and not isinstance(event, EndedEvent)
                and self.outbox.qsize() >= self.limits.max_queued_events):
            asyncio.create_task(self.scheduler.close(live, "slow_consumer"))
        if self.speaker is None:
            self.outbox.put_nowait(event)
            return
        self.speaker.event(event)
        if isinstance(event, OutputEvent):
            if event.speech:
                self.said += event.speech
                self.speaker.say(event.speech)
            elif self.said:  # fell silent: the utterance is over, finished or cut
                if cut_off(self.said):
                    self.speaker.cut()
                    self.speaker.event(SpeechCutEvent(slice=event.slice))
                else:
                    self.speaker.flush()
                self.said = ""

    def _out(self, event: BaseModel) -> None:
        """An event of this connection's own (not a slice's), in order with the rest."""
        if self.speaker is not None:
            self.speaker.event(event)
        else:
            self.outbox.put_nowait(event)

    def _finish_output(self) -> None:
        """The writer stops after everything queued (an `ended` event, speech) is sent."""
        if self.speaker is not None:
            self.speaker.event(None)
        else:
            self.outbox.put_nowait(None)

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        start_by = time.monotonic() + self.limits.start_timeout_s
        try:
            while True:
                if self.live is None:  # a connection that never starts holds no slot for long
                    try:
                        message = await asyncio.wait_for(self.ws.receive(),
                                                         max(0.0, start_by - time.monotonic()))
                    except TimeoutError:
                        self.scheduler.metrics.client_errors.labels("start_timeout").inc()
                        self._out(ServerError(
                            "start_timeout", f"no start message within start_timeout_s "
                            f"{self.limits.start_timeout_s}", 408, "start",
                            self.limits.start_timeout_s).event())
                        break
                else:
                    message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if self.live is not None and not self.live.open:
                    break  # ended by the server; the writer closes the socket
                try:
                    if await self._handle(message):
                        break
                except ServerError as exc:
                    self.scheduler.metrics.client_errors.labels(exc.code).inc()
                    self._out(exc.event())
        except WebSocketDisconnect:
            pass
        finally:
            if self.live is not None and self.live.open:  # abrupt disconnect: free the KV
                await self.scheduler.close(self.live, "disconnected", notify=False)
            self._finish_output()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(writer, 5.0)
            if self.speaker is not None:
                self.speaker.close()

    async def _handle(self, message: dict) -> bool:
        """One client frame; True once the session has ended."""
        text = message.get("text")
        if text is None:
            await self._media(message.get("bytes") or b"")
            return False
        size = len(text.encode())
        if size > self.limits.max_message_bytes:
            raise ServerError("limit", f"message of {size} bytes, over max_message_bytes "
                              f"{self.limits.max_message_bytes}", 413, "message",
                              self.limits.max_message_bytes)
        try:
            msg = client_message.validate_python(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ServerError("bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}",
                              400) from None
        except ValidationError as exc:
            raise validation_error(exc) from None
        except (ValueError, RecursionError) as exc:  # a 4,300+ digit number, deep nesting
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ServerError("bad_json", f"not valid JSON: {reason}", 400) from None
        live = self.live
        if live is not None:
            live.last_seen = time.monotonic()
        if isinstance(msg, PingMessage):
            self._out(PongEvent())
        elif isinstance(msg, StartMessage):
            if live is not None:
                raise ServerError("already_started", "this connection already has a session",
                                  409, "type")
            options = SessionOptions(**msg.model_dump(exclude={"type", "clock"}))
            if msg.speech is not None:
                s = msg.speech
                self.speaker = Speaker(Voice(s.voice, s.words_per_minute, s.sample_rate),
                                       self.outbox.put_nowait,
                                       lambda pcm, _: bytes([MEDIA_AUDIO]) + pcm)
            self.live = live = await self.scheduler.open(options, msg.clock, self.sink,
                                                         owner="websocket")
            closes_in = ((live.next_close - time.monotonic()) * 1e3 if msg.clock == "server"
                         else None)
            self._out(started_event(live, self.public_limits, closes_in))
        elif live is None:
            raise ServerError("not_started", "send a start message first", 409, "type")
        elif isinstance(msg, InputMessage):
            self._input(live, msg)
        elif isinstance(msg, RetractMessage):
            self.scheduler.retract(live, msg.ask)
            self._out(RetractedEvent(ask=msg.ask))
        elif isinstance(msg, EndMessage):
            ended = await self.scheduler.close(live, "client", notify=False)
            self._out(ended if msg.export else
                                   ended.model_copy(update={"export": None}))
            return True
        return False

    async def _media(self, frame: bytes) -> None:
        """A binary frame: one kind byte, then PCM16 audio or one PNG/JPEG image."""
        if len(frame) > self.limits.max_media_bytes:
            raise ServerError("limit", f"binary frame of {len(frame)} bytes, over "
                              f"max_media_bytes {self.limits.max_media_bytes}", 413, "frame",
                              self.limits.max_media_bytes)
        live = self.live
        if live is None:
            raise ServerError("not_started", "send a start message first", 409, "type")
        kind, payload = (frame[0] if frame else None), frame[1:]
        if kind == MEDIA_AUDIO:
            self.scheduler.inputs.audio(live, payload)
        elif kind == MEDIA_IMAGE:
            await self.scheduler.inputs.image(live, payload)
        else:
            raise ServerError("bad_frame", f"a binary frame starts with {MEDIA_AUDIO} (PCM16 "
                              f"audio) or {MEDIA_IMAGE} (PNG/JPEG image), got {kind}", 400,
                              "frame")

    def _input(self, live: LiveSession, msg: InputMessage) -> None:
        if live.clock == "client":
            self.scheduler.put_slice(live, msg.text, msg.tokens, msg.slice, want_reply=False)
            return
        placement = self.scheduler.put_input(live, msg.text, msg.tokens, msg.slice)
        if placement.late:
            self._out(NoticeEvent(
                code="late_input", slice=placement.slice,
                message=f"slice {msg.slice} had already closed; the input went into the open "
                        f"slice {placement.slice}"))
        elif placement.spilled:
            self._out(NoticeEvent(
                code="spilled_input", slice=placement.slice,
                message=f"more than max_input_tokens {self.limits.max_input_tokens} for one "
                        f"slice; the input continues from slice {placement.slice} on"))

    async def _write(self) -> None:
        """Send events in order; after `ended`, close the socket."""
        with contextlib.suppress(Exception):
            while (event := await self.outbox.get()) is not None:
                if isinstance(event, bytes):
                    await self.ws.send_bytes(event)
                    continue
                if isinstance(event, MicroturnError):  # the speaker lost its voice
                    event = ServerError("speech_unavailable", str(event), 503, "speech").event()
                await self.ws.send_text(event.model_dump_json())
                if isinstance(event, EndedEvent):
                    await self.ws.close(1000)
                    return
