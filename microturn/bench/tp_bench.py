"""`microturn bench tp`: a forward pass on N ranks with the ordered chain reduce against the
same pass with torch's plain all-reduce (other bits) and against one process on all cores.

Each pass is the whole sequence without a KV cache (`--tokens` positions; 1 is a decode-sized
pass), the best of `--repeats`, timed inside the ranks after start-up.
"""

import argparse
import time

import torch

from microturn.model.attention_backend import CausalAttention


def _best_pass(model, tokens: int, repeats: int) -> float:
    ids = torch.arange(100, 100 + tokens).unsqueeze(0)
    positions = torch.arange(tokens).unsqueeze(0)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            started = time.perf_counter()
            model(ids, positions, CausalAttention(), logits_at=torch.tensor([tokens - 1]))
            if i:  # the first pass packs and warms
                best = min(best, time.perf_counter() - started)
    return best


def tp_pass_seconds(source: str, dtype: str, tokens: int, reduce: str, repeats: int) -> float:
    from microturn.parallel.launch import rank_model

    return _best_pass(rank_model(source, dtype, reduce), tokens, repeats)


def run_tp_bench(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from microturn.checkpoint.loader import load_checkpoint
    from microturn.parallel.launch import run_ranks

    source = str(args.model or "")
    model = load_checkpoint(args.model, args.dtype, "cpu").model
    table = Table("positions", "1 process (ms)", f"TP={args.tp} chain (ms)",
                  f"TP={args.tp} all-reduce (ms)", "chain / all-reduce")
    for tokens in args.tokens:
        single = _best_pass(model, tokens, args.repeats)
        chain = run_ranks(args.tp, tp_pass_seconds, source, args.dtype, tokens, "chain",
                          args.repeats)
        plain = run_ranks(args.tp, tp_pass_seconds, source, args.dtype, tokens, "all_reduce",
                          args.repeats)
        table.add_row(str(tokens), f"{single * 1e3:.1f}", f"{chain * 1e3:.1f}",
                      f"{plain * 1e3:.1f}", f"{chain / plain:.2f}x")
    Console(width=120).print(f"{args.dtype}, {torch.get_num_threads()} threads for one "
                             f"process, one thread per rank; best of {args.repeats}")
    Console(width=120).print(table)
