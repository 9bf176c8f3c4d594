"""`microturn bench moe`: one MoE layer's experts at micro-turn shapes, four ways, against the
time to read the selected experts' weights once.

- gather: each (token, expert) pair as a one-row product on the packed kernel (`moe.py`);
- grouped: each selected expert once on all its tokens, the same kernel (`moe.py`);
- torch loop: the same grouping with torch's own matmuls (what a plain port does);
- gather+einsum: the selected weights gathered per token, then one einsum (gpt-fast's MoE);
  it copies k weight matrices per token, so it runs only while that copy stays small.

Several layers are stacked and run in turn, so each pass streams weights from memory as a
forward pass does instead of finding them in cache. The floor: distinct selected experts'
bytes over the measured read bandwidth. The crossover is where grouped starts to win, in
rows per selected expert; `moe.GROUPED_FROM` is set from it.
"""

import argparse
import math
import statistics
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from microturn.bench.machine import best_seconds, read_bandwidth
from microturn.kernels import policy
from microturn.model.config import MoEConfig
from microturn.model.decoder import init_random_weights
from microturn.model.moe import MoE, expert_bytes

EINSUM_LIMIT_MB = 256  # the gathered copy per pass beyond which gather+einsum is skipped


@dataclass(frozen=True)
class MoERow:
    tokens: int
    experts: int
    top_k: int
    selected: int  # distinct experts the tokens chose (mean over layers)
    gather_ms: float
    grouped_ms: float
    torch_ms: float
    einsum_ms: float | None
    floor_ms: float

    @property
    def rows_per_expert(self) -> float:
        return self.tokens * self.top_k / self.selected


def _torch_loop(moe: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], ids.shape[1], x.shape[1])
    for e in torch.unique(ids).tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        expert = moe.experts[e]
        gate, up = F.linear(x[rows], expert.gate_up_proj.weight).chunk(2, dim=-1)
        out[rows, slots] = F.linear(F.silu(gate) * up, expert.down_proj.weight)
    return out


def _einsum(stacked: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
    gate_up, down = stacked[0][ids], stacked[1][ids]  # [N, k, 2I, H], [N, k, H, I]
    gate, up = torch.einsum("nh,nkoh->nko", x, gate_up).chunk(2, dim=-1)
    return torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, down)


PATHS = {"gather": lambda m, x, i, s: m._gather(x, i),
         "grouped": lambda m, x, i, s: m._grouped(x, i),
         "torch": lambda m, x, i, s: _torch_loop(m, x, i),
         "einsum": lambda m, x, i, s: _einsum(s, x, i)}


def _one_pass(run, passes, x: torch.Tensor) -> None:
    for moe, ids, stacked in passes:
        run(moe, x, ids, stacked)


def measure(experts: int, top_k: int, tokens: list[int], hidden: int, expert_size: int,
            dtype: torch.dtype, bandwidth: float, repeats: int) -> list[MoERow]:
    config = MoEConfig(experts, top_k, expert_size, normalize=True)
    layer_bytes = experts * expert_bytes(config, hidden, dtype.itemsize)
    count = max(1, min(16, math.ceil(512 * 2**20 / layer_bytes)))
    layers = []
    for i in range(count):
        moe = MoE(hidden, config)
        for p in moe.parameters():
            p.data = torch.empty(p.shape)
        layers.append(init_random_weights(moe, seed=i).to(dtype).requires_grad_(False))
        for expert in moe.experts:  # packed once, as a loaded model's are, not in the timing
            expert.gate_up_proj.panels()
            expert.down_proj.panels()
    stacked = [(torch.stack([e.gate_up_proj.weight for e in m.experts]),
                torch.stack([e.down_proj.weight for e in m.experts])) for m in layers]
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in tokens:
        x = torch.randn(n, hidden, generator=generator).to(dtype)
        with torch.no_grad(), policy.deterministic_mode(True):
            ids = [m.route(x)[0] for m in layers]
            selected = [len(torch.unique(i)) for i in ids]
            timings = {}
            for name, run in PATHS.items():
                copy_mb = n * top_k * 3 * expert_size * hidden * dtype.itemsize / 2**20
                if name == "einsum" and copy_mb > EINSUM_LIMIT_MB:
                    timings[name] = None
                    continue
                passes = list(zip(layers, ids, stacked, strict=True))
                timings[name] = best_seconds(partial(_one_pass, run, passes, x), repeats,
                                             warmup=1) / count * 1e3
        floor = statistics.mean(selected) * expert_bytes(config, hidden, dtype.itemsize) \
            / bandwidth * 1e3
        rows.append(MoERow(n, experts, top_k, round(statistics.mean(selected)),
                           timings["gather"], timings["grouped"], timings["torch"],
                           timings["einsum"], floor))
    return rows


def crossover(rows: list[MoERow]) -> float | None:
    """The fewest rows per selected expert from which grouped beats gather at every larger
    token count of the same layer shape (median over shapes)."""
    points = []
    for shape in sorted({(r.experts, r.top_k) for r in rows}):
        mine = sorted((r for r in rows if (r.experts, r.top_k) == shape), key=lambda r: r.tokens)
        for i, r in enumerate(mine):
            if all(s.grouped_ms < s.gather_ms for s in mine[i:]):
                points.append(r.rows_per_expert)
                break
    return statistics.median(points) if points else None


def run_moe_bench(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from microturn.model.moe import GROUPED_FROM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    tokens = [1, 2, 4, 8, 16, 32, 64] if not args.quick else [1, 4, 16, 64]
    shapes = [(8, 2), (64, 2), (64, 8)] if not args.quick else [(8, 2), (64, 8)]
    bandwidth = read_bandwidth()
    console = Console(width=150)
    console.print(f"MoE layer: hidden {args.hidden}, expert size {args.expert_size}, {args.dtype}; "
                  f"read bandwidth {bandwidth / 1e9:.1f} GB/s; ms per layer (best of "
                  f"{args.repeats})")
    table = Table("experts", "top-k", "tokens", "selected", "rows/expert", "gather", "grouped",
                  "torch loop", "gather+einsum", "floor", "best/floor")
    rows = []
    for experts, top_k in shapes:
        for r in measure(experts, top_k, tokens, args.hidden, args.expert_size, dtype,
                         bandwidth, args.repeats):
            rows.append(r)
            best = min(r.gather_ms, r.grouped_ms)
            table.add_row(str(experts), str(top_k), str(r.tokens), str(r.selected),
                          f"{r.rows_per_expert:.1f}", f"{r.gather_ms:.2f}",
                          f"{r.grouped_ms:.2f}", f"{r.torch_ms:.2f}",
                          "—" if r.einsum_ms is None else f"{r.einsum_ms:.2f}",
                          f"{r.floor_ms:.2f}", f"{best / r.floor_ms:.2f}x")
    console.print(table)
    point = crossover(rows)
    console.print(f"grouped wins from {point:.1f} rows per selected expert (median over shapes);"
                  f" the engine switches at {GROUPED_FROM}" if point is not None else
                  "grouped never won at these shapes")
