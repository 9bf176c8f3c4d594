"""Hugging Face model directories: config.json + *.safetensors (+ tokenizer.json)."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig, MoEConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


def read_config_json(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise MicroturnError(f"{path}: no such file (a safetensors model directory needs it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MicroturnError(f"{path}: not valid JSON ({exc})") from None


def config_from_json(raw: dict, path: Path) -> ModelConfig:
    kind = raw.get("model_type")
    if kind not in SUPPORTED:
        raise MicroturnError(f"{path}: model_type {kind!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED)})")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise MicroturnError(f"{path}: rope scaling {rope} is not supported yet")
    try:
        heads = raw["num_attention_heads"]
        return ModelConfig(
            architecture=kind,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            rope_layout="half",
            max_position=raw["max_position_embeddings"],
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", kind in ("qwen2", "qwen2_moe")),
            qk_norm=kind in ("qwen3", "qwen3_moe"),
            moe=moe_config(kind, raw),
        )
    except KeyError as exc:
        raise MicroturnError(f"{path}: key {exc} is missing") from None


def moe_config(kind: str, raw: dict) -> MoEConfig | None:
    """The mixture-of-experts part of a config.json (None for a dense family)."""
    if kind == "mixtral":
        return MoEConfig(raw["num_local_experts"], raw["num_experts_per_tok"],
                         raw["intermediate_size"], normalize=True)
    if kind in ("qwen2_moe", "qwen3_moe"):
        return MoEConfig(raw.get("num_experts") or raw["num_local_experts"],
                         raw["num_experts_per_tok"], raw["moe_intermediate_size"],
                         normalize=bool(raw.get("norm_topk_prob", kind == "qwen3_moe")),
                         shared_size=raw.get("shared_expert_intermediate_size", 0) or 0,
                         sparse_step=raw.get("decoder_sparse_step", 1) or 1,
                         dense_layers=tuple(raw.get("mlp_only_layers") or ()))
    return None


def read_safetensors_dir(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    raw = read_config_json(directory)
    config = config_from_json(raw, directory / "config.json")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MicroturnError(f"{directory}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise MicroturnError(f"{file}: not a readable safetensors file ({exc})") from None
    return config, tensors, raw
