"""The shipped interaction model: it loads by default and behaves in time on a fixed smoke set
of held-out scenarios (the benchmark's own metric: 3 of 4 in every family), a bar the base
model does not clear."""

import pytest

from microturn.checkpoint.shipped import SHIPPED_ADAPTER, load_interaction_model
from microturn.eval.generator import generate
from microturn.eval.metrics import score
from microturn.eval.micro_turn import run_micro_turn
from microturn.kernels import build

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")

# families the shipped model handles, four held-out scenarios each (docs/MODEL_CARD.md)
SMOKE_FAMILIES = ("pause", "turn_taking", "interruption", "backchannel")


def passes(loaded, scenarios) -> dict[str, int]:
    transcripts = run_micro_turn(loaded, scenarios, "smoke")
    out: dict[str, int] = {}
    for sc, transcript in zip(scenarios, transcripts, strict=True):
        out[sc.family] = out.get(sc.family, 0) + score(sc, transcript.outputs).passed
    return out


def test_shipped_model_passes_the_smoke_set_and_the_base_model_does_not():
    assert SHIPPED_ADAPTER.is_file() and SHIPPED_ADAPTER.stat().st_size < 50 * 2**20
    scenarios = generate("heldout", seed=7, per_family=4, families=list(SMOKE_FAMILIES))
    shipped = passes(load_interaction_model(), scenarios)
    assert all(shipped.get(f, 0) >= 3 for f in SMOKE_FAMILIES), shipped
    base = passes(load_interaction_model(adapter="none"), scenarios)  # negative control:
    assert not all(base.get(f, 0) >= 3 for f in SMOKE_FAMILIES), base  # the base misses the bar
