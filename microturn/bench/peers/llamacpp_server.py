"""llama.cpp's own server, driven over HTTP the way people run it: `llama-server --parallel N`
(one slot per session, continuous batching over the slots, unified KV), each micro-turn one
`/completion` request per session, all in flight at once, with the session's whole history
as the prompt, `cache_prompt` (the slot keeps its KV; only the new tokens are computed) and
`id_slot` (the session's slot, so its cache is the one reused). Greedy, never stopping early.

The server is started for each load (`reserve`): N slots of the tokens each session will
hold. A history past its slot's share is shifted here the way the other llama.cpp peers shift
it (sink kept, the oldest quarter after it dropped); the slot's prompt cache then matches only
the sink, and the server recomputes the rest once."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from microturn.bench.peers.base import PeerUnavailable
from microturn.bench.peers.llamacpp_peer import SINK, shift_drop

SERVER_ENV = "MICROTURN_LLAMA_SERVER"  # path to a llama-server binary, if not on PATH


def find_llama_server() -> str | None:
    return os.environ.get(SERVER_ENV) or shutil.which("llama-server")


class LlamaServerPeer:
    name = "llama-server"

    def __init__(self, gguf: Path, context: int, trained_context: int, threads: int,
                 kv_bytes_per_token: int):
        self.binary = find_llama_server()
        if self.binary is None:
            raise PeerUnavailable(f"llama-server not found (set {SERVER_ENV} or put it on PATH; "
                                  "docs/BENCHMARKS.md builds it from llama-cpp-python's sdist)")
        self.gguf, self.threads, self.trained = gguf, threads, trained_context
        self.per_session, self.bytes_per_token = min(context, trained_context), kv_bytes_per_token
        self.process: subprocess.Popen | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.free_slots: list[int] = []
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True)
        build = (version.stdout + version.stderr).strip().splitlines()
        self.config = (f"llama-server ({build[0] if build else '?'}), GGUF weights as stored, f16 "
                       "KV, --parallel N slots (unified KV, continuous batching), one HTTP "
                       "/completion per session a micro-turn with cache_prompt and id_slot, "
                       f"{threads} threads")
        self.reserve(1, self.per_session)

    def reserve(self, sessions: int, tokens_per_session: int) -> None:
        self._stop()
        self.per_session = min(tokens_per_session, self.trained)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen(
            [self.binary, "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
             "--parallel", str(sessions), "--ctx-size", str(sessions * self.per_session),
             "--kv-unified", "--threads", str(self.threads), "--threads-batch",
             str(self.threads), "--batch-size", str(max(512, 64 * sessions)),
             "--flash-attn", "off", "--no-webui", "--log-disable"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self._wait_ready()
        self.pool = ThreadPoolExecutor(sessions)
        self.free_slots = list(range(sessions - 1, -1, -1))

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("llama-server exited: "
                                   + self.log.read().decode(errors="replace")[-500:])
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llama-server not ready within {timeout_s:.0f} s")

    def open(self) -> dict:
        if not self.free_slots:
            raise RuntimeError("llama-server: more sessions open than slots")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return {"slot": self.free_slots.pop(), "history": [], "conn": conn}

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        for session, new in zip(sessions, inputs, strict=True):
            session["history"] += new
            self._make_room(session, output_tokens)
        list(self.pool.map(lambda s: self._complete(s, output_tokens), sessions))

    def _complete(self, session: dict, output_tokens: int) -> None:
        body = json.dumps({"prompt": session["history"], "n_predict": output_tokens,
                           "temperature": 0.0, "cache_prompt": True, "id_slot": session["slot"],
                           "ignore_eos": True, "return_tokens": True, "stream": False})
        conn = session["conn"]
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = json.loads(reply.read())
        if reply.status != 200:
            raise RuntimeError(f"llama-server /completion {reply.status}: {data}")
        session["history"] += data["tokens"]

    def _make_room(self, session: dict, output_tokens: int) -> None:
        history = session["history"]
        if not (drop := shift_drop(len(history), output_tokens, self.per_session)):
            return
        session["history"] = history[:SINK] + history[SINK + drop:]

    def resident_bytes(self, session: dict) -> int:
        return self.per_session * self.bytes_per_token

    def close(self, session: dict) -> None:
        session["conn"].close()
        self.free_slots.append(session["slot"])
        session.clear()

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self.log.close()

    def __del__(self):
        self._stop()
