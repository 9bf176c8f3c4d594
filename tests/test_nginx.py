"""The same session affinity without Ray: two `microturn serve --replica-name` processes behind
Debian's nginx with docs/nginx-microturn.conf. New sessions spread over both; every call of a
session reaches its replica; one replica killed mid-stream, its sessions resume on the other
(nginx's backup) and end with the undisturbed timelines, bit for bit."""

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from microturn.client import SessionsClient
from microturn.cluster.local import free_port
from microturn.cluster.resuming_client import ResumingSession
from microturn.protocol import SessionOptions

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: nginx)")
SNIPPET = Path(__file__).parent.parent / "docs" / "nginx-microturn.conf"
OPTIONS = SessionOptions(max_output_tokens=3, temperature=0.9, top_p=0.95, seed=5,
                         deterministic=True)


def start_replica(name: str, port: int, store: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "microturn", "serve", "--port", str(port), "--replica-name",
         name, "--checkpoint-dir", str(store), "--checkpoint-every", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_serving(proc: subprocess.Popen) -> None:
    for line in proc.stderr:
        if line.startswith("microturn serving"):
            return
    pytest.fail(f"microturn serve exited {proc.wait()}")


def nginx_conf(tmp: Path, front: int, r1: int, r2: int) -> Path:
    snippet = SNIPPET.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{front}") \
        .replace("127.0.0.1:8001", f"127.0.0.1:{r1}").replace("127.0.0.1:8002",
                                                              f"127.0.0.1:{r2}")
    (tmp / "microturn.conf").write_text(snippet)
    temps = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(f"daemon off; worker_processes 1; pid {tmp}/nginx.pid;\n"
                    f"error_log {tmp}/error.log warn;\nevents {{}}\n"
                    f"http {{ access_log off; {temps} include {tmp}/microturn.conf; }}\n")
    return conf


def script(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["we", "talk", "about", "the", "rain", "and", "then", "stop", "wait", "go"]
    return [" " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
            for _ in range(14)]


def timeline(export: dict) -> tuple:
    return [(t["input_ids"], t["output_ids"]) for t in export["turns"]], export["logprobs"]


def test_nginx_routes_by_session_and_fails_over_bitwise(tmp_path):
    store = tmp_path / "checkpoints"
    front, p1, p2 = free_port(), free_port(), free_port()
    replicas = {"r1": start_replica("r1", p1, store), "r2": start_replica("r2", p2, store)}
    nginx = None
    try:
        for proc in replicas.values():
            wait_serving(proc)
        nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c",
                                  str(nginx_conf(tmp_path, front, p1, p2))],
                                 stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{front}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        scripts = [script(i) for i in range(4)]

        async def http_session():
            async with SessionsClient(url) as http:
                opened = await http.open(OPTIONS)
                for text in scripts[0][:6]:  # each call finds the session's replica
                    await http.slice(opened.session, text)
                await http.close(opened.session)

        async def undisturbed():
            return await asyncio.gather(*(ResumingSession(url, OPTIONS).run(s)
                                          for s in scripts))

        async def one_killed():
            clients = [ResumingSession(url, OPTIONS) for _ in scripts]
            started = [asyncio.Event() for _ in clients]
            tasks = []
            for c, s, e in zip(clients, scripts, started, strict=True):
                tasks.append(asyncio.create_task(c.run(s, 0.15, e)))
                await e.wait()  # one at a time: least_conn sees the open ones
            await asyncio.sleep(1.2)
            replicas["r1"].send_signal(signal.SIGKILL)
            return clients, await asyncio.gather(*tasks)

        asyncio.run(asyncio.wait_for(http_session(), 60))
        reference = asyncio.run(asyncio.wait_for(undisturbed(), 120))
        clients, ended = asyncio.run(asyncio.wait_for(one_killed(), 120))
        homes = [c.session.split("-", 1)[0] for c in clients]
        assert sorted(homes) == ["r1", "r1", "r2", "r2"]
        for c, e, ref in zip(clients, ended, reference, strict=True):
            assert bool(c.resumes) == c.session.startswith("r1-")
            assert timeline(e.export) == timeline(ref.export)
        changed = list(scripts[1])  # negative control: the comparison sees one word
        changed[2] = " rain rain"
        other = asyncio.run(asyncio.wait_for(ResumingSession(url, OPTIONS).run(changed), 60))
        assert timeline(other.export) != timeline(reference[1].export)
    finally:
        for proc in [*replicas.values(), nginx]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
