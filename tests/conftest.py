"""Shared fixtures: the real default model as trained (loaded once) and the reference
implementation."""

from pathlib import Path

import pytest
import torch

from microturn import load_checkpoint
from microturn.checkpoint.default_model import default_model_path
from microturn.kernels import build

DATA = Path(__file__).parent / "data"


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: the figure the correctness goals use."""
    actual, reference = actual.double(), reference.double()
    return float((actual - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="session")
def english_text() -> str:
    return (DATA / "english.txt").read_text()


@pytest.fixture(scope="session")
def smollm_fp32():
    return load_checkpoint(dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def smollm_bf16():
    return load_checkpoint(dtype="bf16", device="cpu")


@pytest.fixture(scope="session")
def reference_model():
    """Hugging Face transformers loading the same GGUF file, in float32."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def reference_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(params=["kernels", "torch"])
def kernel_choice(request, monkeypatch):
    """Run a test with the CPU kernels, and again with torch's operators only."""
    if request.param == "torch":
        monkeypatch.setattr(build, "load", lambda: None)
    elif build.load() is None:
        pytest.skip("CPU kernels unavailable here")
    return request.param


@pytest.fixture
def engine(smollm_fp32):
    """A tiny random model (the real tokenizer) in a deterministic engine: what the server
    tests serve."""
    from test_engine import tiny_loaded

    from microturn.engine.engine import Engine, EngineConfig

    return Engine(tiny_loaded(smollm_fp32.tokenizer),
                  EngineConfig(kv_budget_mb=16, max_sessions=32, deterministic=True))
