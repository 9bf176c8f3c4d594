"""The engine benchmark's roofline capacity: the most sessions whose tick floor fits the slice."""

import pytest
import torch
from test_engine import tiny_loaded

from microturn.bench.engine_bench import Floors
from microturn.checkpoint.loader import load_tokenizer


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded(load_tokenizer())


def test_roofline_is_the_last_session_count_whose_floor_fits(loaded):
    floors = Floors(bandwidth=20e9, peak=50e9, weights=4_000_000, layer_weights=3_000_000)

    def floor_ms(n, feed=20, context=400, out=2):
        rows = [(feed, context)] * n
        steps = [[(1, context + s)] * n for s in range(1, out)]
        return floors.tick(loaded, [rows, *steps]) * 1e3

    for slice_ms in (1.0, 5.0, 200.0):
        n = floors.roofline(loaded, 20, 400, 2, slice_ms)
        assert n == 0 or floor_ms(n) <= slice_ms
        assert floor_ms(n + 1) > slice_ms  # one more session would not fit
    assert floors.roofline(loaded, 20, 400, 2, 0.01) == 0
    small, big = floors.roofline(loaded, 20, 400, 2, 50), floors.roofline(loaded, 20, 4000, 2, 50)
    assert big < small  # a longer history reads more KV: fewer sessions fit


def test_the_roofline_takes_the_load_of_the_p99_tick(loaded):
    """Capacity asks that the p99 tick fit the slice, and a session's context grows tick by
    tick, so the roofline is taken at the load of the p99 tick (its context), not the mean's:
    never more sessions than the mean load would allow, and fewer once the history is long."""
    import torch

    from microturn.bench.engine_bench import ShapeRun, p99_rank

    assert [p99_rank(list(range(n))) for n in (1, 40, 100, 200)] == [0, 39, 99, 198]
    floors = Floors(bandwidth=20e9, peak=50e9, weights=4_000_000, layer_weights=3_000_000)
    with torch.inference_mode():
        run = ShapeRun(loaded, floors, "speech", 2, 12, 16, 2, 200, 64, True)
        for index in range(12 + run.warmup):
            run.turn(index)
        result = run.result()
    contexts = [context for _, context in run.tick_loads]
    assert contexts == sorted(contexts) and contexts[0] < contexts[-1]  # histories grow
    assert result.p99_context == contexts[p99_rank(contexts)] > result.mean_context
    # the run says where the threads sat at its two ends (None: this Floors measured none)
    assert result.round_trip_ns_start is None
    assert result.round_trip_ns_end is None or result.round_trip_ns_end > 10
    at_p99 = floors.roofline(loaded, result.p99_feed, result.p99_context * 40, 2, 50)
    at_mean = floors.roofline(loaded, result.mean_feed, result.mean_context * 40, 2, 50)
    assert at_p99 < at_mean


def test_thread_round_trip_is_a_real_hand_off_between_two_threads():
    from microturn.bench.machine import thread_round_trip_ns
    from microturn.kernels import build

    if build.load() is None:
        pytest.skip("needs the CPU kernels")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert thread_round_trip_ns() is None  # one thread: nothing to hand a line to
        torch.set_num_threads(2)
        ns = thread_round_trip_ns()
        # a cache line's trip and back: tens of ns at least, and far below a scheduler slice
        # unless the two threads share one CPU (then it waits on preemption: not this machine)
        assert ns is not None and 10 < ns < 100_000, ns
        assert build.load().thread_round_trip_ns(rounds=1000, samples=1) > 10
    finally:
        torch.set_num_threads(threads)
    floors = Floors(bandwidth=20e9, peak=50e9, weights=1, layer_weights=1, round_trip_ns=71.4)
    assert floors.describe() == "20.0 GB/s, 50 GFLOP/s, threads 71 ns round trip"
    assert "threads" not in Floors(20e9, 50e9, 1, 1).describe()
