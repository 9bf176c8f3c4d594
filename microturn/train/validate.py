"""Validation during training: scenarios through the real engine, scored by the eval metrics.

The model is served as the engine will serve it (adapters merged, `lora.serving`), greedy, on
train-split scenarios of a seed range the training data never uses, so a pass rate here is
`microturn eval`'s number on templates the model has seen but draws it has not.
"""

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


def validate(loaded: LoadedModel, scenarios: list[Scenario], step: int,
             settings: MicroTurnSettings | None = None) -> Validation:
    settings = settings or MicroTurnSettings(kv_budget_mb=128)
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
