"""`microturn train`'s loop on a tiny model: it learns a timing task, and resumes bit for bit."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from test_engine import tiny_loaded

from microturn import cli
from microturn.checkpoint.adapter import LoRAConfig, read_adapter
from microturn.checkpoint.loader import load_tokenizer
from microturn.eval.phrasebook import NUMBER_WORDS
from microturn.eval.scenario import Expectation, Scenario, TimedEvent, Word
from microturn.kernels import build
from microturn.train.data import (
    Position,
    TargetExamples,
    batches_from,
    epoch_plan,
    training_batch,
)
from microturn.train.loop import LoopConfig, TrainingRun, learning_rate
from microturn.train.targets import TargetConfig
from microturn.train.validate import Validation

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")


def speak_at(seed: int) -> Scenario:
    """'three' arrives in slice 0: say "Go." in slice 3 exactly, silence everywhere else."""
    k = random.Random(seed).randint(2, 4)
    return Scenario(id=f"train-time-k{seed}", family="time", split="train", slice_ms=200,
                    slices=k + 2, words=(Word(NUMBER_WORDS[k], 0, 150),),
                    expect=Expectation(events=(TimedEvent(k, ("go",), 0, 0),), quiet_from=1))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def setup(tokenizer, seeds=range(200)):
    loaded = tiny_loaded(tokenizer, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                         intermediate_size=128)
    markers = loaded.markers
    examples = TargetExamples.from_scenarios([speak_at(s) for s in seeds], None,
                                             loaded.tokenizer, markers, TargetConfig(ack=""))
    return loaded, examples


def test_loop_learns_to_speak_at_slice_k(tokenizer, tmp_path):
    loaded, examples = setup(tokenizer)
    heldout = [speak_at(s) for s in range(10_000, 10_040)]  # seeds training never saw
    config = LoopConfig(steps=70, batch_size=8, lr=5e-3, warmup=10, full=True,
                        checkpoint_every=1000, validate_every=10)
    run = TrainingRun(loaded, examples, config, tmp_path, heldout, progress=False)
    history = run.train()
    assert history[-1].loss < 0.1 * history[0].loss
    final = run.validations[-1]
    assert final.step == 70 and final.overall >= 0.95, final
    assert {"checkpoint.safetensors", "model.safetensors", "history.json",
            "best-model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    # the best validation's weights are kept: the first one (step 10) had not learnt it yet
    assert run.validations[0].overall < 0.95 and run.best.macro >= 0.95
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["best_step"] == run.best.step == max(
        reversed(run.validations), key=lambda v: v.macro).step
    if run.best.step == 70:
        best, last = (load_file(tmp_path / f) for f in ("best-model.safetensors",
                                                         "model.safetensors"))
        assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)


def test_best_is_the_highest_family_mean_the_latest_of_equals():
    def v(step, rates):
        return Validation(step, rates, 0, 1)

    run = TrainingRun.__new__(TrainingRun)
    run.validations = [v(10, {"a": 1.0, "b": 0.0}), v(20, {"a": 0.5, "b": 0.75}),
                       v(30, {"a": 0.75, "b": 0.5}), v(40, {"a": 0.25, "b": 0.25})]
    assert run.best.step == 30  # 0.625 twice: the later; a family mean, not the scenario count
    run.validations = []
    assert run.best is None


def test_resume_continues_bit_identically(tokenizer, tmp_path):
    """LoRA (the default), gradient accumulation: 4 steps straight equal 2 steps, a new run
    from the checkpoint, 2 more. Negative control: another data seed gives other weights."""
    def run(out, steps, seed=0):
        loaded, examples = setup(tokenizer, range(24))
        config = LoopConfig(steps=steps, batch_size=3, accumulate=2, lr=1e-2, warmup=2,
                            seed=seed, lora=LoRAConfig(rank=4, alpha=8), checkpoint_every=1)
        trainer = TrainingRun(loaded, examples, config, out, progress=False)
        trainer.train()
        return trainer

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    assert resumed.step == 4 and resumed.position == straight.position
    assert [r.loss for r in resumed.history] == [r.loss for r in straight.history]
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    other = run(tmp_path / "c", 4, seed=1)
    assert any(not torch.equal(p, other.params[n]) for n, p in straight.params.items())
    config, tensors, metadata = read_adapter(tmp_path / "a" / "adapter.safetensors")
    assert config.rank == 4 and metadata["step"] == "4"
    assert all(k.startswith("lora.") for k in tensors)


def test_stop_after_pauses_a_schedule_that_goes_on_bit_for_bit(tokenizer, tmp_path):
    """A run of 6 steps stopped at 3 (its schedule still the 6-step cosine) and run again
    equals 6 straight; a 3-step run (its own schedule) is the negative control."""
    def run(out, steps, stop_after=None):
        loaded, examples = setup(tokenizer, range(16))
        config = LoopConfig(steps=steps, batch_size=4, lr=1e-2, warmup=1,
                            lora=LoRAConfig(rank=4, alpha=8), checkpoint_every=100)
        trainer = TrainingRun(loaded, examples, config, out, progress=False)
        trainer.train(stop_after=stop_after)
        return trainer

    straight = run(tmp_path / "a", 6)
    paused = run(tmp_path / "b", 6, stop_after=3)
    assert paused.step == 3 and [r.lr for r in paused.history] == [
        r.lr for r in straight.history[:3]]
    resumed = run(tmp_path / "b", 6)
    assert [r.loss for r in resumed.history] == [r.loss for r in straight.history]
    assert all(torch.equal(p, resumed.params[n]) for n, p in straight.params.items())
    short = run(tmp_path / "c", 3)
    assert [r.lr for r in short.history] != [r.lr for r in paused.history]


def test_data_order_is_a_function_of_seed_epoch_and_position(tokenizer):
    _, examples = setup(tokenizer, range(20))
    plan = epoch_plan(examples, 4, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(20))
    for batch in plan:  # sorted by length inside a bucket: little padding
        lengths = [examples.length(i) for i in batch]
        assert lengths == sorted(lengths)
    assert epoch_plan(examples, 4, seed=0, epoch=1) != plan
    stream = batches_from(examples, 4, 0, Position())
    first = [next(stream) for _ in range(7)]
    later = batches_from(examples, 4, 0, first[2][0])
    assert [next(later) for _ in range(4)] == first[3:]
    assert first[5][0] == Position(1, 1)  # 5 batches an epoch


def test_scripted_speech_is_left_out_of_the_loss(tokenizer):
    loaded, examples = setup(tokenizer, range(2))
    export = dict(examples.export(0))
    plain = training_batch([export])
    export["scripted"] = [0]
    masked = training_batch([export])
    assert int(plain.loss_mask.sum()) - int(masked.loss_mask.sum()) == 1  # slice 0: <silence>


def test_moments_weigh_their_slices_and_the_two_before(tokenizer):
    _, examples = setup(tokenizer, range(2))
    export = examples.export(0)
    (moment,) = export["moments"]  # speak_at: the slice of the timed word
    plain = training_batch([export])
    assert plain.loss_weight is None and torch.equal(plain.weights(), plain.loss_mask.float())
    weighted = training_batch([export], moment_weight=4.0).weights()
    extra = weighted.sum() - plain.weights().sum()
    heavy = sum(len(export["turns"][k]["output_ids"]) for k in range(moment - 2, moment + 1))
    assert extra == 3 * heavy > 0
    assert set(weighted.unique().tolist()) == {0.0, 1.0, 4.0}
    export = dict(export, moments=[])  # negative control: no moment, no extra weight
    assert training_batch([export], moment_weight=4.0).weights().sum() == plain.weights().sum()


def test_a_run_can_start_from_a_trained_adapter(tokenizer, tmp_path):
    lora = LoRAConfig(rank=4, alpha=8)

    def run(out, steps, init=None):
        loaded, examples = setup(tokenizer, range(8))
        config = LoopConfig(steps=steps, batch_size=4, lr=1e-2, warmup=1, lora=lora,
                            init_adapter=init)
        trainer = TrainingRun(loaded, examples, config, out, progress=False)
        return trainer

    first = run(tmp_path / "a", 2)
    first.train()
    start = run(tmp_path / "b", 1, str(tmp_path / "a" / "adapter.safetensors"))
    for name, p in first.params.items():
        assert torch.equal(p, start.params[name]), name
    fresh = run(tmp_path / "c", 1)  # negative control: a fresh adapter's B is zero
    assert any(not torch.equal(p, fresh.params[n]) for n, p in first.params.items())
    with pytest.raises(Exception, match="init_adapter: .* has rank 4 .* this run rank 2"):
        loaded, examples = setup(tokenizer, range(2))
        TrainingRun(loaded, examples, LoopConfig(lora=LoRAConfig(rank=2), init_adapter=str(
            tmp_path / "a" / "adapter.safetensors")), tmp_path / "d", progress=False)
    with pytest.raises(Exception, match="init_adapter: .* on qkv,o,gate_up,down, this run "
                                        "rank 8 on qkv,o"):
        loaded, examples = setup(tokenizer, range(2))
        TrainingRun(loaded, examples, LoopConfig(lora=LoRAConfig(rank=8, targets=("qkv", "o")),
                                                 init_adapter=str(tmp_path / "a" /
                                                                  "adapter.safetensors")),
                    tmp_path / "e", progress=False)


@pytest.mark.parametrize("alpha", [16.0, 12.0])
def test_a_higher_rank_grows_a_trained_adapter_and_serves_the_same_weights(tokenizer, tmp_path,
                                                                             alpha):
    from microturn.train.lora import lora_modules

    def run(out, lora, steps, init=None):
        loaded, examples = setup(tokenizer, range(8))
        config = LoopConfig(steps=steps, batch_size=4, lr=1e-2, warmup=1, lora=lora,
                            init_adapter=init)
        return TrainingRun(loaded, examples, config, out, progress=False)

    small = run(tmp_path / "a", LoRAConfig(rank=4, alpha=8), 3)
    small.train()
    grown = run(tmp_path / "b", LoRAConfig(rank=8, alpha=alpha), 2,
                str(tmp_path / "a" / "adapter.safetensors"))
    fresh = run(tmp_path / "c", LoRAConfig(rank=8, alpha=alpha), 2)  # negative control
    before = {n: m.merged_weight() for n, m in lora_modules(small.loaded.model).items()}
    after = {n: m.merged_weight() for n, m in lora_modules(grown.loaded.model).items()}
    unadapted = {n: m.merged_weight() for n, m in lora_modules(fresh.loaded.model).items()}
    # the same scale (alpha / rank = 2) serves the same weights bit for bit; another scale
    # rescales B, within a rounding of the merged weight
    same = torch.equal if alpha == 16.0 else (lambda x, y: torch.allclose(x, y, atol=1e-6))
    assert all(same(after[n], before[n]) for n in before)
    assert not all(torch.equal(unadapted[n], before[n]) for n in before)
    grown.train()  # the new rank learns too
    assert any(float(m.b[:, 4:].detach().abs().sum()) > 0
               for m in lora_modules(grown.loaded.model).values())


def test_family_weights_parse_and_refuse_clearly():
    from microturn.train.command import parse_family_weights

    assert parse_family_weights("time=4, cue_audio=2", ["time", "cue_audio"]) == {
        "time": 4, "cue_audio": 2}
    assert parse_family_weights(None, ["time"]) == {}
    with pytest.raises(Exception, match="'pause' is not a trained family"):
        parse_family_weights("pause=2", ["time"])
    with pytest.raises(Exception, match="is not F=K"):
        parse_family_weights("time=x", ["time"])
    with pytest.raises(Exception, match=r"must be in \[1, 100\]"):
        parse_family_weights("time=0", ["time"])


def test_schedule_and_config_errors():
    config = LoopConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 55) == pytest.approx(0.55)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(Exception, match="accumulate must be >= 1"):
        LoopConfig(accumulate=0)


def test_the_front_end_can_learn_at_a_scaled_rate(tokenizer, tmp_path):
    """--frontend-lr-scale: the front-end's weights in their own group at X times the
    schedule; the rest at the schedule; a checkpoint refuses a run with another scale."""
    def run(scale, out, steps=1):
        loaded, examples = setup(tokenizer, range(8))
        config = LoopConfig(steps=steps, batch_size=4, lr=1e-3, warmup=0, train_frontend=True,
                            frontend_lr_scale=scale, lora=LoRAConfig(rank=4, alpha=8))
        trainer = TrainingRun(loaded, examples, config, out, progress=False)
        trainer.train()
        return trainer

    trainer = run(5.0, tmp_path / "a")
    adapter, front = trainer.optimizer.param_groups
    assert front["lr"] == pytest.approx(5 * adapter["lr"]) and adapter["lr"] > 0
    names = {id(p): n for n, p in trainer.params.items()}
    assert all(names[id(p)].startswith("frontend.") for p in front["params"])
    assert not any(names[id(p)].startswith("frontend.") for p in adapter["params"])
    assert len(run(1.0, tmp_path / "b").optimizer.param_groups) == 1  # the default: one
    with pytest.raises(Exception, match="frontend_lr_scale=5.0, this run has "
                                        "frontend_lr_scale=2.0"):
        run(2.0, tmp_path / "a", steps=2)
    with pytest.raises(Exception, match="only with train_frontend"):
        LoopConfig(frontend_lr_scale=2.0)
    with pytest.raises(Exception, match=r"frontend_lr_scale must be in \(0, 100\]"):
        LoopConfig(frontend_lr_scale=0.0, train_frontend=True)


def test_cli_train_errors_in_one_line(capsys, tmp_path):
    assert cli.main(["train", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "microturn: error: steps must be >= 1, got 0"
    assert cli.main(["train", "--out", str(tmp_path), "--lora-targets", "q,v"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microturn: error: lora targets") and "\n" not in err
    for flag in ("--in-a-room", "--catch-trials"):
        assert cli.main(["train", "--out", str(tmp_path), flag, "1.5"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"microturn: error: {flag} must be a fraction in [0, 1], got 1.5")


def test_cli_train_runs_end_to_end(tokenizer, tmp_path, monkeypatch, capsys):
    """The command on a tiny model (the loader patched): targets, steps, validation, files."""
    import microturn.checkpoint.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: tiny_loaded(tokenizer))
    args = ["train", "--out", str(tmp_path), "--steps", "2", "--families", "time,content",
            "--per-family", "1", "--rounds", "2", "--val-per-family", "1", "--batch-size", "2",
            "--teacher-tokens", "4", "--lora-rank", "2", "--val-every", "0"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "trained 2 steps on 4 timelines" in err and "validation at step 2" in err
    assert f"at step 2: {tmp_path / 'best-adapter.safetensors'}" in err
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter.safetensors", "best-adapter.safetensors", "checkpoint.safetensors",
            "teacher.json", "history.json"} <= names
    assert cli.main(args) == 0  # resumed: already done, nothing more to train
    assert "trained 2 steps" in capsys.readouterr().err
