"""`microturn bench model`: one forward pass against a 1,000-token context, next to its floor.

The floor of a pass is the larger of (bytes it must read) / (measured read bandwidth) and
(FLOPs it must do) / (measured matmul peak). Bytes: every weight once (the tied embedding as the
output head) plus the KV cache it attends over. FLOPs: 2 per weight per new token, attention,
and the output head for the one token whose logits a decode needs. The bandwidth is sampled
right before every timed pass: a shared machine's bandwidth drifts by tens of percent within
minutes (here it jumps between two states within seconds), so each pass is held to the floor of
its own sample and the ratio is the median of those per-pass ratios. The time, bandwidth and
floors shown are medians; in a run that straddles a jump the median time over the median floor
would mix passes of one state with the bandwidth of the other.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from microturn.bench.machine import BandwidthSampler, measure_machine
from microturn.checkpoint.loader import DTYPES, Checkpoint, load_checkpoint
from microturn.engine.paged_attention import PagedSequence
from microturn.errors import MicroturnError
from microturn.kernels import build
from microturn.kernels.build import cpu_has_bf16_gemm


def weight_bytes(loaded: Checkpoint) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())  # tied: once


def pass_flops(loaded: Checkpoint, new_tokens: int, context: int) -> float:
    c = loaded.config
    layer_weights = sum(p.numel() for n, p in loaded.model.layers.named_parameters()
                        if p.dim() == 2)
    head = c.vocab_size * c.hidden_size
    mean_keys = context + (new_tokens + 1) / 2
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * mean_keys * new_tokens
    return 2 * layer_weights * new_tokens + attention + 2 * head


def kv_bytes(loaded: Checkpoint, keys: int) -> int:
    c = loaded.config
    return 2 * c.num_layers * c.kv_size * keys * loaded.model.dtype.itemsize


def time_pass(loaded: Checkpoint, cache: PagedSequence, context: int, new_tokens: int,
              repeats: int, between=None) -> list[float]:
    """Seconds of `repeats` passes (after 3 untimed); `between()` runs before each timed one."""
    model = loaded.model
    tokens = torch.randint(0, loaded.config.vocab_size, (1, new_tokens), device=model.device)
    positions = torch.arange(context, context + new_tokens, device=model.device).unsqueeze(0)
    last = torch.tensor([new_tokens - 1], device=model.device)
    times = []
    for i in range(repeats + 3):
        cache.length = context  # drop the previous pass: every repeat appends at the same place
        if between is not None and i >= 3:
            between()
        started = time.perf_counter()
        model(tokens, positions, cache, logits_at=last)
        if i >= 3:  # first passes warm caches and allocator
            times.append(time.perf_counter() - started)
    return times


@torch.inference_mode()
def run_model_bench(args: argparse.Namespace) -> None:
    console = Console(stderr=True)
    sizes = [int(n) for n in args.new_tokens.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise MicroturnError(f"--dtypes: unknown {unknown}; choose from {', '.join(DTYPES)}")
    if args.context < 1 or min(sizes) < 1 or args.repeats < 1:
        raise MicroturnError("--context, --new-tokens and --repeats must all be >= 1")
    # Without bf16 hardware microturn computes bf16 models in fp32 (bf16 is storage only), so the
    # fp32 peak is the honest compute floor for both.
    compute = {d: (torch.float32 if d == "bf16" and not cpu_has_bf16_gemm() else DTYPES[d])
               for d in dtypes}
    with console.status("measuring memory bandwidth and matmul peak"):
        peaks = measure_machine(compute)
    bandwidth = peaks.read_bytes_per_second
    out = Console()
    out.print(f"machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    out.print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; matmul peak " + ", ".join(
        f"{d} {f / 1e9:.0f} GFLOP/s" + (" (computed in fp32)" if compute[d] != DTYPES[d] else "")
        for d, f in peaks.matmul_flops_per_second.items()))
    out.print(f"CPU kernels: {'on' if build.load() else 'off (torch fallback)'}")
    table = Table(title=f"one forward pass, {args.context}-token context (median of "
                        f"{args.repeats})")
    for column in ("dtype", "new tokens", "time ms", "GB/s during", "bytes floor ms",
                   "flops floor ms", "x floor", "tokens/s"):
        table.add_column(column, justify="right")
    records = []
    for dtype in dtypes:
        with console.status(f"loading the model in {dtype}"):
            loaded = load_checkpoint(args.model, dtype, "cpu")  # the model as trained
        if args.context + max(sizes) > loaded.config.max_position:
            console.print(f"note: context exceeds the trained {loaded.config.max_position}")
        cache = PagedSequence(loaded.config, args.context + max(sizes), loaded.model.dtype)
        context_ids = torch.randint(0, loaded.config.vocab_size, (1, args.context))
        with console.status(f"prefilling {args.context} tokens"):
            loaded.model(context_ids, torch.arange(args.context).unsqueeze(0), cache,
                         logits_at=torch.tensor([args.context - 1]))
        for n in sizes:
            # a bandwidth sample before each pass: the floor is the bandwidth of the same minutes
            sampler = BandwidthSampler()
            with console.status(f"{dtype}: timing passes of {n} new tokens"):
                times = time_pass(loaded, cache, args.context, n, args.repeats, sampler.sample)
            samples = sampler.samples  # one per timed pass, taken right before it
            del sampler
            bytes_read = weight_bytes(loaded) + kv_bytes(loaded, args.context + n)
            flop_floor = pass_flops(loaded, n, args.context) / peaks.matmul_flops_per_second[dtype]
            ratio = statistics.median(t / max(bytes_read / bw, flop_floor)
                                      for t, bw in zip(times, samples, strict=True))
            seconds, during = statistics.median(times), statistics.median(samples)
            byte_floor = bytes_read / during
            record = dict(dtype=dtype, new_tokens=n, context=args.context, ms=seconds * 1e3,
                          read_GBps_during=during / 1e9,
                          bytes_floor_ms=byte_floor * 1e3, flops_floor_ms=flop_floor * 1e3,
                          ratio_to_floor=ratio, tokens_per_s=n / seconds)
            records.append(record)
            table.add_row(dtype, str(n), f"{seconds * 1e3:.2f}", f"{during / 1e9:.1f}",
                          f"{byte_floor * 1e3:.2f}",
                          f"{flop_floor * 1e3:.2f}", f"{ratio:.2f}",
                          f"{n / seconds:.0f}")
    out.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_GBps": bandwidth / 1e9,
                       "matmul_GFLOPs": {d: v / 1e9
                                         for d, v in peaks.matmul_flops_per_second.items()},
                       "passes": records}, f, indent=2)
