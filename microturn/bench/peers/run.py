"""`microturn bench peers`: build each requested engine on the default model, run the workload
on it (both shapes), skip engines that are not installed (saying so), report."""

import argparse
import gc
import time

import torch
from rich.console import Console
from rich.markup import escape

from microturn.bench.machine import cpu_model
from microturn.bench.peers.base import ENGINES, SHAPES, PeerUnavailable, Shape
from microturn.bench.peers.harness import PeerRecord, Workload, measure
from microturn.bench.peers.report import markdown_table, write_json, write_plot
from microturn.checkpoint.loader import load_model
from microturn.errors import MicroturnError

TEXT = ("Interaction models listen and speak at once. Their input and output are continuous "
        "streams cut into short slices of time, and every slice of every session must be "
        "answered before the next one closes, whatever else the machine is doing. ")


def build_peer(name: str, loaded, args, shape: Shape, context: int):
    from microturn.checkpoint.default_model import default_model_path

    gguf = loaded.path if loaded.path and loaded.path.suffix == ".gguf" else None
    if name in ("microturn", "microturn-fast"):
        from microturn.bench.peers.microturn_peer import MicroturnPeer

        return MicroturnPeer(loaded, name == "microturn", shape.output_tokens)
    if name == "reprefill":
        from microturn.bench.peers.reprefill import ReprefillPeer

        return ReprefillPeer(loaded)
    if gguf is None and name != "reprefill":
        gguf = default_model_path()
    if name.startswith("transformers"):
        from microturn.bench.peers.transformers_peer import TransformersPeer

        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        return TransformersPeer(gguf, dtype)
    if name == "llamacpp":
        from microturn.bench.peers.llamacpp_peer import LlamaCppPeer

        return LlamaCppPeer(gguf, loaded.config, context)
    raise MicroturnError(f"--engines: unknown engine {name!r} (known: {', '.join(ENGINES)})")


VLLM_NOTE = ("vllm: not run; the wheel on PyPI (vllm 0.33.0) is the CUDA build (it pins "
             "torch 2.14.0 and NVIDIA libraries, with flash-attention and CUTLASS kernels); "
             "vLLM's CPU backend is built from source only (VLLM_TARGET_DEVICE=cpu)")


def run_peers(args: argparse.Namespace) -> list[PeerRecord]:
    console = Console(highlight=False, soft_wrap=True)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    for name in names:
        if name not in ENGINES:
            raise MicroturnError(f"--engines: unknown engine {name!r} (known: "
                                 f"{', '.join(ENGINES)})")
    shapes = [SHAPES[s.strip()] for s in args.shapes.split(",")]
    if args.input_tokens is not None or args.output_tokens is not None:
        shapes = [Shape("custom", args.input_tokens or 16, args.output_tokens or 2)]
    with console.status("loading the model"):
        loaded = load_model(args.model, args.dtype, "cpu")
    text = loaded.tokenizer.encode(TEXT * 8)
    machine = {"cpu": cpu_model(), "cores": torch.get_num_threads(),
               "torch": torch.__version__, "model": loaded.path.name if loaded.path else "?",
               "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    console.print(f"[bold]microturn bench peers[/]: {machine['model']} on {machine['cpu']}, "
                  f"{machine['cores']} threads; {args.turns} micro-turns per long session, "
                  f"capacity probes of {args.capacity_turns} micro-turns, slice {args.slice_ms} "
                  "ms")
    # checked on 2026-11-23: the wheel on PyPI is vLLM's CUDA build
    records, skipped = [], [VLLM_NOTE]
    console.print(f"[yellow]{VLLM_NOTE}[/]")
    log = console.log
    for name in names:
        for shape in shapes:
            context = (args.turns + 8) * (shape.input_tokens + shape.output_tokens + 4)
            try:
                peer = build_peer(name, loaded, args, shape, max(context, 512))
            except PeerUnavailable as exc:
                skipped.append(f"{name}: skipped, {exc}")
                console.print(f"[yellow]{name}: skipped[/], {escape(str(exc))}")
                break
            console.print(f"[bold]{peer.name}[/] ({shape.name}): {peer.config}")
            try:
                records.append(measure(peer, Workload(text, shape), args.turns, args.slice_ms,
                                       args.capacity_turns, args.max_capacity, args.budget_s,
                                       log))
            except Exception as exc:  # one engine failing must not lose the others' results
                skipped.append(f"{name} {shape.name}: failed, {type(exc).__name__}: {exc}")
                console.print(f"[red]{name} {shape.name}: failed[/], {escape(str(exc))}")
            del peer
            gc.collect()
            if args.json:  # written after every engine, so a long run keeps what it measured
                write_json(records, args.json, machine, skipped)
    if args.json:
        write_json(records, args.json, machine, skipped)
    table = markdown_table(records, args.slice_ms)
    print(table)
    for line in skipped:
        print(f"\n{line}")
    if args.plot:
        write_plot(records, args.plot, f"{machine['model']} (microturn and reprefill in "
                   f"{args.dtype}) on {machine['cpu']}, {machine['cores']} threads, "
                   f"{machine['date']}", args.slice_ms)
        console.print(f"plot written to {args.plot}")
    return records
