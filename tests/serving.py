"""A real server for tests: the app on uvicorn in a thread, on a free loopback port."""

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from microturn.engine.engine import Engine
from microturn.server.app import create_app
from microturn.server.http_protocol import header_timeout_protocol
from microturn.server.limits import ServerLimits


@dataclass
class Served:
    url: str
    engine: Engine
    limits: ServerLimits


@contextlib.contextmanager
def serving(engine: Engine, limits: ServerLimits | None = None, api_key: str | None = None,
            worker=None, checkpoints=None):
    limits = limits or ServerLimits()
    app = create_app(engine, limits, api_key=api_key, worker=worker, checkpoints=checkpoints)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as serve
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", ws="websockets-sansio", lifespan="on",
                            ws_max_size=limits.ws_max_size,
                            http=header_timeout_protocol(limits.header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, limits)
    finally:
        server.should_exit = True
        thread.join(15)
