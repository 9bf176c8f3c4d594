"""`microturn bench attention`: the engine's attention call alone, against its floor."""

import pytest

from microturn import MicroturnError
from microturn.bench.attention_bench import measure_attention
from microturn.kernels import build

pytestmark = pytest.mark.skipif(build.load() is None, reason="no CPU kernels here")


def test_a_small_call_is_timed_against_its_floor():
    r = measure_attention(sessions=2, tokens=3, context=40, layers=2, repeats=2)
    assert 0 < r["best_ms"] <= r["median_ms"]
    assert r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["best_ms"] / r["floor_ms"])
    # the FLOPs: 4 per (query head, channel, visible slot) a layer, the history plus the
    # segment up to each token
    flops = 4 * 2 * 2 * 9 * 64 * (41 + 42 + 43)
    assert r["gflops"] == pytest.approx(flops / r["best_ms"] / 1e6)


@pytest.mark.parametrize("field,kwargs", [
    ("sessions", {"sessions": 0}), ("tokens", {"tokens": 0}), ("context", {"context": -1}),
    ("layers", {"layers": 0}), ("repeats", {"repeats": 0})])
def test_bad_sizes_name_the_field(field, kwargs):
    args = {"sessions": 1, "tokens": 1, "context": 0, "layers": 1, "repeats": 1} | kwargs
    with pytest.raises(MicroturnError, match=f"--{field} must be >= "):
        measure_attention(**args)
