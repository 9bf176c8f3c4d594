"""`microturn serve --replicas 2` on a local Ray cluster, the default model, loopback only:
sessions spread over the replicas and stay on theirs; a replica killed mid-stream loses its
sessions' last seconds at most, and every session, resumed on the other replica, ends with the
timeline an undisturbed run gives, bit for bit; a drained replica hands its sessions over with
nothing lost; /healthz and /metrics speak for the whole cluster."""

import asyncio
import os
import random
import signal
import time

import httpx
import pytest

from microturn.client import SessionsClient, StreamSession
from microturn.cluster.local import healthy_replicas, local_cluster
from microturn.cluster.resuming_client import ResumingSession
from microturn.protocol import SessionOptions

pytest.importorskip("ray.serve")

CHECKPOINT_EVERY_S = 0.5
SLICES = 16
OPTIONS = SessionOptions(max_output_tokens=3, temperature=0.9, top_p=0.95, seed=11,
                         deterministic=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(2, str(tmp_path_factory.mktemp("checkpoints")),
                       CHECKPOINT_EVERY_S) as url:
        yield url


def script(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "hills",
             "and", "quiet", "towns", "remind", "me", "stop", "now"]
    return [" " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 3)))
            for _ in range(SLICES)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


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
        return await asyncio.gather(*(ResumingSession(cluster, OPTIONS).run(s)
                                     for s in scripts))

    async def with_failure():
        clients = [ResumingSession(cluster, OPTIONS) for s in scripts]
        started = [asyncio.Event() for _ in clients]
        tasks = [asyncio.create_task(c.run(s, 0.15, e))
                 for c, s, e in zip(clients, scripts, started, strict=True)]
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
        resume = c.resumes[0]
        # what was lost: the slices answered since the last checkpoint before the kill
        since_checkpoint = sum(t > killed_at - CHECKPOINT_EVERY_S - 0.3 for t in c.answered_at
                               if t <= killed_at)
        assert 0 <= resume.lost <= since_checkpoint + 1
        print(f"session {c.session}: killed at slice {resume.answered}, resumed from "
              f"{resume.resumed_from} after {resume.at - killed_at:.2f} s")
    # negative control: the comparison sees a one-word change
    changed = list(scripts[0])
    changed[3] = " towns towns"
    other = run(ResumingSession(cluster, OPTIONS).run(changed))
    assert timeline(other.export) != timeline(reference[0].export)
    healthy_replicas(cluster, 2)  # Ray brought the killed replica back


def test_a_drained_replica_hands_its_sessions_over_with_nothing_lost(cluster):
    scripts = [script(20 + i) for i in range(2)]

    async def undisturbed():
        return await asyncio.gather(*(ResumingSession(cluster, OPTIONS).run(s)
                                     for s in scripts))

    async def with_drain():
        clients = [ResumingSession(cluster, OPTIONS) for s in scripts]
        started = [asyncio.Event() for _ in clients]
        tasks = [asyncio.create_task(c.run(s, 0.15, e))
                 for c, s, e in zip(clients, scripts, started, strict=True)]
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
        assert c.resumes[0].lost == 0  # handed over as it stood
    for e, ref in zip(ended, reference, strict=True):
        assert timeline(e.export) == timeline(ref.export)
    bad = httpx.post(f"{cluster}/v1/cluster/drain", json={"replica": "nosuch"})
    assert bad.status_code == 404 and bad.json()["error"]["field"] == "replica"
    replicas = healthy_replicas(cluster, 2)
    assert victim["name"] not in {r["name"] for r in replicas}  # Ray replaced it
