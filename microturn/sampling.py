"""Token sampling: greedy, or temperature with top-k / top-p, from a seeded generator."""

from dataclasses import dataclass

import torch

from microturn.errors import MicroturnError

FP32_TINY = torch.finfo(torch.float32).tiny  # a smaller temperature would round to 0 in fp32


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise MicroturnError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise MicroturnError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MicroturnError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def draw_seed(seed: int, token_index: int) -> int:
    """The generator seed for the draw of token `token_index` of a session (splitmix64 of
    both): a draw depends on the session's seed and the token's index, never on the batch or
    on how many draws came before."""
    z = (seed * 0x9E3779B97F4A7C15 + token_index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # torch seeds are < 2**63


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int:
    """One token id from a [vocab] row of logits."""
    return sample_with_logprob(logits, params, generator)[0]


def greedy_tokens(rows: torch.Tensor) -> list[int]:
    """Each [vocab] row's argmax, all rows in one call (a row's argmax depends on that row
    only, so this is the index each would get alone). fp32 argmax is vectorised (bf16's is
    ~8x slower); one fp32 copy of all rows, not a fresh one per row."""
    return rows.float().argmax(-1).tolist()


def sample_with_logprob(logits: torch.Tensor, params: SamplingParams,
                        generator: torch.Generator | None = None) -> tuple[int, float]:
    """(token id, its log-probability under the distribution it was drawn from: temperature,
    top-k and top-p applied; 0.0 for greedy). The model's own log-probability is another
    number (the engine records both)."""
    if params.greedy:
        return greedy_tokens(logits.unsqueeze(0))[0], 0.0
    probs = policy_probs(logits, params)
    # inverse CDF with one uniform draw: ~10x cheaper than torch.multinomial on a 49k vocab
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=generator) * cdf[-1]
    token = int(torch.searchsorted(cdf, u, right=True).clamp_max(cdf.numel() - 1))
    return token, float(probs[token].log())  # the probability it was drawn with


def policy_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution over a [vocab] row. A trainer that takes `.log()` of one
    entry (with autograd) gets the bits the sampler recorded for that token."""
    return policy_scores(logits, params).softmax(-1)


def policy_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution's logits: scaled by the temperature, cut by top-k and top-p
    (a cut token scores -inf)."""
    # shifted so the best score is 0 before the division: a temperature near zero then sends
    # the others to -inf (greedy in the limit) instead of overflowing every score to +-inf
    scores = logits.float()
    scores = (scores - scores.max()) / max(params.temperature, FP32_TINY)
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    return scores
