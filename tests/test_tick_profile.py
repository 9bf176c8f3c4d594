"""`bench engine --profile`'s measurement: the kernels' phase clock and the engine's steps."""

import pytest

from microturn.checkpoint.loader import LoadedModel
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.engine.tick_profile import TickProfile
from microturn.kernels.build import load

LAYER_PHASES = ("norm", "qkv", "rotary+write", "attention", "o", "gate/up", "silu", "down")


def stream(checkpoint, profile: TickProfile | None, ticks: int = 6) -> list[list[int]]:
    engine = Engine(LoadedModel.from_checkpoint(checkpoint),
                    EngineConfig(kv_budget_mb=64, max_sessions=2))
    engine.profile = profile
    ids = [engine.open(SessionParams(max_output_tokens=2, force_output=True)) for _ in range(2)]
    outputs = []
    for k in range(ticks):
        for i, sid in enumerate(ids):
            engine.append(sid, list(range(300 + 20 * k + i, 316 + 20 * k + i)))
        outputs.append([t for out in engine.tick().values() for t in out.output_ids])
    return outputs


@pytest.mark.skipif(load() is None, reason="the C++ kernels are not built on this machine")
def test_profile_accounts_for_the_tick_and_changes_nothing(smollm_bf16):
    kernels = load()
    kernels.phase_seconds()
    plain = stream(smollm_bf16, None)
    assert not any(kernels.phase_seconds().values())  # off unless asked for
    profile = TickProfile()
    profiled = stream(smollm_bf16, profile)
    assert profiled == plain  # timing never touches the arithmetic
    assert profile.ticks == 6
    rows = dict(profile.rows())
    assert all(rows[f"forward: {p}"] > 0 for p in LAYER_PHASES + ("embed", "head"))
    assert rows["forward: Python around the pass"] >= 0  # the pass's phases fit in forward
    assert sum(rows.values()) == pytest.approx(profile.tick_seconds * 1e3 / 6, rel=1e-6)
    assert not kernels.phase_profile(False)  # rows() switched the clock off again
