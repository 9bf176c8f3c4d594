"""Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE), shaped for micro-turns.

The router scores every expert (fp32 softmax), keeps the top k per token, renormalises them
where the family does, and the token's output is the weighted sum of its experts' SwiGLU
outputs (plus a gated shared expert in Qwen2-MoE), accumulated in fp32 in top-k order.

Two ways to run the experts, the same bits in deterministic mode:

- `gather`: each token through each of its k experts alone, a one-row product (a gemv)
  against that expert's packed weight: it reads exactly the selected experts' weights and
  nothing else. The decode shape: a few tokens per tick, one or two per expert.
- `grouped`: each selected expert once, on all the tokens that chose it (a GEMM). Wins once
  enough tokens share an expert (`bench moe` measures where).

The linear kernel computes each row alone (batch-invariant), so a token's expert outputs, and
so its bits, depend on neither its neighbours nor the path. `GROUPED_FROM` is the crossover:
the rows per selected expert from which grouping is faster.
"""

import torch
from torch import nn

from microturn.model.config import MoEConfig
from microturn.model.linear import Linear
from microturn.model.mlp import SwiGLU

GROUPED_FROM = 1.2  # rows per selected expert (measured: docs/BENCHMARKS.md, bench moe)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = Linear(hidden_size, config.experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, config.expert_size)
                                     for _ in range(config.experts))
        self.shared_expert = (SwiGLU(hidden_size, config.shared_size) if config.shared_size
                              else None)
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if config.shared_size \
            else None
        self.path: str | None = None  # "gather" | "grouped" forces a path (tests, bench)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (expert ids [N, k], weights [N, k] fp32)."""
        probs = self.router(x).float().softmax(-1)
        weights, ids = probs.topk(self.config.top_k, dim=-1)
        if self.config.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        path = self.path or ("grouped" if x.shape[0] * self.config.top_k
                             >= GROUPED_FROM * len(torch.unique(ids)) else "gather")
        outs = (self._grouped(x, ids) if path == "grouped" or torch.is_grad_enabled()
                else self._gather(x, ids))
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for j in range(self.config.top_k):
            acc = acc + weights[:, j:j + 1] * outs[:, j].float()
        if self.shared_expert is not None:
            gate = _sigmoid(self.shared_expert_gate(x).float())
            acc = acc + gate * self.shared_expert(x).float()
        return acc.to(x.dtype).reshape(shape)

    def _gather(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, k, H]: every (token, chosen expert) pair as its own one-row product."""
        out = x.new_empty(x.shape[0], self.config.top_k, x.shape[1])
        for n, row in enumerate(ids.tolist()):
            for j, e in enumerate(row):
                out[n, j] = self.experts[e](x[n:n + 1])[0]
        return out

    def _grouped(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[N, k, H]: each selected expert once, on all its tokens (autograd-friendly)."""
        out = x.new_zeros(x.shape[0], self.config.top_k, x.shape[1])
        for e in torch.unique(ids).tolist():
            rows, slots = (ids == e).nonzero(as_tuple=True)
            out = out.index_put((rows, slots), self.experts[e](x[rows]))
        return out


def _sigmoid(g: torch.Tensor) -> torch.Tensor:
    """sigmoid with the same bits for a row wherever it sits in the batch: torch runs the
    whole-vector part of an element-wise op with SIMD and the remainder with scalar code
    (other bits), so the input is padded to whole vectors first."""
    flat = g.reshape(-1)
    pad = -flat.numel() % 64
    out = torch.sigmoid(torch.nn.functional.pad(flat, (0, pad)) if pad else flat)
    return out[:flat.numel()].view(g.shape)


def expert_bytes(config: MoEConfig, hidden_size: int, itemsize: int) -> int:
    """Weight bytes of one expert (gate, up and down)."""
    return 3 * config.expert_size * hidden_size * itemsize

