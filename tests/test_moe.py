"""Mixture-of-experts models: Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints match transformers,
the gather and grouped expert paths and the trainer agree bit for bit, and the engine streams
an MoE model with trainer = sampler alignment."""

import copy
import random

import pytest
import torch
from moe_models import FAMILIES, save_tiny_moe, save_tiny_moe_gguf

from microturn.checkpoint.loader import load_checkpoint, load_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.kernels import build, policy
from microturn.model.attention_backend import CausalAttention
from microturn.model.moe import MoE
from microturn.sampling import SamplingParams
from microturn.train.alignment import verify_alignment

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")


@pytest.fixture(scope="module", params=FAMILIES)
def moe_dir(request, tmp_path_factory):
    return save_tiny_moe(tmp_path_factory.mktemp(request.param), request.param)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0), CausalAttention())


def test_logits_and_greedy_tokens_match_transformers(moe_dir):
    from transformers import AutoModelForCausalLM

    ours = load_checkpoint(moe_dir, torch.float32, "cpu").model  # as trained: no markers
    reference = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (logits_of(ours, ids) - expected).abs().max() <= 1e-5
    with torch.no_grad():
        theirs = reference.generate(ids, max_new_tokens=8, do_sample=False)[0, 24:].tolist()
    mine, seq = [], ids
    for _ in range(8):
        mine.append(int(logits_of(ours, seq)[0, -1].argmax()))
        seq = torch.cat([seq, torch.tensor([[mine[-1]]])], dim=1)
    assert mine == theirs
    # negative control: the experts of the first layer, perturbed
    with torch.no_grad():
        for expert in ours.layers[0].mlp.experts:
            expert.down_proj.weight.add_(0.05)
    assert (logits_of(ours, ids) - expected).abs().max() > 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_grouped_and_trainer_paths_are_bitwise_equal(moe_dir, dtype):
    model = load_model(moe_dir, dtype, "cpu").model
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    x = x.to(dtype)
    outs = {}
    with policy.deterministic_mode(True):
        for path in ("gather", "grouped"):
            moe.path = path
            with torch.no_grad():
                outs[path] = moe(x)
        moe.path = None
        trainer_x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            outs["trainer"] = moe(trainer_x).detach()
        with torch.no_grad():  # batch invariance: each token alone gives its bits
            moe.path = "gather"
            alone = torch.cat([moe(x[i:i + 1]) for i in range(x.shape[0])])
            moe.path = None
    assert torch.equal(outs["gather"], outs["grouped"])
    assert torch.equal(outs["gather"], outs["trainer"])
    assert torch.equal(outs["gather"], alone)
    # negative control: the trainer's pass on torch's kernels (deterministic mode off)
    with policy.deterministic_mode(False), torch.enable_grad():
        torch_x = torch.cat([x] * 4).requires_grad_(True)  # rows enough for a GEMM
        assert not torch.equal(moe(torch_x).detach()[:x.shape[0]], outs["gather"])


def test_engine_streams_an_moe_model_aligned_with_the_trainer(moe_dir):
    loaded = load_model(moe_dir, torch.float32, "cpu")
    engine = Engine(loaded, EngineConfig(kv_budget_mb=32))
    rng = random.Random(0)
    handles = [engine.open(SessionParams(max_output_tokens=3,
                                         sampling=SamplingParams(temperature=0.8, seed=s)))
               for s in range(3)]
    for _ in range(6):
        for h in handles:
            engine.append(h, [rng.randrange(300, 3000) for _ in range(rng.randint(0, 5))])
        engine.tick()
    exports = [engine.close(h) for h in handles]
    for export in exports:
        report = verify_alignment(export, loaded.model)
        assert report.aligned and report.compared >= 10, report
    # negative control: the same export against a model with one expert changed
    other = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for layer in other.layers:
            for expert in layer.mlp.experts:
                expert.gate_up_proj.weight.mul_(1.01)
    assert not verify_alignment(exports[0], other).aligned


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_gguf_moe_loads_the_same_model(family, tmp_path):
    """Stacked-expert GGUF (llama.cpp's layout) of a transformers model: the same logits."""
    from transformers import AutoModelForCausalLM

    hf_dir = save_tiny_moe(tmp_path / "hf", family)
    gguf_path = save_tiny_moe_gguf(hf_dir, tmp_path / "tiny.gguf")
    ours = load_checkpoint(gguf_path, torch.float32, "cpu").model
    assert ours.config.moe.normalize == (family == "qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 2000, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (logits_of(ours, ids) - expected).abs().max() <= 1e-5
