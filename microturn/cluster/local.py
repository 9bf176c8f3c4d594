"""`microturn serve --replicas N` in a child process, for tests and benchmarks: started on a free
port, waited for until every replica reports, stopped with its whole process group."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from microturn.errors import MicroturnError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy_replicas(url: str, n: int, within_s: float = 180.0) -> list[dict]:
    """Wait until /healthz lists `n` replicas that are up; their reports."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            replicas = httpx.get(f"{url}/healthz", timeout=5).json().get("replicas") or []
            up = [r for r in replicas if r["status"] == "ok"]
            if len(up) >= n:
                return up
        time.sleep(0.5)
    raise MicroturnError(f"{n} replicas were not up within {within_s:.0f} s")


@contextlib.contextmanager
def local_cluster(replicas: int, checkpoint_dir: str, checkpoint_every: float = 1.0,
                  extra: tuple[str, ...] = ()):
    """The base URL of a running `serve --replicas`; everything it started is gone after."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "microturn", "serve", "--replicas", str(replicas), "--port",
         str(port), "--checkpoint-dir", checkpoint_dir, "--checkpoint-every",
         str(checkpoint_every), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        last = ""
        for last in proc.stderr:
            if last.startswith("microturn serving"):
                break
        else:
            raise MicroturnError(f"serve --replicas exited {proc.wait()}: {last.strip()}")
        # keep reading its log, so a full pipe never blocks it
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        healthy_replicas(url, replicas)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
