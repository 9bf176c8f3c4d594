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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sessions_stay_on_policy_through_evictions(smollm_fp32, dtype):
    """A session that evicts several times: the trainer replays each token's resident window
    (sink + what was kept) and its log-probabilities are the sampler's, bit for bit, at every
    position; the loss covers every target and has a gradient. Negative controls: a plain
    causal pass differs after the first eviction; a changed log-probability after the second
    is found; an export without its KV layout falls back to leaving those targets out."""
    from microturn.engine.engine import Engine, EngineConfig
    from microturn.engine.session import SessionParams

    loaded = tiny(smollm_fp32, dtype)
    engine = Engine(loaded, EngineConfig(kv_budget_mb=8, block_size=8, context_limit=64,
                                         sink_tokens=8, deterministic=True, keep_logits=True))
    sid = engine.open(SessionParams(max_output_tokens=4, force_output=True))
    for k in range(20):
        engine.append(sid, [100 + k, 101, 102])
        engine.tick()
    export = engine.close(sid)
    tokens = Timeline.from_export(export).tokens()
    assert len(export["evictions"]) >= 2
    report = verify_alignment(export, loaded.model)
    assert report.aligned and report.skipped == 0
    assert report.compared == sum(v is not None for v in export["logprobs"]) > len(tokens) // 2
    first, second = (e["at_token"] for e in export["evictions"][:2])
    plain = sequence_logprobs(loaded.model, torch.tensor([tokens]))[0]
    sampled = torch.tensor([v if v is not None else 0.0 for v in export["logprobs"][1:]])
    assert torch.equal(plain[:first], sampled[:first])
    assert not torch.equal(plain[first:], sampled[first:])  # no replay: other numbers
    tampered = copy.deepcopy(export)
    tampered["logprobs"][second + 3] += 1e-3
    assert verify_alignment(tampered, loaded.model).first_mismatch == second + 3
    forged = copy.deepcopy(export)  # a well-formed eviction the session never made
    forged["evictions"].insert(1, {"at_token": first + 3, "first_slot": 8, "slots": 8})
    assert verify_alignment(forged, loaded.model).first_mismatch is not None

    batch = TimelineBatch.from_exports([export])
    assert batch.windows is not None and batch.loss_mask[0, first:].any()
    loaded.model.requires_grad_(True)
    logprobs = sequence_logprobs(loaded.model, batch.token_ids, True, windows=batch.windows)
    assert torch.equal(logprobs[0].detach(), sampled)
    loss = -(logprobs * batch.loss_mask).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.model.parameters())

    old = {k: v for k, v in export.items() if k != "kv"}
    with pytest.warns(UserWarning, match=r"target\(s\) after a KV eviction left out"):
        legacy = TimelineBatch.from_exports([old])
    assert legacy.windows is None and not legacy.loss_mask[0, first:].any()
    assert torch.equal(legacy.loss_mask[0, :first], batch.loss_mask[0, :first])
    report = verify_alignment(old, loaded.model)
    assert report.aligned and report.compared == first and report.skipped > 0
    tampered = copy.deepcopy(export)
    tampered["evictions"].append({"at_token": 10**6, "first_slot": 8, "slots": 8})
    with pytest.raises(ValueError, match="evictions must fall in order inside"):
        verify_alignment(tampered, loaded.model)
    tampered = copy.deepcopy(export)
    tampered["evictions"][0]["first_slot"] = 0  # the sink is never evicted
    with pytest.raises(ValueError, match="is not one the engine makes"):
        verify_alignment(tampered, loaded.model)
