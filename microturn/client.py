"""Typed async client for `microturn serve` (docs/PROTOCOL.md).

    async with await StreamSession.connect("ws://127.0.0.1:8000", SessionOptions()) as s:
        await s.send(" hello")                  # lands in the open slice
        event = await s.recv()                  # OutputEvent, NoticeEvent, ErrorEvent, ...
        ended = await s.end(export=True)        # EndedEvent with summary (+ export)

    async with SessionsClient("http://127.0.0.1:8000") as http:   # client-clocked HTTP
        started = await http.open(SessionOptions(max_output_tokens=4))
        output = await http.slice(started.session, " hello")
"""

import asyncio
import json
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from microturn.errors import MicroturnError
from microturn.protocol import (
    MEDIA_AUDIO,
    MEDIA_IMAGE,
    EndedEvent,
    ErrorBody,
    ErrorInfo,
    Health,
    OutputEvent,
    ServerEvent,
    SessionOptions,
    SessionState,
    StartedEvent,
    server_event,
)


class ClientError(MicroturnError):
    """The server refused a request: its HTTP status and error body."""

    def __init__(self, status: int, info: ErrorInfo):
        super().__init__(f"server said {status} {info.code}: {info.message}")
        self.status, self.info = status, info


def endpoint(url: str, scheme: str, path: str) -> str:
    """http(s)/ws(s) base URL -> the same host with the scheme family and path wanted."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    secure = parts.scheme in ("https", "wss")
    return urlunsplit((scheme + ("s" if secure else ""), parts.netloc, path, "", ""))


RETRY_RESUME = ("session_open", "draining", "max_sessions", "kv_pool_full")
SESSION_HEADER = "x-session-id"  # Ray Serve's session header: `serve --replicas` routes by it


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class StreamSession:
    """One full-duplex session over WebSocket /v1/stream."""

    def __init__(self, ws: ClientConnection, started: StartedEvent):
        self.ws, self.started = ws, started
        self.started_at = time.monotonic()  # when `started` arrived (slice timing is from it)
        self.answered = 0  # output events received: slices 0 .. answered - 1
        self.last_sent = self.started_at
        self.ended: EndedEvent | None = None
        self.speech = bytearray()  # `speech` sessions: the spoken output received, PCM16

    @classmethod
    async def connect(cls, url: str, options: SessionOptions | None = None,
                      clock: str = "server", api_key: str | None = None) -> "StreamSession":
        options = options or SessionOptions()
        headers = auth_headers(api_key)
        if options.resume_session:  # a replica router sends it where the session may live
            headers[SESSION_HEADER] = options.resume_session
        try:
            ws = await connect(endpoint(url, "ws", "/v1/stream"),
                               additional_headers=headers, max_size=2**24)
        except InvalidStatus as exc:
            raise ClientError(exc.response.status_code, _error_info(exc.response.body)) from None
        except OSError as exc:
            raise MicroturnError(f"cannot connect to {url}: {exc.strerror or exc}") from None
        await ws.send(json.dumps({"type": "start", "clock": clock, **options.model_dump()}))
        first = server_event.validate_json(await ws.recv())
        if not isinstance(first, StartedEvent):
            await ws.close()
            info = ErrorInfo(**first.model_dump(exclude={"type"})) if first.type == "error" \
                else ErrorInfo(code="protocol", message=f"expected started, got {first.type}")
            raise ClientError(400, info)
        return cls(ws, first)

    @classmethod
    async def resume(cls, url: str, session_id: str, clock: str = "server",
                     api_key: str | None = None, within_s: float = 30.0) -> "StreamSession":
        """Reopen `session_id` from its last checkpoint after its server or replica died, or
        handed it over (`ended` reason "moved"); `started.resumed_from` is the first slice
        to send again. Retries while the cluster has no replica for it (connection refused,
        503, or 409 while its old replica still holds it) for up to `within_s` seconds."""
        give_up = time.monotonic() + within_s
        while True:
            try:
                return await cls.connect(url, SessionOptions(resume_session=session_id), clock,
                                         api_key)
            except ClientError as exc:
                if exc.info.code not in RETRY_RESUME or time.monotonic() > give_up:
                    raise
            except MicroturnError:
                if time.monotonic() > give_up:
                    raise
            await asyncio.sleep(0.25)

    @property
    def session_id(self) -> str:
        return self.started.session

    async def send(self, text: str = "", tokens: list[int] | None = None,
                   slice: int | None = None) -> None:
        message = {"type": "input", "text": text}
        if tokens is not None:
            message = {"type": "input", "tokens": tokens}
        if slice is not None:
            message["slice"] = slice
        await self.ws.send(json.dumps(message))
        self.last_sent = time.monotonic()

    async def send_audio(self, pcm16: bytes) -> None:
        """PCM16 little-endian at the session's sample rate and channels, in order."""
        await self.ws.send(bytes([MEDIA_AUDIO]) + pcm16)
        self.last_sent = time.monotonic()

    async def send_image(self, data: bytes) -> None:
        """One PNG or JPEG image: the session's next frame due."""
        await self.ws.send(bytes([MEDIA_IMAGE]) + data)
        self.last_sent = time.monotonic()

    async def send_raw(self, frame: str | bytes) -> None:
        """Any frame as is (tests and tools that probe the server's validation)."""
        await self.ws.send(frame)

    async def ping(self) -> None:
        await self.ws.send('{"type": "ping"}')
        self.last_sent = time.monotonic()

    async def retract(self, ask: int) -> None:
        """Take a question back: the background job of ask `ask` is cancelled."""
        await self.ws.send(json.dumps({"type": "retract", "ask": ask}))
        self.last_sent = time.monotonic()

    def slice_closes_at(self, index: int) -> float:
        """Server clock: when slice `index` closes, on this process's time.monotonic()."""
        first = self.started.first_slice_closes_in_ms or 0.0
        return self.started_at + (first + index * self.started.slice_ms) / 1e3

    async def recv(self) -> ServerEvent:
        """The next event; ConnectionClosed once the server has closed after `ended`. Spoken
        output (binary frames) is gathered in `speech` on the way."""
        while isinstance(frame := await self.ws.recv(), bytes):
            self.speech += frame[1:]
        event = server_event.validate_json(frame)
        if isinstance(event, OutputEvent):
            self.answered = max(self.answered, event.slice + 1)
        elif isinstance(event, EndedEvent):
            self.ended = event
        return event

    async def outputs(self):
        """Output events until the session ends (other events are skipped)."""
        while self.ended is None:
            try:
                event = await self.recv()
            except ConnectionClosed:
                return
            if isinstance(event, OutputEvent):
                yield event

    async def end(self, export: bool = False, timeout: float = 30.0) -> EndedEvent:
        """End the session; events still in flight are discarded; returns `ended`."""
        if self.ended is None:
            await self.ws.send(json.dumps({"type": "end", "export": export}))
            async with asyncio.timeout(timeout):
                while self.ended is None:
                    await self.recv()
        await self.ws.close()
        return self.ended

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> "StreamSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SessionsClient:
    """The client-clocked HTTP API: one request per slice."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.http = httpx.AsyncClient(base_url=endpoint(url, "http", ""), timeout=timeout,
                                      headers=auth_headers(api_key))

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ClientError(response.status_code, _error_info(response.content))
        return response

    async def _call(self, method: str, path: str, **kwargs) -> dict:
        return (await self._request(method, path, **kwargs)).json()

    async def open(self, options: SessionOptions | None = None) -> StartedEvent:
        options = options or SessionOptions()
        headers = {SESSION_HEADER: options.resume_session} if options.resume_session else {}
        return StartedEvent(**await self._call("POST", "/v1/sessions", headers=headers,
                                               json=options.model_dump()))

    async def slice(self, session: str, text: str = "",
                    tokens: list[int] | None = None) -> OutputEvent:
        body = {"text": text} if tokens is None else {"tokens": tokens}
        return OutputEvent(**await self._call("POST", f"/v1/sessions/{session}/slices",
                                              json=body, headers={SESSION_HEADER: session}))

    async def state(self, session: str) -> SessionState:
        return SessionState(**await self._call("GET", f"/v1/sessions/{session}",
                                               headers={SESSION_HEADER: session}))

    async def close(self, session: str, export: bool = False) -> EndedEvent:
        return EndedEvent(**await self._call("DELETE", f"/v1/sessions/{session}",
                                             params={"export": str(export).lower()},
                                             headers={SESSION_HEADER: session}))

    async def health(self) -> Health:
        return Health(**await self._call("GET", "/healthz"))

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "SessionsClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _error_info(body: bytes | None) -> ErrorInfo:
    try:
        return ErrorBody.model_validate_json(body or b"").error
    except ValueError:
        return ErrorInfo(code="http", message=(body or b"").decode(errors="replace")[:200])
