"""Sampling rules and streaming detokenisation."""

import pytest
import torch

from microturn import MicroturnError
from microturn.checkpoint.tokenizer import StreamingDecoder
from microturn.sampling import SamplingParams, sample, sample_with_logprob


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingParams()) == 1


def test_top_k_one_is_greedy_and_seed_reproduces():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_k=1, seed=7)
    assert sample(logits, params, torch.Generator().manual_seed(7)) == int(logits.argmax())
    free = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, free, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0, -10.0])
    generator = torch.Generator().manual_seed(0)
    top2 = {sample(logits, SamplingParams(temperature=2.0, top_k=2), generator)
            for _ in range(200)}
    assert top2 == {0, 1}
    # p(0) = 0.66: top_p 0.5 keeps only token 0, top_p 0.9 keeps tokens 0 and 1
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), generator)
            for _ in range(100)} == {0}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.9), generator)
            for _ in range(300)} == {0, 1}


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-324, 1e-30])
def test_tiny_temperatures_are_near_greedy_not_an_overflow(temperature):
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(3)) * 4
    logits[123] = logits.max() + 0.5
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=temperature, seed=1)
    assert {sample(logits, params, generator) for _ in range(20)} == {123}
    # negative control: the unshifted division overflows to inf - inf = nan everywhere
    assert (logits / temperature).softmax(-1).isnan().all() or temperature == 1e-30


def test_top_k_and_top_p_restrict_the_support_at_tiny_temperature():
    logits = torch.tensor([5.0, 5.0, 3.0, -10.0])  # a tie at the top: either of the two
    params = SamplingParams(temperature=1e-40, top_p=0.9)
    draws = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws <= {0, 1} and draws


@pytest.mark.parametrize("field,kwargs", [("temperature", {"temperature": -1}),
                                          ("top_p", {"top_p": 0.0}), ("top_k", {"top_k": -2})])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(MicroturnError, match=field):
        SamplingParams(**kwargs)


def test_streaming_decoder_holds_back_partial_characters(smollm_fp32):
    tokenizer = smollm_fp32.tokenizer
    text = "Tokyo is 東京, and 🙂 is a smile."
    ids = tokenizer.encode(text)
    stream = StreamingDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_the_policy_logprob_is_the_drawn_distributions():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(4)) * 3
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=2)
    token, policy = sample_with_logprob(logits, params, torch.Generator().manual_seed(5))
    kept = torch.topk(logits, 20).indices
    probs = torch.zeros(300)
    probs[kept] = (logits[kept] / 0.7).softmax(-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = order[before < 0.9]
    expected = (probs[token] / probs[nucleus].sum()).log()
    assert token in nucleus.tolist() and abs(policy - float(expected)) < 1e-5
    model = float(logits.log_softmax(-1)[token])  # negative control: the model's own differs
    assert abs(policy - model) > 0.1
    assert sample_with_logprob(logits, SamplingParams(), None) == (int(logits.argmax()), 0.0)


def test_greedy_rows_together_give_each_rows_own_token():
    """The engine draws every greedy session in one batched argmax: each row must get the
    index it gets alone, ties included (the first maximum). Negative control: the last
    maximum of a tied row is another index, so the comparison can fail."""
    from microturn.sampling import greedy_tokens

    rows = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)).bfloat16()
    rows[2, 17] = rows[2, 250] = rows[2].max() + 1  # a tie: the first one wins
    together = greedy_tokens(rows)
    assert together == [sample(row, SamplingParams()) for row in rows]
    assert together[2] == 17
    assert int(299 - rows[2].flip(0).float().argmax()) == 250 != together[2]
