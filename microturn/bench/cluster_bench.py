"""`microturn bench cluster`: what replicas cost and what a failure costs, on a real local
`serve --replicas N` (Ray Serve, the default model).

1. The router: its decision per request (in process, the real SessionRouter on N replicas'
   stats), and the hop through Ray Serve's proxy and router: a cheap call (GET a session's
   state) round-trip on the cluster against a plain `microturn serve`.
2. A replica killed mid-stream: S client-clocked sessions paced at --pace-ms; after a third of
   their slices, SIGKILL the replica holding the most. Per moved session: seconds from the kill
   to its `started` on another replica, slices lost (answered - resumed_from); and for every
   session, whether its final timeline equals the undisturbed run's bit for bit.
3. A drain: the same, with POST /v1/cluster/drain instead of a kill.
"""

import argparse
import asyncio
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import httpx
from rich.console import Console
from rich.table import Table

from microturn.cluster.local import free_port, healthy_replicas, local_cluster
from microturn.cluster.resuming_client import ResumingSession
from microturn.errors import MicroturnError
from microturn.protocol import SessionOptions

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "hills",
         "and", "quiet", "towns", "remind", "me", "stop", "now"]


@dataclass
class Disruption:
    kind: str  # "kill" or "drain"
    sessions: int
    moved: int
    resume_s_max: float  # disruption -> the last moved session's `started` elsewhere
    resume_s_mean: float
    slices_lost_max: int
    bitwise_equal: int  # sessions whose final timeline equals the undisturbed run's


def inputs(seed: int, n: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
            for _ in range(n)]


def timeline(export: dict) -> tuple:
    return [(t["input_ids"], t["output_ids"]) for t in export["turns"]], export["logprobs"]


async def disrupted(url: str, kind: str, scripts: list[list[str]], reference: list,
                    options: SessionOptions, pace_s: float) -> Disruption:
    clients = [ResumingSession(url, options) for _ in scripts]
    started = [asyncio.Event() for _ in clients]
    tasks = [asyncio.create_task(c.run(s, pace_s, e))
             for c, s, e in zip(clients, scripts, started, strict=True)]
    for e in started:
        await e.wait()
    third = len(scripts[0]) // 3
    while min(len(c.answered_at) for c in clients) < third:
        await asyncio.sleep(0.02)
    replicas = await asyncio.to_thread(lambda: httpx.get(f"{url}/healthz").json()["replicas"])
    counts = {r["name"]: sum(c.session.startswith(r["name"] + "-") for c in clients)
              for r in replicas}
    victim = next(r for r in replicas if r["name"] == max(counts, key=counts.get))
    at = time.monotonic()
    if kind == "kill":
        os.kill(victim["pid"], signal.SIGKILL)
    else:
        reply = await asyncio.to_thread(httpx.post, f"{url}/v1/cluster/drain",
                                        json={"replica": victim["name"]})
        if reply.status_code != 200:
            raise MicroturnError(f"drain refused: {reply.text}")
    ended = await asyncio.gather(*tasks)
    moved = [c for c in clients if c.resumes]
    waits = [c.resumes[0].at - at for c in moved] or [0.0]
    return Disruption(kind, len(clients), len(moved), round(max(waits), 3),
                      round(statistics.mean(waits), 3),
                      max((r.lost for c in moved for r in c.resumes), default=0),
                      sum(timeline(e.export) == timeline(r.export)
                          for e, r in zip(ended, reference, strict=True)))


def hop_ms(url: str, calls: int) -> tuple[float, float]:
    """p50, p99 of GET /v1/sessions/<id> (no engine work) round trips."""
    with httpx.Client(base_url=url, timeout=30) as http:
        session = http.post("/v1/sessions", json={}).json()["session"]
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            http.get(f"/v1/sessions/{session}", headers={"x-session-id": session})
            times.append((time.perf_counter() - t) * 1e3)
        http.delete(f"/v1/sessions/{session}")
    times.sort()
    return round(times[len(times) // 2], 3), round(times[int(0.99 * (len(times) - 1))], 3)


def plain_hop_ms(calls: int) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "microturn", "serve", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("microturn serving"):
                break
        return hop_ms(f"http://127.0.0.1:{port}", calls)
    finally:
        proc.terminate()
        proc.wait(30)


def router_decision_us(replicas: int, sessions_each: int, calls: int = 20000) -> float:
    """The real SessionRouter choosing among `replicas` whose stats list `sessions_each`
    sessions, for a request named by its path (the costlier case: the scope is unpickled)."""
    from ray.serve._private.common import (
        DeploymentID,
        ReplicaID,
        RequestMetadata,
        RunningReplicaInfo,
        StreamingHTTPRequest,
    )
    from ray.serve.request_router import PendingRequest, RunningReplica

    from microturn.cluster.router import SessionRouter

    deployment = DeploymentID("microturn", "microturn")
    running = []
    for i in range(replicas):
        name = f"r{i:07d}"
        info = RunningReplicaInfo(
            ReplicaID(name, deployment), None, None, None, f"actor{i}", 64,
            routing_stats={"sessions": [f"{name}-{j}" for j in range(sessions_each)],
                           "headroom": 0.5, "draining": False, "at": 1.0})
        replica = RunningReplica.__new__(RunningReplica)  # no actor: only its stats are read
        replica._replica_info = info
        running.append(replica)
    router = SessionRouter.__new__(SessionRouter)
    router.initialize_state()
    scope = {"type": "http", "path": f"/v1/sessions/r{replicas - 1:07d}-3/slices",
             "query_string": b""}
    async def decide():
        request = PendingRequest(
            args=[pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))],
            kwargs={}, metadata=RequestMetadata(request_id="x", internal_request_id="x"))
        start = time.perf_counter()
        for _ in range(calls):
            await router.choose_replicas(running, request)
        return (time.perf_counter() - start) / calls * 1e6

    return round(asyncio.run(decide()), 2)


def run_cluster_bench(args: argparse.Namespace) -> None:
    console = Console(highlight=False, soft_wrap=True)
    options = SessionOptions(max_output_tokens=3, temperature=0.9, top_p=0.95, seed=11,
                             deterministic=True)
    scripts = [inputs(100 + i, args.slices) for i in range(args.sessions)]
    results: dict = {"cpu": _cpu(), "replicas": args.replicas, "sessions": args.sessions,
                     "slices": args.slices, "checkpoint_every_s": args.checkpoint_every}
    with console.status("the router's decision, in process"):
        results["router_decision_us"] = router_decision_us(args.replicas, 16)
    with console.status("a plain `microturn serve`: the hop without Ray"):
        results["plain_hop_ms"] = plain_hop_ms(args.calls)
    with tempfile.TemporaryDirectory() as store:
        with console.status(f"starting Ray and {args.replicas} replicas"):
            cluster = local_cluster(args.replicas, store, args.checkpoint_every)
            url = cluster.__enter__()
        try:
            results["cluster_hop_ms"] = hop_ms(url, args.calls)

            async def undisturbed():
                return await asyncio.gather(*(ResumingSession(url, options).run(s)
                                              for s in scripts))

            disruptions = []
            for kind in ("kill", "drain"):
                with console.status(f"{args.sessions} sessions, one replica's {kind}"):
                    reference = asyncio.run(undisturbed())
                    disruptions.append(asyncio.run(disrupted(
                        url, kind, scripts, reference, options, args.pace_ms / 1e3)))
                    healthy_replicas(url, args.replicas)
            results["disruptions"] = [asdict(d) for d in disruptions]
        finally:
            cluster.__exit__(None, None, None)
    table = Table(title=f"microturn bench cluster: {args.replicas} replicas, {args.sessions} "
                        f"sessions x {args.slices} slices, checkpoints every "
                        f"{args.checkpoint_every} s ({results['cpu']})")
    for column in ("disruption", "sessions moved", "resumed within s (mean / max)",
                   "slices lost (max)", "timelines bitwise equal"):
        table.add_column(column, justify="right")
    for d in disruptions:
        table.add_row(d.kind, f"{d.moved} of {d.sessions}",
                      f"{d.resume_s_mean} / {d.resume_s_max}", str(d.slices_lost_max),
                      f"{d.bitwise_equal} of {d.sessions}")
    console.print(table)
    console.print(f"router decision {results['router_decision_us']} µs a request; a cheap call "
                  f"round trip p50 / p99: {results['cluster_hop_ms'][0]} / "
                  f"{results['cluster_hop_ms'][1]} ms through Ray Serve, "
                  f"{results['plain_hop_ms'][0]} / {results['plain_hop_ms'][1]} ms direct")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _cpu() -> str:
    import os

    from microturn.bench.machine import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} vCPUs"
