"""Tiny random mixture-of-experts checkpoints saved by `transformers` (the reference), with the
default model's tokenizer beside them, so microturn loads them as it would a real one."""

import json
from pathlib import Path

import torch

from microturn.checkpoint.loader import load_tokenizer

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def save_tiny_moe(directory: Path, family: str, experts: int = 8, top_k: int = 2,
                  seed: int = 0, vocab_size: int | None = None) -> Path:
    import transformers

    tokenizer = load_tokenizer()
    vocab = vocab_size or tokenizer.vocab_size
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  initializer_range=0.1, tie_word_embeddings=False)
    if family == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=experts,
                                            num_experts_per_tok=top_k, **common)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=top_k,
                                             moe_intermediate_size=48,
                                             shared_expert_intermediate_size=80, **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.Qwen3MoeConfig(num_experts=experts, num_experts_per_tok=top_k,
                                             moe_intermediate_size=48, norm_topk_prob=True,
                                             **common)
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    cls(config).save_pretrained(directory)
    if vocab_size is None:
        tokenizer.backend.save(str(Path(directory) / "tokenizer.json"))
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": tokenizer.backend.id_to_token(min(tokenizer.eos_ids))}))
    return Path(directory)
