"""LoRA merged in the forward: the engine serving the merged model samples exactly the
log-probabilities the trainer's adapted forward computes."""

import copy

import pytest
import torch
from test_determinism import stream_target
from test_engine import tiny_loaded

from microturn import MicroturnError
from microturn.checkpoint.adapter import LoRAConfig, apply_adapter, read_adapter
from microturn.checkpoint.loader import load_tokenizer
from microturn.frontend.embedding import FrontEnd
from microturn.kernels import build
from microturn.model.linear import Linear
from microturn.train import TimelineBatch, verify_alignment
from microturn.train.logprobs import sequence_logprobs
from microturn.train.lora import (
    LoRALinear,
    add_lora,
    load_adapter,
    lora_modules,
    save_adapter,
    serving,
)

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def base_model(tokenizer, dtype):
    loaded = tiny_loaded(tokenizer, seed=5, hidden_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=96)
    loaded.model.to(dtype)
    return loaded


def adapted(loaded, config=None, seed=1):
    """The trainer's side: a copy of the base with an adapter whose B is not zero."""
    model = copy.deepcopy(loaded.model)
    modules = add_lora(model, config or LoRAConfig(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            module.b.copy_(torch.randn(module.b.shape, generator=generator) * 0.05)
    return model


def served_export(loaded, trainer, config, tmp_path):
    """The trainer's adapter saved, merged into a copy of the base as serving does, and one
    session streamed through the engine beside others: (the served model, its export)."""
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trainer, config)
    served = copy.deepcopy(loaded)
    apply_adapter(served, path)
    return served, stream_target(served, True, others=2, ticks=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_on_merged_weights_equals_trainer_with_adapter(tokenizer, tmp_path, dtype):
    loaded = base_model(tokenizer, dtype)
    trainer = adapted(loaded)
    _, export = served_export(loaded, trainer, LoRAConfig(rank=4, alpha=8), tmp_path)
    report = verify_alignment(export, trainer)
    assert report.aligned and report.compared == len(export["logprobs"]) - 1
    # the adapter changed what the model computes: the base model is not aligned with it
    assert not verify_alignment(export, loaded.model).aligned
    # negative control: one adapter value nudged on the trainer's side breaks the alignment
    module = next(iter(lora_modules(trainer).values()))
    with torch.no_grad():
        module.a[0, 0] += 1e-2
    assert not verify_alignment(export, trainer).aligned


def test_serving_swap_is_the_merged_model_and_restores_the_adapter(tokenizer):
    loaded = base_model(tokenizer, torch.float32)
    trainer = adapted(loaded)
    wrapped = lora_modules(trainer)
    view = copy.copy(loaded)
    view.model = trainer
    with serving(trainer):
        assert not lora_modules(trainer)
        export = stream_target(view, True, others=1, ticks=4)
    assert lora_modules(trainer) == wrapped
    assert verify_alignment(export, trainer).aligned


def test_adapter_round_trip_is_bitwise_and_small(tokenizer, tmp_path, capsys):
    loaded = base_model(tokenizer, torch.float32)
    config = LoRAConfig(rank=4, alpha=8, targets=("qkv", "down"))
    trainer = adapted(loaded, config)
    frontend = FrontEnd(loaded.markers.media, loaded.config.hidden_size)
    frontend.initialise(loaded.model.embed_tokens.weight, seed=3)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trainer, config, frontend)
    other = copy.deepcopy(loaded.model)
    add_lora(other, LoRAConfig(rank=4, alpha=8, targets=("qkv", "down"), seed=9))
    other_frontend = FrontEnd(loaded.markers.media, loaded.config.hidden_size)
    other_frontend.initialise(loaded.model.embed_tokens.weight, seed=4)
    assert load_adapter(path, other, other_frontend) == config
    for (name, a), b in zip(trainer.state_dict().items(), other.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(frontend.state_dict().values(), other_frontend.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    tokens = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(trainer, tokens), sequence_logprobs(other, tokens))
    _, tensors, metadata = read_adapter(path)
    assert len([k for k in tensors if k.startswith("lora.")]) == 2 * 2 * 2  # 2 layers, 2 targets
    served = copy.deepcopy(loaded)
    capsys.readouterr()
    apply_adapter(served, path)  # the front-end comes with it: no "untrained" notice
    assert torch.equal(served.frontend.markers, frontend.markers)
    assert "freshly initialised" not in capsys.readouterr().err
    bare = copy.deepcopy(loaded)
    bare.load_frontend()  # the negative control: no weights anywhere, so the notice
    assert "freshly initialised" in capsys.readouterr().err


def test_only_the_adapter_learns(tokenizer):
    loaded = base_model(tokenizer, torch.float32)
    model = copy.deepcopy(loaded.model)
    add_lora(model, LoRAConfig(rank=2, alpha=4, targets=("o", "gate_up")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".a", ".b")) for n in trainable)
    markers = loaded.markers.to_dict()
    turns = [{"index": k, "input_ids": [300 + k], "output_ids": [400 + k, 401]}
             for k in range(6)]
    batch = TimelineBatch.from_exports([{"markers": markers, "turns": turns}])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        logprobs = sequence_logprobs(model, batch.token_ids)
        loss = -(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():  # the base is untouched
        if not p.requires_grad:
            assert torch.equal(p, loaded.model.get_parameter(name.replace(".base", ""))), name


def test_adapter_errors_name_the_field(tokenizer, tmp_path):
    with pytest.raises(MicroturnError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(MicroturnError, match="targets"):
        LoRAConfig(targets=("q",))
    loaded = base_model(tokenizer, torch.float32)
    trainer = adapted(loaded, LoRAConfig(rank=4, alpha=8))
    path = tmp_path / "a.safetensors"
    save_adapter(path, trainer, LoRAConfig(rank=4, alpha=8))
    wider = tiny_loaded(tokenizer, hidden_size=32)
    with pytest.raises(MicroturnError, match=r"lora\.layers\.0\.self_attn\.qkv_proj\.a"):
        apply_adapter(wider, path)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(MicroturnError, match="bad.safetensors"):
        apply_adapter(loaded, tmp_path / "bad.safetensors")
    with pytest.raises(MicroturnError, match="already carries"):
        add_lora(trainer, LoRAConfig())


def test_low_rank_backward_matches_autograd_through_the_merge():
    """The adapter's gradients, taken in low rank, equal autograd through W + s B A in fp32;
    a wrong scale in the reference makes the comparison fail (negative control)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=False)
    linear = Linear(48, 40, bias=False)
    linear.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    module = LoRALinear(linear, 4, 2.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.b.normal_()
    x = torch.randn(2, 7, 48)
    upstream = torch.randn(2, 7, 40)
    (module(x) * upstream).sum().backward()

    def reference_grads(scale):
        a = module.a.detach().clone().requires_grad_(True)
        b = module.b.detach().clone().requires_grad_(True)
        y = x @ (linear.weight + scale * b @ a).T
        (y * upstream).sum().backward()
        return a.grad, b.grad

    ga, gb = reference_grads(2.0)
    assert torch.allclose(module.a.grad, ga, rtol=1e-4, atol=1e-5)
    assert torch.allclose(module.b.grad, gb, rtol=1e-4, atol=1e-5)
    wrong_a, _ = reference_grads(2.2)
    assert not torch.allclose(module.a.grad, wrong_a, rtol=1e-4, atol=1e-5)
