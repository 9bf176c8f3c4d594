"""The policy-gradient objective on one rollout: the sampler's tokens, their advantages, and
the trainer's log-probabilities of them under the sampling policy.

The ratio of a token is exp(trainer - sampler), both log-probabilities under the distribution
the token was drawn from (temperature applied, `sampling.policy_probs`). The trainer runs the
forward the engine ran (deterministic kernels), and takes each row's probabilities with the
sampler's own function, so before any update every ratio is exactly 1.0: the on-policy check.
The loss is PPO's clipped surrogate plus a KL penalty to the reference (the model before this
run's adapter), with the k3 estimator exp(ref - new) - (ref - new) - 1 on the sampled tokens.
"""

from dataclasses import dataclass

import numpy as np
import torch

from microturn.frontend.embedding import FrontEnd
from microturn.kernels.windowed_attention import ResidentWindows
from microturn.model.decoder import Decoder
from microturn.sampling import SamplingParams, policy_probs
from microturn.sequence.timeline import Timeline
from microturn.train.batch import resident_windows
from microturn.train.logprobs import sequence_logits


@dataclass(frozen=True)
class RolloutTokens:
    """The part of a rollout a gradient step needs: the sequence up to its last credited
    token, and for every credited (sampled) token its index, id, the sampler's
    log-probability and the advantage of its slice."""
    token_ids: torch.Tensor  # [1, T]
    index: torch.Tensor  # [M] sequence indices
    tokens: torch.Tensor  # [M]
    sampler: torch.Tensor  # [M] fp32: the policy log-probabilities the engine recorded
    advantage: torch.Tensor  # [M] fp32
    sampling: SamplingParams
    audio: torch.Tensor | None
    patches: torch.Tensor | None
    windows: ResidentWindows | None


def rollout_tokens(export: dict, advantages: np.ndarray) -> RolloutTokens | None:
    """None when no sampled token has a non-zero advantage (nothing to learn from it)."""
    timeline = Timeline.from_export(export)
    sampled = export["policy_logprobs"]
    index, tokens, old, adv, turns = [], [], [], [], 0
    at = 0
    for n, turn in enumerate(timeline.turns):
        at += len(timeline.input_tokens(turn))
        a = float(advantages[turn.index])
        for j, token in enumerate(turn.output_ids):
            if a != 0.0 and sampled[at + j] is not None:
                index.append(at + j)
                tokens.append(token)
                old.append(sampled[at + j])
                adv.append(a)
                turns = n + 1
        at += len(turn.output_ids)
    if not index:
        return None
    kept = Timeline(timeline.markers, timeline.turns[:turns], timeline.layout)
    audio, patches = kept.media()
    s = export["sampling"]
    return RolloutTokens(torch.tensor([kept.tokens()[:index[-1] + 1]]), torch.tensor(index),
                         torch.tensor(tokens), torch.tensor(old, dtype=torch.float32),
                         torch.tensor(adv, dtype=torch.float32),
                         SamplingParams(s["temperature"], s["top_k"], s["top_p"], s["seed"]),
                         audio, patches, resident_windows([export]))


def policy_logprobs(model: Decoder, rollout: RolloutTokens, deterministic: bool = True,
                    frontend: FrontEnd | None = None) -> torch.Tensor:
    """[M]: log-probability of each credited token under the sampling policy (autograd on
    when enabled), row by row through the sampler's own function."""
    logits = sequence_logits(model, rollout.token_ids, deterministic, frontend, rollout.audio,
                             rollout.patches, rollout.windows, logits_at=rollout.index - 1)[0]
    return torch.stack([policy_probs(logits[i], rollout.sampling)[token].log()
                        for i, token in enumerate(rollout.tokens.tolist())])


@dataclass(frozen=True)
class ObjectiveParts:
    loss: torch.Tensor  # summed over the rollout's tokens (the caller divides)
    ratio_deviation: float  # max |ratio - 1|
    kl: float  # summed k3 estimate
    clipped: int  # tokens whose ratio was clipped


def clipped_objective(new: torch.Tensor, rollout: RolloutTokens, reference: torch.Tensor | None,
                      clip: float, kl_weight: float) -> ObjectiveParts:
    ratio = torch.exp(new - rollout.sampler)
    a = rollout.advantage
    clamped = ratio.clamp(1 - clip, 1 + clip)
    loss = -torch.minimum(ratio * a, clamped * a).sum()
    kl = torch.zeros(())
    if reference is not None:
        d = reference - new
        kl = (torch.exp(d) - d - 1).sum()
        loss = loss + kl_weight * kl
    r = ratio.detach()
    return ObjectiveParts(loss, float((r - 1).abs().max()), float(kl.detach()),
                          int((r != clamped.detach()).sum()))
