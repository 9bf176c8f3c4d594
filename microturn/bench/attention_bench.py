"""`microturn bench attention`: one ragged paged-attention call of the engine's shapes alone,
against its floor, so attention's kernels can be worked on without a whole tick around them.

S sessions each feed T new tokens after C slots of history (SmolLM2-135M's heads: 9 query
heads, 3 kv heads, 64 channels) through the same kernel call a layer of the engine makes, over
`layers` separate pools as a pass walks them (their K/V cold, as in a tick; `--layers 1`
repeats one pool, its K/V hot). Floor: the call's FLOPs at the matmul peak plus its K/V read
once at the measured bandwidth, both measured first.
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from microturn.bench.machine import matmul_peak, read_bandwidth
from microturn.errors import MicroturnError
from microturn.kernels import ops

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 256


def attention_case(sessions: int, tokens: int, context: int, layers: int, seed: int = 0):
    """Pools in KVPool's layout (bf16, key panels of the kernel's width), block tables, the
    ragged batch's metadata and its queries."""
    kernels = ops.kernels_for(torch.empty(0))
    generator = torch.Generator().manual_seed(seed)
    width = kernels.key_panel_slots(BLOCK, True)
    per_session = -(-(context + tokens) // BLOCK)
    blocks = sessions * per_session
    pools = [(torch.randn(blocks, KV_HEADS, BLOCK // width, HEAD_DIM, width,
                          generator=generator).bfloat16(),
              torch.randn(blocks, KV_HEADS, BLOCK, HEAD_DIM, generator=generator).bfloat16())
             for _ in range(layers)]
    table = torch.arange(blocks, dtype=torch.int32).view(sessions, per_session)
    rows = torch.arange(sessions, dtype=torch.int32).repeat_interleave(tokens)
    keys = (context + 1 + torch.arange(tokens, dtype=torch.int32)).repeat(sessions)
    starts = torch.arange(0, sessions * tokens + 1, tokens, dtype=torch.int32)
    q = torch.randn(sessions * tokens, Q_HEADS, HEAD_DIM, generator=generator).bfloat16()
    return kernels, pools, (table, rows, keys, starts), q


def measure_attention(sessions: int, tokens: int, context: int, layers: int,
                      repeats: int) -> dict:
    for name, value, least in (("sessions", sessions, 1), ("tokens", tokens, 1),
                               ("context", context, 0), ("layers", layers, 1),
                               ("repeats", repeats, 1)):
        if value < least:
            raise MicroturnError(f"bench attention: --{name} must be >= {least}, got {value}")
    kernels, pools, meta, q = attention_case(sessions, tokens, context, layers)
    if kernels is None:
        raise MicroturnError("bench attention: the CPU kernels are not available here")

    def call() -> float:
        started = time.perf_counter()
        for k_pool, v_pool in pools:
            kernels.paged_attention(q, k_pool, v_pool, *meta)
        return time.perf_counter() - started

    call()
    seconds = [call() for _ in range(repeats)]
    peak, bandwidth = matmul_peak(torch.bfloat16), read_bandwidth(256, 4)
    # each query row sees its history and the segment's tokens up to itself
    pairs = sessions * Q_HEADS * HEAD_DIM * sum(context + 1 + t for t in range(tokens))
    flops = 4 * layers * pairs
    kv_bytes = 2 * layers * sessions * KV_HEADS * (context + tokens) * HEAD_DIM * 2
    floor = flops / peak + kv_bytes / bandwidth
    best = min(seconds)
    return {"sessions": sessions, "tokens": tokens, "context": context, "layers": layers,
            "best_ms": best * 1e3, "median_ms": statistics.median(seconds) * 1e3,
            "floor_ms": floor * 1e3, "x_floor": best / floor, "gflops": flops / best / 1e9,
            "peak_gflops": peak / 1e9, "bandwidth_gbs": bandwidth / 1e9}


def run_attention_bench(args: argparse.Namespace) -> None:
    shapes = [(args.sessions, args.tokens, args.context)]
    if args.decode:
        shapes.append((args.sessions, 1, args.context))
    console = Console(stderr=True)
    results = []
    with console.status("timing paged attention"):
        for sessions, tokens, context in shapes:
            results.append(measure_attention(sessions, tokens, context, args.layers,
                                             args.repeats))
    table = Table(title=f"paged attention, {args.layers} layer(s) a call "
                        f"({'cold' if args.layers > 1 else 'hot'} K/V), best of {args.repeats}")
    for column in ("sessions x tokens @ context", "best ms", "median ms", "floor ms",
                   "x floor", "GFLOP/s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r['sessions']} x {r['tokens']} @ {r['context']}", f"{r['best_ms']:.2f}",
                      f"{r['median_ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['x_floor']:.2f}",
                      f"{r['gflops']:.0f}")
    out = Console(width=120)
    out.print(f"matmul peak {results[0]['peak_gflops']:.0f} GFLOP/s, bandwidth "
              f"{results[0]['bandwidth_gbs']:.1f} GB/s (measured after the calls)")
    out.print(table)
