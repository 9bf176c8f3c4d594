"""Tiny random mixture-of-experts checkpoints saved by `transformers` (the reference), with the
default model's tokenizer beside them, so microturn loads them as it would a real one."""

import json
from pathlib import Path

import numpy as np
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


GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def save_tiny_moe_gguf(hf_dir: Path, path: Path) -> Path:
    """The same weights as a GGUF file (F32), named and laid out as llama.cpp's converter
    writes them: experts stacked per layer, the default model's tokenizer."""
    import gguf
    from safetensors.torch import load_file

    from microturn.checkpoint.default_model import default_model_path
    from microturn.checkpoint.gguf_file import field, open_gguf

    raw = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[raw["model_type"]]
    t = {k.removeprefix("model."): v.float().numpy()
         for k, v in load_file(hf_dir / "model.safetensors").items()}
    w = gguf.GGUFWriter(str(path), arch)
    heads = raw["num_attention_heads"]
    w.add_block_count(raw["num_hidden_layers"])
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(raw["hidden_size"])
    w.add_feed_forward_length(raw["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(raw["num_key_value_heads"])
    w.add_key_length(raw.get("head_dim") or raw["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    w.add_rope_freq_base(raw.get("rope_theta", 10000.0))
    w.add_expert_count(raw.get("num_experts") or raw["num_local_experts"])
    w.add_expert_used_count(raw["num_experts_per_tok"])
    w.add_expert_feed_forward_length(raw["moe_intermediate_size"])
    if raw.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(raw["shared_expert_intermediate_size"])
    w.add_expert_weights_norm(bool(raw.get("norm_topk_prob")))
    reader = open_gguf(default_model_path())
    w.add_tokenizer_model(field(reader, "tokenizer.ggml.model"))
    w.add_tokenizer_pre(field(reader, "tokenizer.ggml.pre"))
    w.add_token_list(field(reader, "tokenizer.ggml.tokens"))
    w.add_token_types(field(reader, "tokenizer.ggml.token_type"))
    w.add_token_merges(field(reader, "tokenizer.ggml.merges"))
    w.add_bos_token_id(field(reader, "tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field(reader, "tokenizer.ggml.eos_token_id"))
    w.add_tensor("token_embd.weight", t.pop("embed_tokens.weight"))
    w.add_tensor("output_norm.weight", t.pop("norm.weight"))
    w.add_tensor("output.weight", t.pop("lm_head.weight"))
    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
             "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
             "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight"}
    names |= {f"self_attn.{p}_proj.{kind}": f"attn_{p}.{kind}" for p in "qkv"
              for kind in ("weight", "bias")}
    for i in range(raw["num_hidden_layers"]):
        src = f"layers.{i}."
        for ours, theirs in names.items():
            if src + ours in t:
                w.add_tensor(f"blk.{i}.{theirs}", t.pop(src + ours))
        if src + "mlp.shared_expert_gate.weight" in t:
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight",
                         t.pop(src + "mlp.shared_expert_gate.weight").reshape(-1))
        experts = raw.get("num_experts") or raw["num_local_experts"]
        for proj, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                             ("down_proj", "ffn_down_exps")):
            stacked = [t.pop(f"{src}mlp.experts.{e}.{proj}.weight") for e in range(experts)]
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.stack(stacked))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
