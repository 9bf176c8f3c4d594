"""Training data: a pool of timeline exports, and the order the loop reads it in.

Two sources, one interface (`Examples`: a length and an export per index):

- `TargetExamples`: target timelines of train-split scenarios (`targets.py`), drawn from
  seeds `seed .. seed + rounds - 1`. Targets (the teacher's words) are built up front, while
  the model still has its base weights; exports (with rendered audio and video) on first use.
- `ExportExamples`: a directory of `*.json` exports (engine sessions, or targets written out).

The order: each epoch a permutation from (seed, epoch); the permutation is cut into buckets of
`bucket_batches` batches, sorted by length inside a bucket (little padding), and the batches
shuffled again. An epoch's plan depends only on (seed, epoch, lengths), so a `Position`
(epoch, batch) is all a checkpoint needs to resume the same stream.
"""

import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from microturn.checkpoint.tokenizer import Tokenizer
from microturn.errors import MicroturnError
from microturn.eval.generator import generate
from microturn.eval.phrasebook import BOOKS
from microturn.eval.scenario import Scenario
from microturn.sequence.markers import MarkerTokens
from microturn.sequence.timeline import Timeline
from microturn.train.batch import TimelineBatch
from microturn.train.targets import Target, TargetConfig, build_target, target_export
from microturn.train.teacher import Teacher


class Examples:
    def __len__(self) -> int:
        raise NotImplementedError

    def export(self, index: int) -> dict:
        raise NotImplementedError

    def length(self, index: int) -> int:
        """Tokens in the example's sequence (for batching by length)."""
        raise NotImplementedError


class TargetExamples(Examples):
    def __init__(self, targets: list[Target], tokenizer: Tokenizer, markers: MarkerTokens,
                 budget: int, clock: bool = False, clock_both_lanes: bool = False):
        if not targets:
            raise MicroturnError("training data: no scenarios")
        self.targets, self.tokenizer, self.markers = targets, tokenizer, markers
        self.budget, self.clock, self.clock_both_lanes = budget, clock, clock_both_lanes
        self._exports: dict[int, dict] = {}
        self._lengths: dict[int, int] = {}

    @classmethod
    def from_scenarios(cls, scenarios: list[Scenario], teacher: Teacher, tokenizer: Tokenizer,
                       markers: MarkerTokens, config: TargetConfig | None = None,
                       progress: Callable[[int], None] | None = None) -> "TargetExamples":
        config = config or TargetConfig()
        targets = []
        for sc in scenarios:
            targets.append(build_target(sc, teacher, tokenizer, config))
            if progress:
                progress(1)
        return cls(targets, tokenizer, markers, config.max_output_tokens, config.clock,
                   config.clock_both_lanes)

    def __len__(self) -> int:
        return len(self.targets)

    def export(self, index: int) -> dict:
        if index not in self._exports:
            self._exports[index] = target_export(self.targets[index], self.tokenizer,
                                                 self.markers, self.budget, clock=self.clock,
                                                 clock_both_lanes=self.clock_both_lanes)
        return self._exports[index]

    def length(self, index: int) -> int:
        if index not in self._lengths:
            self._lengths[index] = len(Timeline.from_export(self.export(index)).tokens())
        return self._lengths[index]


class ExportExamples(Examples):
    def __init__(self, directory: str | Path):
        self.paths = sorted(Path(directory).glob("*.json"))
        if not self.paths:
            raise MicroturnError(f"{directory}: no *.json exports to train on")
        self._lengths: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def export(self, index: int) -> dict:
        path = self.paths[index]
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise MicroturnError(f"{path}: not a readable export ({error})") from None
        if missing := {"markers", "turns"} - data.keys():
            raise MicroturnError(f"{path}: export lacks {', '.join(sorted(missing))}")
        return data

    def length(self, index: int) -> int:
        if index not in self._lengths:
            self._lengths[index] = len(Timeline.from_export(self.export(index)).tokens())
        return self._lengths[index]


def train_scenarios(seed: int, rounds: int, per_family: int,
                    families: list[str] | None = None) -> list[Scenario]:
    """The train split's scenarios of seeds seed .. seed + rounds - 1 (never held-out)."""
    return [sc for s in range(seed, seed + rounds)
            for sc in generate("train", s, per_family, families)]


UNVOICED_IN_A_ROOM = ("interruption", "backchannel")  # their timing depends on what is heard


def in_a_room(scenarios: list[Scenario], fraction: float, seed: int) -> list[Scenario]:
    """About `fraction` of the text-only scenarios become audio sessions: the same words with
    a room's noise on an audio stream, and (but where the expected timing depends on when the
    user is first heard) the user's voice speaking them, so the model learns that a
    conversation (a question, a timed request, a cue word) goes the same way with a
    microphone open, as served, and that a voice is not a cue sound."""
    out = []
    for sc in scenarios:
        rng = np.random.default_rng([seed, zlib.crc32(sc.id.encode())])
        if not sc.has_audio and not sc.has_video and rng.random() < fraction:
            sc = replace(sc, noise_level=float(rng.uniform(0.002, 0.02)),
                         audio_seed=int(rng.integers(2**31)))
            voices = BOOKS[sc.split].voices
            if sc.family not in UNVOICED_IN_A_ROOM and rng.random() < 0.7:
                sc = replace(sc, voice=voices[int(rng.integers(len(voices)))],
                             voice_level=float(rng.uniform(0.3, 0.8)))
        out.append(sc)
    return out


CAUGHT_FAMILIES = ("cue_audio", "cue_visual")  # where the cue is a sound or a sight


def catch_trials(scenarios: list[Scenario], fraction: float, seed: int) -> list[Scenario]:
    """About `fraction` of the sound and sight cue scenarios become catch trials: the same
    instruction, and the cue never comes (the session ends first), so the target is silence
    to the end. With the cue always coming, a model that has not heard it is still rewarded
    for saying the word at a typical time; a catch trial makes guessing the time cost."""
    out = []
    for sc in scenarios:
        rng = np.random.default_rng([seed, zlib.crc32(sc.id.encode()), 1])
        if sc.family in CAUGHT_FAMILIES and rng.random() < fraction:
            screen = sc.screen and replace(sc.screen, change_ms=None)
            sc = replace(sc, sounds=(), screen=screen, expect=replace(sc.expect, events=()),
                         note=f"{sc.note}; catch trial: the cue never comes")
        out.append(sc)
    return out


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    batch: int = 0  # the next batch of the epoch's plan


def epoch_plan(examples: Examples, batch_size: int, seed: int, epoch: int,
               bucket_batches: int = 8) -> list[list[int]]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples)).tolist()
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=examples.length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_from(examples: Examples, batch_size: int, seed: int,
                 position: Position) -> Iterator[tuple[Position, list[int]]]:
    """(the position after it, indices) of every batch from `position` on, forever."""
    epoch, start = position.epoch, position.batch
    while True:
        plan = epoch_plan(examples, batch_size, seed, epoch)
        for b in range(start, len(plan)):
            yield Position(epoch, b + 1), plan[b]
        epoch, start = epoch + 1, 0


MOMENT_WINDOW = 2  # slices before a moment that weigh with it: going early is the failure


def training_batch(exports: list[dict], moment_weight: float = 1.0) -> TimelineBatch:
    """`TimelineBatch.from_exports`, with the outputs of scripted turns (replayed speech, an
    export's `scripted`) left out of the loss, and the outputs of the turns at and just before
    each of an export's `moments` weighing `moment_weight` times as much as the rest."""
    batch = TimelineBatch.from_exports(exports)
    mask = batch.loss_mask.clone()
    weight = torch.ones(mask.shape) if moment_weight != 1.0 else None
    for row, export in enumerate(exports):
        scripted = set(export.get("scripted", ()))
        moments = {k for m in export.get("moments", ())
                   for k in range(m - MOMENT_WINDOW, m + 1)} if weight is not None else set()
        if not scripted and not moments:
            continue
        timeline = Timeline.from_export(export)
        at = 0
        for turn in timeline.turns:
            at += len(timeline.input_tokens(turn))
            span = slice(at - 1, at - 1 + len(turn.output_ids))  # target t: mask column t - 1
            if turn.index in scripted:
                mask[row, span] = False
            elif turn.index in moments:
                weight[row, span] = moment_weight
            at += len(turn.output_ids)
    return TimelineBatch(batch.token_ids, mask, batch.lengths, batch.audio, batch.patches,
                         None if weight is None else weight * mask, batch.windows)


def tokens_in(batch: TimelineBatch) -> int:
    return int(torch.tensor(batch.lengths).sum())
