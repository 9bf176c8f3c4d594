"""The real default model against Hugging Face transformers loading the same GGUF file."""

import copy

import pytest
import torch
from conftest import relative_error

from microturn.generate import generate_tokens
from microturn.model import CausalAttention
from microturn.model.rotary import inverse_frequencies

TOLERANCE = 1e-4  # max |Δ| / max |ref| for float32 logits
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


def microturn_logits(loaded, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids)).unsqueeze(0)
    with torch.inference_mode():
        return loaded.model(tokens, positions, CausalAttention())[0].float()


@pytest.fixture(scope="module")
def text_ids(smollm_fp32, english_text):
    ids = smollm_fp32.tokenizer.encode(english_text)
    assert 280 <= len(ids) <= 400
    return ids


@pytest.fixture(scope="module")
def reference_logits(reference_model, text_ids):
    with torch.inference_mode():
        return reference_model(torch.tensor([text_ids])).logits[0].float()


def test_tokenizer_matches_reference(smollm_fp32, reference_tokenizer, english_text):
    tokenizer = smollm_fp32.tokenizer
    samples = [english_text, "  spaces\tand\nnewlines  ", "Numbers: 12345, 3.14 and 2026-11-22.",
               "Unicode: naïve café — 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in samples:
        ours = tokenizer.encode(text)
        assert ours == reference_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ours, skip_special=False) == text


def test_chat_template_matches_reference(smollm_fp32, reference_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ours = smollm_fp32.tokenizer.apply_chat_template(messages)
    theirs = reference_tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")


def test_fp32_logits_match_reference(smollm_fp32, text_ids, reference_logits):
    error = relative_error(microturn_logits(smollm_fp32, text_ids), reference_logits)
    print(f"fp32 logits vs transformers over {len(text_ids)} tokens: max rel error {error:.2e}")
    assert error <= TOLERANCE


def test_negative_control_perturbed_weight_fails(smollm_fp32, text_ids, reference_logits):
    broken = copy.deepcopy(smollm_fp32)
    with torch.no_grad():
        weight = broken.model.layers[5].mlp.down_proj.weight
        weight[0] += 0.01 * weight.abs().max()  # one row of one matrix, 1% of its range
    error = relative_error(microturn_logits(broken, text_ids), reference_logits)
    assert error > TOLERANCE, f"a perturbed weight went unnoticed (error {error:.2e})"


def test_negative_control_wrong_rope_base_fails(smollm_fp32, text_ids, reference_logits):
    broken = copy.deepcopy(smollm_fp32)
    broken.model.inv_freq = inverse_frequencies(broken.config.head_dim, 10000.0)
    error = relative_error(microturn_logits(broken, text_ids), reference_logits)
    assert error > TOLERANCE, f"a wrong rope base went unnoticed (error {error:.2e})"


def reference_greedy(model, ids: list[int], steps: int) -> list[int]:
    """transformers' greedy decoding with its KV cache, ignoring end-of-sequence tokens."""
    tokens, past, out = torch.tensor([ids]), None, []
    with torch.inference_mode():
        for _ in range(steps):
            result = model(input_ids=tokens, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_reference(smollm_fp32, reference_model, prompt):
    ids = smollm_fp32.tokenizer.encode(prompt)
    ours = list(generate_tokens(smollm_fp32, ids, 32, stop_at_eos=False))
    assert ours == reference_greedy(reference_model, ids, 32)


def test_bf16_logits_close_to_fp32(smollm_fp32, smollm_bf16, text_ids, reference_model,
                                   reference_logits):
    """Our bf16 error is measured against the error transformers itself makes in bf16: on the
    whole distribution (KL to fp32, mean |error|) and at its worst logit. The worst of ~17M
    logits moves by 2x with any change of fp32 summation order (the bf16 dot-product kernel's
    pairs, say), so it gets a wider bound than the averages."""
    fp32 = microturn_logits(smollm_fp32, text_ids)
    bf16 = microturn_logits(smollm_bf16, text_ids)
    reference_bf16 = copy.deepcopy(reference_model).to(torch.bfloat16)
    with torch.inference_mode():
        theirs = reference_bf16(torch.tensor([text_ids])).logits[0].float()

    def errors(logits, exact):
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1), exact.log_softmax(-1),
                                        log_target=True, reduction="batchmean")
        return (relative_error(logits, exact), float((logits - exact).abs().mean()), float(kl),
                float((logits.argmax(-1) == exact.argmax(-1)).float().mean()))

    ours, ref = errors(bf16, fp32), errors(theirs, reference_logits)
    print("bf16 vs fp32 logits (max rel error, mean |error|, KL, top-1 agreement): microturn "
          f"{ours[0]:.2e}, {ours[1]:.3f}, {ours[2]:.4f}, {ours[3]:.1%}; transformers "
          f"{ref[0]:.2e}, {ref[1]:.3f}, {ref[2]:.4f}, {ref[3]:.1%}")
    assert ours[1] <= 1.5 * ref[1] and ours[2] <= 1.5 * ref[2]
    assert ours[0] <= 3 * ref[0]
    assert ours[3] >= 0.9
