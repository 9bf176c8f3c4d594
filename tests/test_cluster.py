"""`microturn serve --replicas 2` on a local Ray cluster, the default model, loopback only:
sessions spread over the replicas and stay on theirs; a replica killed mid-stream loses its
sessions' last seconds at most, and every session, resumed on the other replica, ends with the
timeline an undisturbed run gives, bit for bit; a drained replica hands its sessions over with
nothing lost; /healthz and /metrics speak for the whole cluster."""

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from microturn.client import SessionsClient, StreamSession
from microturn.protocol import EndedEvent, OutputEvent, SessionOptions

pytest.importorskip("ray.serve")

CHECKPOINT_EVERY_S = 0.5
SLICES = 16
OPTIONS = SessionOptions(max_output_tokens=3, temperature=0.9, top_p=0.95, seed=11,
                         deterministic=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    store = tmp_path_factory.mktemp("checkpoints")
    proc = subprocess.Popen(
        [sys.executable, "-m", "microturn", "serve", "--replicas", "2", "--port", str(port),
         "--checkpoint-dir", str(store), "--checkpoint-every", str(CHECKPOINT_EVERY_S)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if line.startswith("microturn serving"):
                break
        else:
            pytest.fail(f"the cluster did not start (exit {proc.wait()})")
        url = f"http://127.0.0.1:{port}"
        wait_for_replicas(url, 2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for_replicas(url: str, n: int, within_s: float = 120.0) -> list:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            replicas = httpx.get(f"{url}/healthz", timeout=5).json().get("replicas") or []
            if len([r for r in replicas if r["status"] == "ok"]) >= n:
                return replicas
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{n} replicas not up within {within_s} s")


def script(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "hills",
             "and", "quiet", "towns", "remind", "me", "stop", "now"]
    return [" " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
            for _ in range(SLICES)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


class Lost(Exception):
    pass


class Client:
    """One client-clocked session that resumes itself whenever its connection is lost (a
    dead replica) or the server hands it over ("moved")."""

    def __init__(self, url: str, said: list[str], pace_s: float = 0.0):
        self.url, self.said, self.pace_s = url, said, pace_s
        self.outputs: dict[int, list[int]] = {}
        self.answered_at: list[float] = []
        self.resumes: list[tuple[float, int, int]] = []  # (when, answered then, resumed from)
        self.session = ""

    async def run(self, started: asyncio.Event | None = None) -> EndedEvent:
        s = await StreamSession.connect(self.url, OPTIONS, clock="client")
        self.session = s.session_id
        if started is not None:
            started.set()
        k = 0
        while k < len(self.said):
            try:
                await s.send(self.said[k])
                while not isinstance(event := await s.recv(), OutputEvent):
                    if isinstance(event, EndedEvent):  # handed over ("moved")
                        raise Lost(event.reason)
            except (ConnectionClosed, Lost):
                answered = k
                s = await StreamSession.resume(self.url, self.session, clock="client")
                k = s.started.resumed_from
                self.resumes.append((time.monotonic(), answered, k))
                continue
            self.outputs[event.slice] = event.tokens
            self.answered_at.append(time.monotonic())
            k += 1
            await asyncio.sleep(self.pace_s)
        return await s.end(export=True)


def owner(session: str, replicas: list) -> dict:
    return next(r for r in replicas if session.startswith(r["name"] + "-"))


def timeline(export: dict) -> list:
    return [(t["input_ids"], t["output_ids"]) for t in export["turns"]], export["logprobs"]


def test_sessions_spread_and_the_cluster_reports_as_one(cluster):
    async def main():
        clients = [await StreamSession.connect(cluster, OPTIONS, clock="client")
                   for _ in range(4)]
        async with SessionsClient(cluster) as http:
            opened = await http.open(OPTIONS)
            for text in script(1)[:6]:  # every slice call reaches the session's replica
                await http.slice(opened.session, text)
            health = await http.health()
            metrics = await http.metrics()
            await http.close(opened.session)
        for c in clients:
            await c.end()
        return [c.session_id for c in clients], health, metrics

    ids, health, metrics = run(main())
    names = {r.name for r in health.replicas}
    assert len(names) == 2 and health.replica in names
    homes = [i.split("-", 1)[0] for i in ids]
    assert sorted(homes.count(n) for n in names) == [2, 2]  # least loaded first
    for name in names:
        assert f'microturn_live_sessions{{replica="{name}"}}' in metrics
    assert "microturn_cluster_replicas 2.0" in metrics


def test_a_killed_replica_loses_nothing_past_the_checkpoint_and_sessions_go_on_bitwise(
        cluster):
    scripts = [script(10 + i) for i in range(4)]

    async def undisturbed():
        return await asyncio.gather(*(Client(cluster, s).run() for s in scripts))

    async def with_failure():
        clients = [Client(cluster, s, pace_s=0.15) for s in scripts]
        started = [asyncio.Event() for _ in clients]
        tasks = [asyncio.create_task(c.run(e)) for c, e in zip(clients, started, strict=True)]
        for e in started:
            await e.wait()
        await asyncio.sleep(1.5)  # mid-stream, after a few checkpoints
        replicas = httpx.get(f"{cluster}/healthz").json()["replicas"]
        victim = owner(clients[0].session, replicas)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        ended = await asyncio.gather(*tasks)
        return clients, ended, victim, killed_at

    reference = run(undisturbed())
    clients, ended, victim, killed_at = run(with_failure())
    moved = [c for c in clients if c.session.startswith(victim["name"] + "-")]
    assert moved and all(c.resumes for c in moved)
    for c, e, ref in zip(clients, ended, reference, strict=True):
        assert timeline(e.export) == timeline(ref.export)  # bit for bit, whatever happened
        assert [c.outputs[k] for k in range(SLICES)] == [
            t["output_ids"] for t in ref.export["turns"]]
    for c in moved:
        when, answered, resumed_from = c.resumes[0]
        # what was lost: the slices answered since the last checkpoint before the kill
        lost = answered - resumed_from
        since_checkpoint = sum(t > killed_at - CHECKPOINT_EVERY_S - 0.3 for t in c.answered_at
                               if t <= killed_at)
        assert 0 <= lost <= since_checkpoint + 1
        print(f"session {c.session}: killed at slice {answered}, resumed from "
              f"{resumed_from} after {when - killed_at:.2f} s")
    # negative control: the comparison sees a one-word change
    changed = list(scripts[0])
    changed[3] = " towns towns"
    other = run(Client(cluster, changed).run())
    assert timeline(other.export) != timeline(reference[0].export)
    wait_for_replicas(cluster, 2)  # Ray brought the killed replica back


def test_a_drained_replica_hands_its_sessions_over_with_nothing_lost(cluster):
    scripts = [script(20 + i) for i in range(2)]

    async def undisturbed():
        return await asyncio.gather(*(Client(cluster, s).run() for s in scripts))

    async def with_drain():
        clients = [Client(cluster, s, pace_s=0.15) for s in scripts]
        started = [asyncio.Event() for _ in clients]
        tasks = [asyncio.create_task(c.run(e)) for c, e in zip(clients, started, strict=True)]
        for e in started:
            await e.wait()
        await asyncio.sleep(0.8)
        replicas = httpx.get(f"{cluster}/healthz").json()["replicas"]
        victim = owner(clients[0].session, replicas)
        reply = httpx.post(f"{cluster}/v1/cluster/drain", json={"replica": victim["name"]})
        assert reply.status_code == 200, reply.text
        ended = await asyncio.gather(*tasks)
        return clients, ended, victim

    reference = run(undisturbed())
    clients, ended, victim = run(with_drain())
    moved = [c for c in clients if c.session.startswith(victim["name"] + "-")]
    assert moved
    for c in moved:
        _, answered, resumed_from = c.resumes[0]
        assert resumed_from == answered  # handed over as it stood
    for e, ref in zip(ended, reference, strict=True):
        assert timeline(e.export) == timeline(ref.export)
    bad = httpx.post(f"{cluster}/v1/cluster/drain", json={"replica": "nosuch"})
    assert bad.status_code == 404 and bad.json()["error"]["field"] == "replica"
    replicas = wait_for_replicas(cluster, 2)
    assert victim["name"] not in {r["name"] for r in replicas}  # Ray replaced it
