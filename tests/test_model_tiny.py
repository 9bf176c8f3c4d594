"""Tiny randomly initialised models: shapes, edge cases, KV cache, and the safetensors path
against transformers for each architecture the decoder claims (Llama, Qwen2, Qwen3)."""

import json

import pytest
import torch
from conftest import relative_error
from dense_kv_cache import DenseKVCache

from microturn import MicroturnError, load_checkpoint, load_model
from microturn.model import CausalAttention, Decoder, ModelConfig
from microturn.model.decoder import init_random_weights


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0,
                  rope_layout="half", max_position=16, tie_word_embeddings=True)
    return ModelConfig(**(fields | overrides))


def tiny_model(seed: int = 0, **overrides) -> Decoder:
    return init_random_weights(Decoder(tiny_config(**overrides)), seed=seed).eval()


def full_logits(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.inference_mode():
        return model(tokens, positions, CausalAttention())


def test_shapes_and_batch_of_one():
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 7))
    assert full_logits(model, tokens).shape == (1, 7, 97)
    batch = torch.randint(0, 97, (3, 5))
    logits = full_logits(model, batch)
    assert logits.shape == (3, 5, 97)
    # every row of a batch computes what it computes alone
    for row in range(3):
        assert torch.allclose(logits[row], full_logits(model, batch[row:row + 1])[0], atol=1e-5)


def test_empty_input_gives_empty_logits():
    model = tiny_model()
    empty = torch.zeros((1, 0), dtype=torch.long)
    assert full_logits(model, empty).shape == (1, 0, 97)
    cache = DenseKVCache(model.config, batch=1, capacity=4, dtype=torch.float32)
    with torch.inference_mode():
        assert model(empty, empty, cache).shape == (1, 0, 97)
    assert cache.length == 0


def test_positions_past_trained_context_run():
    model = tiny_model()  # trained context 16
    tokens = torch.randint(0, 97, (1, 4))
    far = torch.tensor([[1000, 1001, 1002, 1003]])
    with torch.inference_mode():
        logits = model(tokens, far, CausalAttention())
    assert torch.isfinite(logits).all()
    # rotary is relative: shifting every position by the same amount changes nothing (fp32 noise)
    assert relative_error(logits, full_logits(model, tokens)) < 1e-4


def test_logits_at_selects_steps():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 6))
    positions = torch.arange(6).expand(2, 6)
    with torch.inference_mode():
        picked = model(tokens, positions, CausalAttention(), logits_at=torch.tensor([0, 5]))
    full = full_logits(model, tokens)
    assert torch.allclose(picked, full[:, [0, 5]], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [[10], [1] * 10, [4, 1, 1, 3, 1], [7, 3]])
def test_kv_cache_matches_full_forward(split, dtype, kernel_choice):
    model = tiny_model(seed=3).to(dtype)
    tokens = torch.randint(0, 97, (2, sum(split)))
    full = full_logits(tiny_model(seed=3), tokens)  # fp32 reference
    cache = DenseKVCache(model.config, batch=2, capacity=sum(split), dtype=dtype)
    start, pieces = 0, []
    with torch.inference_mode():
        for n in split:
            positions = torch.arange(start, start + n).expand(2, n)
            pieces.append(model(tokens[:, start:start + n], positions, cache))
            start += n
    assert relative_error(torch.cat(pieces, dim=1), full) < (1e-5 if dtype == torch.float32
                                                             else 2e-2)
    with pytest.raises(MicroturnError, match="capacity"):
        model(tokens[:, :1], torch.zeros((2, 1), dtype=torch.long), cache)


def test_interleaved_layout_equals_half_with_permuted_rows():
    """GGUF llama files permute Q/K rows; running rotary interleaved undoes exactly that."""
    half = tiny_model(seed=5)
    inter = tiny_model(seed=5, rope_layout="interleaved")
    c = half.config
    perm = torch.cat([torch.arange(c.head_dim // 2).unsqueeze(1),
                      torch.arange(c.head_dim // 2, c.head_dim).unsqueeze(1)], 1).flatten()

    def permute_heads(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, c.head_dim, -1)[:, perm].reshape(w.shape)

    with torch.no_grad():
        for a, b in zip(half.layers, inter.layers, strict=True):
            q, k, v = a.self_attn.qkv_proj.weight.split((c.q_size, c.kv_size, c.kv_size))
            b.self_attn.qkv_proj.weight.copy_(torch.cat(
                [permute_heads(q, c.num_heads), permute_heads(k, c.num_kv_heads), v]))
    tokens = torch.randint(0, 97, (1, 9))
    assert relative_error(full_logits(inter, tokens), full_logits(half, tokens)) < 1e-5
    # negative control: without the permutation the two layouts disagree
    plain = tiny_model(seed=5, rope_layout="interleaved")
    assert relative_error(full_logits(plain, tokens), full_logits(half, tokens)) > 1e-3


def test_bad_config_names_the_field():
    with pytest.raises(MicroturnError, match="num_kv_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(MicroturnError, match="hidden_size"):
        tiny_config(hidden_size=0)


HF_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rms_norm_eps=1e-6)


def save_tiny_hf(kind: str, directory, tie: bool):
    transformers = pytest.importorskip("transformers")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}  # Qwen3 decouples head_dim from width
    config = config_class(**HF_TINY, **extra, tie_word_embeddings=tie, rope_theta=50000.0)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a dropped one is visible
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", True),
                                      ("qwen3", False)])
def test_safetensors_directory_matches_transformers(kind, tie, tmp_path, smollm_fp32):
    reference = save_tiny_hf(kind, tmp_path, tie)
    smollm_fp32.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = load_checkpoint(tmp_path, dtype="fp32", device="cpu")
    assert loaded.config.architecture == kind
    assert loaded.config.attention_bias == (kind == "qwen2")
    assert loaded.config.qk_norm == (kind == "qwen3")
    tokens = torch.randint(0, 97, (2, 11))
    with torch.inference_mode():
        expected = reference(tokens).logits
    assert relative_error(full_logits(loaded.model, tokens), expected) < 1e-5


def test_broken_checkpoints_fail_with_one_clear_line(tmp_path, smollm_fp32):
    with pytest.raises(MicroturnError, match="no such file"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(MicroturnError, match="junk.gguf: not a readable GGUF"):
        load_model(tmp_path / "junk.gguf")
    model_dir = tmp_path / "model"
    save_tiny_hf("llama", model_dir, tie=True)
    smollm_fp32.tokenizer.backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(MicroturnError, match="model.safetensors: not a readable safetensors"):
        load_model(model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MicroturnError, match="model_type 'gpt2' is not supported"):
        load_model(model_dir)


def test_native_layer_stack_follows_in_place_weight_updates(kernel_choice):
    """The all-layers native pass keeps its packed weights between calls; an in-place update (an
    optimizer step) or a replaced weight must be seen by the next pass, as the reference sees it."""
    from microturn.engine.paged_attention import PagedSequence

    model = tiny_model(seed=5)
    tokens = torch.randint(0, 97, (1, 6))
    positions = torch.arange(6).unsqueeze(0)

    def paged_logits() -> torch.Tensor:
        cache = PagedSequence(model.config, 6, torch.float32)
        with torch.inference_mode():
            return model(tokens, positions, cache)

    before = paged_logits()
    assert relative_error(before, full_logits(model, tokens)) < 1e-5
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(1.5)  # in place: bumps the version
    after = paged_logits()
    assert relative_error(after, before) > 1e-3  # negative control: the update changes logits
    assert relative_error(after, full_logits(model, tokens)) < 1e-5
    model.layers[0].self_attn.o_proj.weight = torch.nn.Parameter(
        model.layers[0].self_attn.o_proj.weight.detach() * 0.5)  # replaced
    assert relative_error(paged_logits(), full_logits(model, tokens)) < 1e-5
    # the parts around the layers, which the whole-forward native call also keeps
    with torch.no_grad():
        model.norm.weight.mul_(1.25)  # in place
    model.embed_tokens.weight.data = model.embed_tokens.weight.data * 0.75  # storage swapped
    changed = paged_logits()
    assert relative_error(changed, before) > 1e-3
    assert relative_error(changed, full_logits(model, tokens)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,heads,kv_heads", [(576, 9, 3), (512, 8, 2)])
def test_decode_team_gives_the_bits_of_a_prefill(dtype, hidden, heads, kv_heads):
    """Passes of up to 4 tokens run all layers as one thread team (units split over the team,
    barriers between ops); a prefill opens a region per op. Over two attention splits and
    9-group linears (on two threads the middle group's K is cut between them) or 8-group ones
    (cut between groups), the o and down projections' halves taken in reverse thread order,
    with 1, 2 and 3 threads, the team's decode rows, 4 at once and one by one, must be the
    prefill's bits."""
    from microturn.engine.paged_attention import PagedSequence
    from microturn.kernels import build

    if build.load() is None:
        pytest.skip("CPU kernels unavailable here")
    config = tiny_config(vocab_size=500, hidden_size=hidden, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=64, intermediate_size=576,
                         max_position=2048)
    model = init_random_weights(Decoder(config), seed=3).to(dtype).eval()
    tokens = torch.randint(0, 500, (1, 700))
    positions = torch.arange(700).unsqueeze(0)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        prefill = model(tokens, positions, PagedSequence(config, 700, dtype))[0, -4:]
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                cache = PagedSequence(config, 700, dtype)
                model(tokens[:, :696], positions[:, :696], cache, logits_at=torch.tensor([695]))
                decode = model(tokens[:, 696:], positions[:, 696:], cache)[0]
                assert torch.equal(decode, prefill), f"{n} threads"
                cache.length = 696
                singles = torch.cat([model(tokens[:, t:t + 1], positions[:, t:t + 1], cache)[0]
                                     for t in range(696, 700)])
                assert torch.equal(singles, prefill), f"{n} threads, one token a pass"
                # negative control: the same comparison catches rows one position off
                cache.length = 696
                shifted = model(tokens[:, 696:], positions[:, 696:] + 1, cache)[0]
                assert not torch.equal(shifted, prefill)
        finally:
            torch.set_num_threads(threads)


def test_unknown_gguf_pre_tokenizer_is_refused_by_name(tmp_path):
    """An unknown `tokenizer.ggml.pre` is an error naming the field, not a silent GPT-2 split
    (which tokenizes such a model's text wrongly without a word)."""
    from microturn.checkpoint.tokenizer import tokenizer_from_gguf

    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
              "tokenizer.ggml.merges": ["a b"]}
    path = tmp_path / "model.gguf"
    assert tokenizer_from_gguf(fields | {"tokenizer.ggml.pre": "smollm"}, path).encode("ab")
    assert tokenizer_from_gguf(fields, path).encode("ab")  # absent: llama.cpp's default split
    with pytest.raises(MicroturnError, match=r"model.gguf: tokenizer.ggml.pre 'mystery' is "
                                             r"not supported \(supported: .*smollm"):
        tokenizer_from_gguf(fields | {"tokenizer.ggml.pre": "mystery"}, path)
