"""`microturn serve`: load the model, build one engine, run the app on uvicorn.

SIGTERM (or Ctrl-C) is graceful: new sessions are refused, the tick in progress finishes, every
client gets an `ended` event with reason "shutdown", then the process exits 0.
"""

import argparse
import asyncio
import logging
import re
import signal
import socket
import sys

import uvicorn

from microturn.background.tools import Tools
from microturn.background.worker import BackgroundWorker, WorkerConfig
from microturn.checkpoint.loader import load_model
from microturn.checkpoint.shipped import load_interaction_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.torch_thread import run_on_torch_thread
from microturn.errors import MicroturnError
from microturn.server.app import create_app
from microturn.server.checkpoints import CheckpointStore
from microturn.server.http_protocol import header_timeout_protocol
from microturn.server.limits import ServerLimits


class GracefulServer(uvicorn.Server):
    """uvicorn, but a stop signal drains the sessions first (and is not re-raised at exit,
    so the exit status is 0)."""

    def __init__(self, config: uvicorn.Config, scheduler):
        super().__init__(config)
        self.scheduler = scheduler
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain is not None or self._loop is None:  # a second signal: stop now
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit():
            await self.scheduler.drain()
            self.should_exit = True

        if self._drain is None:
            self._drain = asyncio.create_task(drain_then_exit())


def run_serve(args: argparse.Namespace) -> None:
    tp = getattr(args, "tp", 1)
    if tp > 1:
        if args.background_model != "none":
            raise MicroturnError("--tp: a background model runs between ticks, outside the "
                                 "ranks' lockstep; use --background-model none")
        from microturn.parallel.launch import run_ranks

        run_ranks(tp, _serve_rank, args)
        return
    _serve(args)


def _serve_rank(args: argparse.Namespace) -> None:
    """One rank of `serve --tp N`: rank 0 serves, the others follow its engine."""
    import torch.distributed as dist

    from microturn.parallel.replicated import follow

    if dist.get_rank() == 0:
        return _serve(args)
    loaded = run_on_torch_thread(_rank_model, args)
    engine = run_on_torch_thread(Engine, loaded, EngineConfig(
        kv_budget_mb=args.kv_budget_mb, max_sessions=args.max_sessions))
    run_on_torch_thread(engine.warm_up, media=True)
    run_on_torch_thread(follow, engine)


def _rank_model(args: argparse.Namespace):
    """The interaction model, sharded when this process is one of `--tp` ranks."""
    import torch.distributed as dist

    loaded = load_interaction_model(args.model, args.adapter, args.dtype, args.device)
    if not dist.is_initialized():
        return loaded
    from microturn.parallel.replicated import rank_loaded

    return rank_loaded(loaded)


def limits_from(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_sessions=args.max_sessions,
                        max_message_bytes=args.max_message_bytes,
                        max_media_bytes=args.max_media_bytes,
                        max_input_tokens=args.max_input_tokens,
                        max_buffered_slices=args.max_buffered_slices,
                        idle_timeout_s=args.idle_timeout,
                        start_timeout_s=args.start_timeout,
                        body_timeout_s=args.body_timeout,
                        header_timeout_s=args.header_timeout)


def build_app(args: argparse.Namespace, **app_options):
    """The served app for `serve`'s flags: the model loaded, one engine warmed up, the
    background worker and checkpoint store; `app_options` go to create_app (a replica's
    id prefix and cluster view)."""
    limits = limits_from(args)
    print(f"loading {args.model or 'the default model'} ({args.dtype}) ...", file=sys.stderr)
    # all torch work on one thread: loading, warm-up and every tick (see torch_thread.py)
    loaded = run_on_torch_thread(_rank_model, args)
    engine = run_on_torch_thread(Engine, loaded, EngineConfig(
        kv_budget_mb=args.kv_budget_mb, max_sessions=limits.max_sessions))
    run_on_torch_thread(engine.warm_up, media=True)
    if getattr(args, "tp", 1) > 1:
        from microturn.parallel.replicated import ReplicatedEngine

        engine = ReplicatedEngine(engine)
    background = None
    if args.background_model == "same":
        background = loaded
    elif args.background_model != "none":
        background = run_on_torch_thread(load_model, args.background_model, args.dtype,
                                         args.device)
    worker = BackgroundWorker(Tools(), background,
                              WorkerConfig(timeout_s=args.background_timeout))
    checkpoints = (CheckpointStore(args.checkpoint_dir, args.checkpoint_every)
                   if args.checkpoint_dir else None)
    app = create_app(engine, limits, api_key=args.api_key, worker=worker,
                     checkpoints=checkpoints, **app_options)
    app.state.loaded, app.state.engine = loaded, engine
    return app


def _serve(args: argparse.Namespace) -> None:
    name = getattr(args, "replica_name", None)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9]{1,16}", name):
        raise MicroturnError(f"--replica-name: 1 to 16 letters and digits, got {name!r}")
    app = build_app(args, id_prefix=f"{name}-" if name else "")
    loaded, limits = app.state.loaded, app.state.limits
    replicated = app.state.engine if getattr(args, "tp", 1) > 1 else None
    # WebSocket frames up to 4x the limit reach the app, which answers with an error event
    # naming the limit; larger ones are cut by the protocol layer (close code 1009).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            ws_max_size=limits.ws_max_size, ws="websockets-sansio",
                            http=header_timeout_protocol(limits.header_timeout_s),
                            lifespan="on", timeout_graceful_shutdown=5)
    server = GracefulServer(config, app.state.scheduler)
    # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP;
    # with protocol 0 a keep-alive client's next response waited ~40 ms for a delayed ACK
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from now on, before uvicorn's loop accepts them
    host, port = sock.getsockname()[:2]
    # one line a script can wait for: the address really bound (--port 0 picks a free one)
    print(f"microturn serving {loaded.path.name} on http://{host}:{port} "
          f"(ws://{host}:{port}/v1/stream; {limits.max_sessions} sessions max; "
          f"{'API key required' if args.api_key else 'no API key'})", file=sys.stderr,
          flush=True)
    logging.getLogger("microturn.server").setLevel(logging.INFO)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        if replicated is not None:
            run_on_torch_thread(replicated.stop)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
