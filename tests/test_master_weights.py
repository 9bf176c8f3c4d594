"""bf16 weights learn through fp32 masters: steps under half a bf16 ulp add up instead of
rounding away, and a bf16 run still resumes bit for bit."""

import pytest
import torch
from test_engine import tiny_loaded
from test_train_loop import speak_at

from microturn.checkpoint.loader import load_tokenizer
from microturn.kernels import build
from microturn.train.data import TargetExamples
from microturn.train.loop import LoopConfig, TrainingRun
from microturn.train.master_weights import MasterWeights
from microturn.train.targets import TargetConfig


def small_steps(with_masters: bool, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamW at lr 1e-5 on bf16 weights near 0.0136 (ulp 6.1e-5): each step is under half an
    ulp. Returns the weight before and after."""
    weight = torch.nn.Parameter(torch.full((64,), 0.0136, dtype=torch.bfloat16))
    before = weight.detach().clone()
    masters = MasterWeights({"w": weight}) if with_masters else None
    stepped = masters.params if masters else {"w": weight}
    optimizer = torch.optim.AdamW(list(stepped.values()), lr=1e-5, weight_decay=0.0)
    direction = torch.linspace(-1, 1, 64, dtype=torch.bfloat16)
    for _ in range(steps):
        (weight * direction).sum().backward()
        if masters:
            masters.take_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters:
            masters.write()
    return before, weight.detach()


def test_small_steps_add_up_in_the_master():
    before, after = small_steps(with_masters=True)
    moved = (after.float() - before.float()).abs()
    assert (moved > 0).float().mean() > 0.9  # 20 steps of 1e-5 make 2e-4, over three ulps
    # negative control: AdamW on the bf16 weight itself rounds every step away
    before, after = small_steps(with_masters=False)
    assert torch.equal(before, after)


def test_the_working_weight_is_the_master_rounded():
    weight = torch.nn.Parameter(torch.randn(32, dtype=torch.bfloat16))
    lora_like = torch.nn.Parameter(torch.randn(8))  # fp32: passes through as itself
    masters = MasterWeights({"w": weight, "a": lora_like})
    assert masters.params["a"] is lora_like and masters.params["w"].dtype == torch.float32
    with torch.no_grad():
        masters.params["w"].add_(torch.rand(32) * 1e-3)
    masters.write()
    assert torch.equal(weight, masters.params["w"].to(torch.bfloat16))


@pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")
def test_a_bf16_run_learns_at_a_small_lr_and_resumes_bit_for_bit(tmp_path):
    """A full bf16 fine-tune at lr 1e-5: the model's weights move (they stayed put before the
    masters), and 4 steps straight equal 2 + 2 resumed (the checkpoint holds the masters)."""
    tokenizer = load_tokenizer()

    def run(out, stop_after=None):
        loaded = tiny_loaded(tokenizer, dtype=torch.bfloat16, hidden_size=64, num_heads=4,
                             num_kv_heads=2, head_dim=16, intermediate_size=128)
        examples = TargetExamples.from_scenarios([speak_at(s) for s in range(24)], None,
                                                 loaded.tokenizer, loaded.markers,
                                                 TargetConfig(ack=""))
        start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        config = LoopConfig(steps=4, batch_size=4, lr=1e-5, warmup=0, full=True,
                            checkpoint_every=1)
        trainer = TrainingRun(loaded, examples, config, out, progress=False)
        trainer.train(stop_after=stop_after)
        return trainer, start

    straight, start = run(tmp_path / "a")
    model = dict(straight.loaded.model.named_parameters())
    # weights in [2^-8, 2^-6): one step of ~1e-5 is under half their ulp, four are not
    band = {n: (start[n].float().abs() >= 2**-8) & (start[n].float().abs() < 2**-6)
            for n in model}
    moved = sum(int(((p != start[n]) & band[n]).sum()) for n, p in model.items())
    assert moved > 0.1 * sum(int(b.sum()) for b in band.values())
    assert all(p.dtype == torch.float32 for p in straight.params.values())
    run(tmp_path / "b", stop_after=2)
    resumed, _ = run(tmp_path / "b")
    assert [r.loss for r in resumed.history] == [r.loss for r in straight.history]
    for name, p in resumed.loaded.model.named_parameters():
        assert torch.equal(p, model[name]), name
