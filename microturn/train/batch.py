"""Training batches from timeline exports: the same sequences the engine fed, padded."""

import warnings
from dataclasses import dataclass

import torch

from microturn.kernels.windowed_attention import ResidentWindows
from microturn.sequence.residency import Eviction, replay
from microturn.sequence.timeline import Timeline


@dataclass(frozen=True)
class TimelineBatch:
    token_ids: torch.Tensor  # [B, T] int64, right-padded
    loss_mask: torch.Tensor  # [B, T - 1] bool: the target token counts in the loss
    lengths: tuple[int, ...]
    audio: torch.Tensor | None = None  # dMel codes behind the audio placeholders, row order
    patches: torch.Tensor | None = None  # patches behind the patch placeholders, row order
    loss_weight: torch.Tensor | None = None  # [B, T - 1] float where targets weigh unequally
    windows: ResidentWindows | None = None  # rows that evicted: what each token had resident

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
        windows = resident_windows(exports)
        excluded = 0
        for row, (timeline, tokens) in enumerate(zip(timelines, sequences, strict=True)):
            token_ids[row, :len(tokens)] = torch.tensor(tokens)
            wanted = timeline.output_mask() if outputs_only else [True] * len(tokens)
            mask[row, :len(tokens) - 1] = torch.tensor(wanted[1:])
            if windows is None and (evicted := first_eviction(exports[row])):
                # an export without its KV layout (`kv`): the window after its first eviction
                # cannot be replayed, so those targets stay out of the loss
                excluded += int(mask[row, evicted:].sum())
                mask[row, evicted:] = False
        if excluded:
            warnings.warn(f"training batch: {excluded} target(s) after a KV eviction left out "
                          f"of the loss (the export does not say its KV layout)", stacklevel=2)
        media = [t.media() for t in timelines]
        audio = [a for a, _ in media if a is not None]
        patches = [p for _, p in media if p is not None]
        vocab = timelines[0].markers.vocab_size  # 0 in exports from before media
        if vocab:  # a media position has no token probability to learn
            mask &= token_ids[:, 1:] < vocab
        return cls(token_ids, mask, tuple(len(s) for s in sequences),
                   torch.cat(audio) if audio else None, torch.cat(patches) if patches else None,
                   windows=windows)


def first_eviction(export: dict) -> int | None:
    """The first loss column (target index - 1) after the export's first eviction: that
    token's own log-probability came from the window before it; None without evictions."""
    evictions = export.get("evictions") or []
    return min(int(e["at_token"]) for e in evictions) if evictions else None


def resident_windows(exports: list[dict]) -> ResidentWindows | None:
    """What each row's tokens had resident, for exports that evicted and say their KV layout
    (one layout for the batch); None when no row evicted or one cannot be replayed."""
    if not any(e.get("evictions") for e in exports):
        return None
    layouts = {(e["kv"]["block_size"], e["kv"]["sink_slots"]) for e in exports if "kv" in e}
    if len(layouts) != 1 or any(e.get("evictions") and "kv" not in e for e in exports):
        return None
    (block_size, sink_slots) = layouts.pop()
    rows = tuple(tuple(replay([Eviction.from_dict(e) for e in export.get("evictions") or []],
                              block_size, sink_slots)) for export in exports)
    return ResidentWindows(block_size, sink_slots, rows)
