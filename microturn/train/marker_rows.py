"""The timeline markers' own embedding rows, learning beside the adapter.

A marker found in a checkpoint's vocabulary may carry a row the base never trained: SmolLM2's
`<empty_output>` (our silence) has exactly the row of several other unused specials, so with a
tied head their logits tie with silence's and greedy decoding says junk where the model
means to keep quiet. Training the markers' rows (input and output heads at once, since they
are tied) gives each marker a logit of its own.

The rows are fp32 masters; the model sees them rounded to its dtype, written over the
embedding's rows: W' = W with W'[ids] = round(rows). The engine serves exactly W'
(`checkpoint/adapter.py` writes the rows into the loaded weight), and the trainer's forward
runs W' through the same lookup and the same packed head kernel, so the sampler's bits stay
the trainer's. The backward reaches the rows only: dL/drows = (dL/dlogits[:, ids])^T h from the
head, plus the embedding's gradient at those rows.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from microturn.checkpoint.adapter import pack, written_weight
from microturn.errors import MicroturnError
from microturn.kernels import ops, policy
from microturn.model.decoder import Decoder
from microturn.model.linear import Embedding, Linear


class MarkerRows(nn.Module):
    """Trainable fp32 rows for the token ids `ids`, over a frozen (tied) embedding weight."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        super().__init__()
        if len(set(ids)) != len(ids) or not ids:
            raise MicroturnError(f"marker rows: ids must be distinct and non-empty, got {ids}")
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device),
                             persistent=False)
        self.rows = nn.Parameter(weight.detach()[self.ids].float())

    def patched(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with the rows written over it in its dtype (differentiable in the rows)."""
        return weight.index_put((self.ids,), self.rows.to(weight.dtype))


class _HeadWithRows(torch.autograd.Function):
    """logits = h W'^T through the packed kernel (the engine's bits); the backward goes to h
    and to the marker rows, never forming a gradient for the whole head."""

    @staticmethod
    def forward(ctx, hidden, rows, weight, ids):
        with torch.no_grad():
            w = weight.index_put((ids,), rows.to(weight.dtype))
            kernels = ops.kernels_for(hidden) if policy.deterministic() else None
            y = (kernels.packed_linear(hidden, pack(w), w.shape[0], None) if kernels
                 else torch.nn.functional.linear(hidden, w))
        ctx.save_for_backward(hidden, w, ids)
        return y

    @staticmethod
    def backward(ctx, grad):
        hidden, w, ids = ctx.saved_tensors
        g = grad.flatten(0, -2).float()
        h = hidden.flatten(0, -2).float()
        grad_h = (g @ w.float()).view_as(hidden).to(hidden.dtype) \
            if ctx.needs_input_grad[0] else None
        grad_rows = g[:, ids].T @ h if ctx.needs_input_grad[1] else None
        return grad_h, grad_rows, None, None


class EmbeddingWithRows(nn.Module):
    """The token embedding with the marker rows written over it."""

    def __init__(self, base: Embedding, rows: MarkerRows):
        super().__init__()
        self.base, self.marker_rows = base, rows

    @property
    def weight(self) -> torch.Tensor:  # dtype, device and spread, for the model's readers
        return self.base.weight

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(token_ids, self.marker_rows.patched(self.base.weight))


class HeadWithRows(nn.Module):
    """The tied output head with the marker rows written over it."""

    def __init__(self, base: Linear, rows: MarkerRows):
        super().__init__()
        self.base, self.marker_rows = base, rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        r = self.marker_rows
        if not torch.is_grad_enabled():
            w = r.patched(self.base.weight)
            return ops.linear(hidden, w, None, lambda: pack(w))
        return _HeadWithRows.apply(hidden, r.rows, self.base.weight, r.ids)


def add_marker_rows(model: Decoder, ids: list[int]) -> MarkerRows:
    """Make the rows of `ids` trainable in place (tied embeddings only: one row is both the
    marker's input vector and its output logit's weights)."""
    if not model.config.tie_word_embeddings:
        raise MicroturnError("marker rows: only for a model with tied embeddings")
    if marker_rows(model) is not None:
        raise MicroturnError("this model already carries trainable marker rows")
    rows = MarkerRows(model.embed_tokens.weight, ids)
    model.embed_tokens = EmbeddingWithRows(model.embed_tokens, rows)
    model.lm_head = HeadWithRows(model.lm_head, rows)
    return rows


def marker_rows(model: nn.Module) -> MarkerRows | None:
    embed = getattr(model, "embed_tokens", None)
    return embed.marker_rows if isinstance(embed, EmbeddingWithRows) else None


@contextmanager
def rows_served(model: Decoder) -> Iterator[Decoder]:
    """The model with plain modules holding the written weight, for the duration (the
    engine's native pass reads plain modules), put back afterwards."""
    rows = marker_rows(model)
    if rows is None:
        yield model
        return
    embed, head = model.embed_tokens, model.lm_head
    with torch.no_grad():
        weight = written_weight(embed.base.weight, rows.ids, rows.rows)
    plain_embed = Embedding(*weight.shape, device="meta")
    plain_head = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    plain_embed.weight = weight
    plain_head.weight = weight
    model.embed_tokens, model.lm_head = plain_embed, plain_head
    try:
        yield model
    finally:
        model.embed_tokens, model.lm_head = embed, head


@contextmanager
def rows_off(model: Decoder) -> Iterator[Decoder]:
    """The model with its base rows for the duration (a KL penalty's reference)."""
    if marker_rows(model) is None:
        yield model
        return
    embed, head = model.embed_tokens, model.lm_head
    model.embed_tokens, model.lm_head = embed.base, head.base
    try:
        yield model
    finally:
        model.embed_tokens, model.lm_head = embed, head
