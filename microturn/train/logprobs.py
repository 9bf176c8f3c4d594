"""Per-token log-probabilities of whole sequences in one forward pass, with autograd.

This is the forward a training step differentiates, and the one `verify-alignment` compares
with the sampler. Both run the same batch-invariant kernels (deterministic mode), so for the
token at index t the trainer computes exactly the bits the engine computed when it streamed
that token inside whatever batch it was in.
"""

import torch

from microturn.kernels import ops, policy
from microturn.model.attention_backend import CausalAttention
from microturn.model.decoder import Decoder


def sequence_logprobs(model: Decoder, token_ids: torch.Tensor,
                      deterministic: bool = True) -> torch.Tensor:
    """token_ids [B, T] -> [B, T - 1]: entry t - 1 is log p(token t | tokens before it),
    at positions 0..T-1. Sequences shorter than T are right-padded: padding never changes the
    log-probabilities of the tokens before it (attention is causal, kernels row-invariant)."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be [batch, steps], got {tuple(token_ids.shape)}")
    batch, steps = token_ids.shape
    token_ids = token_ids.to(model.device)
    positions = torch.arange(steps, device=model.device).expand(batch, steps)
    with policy.deterministic_mode(deterministic):
        logits = model(token_ids, positions, CausalAttention())
        targets = token_ids[:, 1:].reshape(-1)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return ops.token_logprobs(flat, targets).view(batch, steps - 1)
