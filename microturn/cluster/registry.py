"""The cluster's shared view: one small Ray actor every replica reports to each second (its
health and its Prometheus text) and reads its orders from (drain). Any replica answering
/healthz or /metrics asks it for everyone's, so the cluster reads as one server.

Reports older than STALE_S are left out: a replica killed mid-stream drops out of /healthz
within that time, even before Ray has noticed its death.
"""

import time

import ray

REGISTRY_NAME = "microturn-cluster"
NAMESPACE = "microturn"
STALE_S = 3.0


@ray.remote(num_cpus=0)
class ClusterRegistry:
    def __init__(self):
        self.reports: dict[str, tuple[float, dict, bytes]] = {}  # name -> (at, health, metrics)
        self.drain_orders: set[str] = set()

    def report(self, name: str, health: dict, metrics: bytes) -> dict:
        """A replica's report; the answer is its orders."""
        self.reports[name] = (time.monotonic(), health, metrics)
        return {"drain": name in self.drain_orders}

    def leave(self, name: str) -> None:
        self.reports.pop(name, None)
        self.drain_orders.discard(name)

    def _fresh(self) -> dict[str, tuple[float, dict, bytes]]:
        now = time.monotonic()
        return {n: r for n, r in self.reports.items() if now - r[0] <= STALE_S}

    def replicas(self) -> list[dict]:
        now = time.monotonic()
        return [health | {"name": name, "reported_s_ago": round(now - at, 3)}
                for name, (at, health, _) in sorted(self._fresh().items())]

    def metrics(self) -> dict[str, bytes]:
        return {name: text for name, (_, _, text) in sorted(self._fresh().items())}

    def drain(self, name: str) -> bool:
        """Order replica `name` to hand its sessions over; False if no such live replica."""
        if name not in self._fresh():
            return False
        self.drain_orders.add(name)
        return True


def registry():
    """The cluster's registry actor, created by whoever asks first (detached, so it outlives
    the replica that made it)."""
    return ClusterRegistry.options(name=REGISTRY_NAME, namespace=NAMESPACE,
                                   get_if_exists=True, lifetime="detached").remote()
