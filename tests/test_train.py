"""microturn.train: gradients through the kernels, a real training step, checkpoints."""

import copy

import pytest
import torch
from conftest import relative_error
from test_determinism import stream_target, tiny

from microturn import MicroturnError
from microturn.kernels import build
from microturn.sequence.timeline import Timeline
from microturn.train import TimelineBatch, TrainConfig, Trainer, verify_alignment
from microturn.train.logprobs import sequence_logprobs

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")


@pytest.fixture
def exports(smollm_fp32):
    loaded = tiny(smollm_fp32, torch.float32)
    return loaded, [stream_target(loaded, True, others=0, ticks=6),
                    stream_target(loaded, True, others=3, ticks=4, seed=9)]


def test_kernel_gradients_match_torch_gradients(exports):
    """Deterministic mode's forward is our kernels and its backward autograd through torch's
    formulas; the gradients agree with the all-torch path to fp32 precision."""
    loaded, sessions = exports
    batch = TimelineBatch.from_exports(sessions)
    grads = {}
    for deterministic in (True, False):
        model = copy.deepcopy(loaded.model).requires_grad_(True)
        logprobs = sequence_logprobs(model, batch.token_ids, deterministic)
        (-(logprobs * batch.loss_mask).sum()).backward()
        grads[deterministic] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[True].items():
        assert relative_error(grad, grads[False][name]) < 1e-4, name
    # negative control: the same check catches a gradient that is slightly wrong
    name = next(iter(grads[True]))
    assert relative_error(grads[True][name] * 1.01, grads[False][name]) > 1e-4


def test_training_steps_lower_the_loss_and_padding_is_ignored(exports):
    loaded, sessions = exports
    model = copy.deepcopy(loaded.model)
    trainer = Trainer(model, TrainConfig(lr=3e-3, max_grad_norm=1.0))
    batch = TimelineBatch.from_exports(sessions)
    assert batch.token_ids.shape[0] == 2 and len(set(batch.lengths)) == 2  # ragged: padded
    # the padded batch gives each sequence exactly its own log-probabilities
    alone = TimelineBatch.from_exports(sessions[1:])
    with torch.no_grad():
        both = sequence_logprobs(model, batch.token_ids)
        one = sequence_logprobs(model, alone.token_ids)
    n = batch.lengths[1] - 1
    assert torch.equal(both[1, :n], one[0, :n])
    results = [trainer.step(batch) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    assert results[0].grad_norm > 0 and results[-1].loss < 0.7 * results[0].loss
    assert results[0].tokens == int(batch.loss_mask.sum()) > 0


def test_checkpoint_round_trip_resumes_bitwise(exports, tmp_path):
    loaded, sessions = exports
    batch = TimelineBatch.from_exports(sessions)
    trainer = Trainer(copy.deepcopy(loaded.model), TrainConfig(lr=1e-3))
    trainer.step(batch)
    trainer.save(tmp_path / "step1.safetensors")
    resumed = Trainer(copy.deepcopy(loaded.model), TrainConfig(lr=1e-3))
    resumed.load(tmp_path / "step1.safetensors")
    assert resumed.steps == 1
    for (name, a), b in zip(trainer.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name
    assert trainer.step(batch).loss == resumed.step(batch).loss
    for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)  # optimizer state came back too: the next step is identical
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MicroturnError, match="broken.safetensors"):
        resumed.load(tmp_path / "broken.safetensors")


def test_training_step_on_the_default_model(smollm_fp32):
    model = copy.deepcopy(smollm_fp32.model)
    tokens = smollm_fp32.tokenizer.encode("The capital of France is Paris. " * 6)
    turns = [{"index": i, "input_ids": tokens[8 * i:8 * i + 6],
              "output_ids": tokens[8 * i + 6:8 * i + 8]} for i in range(len(tokens) // 8)]
    markers = {"input_start": 1, "output_start": 2, "silence": 3, "end_of_slice": 4, "added": []}
    trainer = Trainer(model, TrainConfig(lr=1e-4))
    batch = TimelineBatch.from_exports([{"markers": markers, "turns": turns}])
    first = trainer.step(batch)
    later = [trainer.step(batch) for _ in range(2)]
    assert torch.isfinite(torch.tensor(first.loss)) and later[-1].loss < first.loss


def test_targets_after_an_eviction_stay_out_of_the_loss_with_a_warning(smollm_fp32):
    """A long session's export evicts; a full-sequence pass cannot reproduce what the sampler
    attended to after that, so those targets leave the loss (with a warning) and the ones
    before stay. Negative control: the same export without its eviction records keeps all."""
    from microturn.engine.engine import Engine, EngineConfig
    from microturn.engine.session import SessionParams

    loaded = tiny(smollm_fp32, torch.float32)
    engine = Engine(loaded, EngineConfig(kv_budget_mb=8, block_size=8, context_limit=64,
                                         sink_tokens=8, deterministic=True, keep_logits=True))
    sid = engine.open(SessionParams(max_output_tokens=4, force_output=True))
    for k in range(12):
        engine.append(sid, [100 + k, 101, 102])
        engine.tick()
    export = engine.close(sid)
    at = export["evictions"][0]["at_token"]
    assert 0 < at < len(Timeline.from_export(export).tokens())
    with pytest.warns(UserWarning, match=r"target\(s\) after a KV eviction left out"):
        batch = TimelineBatch.from_exports([export])
    plain = TimelineBatch.from_exports([{k: v for k, v in export.items() if k != "evictions"}])
    assert torch.equal(batch.loss_mask[0, :at], plain.loss_mask[0, :at])
    assert not batch.loss_mask[0, at:].any() and plain.loss_mask[0, at:].any()

    # verify-alignment compares up to the eviction's own token (computed before it), bitwise
    report = verify_alignment(export, loaded.model)
    assert report.aligned and report.compared == at and report.skipped > 0
    tampered = copy.deepcopy(export)
    tampered["logprobs"][at] += 1e-3  # negative control: a change at the eviction point
    assert verify_alignment(tampered, loaded.model).first_mismatch == at
    tampered = copy.deepcopy(export)
    tampered["evictions"].append({"at_token": 10**6, "first_slot": 8, "slots": 8})
    with pytest.raises(ValueError, match="evictions must fall in order inside"):
        verify_alignment(tampered, loaded.model)
    tampered = copy.deepcopy(export)
    tampered["evictions"][0]["first_slot"] = 0  # the sink is never evicted
    with pytest.raises(ValueError, match="is not one the engine makes"):
        verify_alignment(tampered, loaded.model)
