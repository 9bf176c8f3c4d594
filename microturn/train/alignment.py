"""verify_alignment: recompute an exported session with the trainer, compare bit for bit."""

import math
from dataclasses import dataclass

import torch

from microturn.frontend.embedding import FrontEnd
from microturn.model.decoder import Decoder
from microturn.sequence.residency import Eviction, replay
from microturn.sequence.timeline import Timeline
from microturn.train.batch import resident_windows
from microturn.train.logprobs import sequence_logprobs


@dataclass(frozen=True)
class AlignmentReport:
    compared: int  # positions with a sampler log-probability that the trainer recomputed
    max_abs_diff: float
    first_mismatch: int | None  # sequence index of the first differing position
    skipped: int  # positions after the first eviction of an export without its KV layout

    @property
    def aligned(self) -> bool:
        return self.first_mismatch is None and self.compared > 0


def verify_alignment(export: dict, model: Decoder,
                     frontend: FrontEnd | None = None) -> AlignmentReport:
    """`frontend`: the engine's, for sessions with audio or video."""
    timeline = Timeline.from_export(export)
    tokens = timeline.tokens()
    sampled = export["logprobs"]
    if len(sampled) != len(tokens):
        raise ValueError(f"export: {len(sampled)} logprobs for {len(tokens)} tokens")
    # after an eviction the engine's window no longer starts at token 0: with the export's KV
    # layout the pass replays each token's resident window; without it, it reproduces the
    # tokens up to the first eviction, whose own token it includes (its log-probability came
    # from the step before the eviction)
    evicted = check_evictions(export, tokens, timeline.markers.vocab_size)
    windows = resident_windows([export])
    limit = len(tokens) if windows is not None else min(evicted + [len(tokens) - 1]) + 1
    kept = Timeline(timeline.markers, _turns_within(timeline, limit), timeline.layout)
    audio, patches = kept.media()
    with torch.enable_grad():  # the trainer's forward, autograd on
        trainer = sequence_logprobs(model, torch.tensor([tokens[:limit]]),
                                    export.get("deterministic", True), frontend, audio,
                                    patches, windows)[0].detach()
    compared, worst, first = 0, 0.0, None
    for index in range(1, limit):
        if sampled[index] is None:
            continue
        compared += 1
        recomputed = float(trainer[index - 1])
        diff = abs(recomputed - sampled[index])
        worst = max(worst, diff if not math.isnan(diff) else math.inf)
        if recomputed != sampled[index] and first is None:
            first = index
    skipped = sum(v is not None for v in sampled[limit:])
    return AlignmentReport(compared, worst, first, skipped)


def check_evictions(export: dict, tokens: list[int], vocab_size: int = 0) -> list[int]:
    """The evictions' token indices, once each record is what the engine's policy writes
    (`sequence/residency.py`): in order, inside the session, whole blocks after the sink,
    a compaction dropping media only (a forged record would hide what comes after it)."""
    evictions, kv = export.get("evictions", []), export.get("kv")
    at = [int(e["at_token"]) for e in evictions]
    if any(not 0 < a < len(tokens) for a in at) or at != sorted(at):
        raise ValueError(f"export: evictions must fall in order inside the session's "
                         f"{len(tokens)} tokens")
    if kv is not None:
        try:
            replay([Eviction.from_dict(e) for e in evictions], kv["block_size"],
                   kv["sink_slots"], tokens, vocab_size)
        except ValueError as error:
            raise ValueError(f"export: {error}") from None
    return at


def _turns_within(timeline: Timeline, limit: int) -> list:
    """The turns whose input lies wholly inside the first `limit` tokens (their media is
    what those tokens need; an eviction always falls on a tick's first fed token)."""
    out, length = [], 0
    for turn in timeline.turns:
        length += len(timeline.input_tokens(turn))
        if length > limit:
            break
        out.append(turn)
        length += len(turn.output_ids)
    return out
