"""`microturn serve` over real loopback sockets: both APIs, every limit, bad input, isolation,
abrupt disconnects, many clients, graceful shutdown. A tiny random model keeps ticks short;
the shutdown test runs the real command on the default model."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serving import serving

from microturn.client import ClientError, SessionsClient, StreamSession
from microturn.protocol import EndedEvent, ErrorEvent, NoticeEvent, OutputEvent, SessionOptions
from microturn.server.limits import ServerLimits


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def next_of(session: StreamSession, kind: type, timeout: float = 10.0):
    """The next event of a kind (others are kept in `session.skipped`)."""
    skipped = session.__dict__.setdefault("skipped", [])
    async with asyncio.timeout(timeout):
        while True:
            event = await session.recv()
            if isinstance(event, kind):
                return event
            skipped.append(event)


async def wait_until_all_free(http: SessionsClient, timeout: float = 10.0):
    """No session left and every KV block back in the pool (a close frees them at once, but
    it may wait for the tick in progress)."""
    async with asyncio.timeout(timeout):
        while True:
            health = await http.health()
            if health.sessions == 0 and health.kv_blocks_free == health.kv_blocks_total:
                return health
            await asyncio.sleep(0.05)


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# -- the two APIs ------------------------------------------------------------------------------

def test_http_sessions_share_ticks_and_report_state(engine):
    tokenizer = engine.loaded.tokenizer

    async def main(url):
        async with SessionsClient(url) as http:
            assert (await http.health()).sessions == 0
            opened = [await http.open(SessionOptions(max_output_tokens=3, seed=i,
                                                     temperature=0.7)) for i in range(8)]
            for k in range(4):  # 8 sessions' slices in flight together
                outs = await asyncio.gather(*(http.slice(o.session, f" word {k} of {i}")
                                              for i, o in enumerate(opened)))
                for i, out in enumerate(outs):
                    assert out.slice == k and out.input_text == f" word {k} of {i}"
                    assert out.input_tokens == tokenizer.encode(f" word {k} of {i}")
                    assert 1 <= len(out.tokens) <= 3
            state = await http.state(opened[0].session)
            assert (state.slices, state.pending_slices, state.clock) == (4, 0, "client")
            assert state.kv_blocks >= 1 and state.sequence_tokens >= state.kv_slots > 0
            metrics = await http.metrics()
            for name in ("microturn_live_sessions", "microturn_tick_seconds_bucket",
                         "microturn_deadline_misses_total", "microturn_input_tokens_total",
                         "microturn_output_tokens_total", "microturn_kv_blocks_used"):
                assert name in metrics
            assert metric(metrics, "microturn_live_sessions") == 8
            # batching: fewer ticks than slices answered
            assert (metric(metrics, "microturn_tick_sessions_sum")
                    > metric(metrics, "microturn_tick_sessions_count"))
            ended = await http.close(opened[0].session, export=True)
            assert ended.reason == "client" and ended.summary.slices == 4
            assert [t["input_ids"] for t in ended.export["turns"]] == [
                tokenizer.encode(f" word {k} of 0") for k in range(4)]
            with pytest.raises(ClientError) as missing:
                await http.slice(opened[0].session, " again")
            assert missing.value.status == 404 and missing.value.info.code == "no_session"
            for o in opened[1:]:
                await http.close(o.session)
            health = await http.health()
            assert health.sessions == 0 and health.kv_blocks_free == health.kv_blocks_total
            schema = (await http.http.get("/openapi.json")).json()
            assert {"/v1/sessions", "/v1/sessions/{session_id}/slices",
                    "/v1/sessions/{session_id}", "/healthz", "/metrics"} <= schema["paths"].keys()

    with serving(engine) as served:
        run(main(served.url))


def test_websocket_server_clock_places_input_by_slice(engine):
    tokenizer = engine.loaded.tokenizer
    plan = {0: " hello", 1: " there", 3: " after a pause", 4: ""}

    async def main(url):
        s = await StreamSession.connect(url, SessionOptions(slice_ms=60, max_output_tokens=2))
        assert s.started.clock == "server" and 20 <= s.started.first_slice_closes_in_ms <= 90
        for k, text in plan.items():  # queued ahead, each for its own slice
            await s.send(text, slice=k)
        outputs = [await next_of(s, OutputEvent) for _ in range(6)]
        assert [o.slice for o in outputs] == list(range(6))
        for o in outputs:
            assert o.input_text == plan.get(o.slice, "")
            assert o.latency_ms >= 0 and o.missed_deadline == (o.latency_ms > 60)
        await s.send(" late", slice=1)  # slice 1 has closed: lands in the open slice
        notice = await next_of(s, NoticeEvent)
        assert notice.code == "late_input" and notice.slice >= 6
        landed = await next_of(s, OutputEvent)
        while landed.slice < notice.slice:
            landed = await next_of(s, OutputEvent)
        assert landed.slice == notice.slice and landed.input_text == " late"
        ended = await s.end(export=True)
        turns = ended.export["turns"]
        assert turns[3]["input_ids"] == tokenizer.encode(" after a pause")
        assert turns[notice.slice]["input_ids"] == tokenizer.encode(" late")
        assert ended.summary.slices == len(turns)
        assert ended.export["logprobs"].count(None) < len(ended.export["logprobs"])

    with serving(engine) as served:
        run(main(served.url))


# -- safety: keys, limits, bad input -----------------------------------------------------------

def test_api_key_required(engine):
    async def main(url):
        async with SessionsClient(url) as anonymous, SessionsClient(url, "wrong") as wrong, \
                SessionsClient(url, "sesame") as keyed:
            for client in (anonymous, wrong):
                with pytest.raises(ClientError) as refused:
                    await client.open()
                assert refused.value.status == 401
                with pytest.raises(ClientError) as refused:
                    await client.metrics()
                assert refused.value.status == 401
            with pytest.raises(ClientError) as refused:
                await StreamSession.connect(url)
            assert refused.value.status == 401
            assert (await anonymous.health()).sessions == 0  # no session was opened
            opened = await keyed.open()
            s = await StreamSession.connect(url, api_key="sesame")
            assert (await keyed.health()).sessions == 2
            await s.end()
            await keyed.close(opened.session)

    with serving(engine, api_key="sesame") as served:
        run(main(served.url))


def test_api_key_in_the_query_never_reaches_the_access_log(engine):
    import logging

    from microturn.server.logs import redact

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    access = logging.getLogger("uvicorn.access")
    with serving(engine, api_key="sesame") as served:
        access.setLevel(logging.INFO)
        handler = Keep()
        access.addHandler(handler)
        try:
            assert httpx.get(f"{served.url}/metrics?api_key=sesame").status_code == 200
            assert httpx.get(f"{served.url}/metrics?x=1&key=sesame").status_code == 401
        finally:
            access.removeHandler(handler)
    logged = "\n".join(records)
    assert "/metrics?api_key=[redacted]" in logged and "key=[redacted]" in logged
    assert "sesame" not in logged
    # negative control: the path as uvicorn hands it over carries the key
    assert "sesame" in "/v1/metrics?api_key=sesame" != redact("/v1/metrics?api_key=sesame")


def test_a_websocket_session_belongs_to_its_connection(engine):
    """Its id, leaked, lets no HTTP client feed or end it; its owner goes on, and ids never
    reach the access log. Negative control: an HTTP session is fed and ended over HTTP."""
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    async def main(url):
        s = await StreamSession.connect(url, SessionOptions(max_output_tokens=2), clock="client")
        async with httpx.AsyncClient(base_url=url) as http:
            for method, path in (("POST", f"/v1/sessions/{s.session_id}/slices"),
                                 ("DELETE", f"/v1/sessions/{s.session_id}")):
                response = await http.request(method, path, json={"text": " hi"})
                assert response.status_code == 403, response.text
                assert response.json()["error"] == {
                    "code": "not_owner", "field": "session", "limit": None,
                    "message": "this session belongs to the WebSocket connection that opened "
                               "it: feed and end it there"}
            assert (await http.get(f"/v1/sessions/{s.session_id}")).status_code == 200  # read
            await s.send_raw(json.dumps({"type": "input", "text": " hello"}))
            assert (await next_of(s, OutputEvent)).slice == 0  # its owner goes on
            ended = await s.end()
            assert ended.reason == "client"
            opened = (await http.post("/v1/sessions", json={})).json()["session"]
            assert (await http.post(f"/v1/sessions/{opened}/slices", json={})).status_code == 200
            assert (await http.delete(f"/v1/sessions/{opened}")).status_code == 200
        return [s.session_id, opened]

    access = logging.getLogger("uvicorn.access")
    with serving(engine) as served:
        access.setLevel(logging.INFO)
        handler = Keep()
        access.addHandler(handler)
        try:
            ids = run(main(served.url))
        finally:
            access.removeHandler(handler)
    logged = "\n".join(records)
    assert "/v1/sessions/[session]/slices" in logged
    assert not any(i in logged for i in ids)


def test_every_refusal_has_the_error_shape(engine):
    with serving(engine) as served:
        cases = [("GET", "/nope", 404, "not_found", "path"),
                 ("DELETE", "/healthz", 405, "method_not_allowed", "method"),
                 ("POST", "/v1/sessions/abc/slices", 404, "no_session", "session")]
        for method, path, status, code, field in cases:
            response = httpx.request(method, served.url + path, json={})
            assert response.status_code == status, (path, response.text)
            body = response.json()
            assert "detail" not in body and body["error"]["code"] == code, body
            assert body["error"]["field"] == field
        metrics = httpx.get(served.url + "/metrics").text
        assert 'microturn_client_errors_total{code="not_found"} 1.0' in metrics


def test_opens_waiting_behind_a_tick_are_refused_as_max_sessions(engine):
    """Opens that arrive while the engine is busy (its lock held, as during a tick) and then
    find the server full are refused with `max_sessions`, not `kv_pool_full`."""
    from microturn.server.errors import ServerError
    from microturn.server.metrics import ServerMetrics
    from microturn.server.scheduler import Scheduler

    async def main():
        scheduler = Scheduler(engine, ServerLimits(max_sessions=2), ServerMetrics())
        async with scheduler._engine_lock:  # a tick in progress
            opens = [asyncio.create_task(scheduler.open(SessionOptions(), "client", print))
                     for _ in range(5)]
            await asyncio.sleep(0.05)  # every open has passed its first check and now waits
        results = await asyncio.gather(*opens, return_exceptions=True)
        refused = [r.code for r in results if isinstance(r, ServerError)]
        assert len(refused) == 3 and set(refused) == {"max_sessions"}, results
        for live in list(scheduler.sessions.values()):
            await scheduler.close(live, "client", notify=False)

    run(main())


def test_client_faults_are_counted_not_logged_as_errors(engine):
    """An invalid UTF-8 text frame (closed 1007, as RFC 6455 says) and a refused key: counted
    in the metric, no error record. Negative control: the filter lets other errors through."""
    import logging

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError, InvalidStatus

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    async def main(url):
        ws_url = url.replace("http", "ws") + "/v1/stream"
        async with connect(ws_url + "?api_key=sesame") as ws:
            await ws.send(b'{"type": "start"}\xff', text=True)
            with pytest.raises(ConnectionClosedError) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd.code == 1007
        with pytest.raises(InvalidStatus):
            async with connect(ws_url + "?api_key=wrong"):
                pass

    errors = logging.getLogger("uvicorn.error")
    handler = Keep()
    with serving(engine, api_key="sesame") as served:
        errors.addHandler(handler)  # after uvicorn configured its loggers
        try:
            run(main(served.url))
            metrics = httpx.get(served.url + "/metrics?api_key=sesame").text
            errors.error("a real server error")
        finally:
            errors.removeHandler(handler)
    assert 'microturn_client_errors_total{code="invalid_utf8"} 1.0' in metrics
    assert 'microturn_client_errors_total{code="unauthorized"} 1.0' in metrics
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == [
        "a real server error"]


def test_max_sessions_refused_clearly(engine):
    async def main(url):
        async with SessionsClient(url) as http:
            first = await StreamSession.connect(url)
            second = await http.open()
            with pytest.raises(ClientError) as refused:
                await StreamSession.connect(url)
            assert refused.value.info.code == "max_sessions" and refused.value.info.limit == 2
            with pytest.raises(ClientError) as refused:
                await http.open()
            assert refused.value.status == 503 and refused.value.info.limit == 2
            await http.close(second.session)
            third = await http.open()  # room again
            await http.close(third.session)
            await first.end()

    with serving(engine, ServerLimits(max_sessions=2)) as served:
        run(main(served.url))


def test_bad_websocket_input_names_field_and_limit_and_keeps_session(engine):
    limits = ServerLimits(max_message_bytes=2000, max_input_tokens=16)
    vocab = engine.loaded.config.vocab_size
    bad = [
        ("{not json", "bad_json", None, None),
        ('{"type": "shout"}', "unknown_type", "type", None),
        ('{"text": "no type"}', "unknown_type", "type", None),
        ('{"type": "input", "text": 5}', "invalid", "text", None),
        ('{"type": "input", "text": "x", "slice": -3}', "invalid", "slice", 0),
        ('{"type": "input", "tokens": ["a"]}', "invalid", "tokens.0", None),
        (f'{{"type": "input", "tokens": [{vocab}]}}', "invalid", "tokens", vocab),
        ('{"type": "input", "text": "x", "color": "red"}', "invalid", "color", None),
        (json.dumps({"type": "input", "tokens": list(range(100, 117)), "slice": 40}), "limit",
         "tokens", 16),
        (json.dumps({"type": "input", "text": "y" * 2100}), "limit", "message", 2000),
        ('{"type": "start"}', "already_started", "type", None),
        (b"\x00\x01binary", "bad_frame", "frame", None),
        (b"\x01\x00\x00", "invalid", "audio", None),  # audio to a text-only session
    ]

    async def main(url):
        s = await StreamSession.connect(url, SessionOptions(slice_ms=40, max_output_tokens=2),
                                        clock="client")
        await s.send(" before", slice=0)
        assert (await next_of(s, OutputEvent)).input_text == " before"
        for frame, code, field, limit in bad:
            await s.send_raw(frame)
            error = await next_of(s, ErrorEvent)
            assert (error.code, error.field) == (code, field), frame
            if limit is not None:
                assert error.limit == limit and str(limit) in error.message
        await s.send(" after", slice=1)  # the session is intact and goes on
        assert (await next_of(s, OutputEvent)).input_text == " after"
        ended = await s.end(export=True)
        assert [t["input_ids"] for t in ended.export["turns"]] == [
            engine.loaded.tokenizer.encode(" before"), engine.loaded.tokenizer.encode(" after")]
        # a start with an out-of-range option is refused with its field and limit
        with pytest.raises(ClientError) as refused:
            await StreamSession.connect(url, SessionOptions.model_construct(
                **(SessionOptions().model_dump() | {"max_output_tokens": 999})))
        assert (refused.value.info.field, refused.value.info.limit) == ("max_output_tokens", 256)

    with serving(engine, limits) as served:
        run(main(served.url))


def test_bad_http_input_names_field_and_limit(engine):
    limits = ServerLimits(max_message_bytes=2000, max_input_tokens=16)

    async def main(url):
        async with SessionsClient(url) as http:
            raw = http.http
            cases = [
                (raw.post("/v1/sessions", content=b"{oops"), 400, "bad_json", None, None),
                (raw.post("/v1/sessions", json={"max_output_tokens": 999}), 422, "invalid",
                 "max_output_tokens", 256),
                (raw.post("/v1/sessions", json={"slice_ms": "fast"}), 422, "invalid",
                 "slice_ms", None),
                (raw.post("/v1/sessions", json={"top_p": 0}), 422, "invalid", "top_p", 0),
                (raw.post("/v1/sessions", json={"audio": {}}), 422, "invalid", "audio", None),
                (raw.post("/v1/sessions", json={"video": {"fps": 60}}), 422, "invalid",
                 "video.fps", 30.0),
            ]
            for request, status, code, field, limit in cases:
                response = await request
                error = response.json()["error"]
                assert (response.status_code, error["code"], error["field"]) == (status, code,
                                                                                 field)
                if limit is not None:
                    assert error["limit"] == limit
            opened = await http.open(SessionOptions(max_output_tokens=2))
            path = f"/v1/sessions/{opened.session}/slices"
            for body, status, field, limit in [
                    ({"tokens": list(range(100, 117))}, 422, "tokens", 16),
                    ({"text": "z" * 2100}, 413, "body", 2000),
                    ({"text": 3}, 422, "text", None)]:
                response = await raw.post(path, json=body)
                error = response.json()["error"]
                assert (response.status_code, error["field"]) == (status, field)
                if limit is not None:
                    assert error["limit"] == limit
            out = await http.slice(opened.session, " still here")
            assert out.slice == 0  # nothing refused was queued
            assert (await http.state(opened.session)).slices == 1
            await http.close(opened.session)

    with serving(engine, limits) as served:
        run(main(served.url))


def test_input_faster_than_real_time_gets_backpressure_with_bounded_memory(engine):
    limits = ServerLimits(max_input_tokens=8, max_buffered_slices=3)
    tokens = list(range(300, 308))  # one full slice per message

    async def main(url):
        s = await StreamSession.connect(url, SessionOptions(slice_ms=2000))
        async with SessionsClient(url) as http:
            for _ in range(12):
                await s.send(tokens=tokens)
            await s.ping()
            errors = []
            while True:
                event = await s.recv()
                if event.type == "pong":
                    break
                errors.append(event)
            assert all(isinstance(e, ErrorEvent) and e.code == "backpressure"
                       and e.limit == 3 and e.field == "slice" for e in errors)
            assert len(errors) == 12 - 4  # the open slice and 3 ahead were filled
            state = await http.state(s.session_id)
            assert state.pending_slices == 4
            first = await next_of(s, OutputEvent, timeout=5)
            assert first.input_tokens == tokens  # what was accepted is served in order
        await s.close()

    with serving(engine, limits) as served:
        run(main(served.url))


def test_idle_sessions_are_closed_and_freed(engine):
    async def main(url):
        async with SessionsClient(url) as http:
            s = await StreamSession.connect(url, SessionOptions(slice_ms=50))
            opened = await http.open()
            await http.slice(opened.session, " hi")
            ended = await next_of(s, EndedEvent, timeout=5)
            assert ended.reason == "idle"
            await wait_until_all_free(http)
            with pytest.raises(ClientError) as gone:
                await http.slice(opened.session, " hello?")
            assert gone.value.status == 404

    with serving(engine, ServerLimits(idle_timeout_s=0.6)) as served:
        run(main(served.url))


def test_waiting_on_a_slow_tick_is_not_idleness(engine, monkeypatch):
    """A client-clocked slice waits behind ticks slower than the idle timeout: the client is
    answered, and its session stays open; the idle clock starts at the answer. Negative
    control: a client that then sends nothing is closed as idle."""
    real_tick = engine.tick_async

    async def slow_tick():
        await asyncio.sleep(0.8)  # a long tick (a crowded server), longer than idle_timeout_s
        return await real_tick()

    monkeypatch.setattr(engine, "tick_async", slow_tick)

    async def main(url):
        async with SessionsClient(url) as http:
            opened = await http.open()
            for _ in range(2):
                output = await http.slice(opened.session, " hi")
                state = await http.state(opened.session)  # still open right after the answer
                assert state.slices == output.slice + 1
            await asyncio.sleep(1.5)  # now truly idle
            with pytest.raises(ClientError) as gone:
                await http.state(opened.session)
            assert gone.value.status == 404

    with serving(engine, ServerLimits(idle_timeout_s=0.5)) as served:
        run(main(served.url))


def until_closed(sock) -> bytes:
    """Everything the server sends on a raw socket until it closes the connection."""
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def test_silent_connections_and_slow_bodies_time_out(engine):
    """A WebSocket that never sends `start` gets `start_timeout` and is closed; an HTTP body
    that stops arriving gets 408 `body_timeout`. Negative control: a prompt start is served."""
    import logging
    import socket

    from websockets.asyncio.client import connect

    limits = ServerLimits(start_timeout_s=0.5, body_timeout_s=0.5, header_timeout_s=0.5)

    async def main(url):
        ws_url = url.replace("http", "ws") + "/v1/stream"
        async with connect(ws_url) as ws:
            started = time.monotonic()
            event = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert event["type"] == "error" and event["code"] == "start_timeout"
            assert (event["field"], event["limit"]) == ("start", 0.5)
            assert 0.4 < time.monotonic() - started < 3
            await asyncio.wait_for(ws.wait_closed(), 5)
        prompt = await StreamSession.connect(url)  # negative control
        await prompt.end()

    with serving(engine, limits) as served:
        run(main(served.url))
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"max_")
            reply = until_closed(sock).decode()
        assert reply.startswith("HTTP/1.1 408") and '"code":"body_timeout"' in reply, reply
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a slow head
            started = time.monotonic()
            assert sock.recv(4096) == b""  # closed, no answer
            assert 0.4 < time.monotonic() - started < 3
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # negative control
            started = time.monotonic()
            # answered, then closed once the next head is late (timed from the response on)
            assert until_closed(sock).startswith(b"HTTP/1.1 200")
            assert 0.4 < time.monotonic() - started < 3
        errors = logging.getLogger("uvicorn.error")
        records: list[logging.LogRecord] = []
        keep = logging.Handler()
        keep.emit = records.append
        errors.addHandler(keep)
        try:  # a client that leaves mid-body: a counted refusal, no traceback
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 100\r\n\r\n{")
                time.sleep(0.1)
            time.sleep(0.3)
        finally:
            errors.removeHandler(keep)
        assert not [r for r in records if r.levelno >= logging.ERROR], records
        health = httpx.get(served.url + "/healthz").json()
        assert health["sessions"] == 0


def test_abrupt_disconnect_frees_the_session(engine):
    async def main(url):
        async with SessionsClient(url) as http:
            s = await StreamSession.connect(url, SessionOptions(slice_ms=40))
            await s.send(" some words to hold kv blocks")
            await next_of(s, OutputEvent)
            health = await http.health()
            assert health.sessions == 1 and health.kv_blocks_free < health.kv_blocks_total
            s.ws.transport.abort()  # no close frame: the TCP connection just dies
            await wait_until_all_free(http)

    with serving(engine) as served:
        run(main(served.url))


# -- isolation and load ------------------------------------------------------------------------

GOOD = [(" one two three", 0.0, 0), (" a cat sat", 0.9, 5), (" listen", 1.3, 11)]


async def good_session(url: str, text: str, temperature: float, seed: int) -> dict:
    s = await StreamSession.connect(url, SessionOptions(max_output_tokens=3, seed=seed,
                                                        temperature=temperature,
                                                        deterministic=True), clock="client")
    for k in range(10):
        await s.send(text if k % 3 == 0 else "", slice=k)
        await asyncio.sleep(0.003 * k)  # ticks shared differently run to run
    for _ in range(10):
        await next_of(s, OutputEvent)
    return (await s.end(export=True)).export


async def garbage_session(url: str) -> None:
    s = await StreamSession.connect(url, SessionOptions(max_output_tokens=5), clock="client")
    for k in range(10):
        await s.send_raw(b"\xff" * 50)
        await s.send_raw('{"type": "input", "tokens": "x"}')
        await s.send_raw("][")
        await s.send(" noise " * (k + 1), slice=k)  # valid input too: it shares the ticks
    s.ws.transport.abort()


def test_garbage_client_does_not_change_other_sessions_bitwise(engine):
    async def sessions(url, with_garbage, good=GOOD):
        jobs = [good_session(url, *g) for g in good]
        if with_garbage:
            jobs.append(garbage_session(url))
        return (await asyncio.gather(*jobs))[:len(good)]

    with serving(engine) as served:
        alone = run(sessions(served.url, False))
        beside = run(sessions(served.url, True))
        # negative control: a one-seed change in one session is seen by the same comparison
        changed = run(sessions(served.url, True, GOOD[:2] + [(" listen", 1.3, 12)]))
    for a, b in zip(alone, beside, strict=True):
        assert a["turns"] == b["turns"]
        assert a["logprobs"] == b["logprobs"]  # bit-identical floats
    assert alone[:2] == changed[:2] and alone[2]["logprobs"] != changed[2]["logprobs"]


def test_sixteen_concurrent_websocket_clients(engine):
    async def client(url, i):
        s = await StreamSession.connect(url, SessionOptions(slice_ms=100, max_output_tokens=2,
                                                            seed=i))
        for k in range(8):
            await s.send(f" client {i} slice {k}", slice=k)
        outputs = [await next_of(s, OutputEvent, timeout=20) for _ in range(8)]
        await s.end()
        return outputs

    async def main(url):
        results = await asyncio.gather(*(client(url, i) for i in range(16)))
        for i, outputs in enumerate(results):
            assert [o.slice for o in outputs] == list(range(8))
            assert [o.input_text for o in outputs] == [f" client {i} slice {k}"
                                                        for k in range(8)]
        async with SessionsClient(url) as http:
            metrics = await http.metrics()
        # one grid: sessions with the same slice length close slices together
        per_tick = (metric(metrics, "microturn_tick_sessions_sum")
                    / metric(metrics, "microturn_tick_sessions_count"))
        assert per_tick > 4, per_tick

    with serving(engine, ServerLimits(max_sessions=16)) as served:
        run(main(served.url))


# -- the commands --------------------------------------------------------------------------------

def test_stream_command_real_time_and_fast_give_the_same_session(engine, tmp_path, capsys):
    from microturn.cli import main as cli

    timed = tmp_path / "talk.txt"
    timed.write_text("# seconds text\n0.0 Hello there\n0.13 how are\n0.16 you\n\n0.35 bye\n")
    with serving(engine) as served:
        common = ["stream", "--url", served.url, "--text-file", str(timed), "--slice-ms", "50",
                  "--max-output-tokens", "3", "--tail-slices", "2"]
        assert cli(common + ["--export", str(tmp_path / "live.json")]) == 0
        live_view = capsys.readouterr().out
        assert cli(common + ["--fast", "--export", str(tmp_path / "fast.json")]) == 0
    live = json.loads((tmp_path / "live.json").read_text())
    fast = json.loads((tmp_path / "fast.json").read_text())
    # the server's clock may close one more (silent) slice before `end` arrives
    assert live["turns"][:len(fast["turns"])] == fast["turns"]
    assert live["logprobs"][:len(fast["logprobs"])] == fast["logprobs"]
    tokenizer = engine.loaded.tokenizer
    assert [t["input_ids"] for t in fast["turns"]] == [
        tokenizer.encode(" Hello there"), [], tokenizer.encode(" how are"),
        tokenizer.encode(" you"), [], [], [], tokenizer.encode(" bye"), [], []]
    assert "in Hello there" in live_view and "ended (client): " in live_view

    timed.write_text("0.0 fine\nsoon words\n")
    assert cli(["stream", "--url", "http://127.0.0.1:9", "--text-file", str(timed)]) == 2
    assert "talk.txt:2: a line starts with its time in seconds" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_sigterm_finishes_tick_tells_clients_and_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "microturn", "serve", "--port", "0",
                               "--dtype", "fp32"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in server.stderr:
            if found := re.search(r"on (http://\S+) ", line):
                url = found.group(1)
                break
        assert url, "no serving line"

        async def main():
            clients = [await StreamSession.connect(url, SessionOptions(slice_ms=200,
                                                                       max_output_tokens=2))
                       for _ in range(2)]
            received = [0, 0]
            for i, c in enumerate(clients):
                await c.send(" Hello")
                await next_of(c, OutputEvent, timeout=30)
                received[i] += 1
            server.send_signal(signal.SIGTERM)
            for i, c in enumerate(clients):
                async with asyncio.timeout(30):
                    while not isinstance(event := await c.recv(), EndedEvent):
                        received[i] += isinstance(event, OutputEvent)
                # every slice the server computed (the tick in progress included) arrived
                assert event.reason == "shutdown"
                assert event.summary.slices == received[i] >= 1

        run(main())
        assert server.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
        time.sleep(0)


def test_stream_command_sends_typed_lines_from_stdin(engine):
    with serving(engine) as served:
        typed = subprocess.run(
            [sys.executable, "-m", "microturn", "stream", "--url", served.url, "--stdin",
             "--slice-ms", "50", "--max-output-tokens", "2", "--tail-slices", "3"],
            input="good morning\n\nhow are you\n", capture_output=True, text=True, timeout=60)
    assert typed.returncode == 0, typed.stderr
    # piped lines arrive together: they land in the slice open then, in order
    assert "in good morning how are you" in typed.stdout
    assert "ended (client)" in typed.stdout
