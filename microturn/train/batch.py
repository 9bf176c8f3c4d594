"""Training batches from timeline exports: the same sequences the engine fed, padded."""

import warnings
from dataclasses import dataclass

import torch

from microturn.sequence.timeline import Timeline


@dataclass(frozen=True)
class TimelineBatch:
    token_ids: torch.Tensor  # [B, T] int64, right-padded
    loss_mask: torch.Tensor  # [B, T - 1] bool: the target token counts in the loss
    lengths: tuple[int, ...]
    audio: torch.Tensor | None = None  # dMel codes behind the audio placeholders, row order
    patches: torch.Tensor | None = None  # patches behind the patch placeholders, row order
    loss_weight: torch.Tensor | None = None  # [B, T - 1] float where targets weigh unequally

    def weights(self) -> torch.Tensor:
        """Each target's weight in the loss: the mask, scaled where `loss_weight` says."""
        return self.loss_mask.float() if self.loss_weight is None else self.loss_weight

    @classmethod
    def from_exports(cls, exports: list[dict], outputs_only: bool = True,
                     pad_id: int = 0) -> "TimelineBatch":
        """outputs_only: the loss covers what the model emitted, not what it was fed."""
        timelines = [Timeline.from_export(e) for e in exports]
        sequences = [t.tokens() for t in timelines]
        steps = max(len(s) for s in sequences)
        if steps < 2:
            raise ValueError("a training batch needs a sequence of at least 2 tokens")
        token_ids = torch.full((len(sequences), steps), pad_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), steps - 1, dtype=torch.bool)
        excluded = 0
        for row, (timeline, tokens) in enumerate(zip(timelines, sequences, strict=True)):
            token_ids[row, :len(tokens)] = torch.tensor(tokens)
            wanted = timeline.output_mask() if outputs_only else [True] * len(tokens)
            mask[row, :len(tokens) - 1] = torch.tensor(wanted[1:])
            if evicted := unreproducible_from(exports[row]):
                # after the session's first eviction the sampler attended to a window this
                # full-sequence pass does not reproduce: those targets stay out of the loss
                excluded += int(mask[row, evicted:].sum())
                mask[row, evicted:] = False
        if excluded:
            warnings.warn(f"training batch: {excluded} target(s) after a KV eviction left out "
                          f"of the loss (the trainer does not yet replay evicted windows)",
                          stacklevel=2)
        media = [t.media() for t in timelines]
        audio = [a for a, _ in media if a is not None]
        patches = [p for _, p in media if p is not None]
        vocab = timelines[0].markers.vocab_size  # 0 in exports from before media
        if vocab:  # a media position has no token probability to learn
            mask &= token_ids[:, 1:] < vocab
        return cls(token_ids, mask, tuple(len(s) for s in sequences),
                   torch.cat(audio) if audio else None, torch.cat(patches) if patches else None)


def unreproducible_from(export: dict) -> int | None:
    """The first loss column (target index - 1) a full-sequence pass cannot reproduce for this
    export: the targets after its first eviction's token (that token's own log-probability
    came from the window before it); None without evictions."""
    evictions = export.get("evictions") or []
    if not evictions:
        return None
    return min(int(e["at_token"]) for e in evictions)
