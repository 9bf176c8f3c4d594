"""The markers' trained embedding rows: the engine serving an adapter that carries them samples
exactly the trainer's log-probabilities, the rows round-trip, and their gradient is right."""

import copy

import pytest
import torch
from test_lora import adapted, base_model, served_export

from microturn import MicroturnError
from microturn.checkpoint.adapter import LoRAConfig, read_adapter
from microturn.checkpoint.loader import load_tokenizer
from microturn.kernels import build
from microturn.train import verify_alignment
from microturn.train.logprobs import sequence_logprobs
from microturn.train.lora import add_lora, load_adapter, save_adapter, serving
from microturn.train.marker_rows import (
    EmbeddingWithRows,
    HeadWithRows,
    add_marker_rows,
    marker_rows,
)

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")
CONFIG = LoRAConfig(rank=4, alpha=8)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def marker_ids(loaded) -> list[int]:
    m = loaded.markers
    return [m.input_start, m.output_start, m.silence, m.end_of_slice]


def with_rows(loaded, seed=2):
    """The trainer's side: an adapted copy whose marker rows moved away from the base's."""
    model = adapted(loaded, CONFIG)
    rows = add_marker_rows(model, marker_ids(loaded))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows.rows.add_(torch.randn(rows.rows.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_engine_serving_trained_rows_equals_trainer(tokenizer, tmp_path, dtype):
    loaded = base_model(tokenizer, dtype)
    trainer = with_rows(loaded)
    served, export = served_export(loaded, trainer, CONFIG, tmp_path)
    assert served.model.lm_head.weight is served.model.embed_tokens.weight  # still tied
    report = verify_alignment(export, trainer)
    assert report.aligned and report.compared == len(export["logprobs"]) - 1
    # negative controls: the same adapter without its rows, and one row nudged
    without_rows = adapted(loaded, CONFIG)
    assert not verify_alignment(export, without_rows).aligned
    with torch.no_grad():
        marker_rows(trainer).rows[2, 0] += 0.25
    assert not verify_alignment(export, trainer).aligned


def test_rows_round_trip_and_serving_swap(tokenizer, tmp_path):
    loaded = base_model(tokenizer, torch.float32)
    trainer = with_rows(loaded)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, trainer, CONFIG)
    _, tensors, _ = read_adapter(path)
    assert tensors["rows.ids"].tolist() == marker_ids(loaded)
    other = copy.deepcopy(loaded.model)
    add_lora(other, CONFIG)
    add_marker_rows(other, marker_ids(loaded))
    load_adapter(path, other)
    assert torch.equal(marker_rows(other).rows, marker_rows(trainer).rows)
    tokens = torch.tensor([marker_ids(loaded) * 5 + [300, 301, 302]])
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(trainer, tokens), sequence_logprobs(other, tokens))
        with serving(trainer):  # plain modules holding the written weight, the same bits
            assert not isinstance(trainer.embed_tokens, EmbeddingWithRows)
            served = sequence_logprobs(trainer, tokens)
        assert isinstance(trainer.embed_tokens, EmbeddingWithRows)
        assert torch.equal(served, sequence_logprobs(other, tokens))
    # an adapter with rows into a run that does not train them: refused, by name
    plain = copy.deepcopy(loaded.model)
    add_lora(plain, CONFIG)
    with pytest.raises(MicroturnError, match="--train-markers"):
        load_adapter(path, plain)
    with pytest.raises(MicroturnError, match="already carries"):
        add_marker_rows(trainer, [1])


def test_row_gradient_matches_autograd_through_the_written_weight(tokenizer):
    """Head and embedding gradients of the rows equal autograd through W' = W[ids] <- rows in
    fp32; a reference with a wrong id fails (negative control)."""
    loaded = base_model(tokenizer, torch.float32)
    model = copy.deepcopy(loaded.model)
    ids = marker_ids(loaded)
    rows = add_marker_rows(model, ids)
    assert isinstance(model.lm_head, HeadWithRows)
    tokens = torch.tensor([[ids[0], 300, ids[2], 301, ids[1], ids[3], 302]])
    upstream = torch.randn(1, 6, generator=torch.Generator().manual_seed(0))
    (sequence_logprobs(model, tokens) * upstream).sum().backward()

    def reference(row_ids):
        base = copy.deepcopy(loaded.model)
        weight = base.embed_tokens.weight.detach().clone()
        r = rows.rows.detach().clone().requires_grad_(True)
        w = weight.index_put((torch.tensor(row_ids),), r)
        x = torch.nn.functional.embedding(tokens, w)
        base.embed_tokens.weight = torch.nn.Parameter(weight)
        h = _hidden(base, x, tokens)
        logprobs = torch.log_softmax(h @ w.T, -1)[0, :-1].gather(1, tokens[0, 1:, None])[:, 0]
        (logprobs * upstream[0]).sum().backward()
        return r.grad

    assert torch.allclose(rows.rows.grad, reference(ids), rtol=1e-3, atol=1e-5)
    wrong = [ids[0], ids[1], ids[3], ids[2]]
    assert not torch.allclose(rows.rows.grad, reference(wrong), rtol=1e-3, atol=1e-5)


def _hidden(model, x, tokens):
    """The decoder's final-norm hidden states from input vectors `x` (fp32 autograd path)."""
    from microturn.model.attention_backend import CausalAttention
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    backend = CausalAttention()
    model._begin_pass(tokens, positions, backend)
    return model._hidden_states(tokens, positions, backend, x)


def test_training_rows_separates_a_tied_marker(tokenizer):
    """Silence's row made identical to another token's (the base's tie): after a few steps
    on a target of silence, silence's logit leads its twin's where it was trained."""
    loaded = base_model(tokenizer, torch.float32)
    model = copy.deepcopy(loaded.model)
    silence, twin = loaded.markers.silence, 7
    with torch.no_grad():
        model.embed_tokens.weight[silence] = model.embed_tokens.weight[twin]
    add_lora(model, LoRAConfig(rank=2, alpha=4))
    add_marker_rows(model, marker_ids(loaded))
    tokens = torch.tensor([[300, 301, silence, 302, 303, silence]])
    mask = torch.tensor([[0, 1, 0, 0, 1]], dtype=torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)

    def logits_at_silence():
        from microturn.train.logprobs import sequence_logits
        with torch.no_grad():
            return sequence_logits(model, tokens)[0, 1]

    before = logits_at_silence()
    assert before[silence] == before[twin]  # the tie, as in the base checkpoint
    for _ in range(6):
        optimizer.zero_grad()
        loss = -(sequence_logprobs(model, tokens) * mask).sum()
        loss.backward()
        optimizer.step()
    after = logits_at_silence()
    assert after[silence] > after[twin]
