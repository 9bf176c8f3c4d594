"""`microturn train --rl` on a tiny model: on-policy bit for bit, and it learns a timing task
from rewards alone."""

import copy

import numpy as np
import pytest
import torch
from test_train_loop import setup, speak_at

from microturn import cli
from microturn.checkpoint.adapter import apply_adapter, read_adapter
from microturn.checkpoint.loader import load_tokenizer
from microturn.eval.scenario import Expectation, Scenario, TimedEvent, Word
from microturn.kernels import build
from microturn.rl.advantage import group_advantages
from microturn.rl.loop import RLConfig, RLRun
from microturn.rl.reward import RewardWeights, slice_rewards
from microturn.train.loop import LoopConfig, TrainingRun
from microturn.train.lora import lora_modules, serving

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")

HELD_OUT = [speak_at(s) for s in range(10_000, 10_040)]


def timing_source(step: int) -> list[Scenario]:
    return [speak_at(20_000 + step * 8 + i) for i in range(8)]


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory):
    """A tiny model trained (every weight) on "speak at slice k" until it is right about
    half the time, greedy: the starting point RL improves on; and that pass rate."""
    loaded, examples = setup(load_tokenizer())
    run = TrainingRun(loaded, examples, LoopConfig(steps=50, batch_size=8, lr=5e-3, warmup=10,
                                                   full=True, checkpoint_every=1000),
                      tmp_path_factory.mktemp("sft"), HELD_OUT, progress=False)
    run.train(resume=False)
    before = run.validations[-1].overall
    assert 0.2 <= before <= 0.8, before  # room to improve, something to start from
    loaded.model.requires_grad_(False)
    return loaded, before


def test_rl_learns_timing_from_rewards_and_stays_on_policy(half_trained, tmp_path):
    loaded, before = copy.deepcopy(half_trained[0]), half_trained[1]
    config = RLConfig(steps=15, scenarios=8, group=4, lr=1e-2, warmup=1, kl_weight=0.0,
                      checkpoint_every=1000)
    run = RLRun(loaded, config, tmp_path, validation=HELD_OUT, progress=False,
                log_every=0, source=timing_source)
    history = run.train(resume=False)
    # the on-policy check: every ratio of every step was exactly 1.0 (the loop raises if not)
    assert all(r.ratio_deviation == 0.0 for r in history)
    assert all(r.learned_from > 0 for r in history)
    after = run.validations[-1].overall
    assert after >= min(0.95, before + 0.25), (before, after)
    assert {"adapter.safetensors", "history.json", "checkpoint.safetensors"} <= {
        p.name for p in tmp_path.iterdir()}


def test_ratios_move_off_one_without_deterministic_kernels(half_trained, tmp_path):
    """Negative control: the trainer on torch's fastest kernels recomputes other bits."""
    loaded = copy.deepcopy(half_trained[0])
    run = RLRun(loaded, RLConfig(steps=1, scenarios=8, group=4, deterministic=False),
                tmp_path, progress=False, log_every=0, source=timing_source)
    history = run.train(resume=False)
    assert history[0].tokens > 0 and history[0].ratio_deviation > 0.0


def test_stacked_adapter_serves_what_the_trainer_ran(half_trained, tmp_path):
    """An RL adapter trained on top of another names it as its parent; `apply_adapter`
    merges both, bitwise the weights the rollouts were sampled with. The parent alone
    differs (negative control)."""
    config = RLConfig(steps=2, scenarios=8, group=4, lr=1e-2, warmup=1)
    first = RLRun(copy.deepcopy(half_trained[0]), config, tmp_path / "first", progress=False,
                  log_every=0, source=timing_source)
    first.train(resume=False)
    on_top = copy.deepcopy(half_trained[0])
    apply_adapter(on_top, first.artifact)
    second = RLRun(on_top, RLConfig(**{**config.__dict__, "seed": 1}), tmp_path / "second",
                   parent=first.artifact, progress=False, log_every=0, source=timing_source)
    second.train(resume=False)
    assert read_adapter(second.artifact)[2]["parent"] == str(first.artifact.resolve())
    served, only_parent = copy.deepcopy(half_trained[0]), copy.deepcopy(half_trained[0])
    apply_adapter(served, second.artifact)
    apply_adapter(only_parent, first.artifact)
    with serving(second.loaded.model):
        ours = dict(second.loaded.model.named_parameters())
        assert all(torch.equal(p, ours[n]) for n, p in served.model.named_parameters())
        assert not all(torch.equal(p, ours[n]) for n, p in only_parent.model.named_parameters())


def test_resume_continues_bit_identically(half_trained, tmp_path):
    config = RLConfig(steps=4, scenarios=4, group=2, lr=1e-2, warmup=1)
    straight = RLRun(copy.deepcopy(half_trained[0]), config, tmp_path / "a", progress=False,
                     log_every=0, source=timing_source)
    straight.train(resume=False)
    first = RLRun(copy.deepcopy(half_trained[0]), RLConfig(**{**config.__dict__, "steps": 2}),
                  tmp_path / "b", progress=False, log_every=0, source=timing_source)
    first.train(resume=False)
    resumed = RLRun(copy.deepcopy(half_trained[0]), config, tmp_path / "b", progress=False,
                    log_every=0, source=timing_source)
    resumed.train()
    assert [r.reward for r in resumed.history] == [r.reward for r in straight.history]
    for name, module in lora_modules(straight.loaded.model).items():
        other = lora_modules(resumed.loaded.model)[name]
        assert torch.equal(module.b, other.b) and torch.equal(module.a, other.a)


def timed(k: int) -> Scenario:
    return Scenario(id="t", family="time", split="train", slice_ms=200, slices=k + 3,
                    words=(Word("three", 0, 150),),
                    expect=Expectation(events=(TimedEvent(k, ("go",), 0, 1),), quiet_from=1))


def test_slice_rewards_place_credit_where_it_happened():
    sc, w = timed(3), RewardWeights()
    right = slice_rewards(sc, ["", "", "", "Go.", "", ""])
    assert right.passed and right.values[3] == w.timing and right.values[-1] == w.passed
    late = slice_rewards(sc, ["", "", "", "", "Go.", ""])  # in the window, one slice late
    assert late.passed and 0 < late.values[4] < w.timing
    early = slice_rewards(sc, ["", "well", "", "Go.", "", ""])  # stray speech at slice 1
    assert not early.passed and early.values[1] == -w.stray and early.total < right.total
    missed = slice_rewards(sc, [""] * 6)
    assert not missed.passed and missed.values[4] == -w.timing


def test_group_advantages_are_returns_to_go_against_the_group():
    a, b = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    adv = group_advantages([a, b])
    assert np.allclose(adv[0], [1.0, 1.0, 0.5]) and np.allclose(adv[1], -adv[0])
    same = group_advantages([a, a, a])
    assert all(not x.any() for x in same)  # all alike: nothing to learn, no backward


def test_config_and_cli_errors(capsys, tmp_path):
    with pytest.raises(Exception, match="group must be >= 2"):
        RLConfig(group=1)
    with pytest.raises(Exception, match="temperature must be in"):
        RLConfig(temperature=0.0)
    assert cli.main(["train", "--rl", "--out", str(tmp_path), "--group", "1"]) != 0
    err = capsys.readouterr().err
    assert "group" in err and "Traceback" not in err


def test_cli_rl_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """`microturn train --rl` on a tiny model (the loader patched): generated train-split
    scenarios, rollouts, an update, validation, the artifact and the plot."""
    from test_engine import tiny_loaded

    import microturn.checkpoint.shipped as shipped

    monkeypatch.setattr(shipped, "load_interaction_model",
                        lambda *a, **k: tiny_loaded(load_tokenizer()))
    args = ["train", "--rl", "--out", str(tmp_path), "--steps", "2", "--families",
            "time,pause", "--scenarios-per-step", "2", "--group", "2", "--val-per-family", "1",
            "--lora-rank", "2", "--val-every", "0", "--rl-from", "none"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "rl: 2 steps, 8 rollouts" in err and "validation at step 2" in err
    assert {"adapter.safetensors", "checkpoint.safetensors", "history.json", "rl.png"} <= {
        p.name for p in tmp_path.iterdir()}
