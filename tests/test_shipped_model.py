"""The shipped interaction model: it loads by default and behaves in time on a fixed smoke set
of held-out scenarios (the benchmark's own metric: 3 of 4 in every family), a bar the base
model does not clear; and where it keeps quiet it says so with the silence marker alone."""

import pytest
from safetensors.torch import save_file

from microturn.checkpoint.adapter import read_adapter
from microturn.checkpoint.shipped import SHIPPED_ADAPTER, load_interaction_model
from microturn.eval.generator import generate
from microturn.eval.metrics import score
from microturn.eval.micro_turn import quiet_slices, run_micro_turn
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


def test_shipped_model_keeps_quiet_with_the_silence_marker(tmp_path):
    """Its quiet slices are `<silence>` alone (one decode step), not the unused specials whose
    base rows tie with silence's; without its trained marker rows (the negative control) the
    same LoRA says those junk tokens instead."""
    scenarios = generate("heldout", seed=3, per_family=2, families=["pause", "turn_taking"])
    loaded = load_interaction_model()
    share = quiet_slices(run_micro_turn(loaded, scenarios, "smoke"), loaded.markers)
    assert share.quiet > 20 and share.by_marker / share.quiet > 0.95, share
    _, tensors, metadata = read_adapter(SHIPPED_ADAPTER)
    assert "rows.ids" in tensors
    stripped = tmp_path / "no-rows.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("rows.")}, str(stripped),
              metadata)
    bare = load_interaction_model(adapter=str(stripped))
    share = quiet_slices(run_micro_turn(bare, scenarios, "smoke"), bare.markers)
    assert share.by_marker / share.quiet < 0.5, share
