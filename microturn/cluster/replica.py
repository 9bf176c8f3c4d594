"""One replica of `microturn serve --replicas N`: a Ray Serve deployment whose ingress is the
whole microturn app (engine, tick loop, WebSocket and HTTP API), exactly as `serve` runs it.

Its session ids start with its name, so the router (`router.py`) can tell a session's home
from the id alone. Each second it tells the router (Ray's routing stats) and the other replicas
(the registry) its sessions, tick headroom and whether it drains. On a drain order it hands its
sessions over (`Scheduler.drain("moved")`), then fails its health check so Ray replaces it.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import time

import torch
from ray import serve

from microturn.cluster.merged_metrics import merged_metrics
from microturn.cluster.registry import registry
from microturn.protocol import ReplicaHealth

REPORT_EVERY_S = 0.5
log = logging.getLogger("microturn.server")


class ClusterView:
    """What a replica's app asks of the cluster (create_app's `cluster`)."""

    def __init__(self, name: str, actor):
        self.name, self.actor = name, actor

    async def replicas(self) -> list[ReplicaHealth]:
        return [ReplicaHealth(**r) for r in await self.actor.replicas.remote()]

    async def metrics(self) -> bytes:
        return merged_metrics(await self.actor.metrics.remote())

    async def drain(self, name: str) -> bool:
        return await self.actor.drain.remote(name)


@serve.ingress()
class MicroturnReplica:
    def __init__(self, args: dict, threads: int = 1):
        self.args = argparse.Namespace(**args)
        self.threads = threads
        self.name = serve.get_replica_context().replica_id.unique_id
        self.registry = registry()
        self.handed_over = False
        self.scheduler = None
        self._reporter: asyncio.Task | None = None

    def __serve_build_asgi_app__(self):
        from microturn.server.serve import build_app

        torch.set_num_threads(self.threads)
        app = build_app(self.args, id_prefix=f"{self.name}-",
                        cluster=ClusterView(self.name, self.registry))
        self.scheduler = app.state.scheduler
        self._reporter = asyncio.get_running_loop().create_task(self._report())
        return app

    def record_routing_stats(self) -> dict:
        s = self.scheduler
        if s is None:
            return {"sessions": [], "headroom": 1.0, "draining": False, "at": time.time()}
        return {"sessions": list(s.sessions), "headroom": round(s.tick_headroom(), 4),
                "draining": s.draining, "at": time.time()}

    def check_health(self) -> None:
        if self.handed_over:
            raise RuntimeError(f"replica {self.name} handed its sessions over: replace it")

    def _health(self) -> dict:
        s = self.scheduler
        pool = s.engine.pool_stats()
        return {"status": "draining" if s.draining else "ok", "sessions": len(s.sessions),
                "tick_headroom": round(s.tick_headroom(), 4),
                "kv_blocks_free": pool.blocks_free, "pid": os.getpid()}

    async def _report(self) -> None:
        while True:
            try:
                orders = await self.registry.report.remote(self.name, self._health(),
                                                           self.scheduler.metrics.render())
                if orders["drain"] and not self.scheduler.draining:
                    moved = await self.scheduler.drain("moved")
                    self.handed_over = True
                    log.info("replica %s handed %d sessions over", self.name, len(moved))
            except Exception:  # the registry restarting must not stop the replica
                log.exception("replica report failed")
            await asyncio.sleep(REPORT_EVERY_S)

    async def __del__(self):
        if self._reporter is not None:
            self._reporter.cancel()
        with contextlib.suppress(Exception):
            await self.registry.leave.remote(self.name)

