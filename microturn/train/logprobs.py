"""Per-token log-probabilities of whole sequences in one forward pass, with autograd.

This is the forward a training step differentiates, and the one `verify-alignment` compares
with the sampler. Both run the same batch-invariant kernels (deterministic mode), so for the
token at index t the trainer computes exactly the bits the engine computed when it streamed
that token inside whatever batch it was in.
"""

import torch

from microturn.frontend.embedding import FrontEnd
from microturn.kernels import ops, policy
from microturn.kernels.windowed_attention import ResidentWindows
from microturn.model.attention_backend import CausalAttention, WindowedAttention
from microturn.model.decoder import Decoder


def sequence_logprobs(model: Decoder, token_ids: torch.Tensor, deterministic: bool = True,
                      frontend: FrontEnd | None = None, audio: torch.Tensor | None = None,
                      patches: torch.Tensor | None = None,
                      windows: ResidentWindows | None = None) -> torch.Tensor:
    """token_ids [B, T] -> [B, T - 1]: entry t - 1 is log p(token t | tokens before it),
    at positions 0..T-1. Sequences shorter than T are right-padded: padding never changes the
    log-probabilities of the tokens before it (attention is causal, kernels row-invariant).
    Media positions (ids past the vocabulary) take their vectors from `frontend` with `audio`
    and `patches` in row order; their own entries are 0 (a dMel frame has no probability).
    `windows`: the rows are long sessions that evicted; each token attends to what was
    resident when the engine computed it."""
    batch, steps = token_ids.shape
    logits = sequence_logits(model, token_ids, deterministic, frontend, audio, patches,
                             windows)
    vocab = model.config.vocab_size
    token_ids = token_ids.to(model.device)
    with policy.deterministic_mode(deterministic):
        targets = token_ids[:, 1:].reshape(-1)
        is_text = targets < vocab
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        values = ops.token_logprobs(flat, torch.where(is_text, targets, 0))
        return torch.where(is_text, values, 0.0).view(batch, steps - 1)


def sequence_logits(model: Decoder, token_ids: torch.Tensor, deterministic: bool = True,
                    frontend: FrontEnd | None = None, audio: torch.Tensor | None = None,
                    patches: torch.Tensor | None = None,
                    windows: ResidentWindows | None = None,
                    logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """The forward behind `sequence_logprobs`: logits [B, T', vocab] at the steps
    `logits_at` (all T when None), each row the bits the engine's logits had there."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be [batch, steps], got {tuple(token_ids.shape)}")
    batch, steps = token_ids.shape
    token_ids = token_ids.to(model.device)
    positions = torch.arange(steps, device=model.device).expand(batch, steps)
    with policy.deterministic_mode(deterministic):
        embeds = None
        if frontend is not None and bool((token_ids >= model.config.vocab_size).any()):
            embeds = frontend.embed(model.embed_tokens, token_ids, audio, patches)
        backend = CausalAttention() if windows is None else WindowedAttention(windows)
        at = None if logits_at is None else logits_at.to(model.device)
        return model(token_ids, positions, backend, logits_at=at, embeds=embeds)
