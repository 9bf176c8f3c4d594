"""`microturn serve --replicas N`: a local Ray cluster, Ray Serve's HTTP proxy on --host/--port,
N microturn replicas behind it routed by session (`router.py`), all checkpointing to one store.

A replica that dies is restarted by Ray; its sessions resume on the others from their last
checkpoint (the client sends `resume_session`). SIGTERM / Ctrl-C shuts the cluster down.
"""

import argparse
import os
import signal
import sys
import tempfile
import threading

from microturn.errors import MicroturnError

APP_NAME = "microturn"


def deployment(args: argparse.Namespace, replicas: int):
    """The Ray Serve deployment of `replicas` microturn replicas with `serve`'s flags."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from microturn.cluster.replica import MicroturnReplica
    from microturn.cluster.router import SessionRouter

    threads = max(1, (os.cpu_count() or 1) // replicas)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "replicas")}
    return serve.deployment(
        MicroturnReplica, name="microturn", num_replicas=replicas,
        # each WebSocket session is one long request: a replica takes as many as it has room
        max_ongoing_requests=args.max_sessions * 2 + 32,
        ray_actor_options={"num_cpus": 0},
        health_check_period_s=1.0, health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=10.0,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter, request_routing_stats_period_s=0.5,
            request_routing_stats_timeout_s=1.0),
    ).bind(settings, threads)


def start_cluster(args: argparse.Namespace) -> str:
    """Ray (local), Serve's proxy, the replicas; the base URL once every replica is up."""
    import ray
    from ray import serve

    if args.replicas < 1:
        raise MicroturnError(f"--replicas must be at least 1, got {args.replicas}")
    if args.tp > 1:
        raise MicroturnError("--replicas with --tp: not supported yet; use one or the other")
    if not args.checkpoint_dir:  # failover and drain need a store every replica reads
        args.checkpoint_dir = tempfile.mkdtemp(prefix="microturn-checkpoints-")
    ray.init(address="local", include_dashboard=False, namespace="microturn", log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(args, args.replicas), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def run_replicas(args: argparse.Namespace) -> None:
    if args.port == 0:
        raise MicroturnError("--replicas needs a fixed --port (Ray Serve's proxy binds it)")
    print(f"starting Ray and {args.replicas} replicas ...", file=sys.stderr, flush=True)
    url = start_cluster(args)
    print(f"microturn serving {args.replicas} replicas on {url} "
          f"(ws://{args.host}:{args.port}/v1/stream; checkpoints in {args.checkpoint_dir}; "
          f"routing by session)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
