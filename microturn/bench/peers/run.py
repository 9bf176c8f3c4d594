"""`microturn bench peers`: each requested engine on the default model, each in a process of
its own (process.py), on every shape; engines that are not installed are skipped (saying so);
then the report."""

import argparse
import dataclasses
import time

import torch
from rich.console import Console
from rich.markup import escape

from microturn.bench.machine import cpu_model
from microturn.bench.peers.base import ENGINES, SHAPES, PeerUnavailable, Shape
from microturn.bench.peers.harness import PeerRecord
from microturn.bench.peers.process import PeerJob, run_in_own_process, run_job
from microturn.bench.peers.report import markdown_table, write_json, write_plot
from microturn.checkpoint.default_model import default_model_path
from microturn.checkpoint.loader import load_model
from microturn.errors import MicroturnError
from microturn.sequence.timeline import SliceLayout

TEXT = ("Interaction models listen and speak at once. Their input and output are continuous "
        "streams cut into short slices of time, and every slice of every session must be "
        "answered before the next one closes, whatever else the machine is doing. ")


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
    for name in args.shapes.split(","):
        if name.strip() not in SHAPES:
            raise MicroturnError(f"--shapes: unknown shape {name.strip()!r} (known: "
                                 f"{', '.join(SHAPES)})")
    shapes = [SHAPES[s.strip()] for s in args.shapes.split(",")]
    if args.input_tokens is not None or args.output_tokens is not None:
        shapes = [Shape("custom", args.input_tokens or 16, args.output_tokens or 2)]
    # a voice slice's audio: `<audio>` and its dMel frames
    audio = SliceLayout(args.slice_ms, audio=True).audio_frames + 1
    shapes = [dataclasses.replace(s, audio_positions=audio) if s.name == "audio" else s
              for s in shapes]
    with console.status("loading the model"):
        loaded = load_model(args.model, args.dtype, "cpu")
    text = loaded.tokenizer.encode(TEXT * 8)
    gguf = loaded.path if loaded.path and loaded.path.suffix == ".gguf" else \
        default_model_path()
    c = loaded.config
    base = dict(model=args.model, dtype=args.dtype, gguf=str(gguf),
                trained_context=c.max_position,
                kv_bytes_per_token=2 * c.num_layers * c.num_kv_heads * c.head_dim * 2,
                threads=torch.get_num_threads(), text=text, turns=args.turns,
                slice_ms=args.slice_ms, capacity_turns=args.capacity_turns,
                max_capacity=args.max_capacity, budget_s=args.budget_s)
    machine = {"cpu": cpu_model(), "cores": torch.get_num_threads(),
               "torch": torch.__version__, "model": loaded.path.name if loaded.path else "?",
               "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
               "engines_in": "this process" if args.same_process else "a process each"}
    del loaded
    console.print(f"[bold]microturn bench peers[/]: {machine['model']} on {machine['cpu']}, "
                  f"{machine['cores']} threads; {args.turns} micro-turns per long session, "
                  f"capacity probes of {args.capacity_turns} micro-turns, slice {args.slice_ms} "
                  "ms")
    # checked on 2026-11-23: the wheel on PyPI is vLLM's CUDA build
    records, skipped = [], [VLLM_NOTE]
    console.print(f"[yellow]{VLLM_NOTE}[/]")
    run = run_job if args.same_process else run_in_own_process
    if args.same_process:
        console.print("[yellow]--same-process: every engine in this process, beside torch[/]")
    for name in names:
        for shape in shapes:
            try:
                records.append(run(PeerJob(engine=name, shape=shape, **base)))
            except PeerUnavailable as exc:
                skipped.append(f"{name}: skipped, {exc}")
                console.print(f"[yellow]{name}: skipped[/], {escape(str(exc))}")
                break
            except Exception as exc:  # one engine failing must not lose the others' results
                skipped.append(f"{name} {shape.name}: failed, {type(exc).__name__}: {exc}")
                console.print(f"[red]{name} {shape.name}: failed[/], {escape(str(exc))}")
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
