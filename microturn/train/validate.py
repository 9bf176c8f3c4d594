"""Validation during training: scenarios through the real engine, scored by the eval metrics.

The model is served as the engine will serve it (adapters merged, `lora.serving`), greedy, on
train-split scenarios of a seed range the training data never uses, so a pass rate here is
`microturn eval`'s number on templates the model has seen but draws it has not.
"""

import math
from dataclasses import dataclass

from microturn.checkpoint.loader import LoadedModel
from microturn.eval.metrics import score
from microturn.eval.micro_turn import MicroTurnSettings, run_micro_turn
from microturn.eval.scenario import Scenario
from microturn.train.lora import serving

VALIDATION_SEED = 1_000_000  # validation draws seeds from here; training seeds stay below


@dataclass(frozen=True)
class Validation:
    step: int
    pass_rate: dict[str, float]  # family -> share of its scenarios passed
    passed: int
    total: int

    @property
    def overall(self) -> float:
        return self.passed / self.total

    @property
    def macro(self) -> float:
        """Every family counts the same (each is a goal of its own), however many
        scenarios it has: what picks the best checkpoint."""
        return sum(self.pass_rate.values()) / len(self.pass_rate)


def validate(loaded: LoadedModel, scenarios: list[Scenario], step: int,
             settings: MicroTurnSettings | None = None) -> Validation:
    if settings is None:
        settings = MicroTurnSettings()
        settings = MicroTurnSettings(kv_budget_mb=kv_budget_mb(loaded, scenarios,
                                                                settings.batch))
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        with serving(loaded.model):
            transcripts = run_micro_turn(loaded, scenarios, "validation", settings)
    finally:
        loaded.model.train(was_training)
    by_family: dict[str, list[bool]] = {}
    for sc, transcript in zip(scenarios, transcripts, strict=True):
        by_family.setdefault(sc.family, []).append(score(sc, transcript.outputs).passed)
    rates = {f: sum(v) / len(v) for f, v in by_family.items()}
    passed = sum(sum(v) for v in by_family.values())
    return Validation(step, rates, passed, len(scenarios))


def kv_budget_mb(loaded: LoadedModel, scenarios: list[Scenario], batch: int) -> int:
    """Room for the `batch` longest scenarios at once (a slice: up to ~8 text and output
    positions, 17 of audio, ~12 of video at 2 fps; plus a block of slack per session): a pool
    too small evicts, which would change what is validated; one far too big costs its zeroing."""
    c = loaded.config
    per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * loaded.model.dtype.itemsize
    sizes = sorted((sc.slices * (8 + 17 * sc.has_audio + 12 * sc.has_video) + 256
                    for sc in scenarios), reverse=True)
    return math.ceil(per_token * sum(sizes[:batch]) / 2**20) + 8
