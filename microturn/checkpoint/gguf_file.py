"""GGUF checkpoints: config from the metadata, tensors dequantised by the `gguf` package.

GGUF llama files store Q and K rows permuted for llama.cpp's interleaved rotary layout; rather
than undo the permutation we run rotary in that layout (ModelConfig.rope_layout).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor, dequantize

from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig, MoEConfig

# rotary layout per GGUF architecture (llama.cpp: LLAMA_ROPE_TYPE_NORM vs NEOX)
ROPE_LAYOUTS = {"llama": "interleaved", "mistral": "interleaved", "qwen2": "half", "qwen3": "half",
                "qwen2moe": "half", "qwen3moe": "half"}
# llama.cpp renormalises the top-k weights for these (Mixtral is a "llama" with experts)
NORMALISED_EXPERTS = {"llama": True, "mistral": True, "qwen2moe": False, "qwen3moe": True}

LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# all experts of a layer in one [experts, out, in] tensor: split into Hugging Face's names
STACKED_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                   "ffn_down_exps.weight": "down_proj"}
GLOBAL_TENSORS = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "lm_head.weight"}


class FastGGUFReader(GGUFReader):
    """GGUFReader that slices a plain ndarray view of its file mapping.

    Parsing the 49k-string vocabulary makes ~250k small slices; on a numpy.memmap each one pays
    for memmap's Python-level __getitem__/__array_finalize__ (seconds in total). A plain view of
    the same mapping gives identical bytes without that cost.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(override_order or self.byte_order))


def open_gguf(path: Path) -> GGUFReader:
    try:
        return FastGGUFReader(path)
    except FileNotFoundError:
        raise MicroturnError(f"{path}: no such file") from None
    except Exception as exc:  # the reader raises bare ValueError/AssertionError on damage
        raise MicroturnError(f"{path}: not a readable GGUF file ({exc})") from None


def field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader: GGUFReader, path: Path) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in ROPE_LAYOUTS:
        raise MicroturnError(f"{path}: architecture {arch!r} is not supported "
                             f"(supported: {', '.join(ROPE_LAYOUTS)})")
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise MicroturnError(f"{path}: rope scaling ({scaling}) is not supported yet")

    def need(key: str):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise MicroturnError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab or need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(reader, f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(need("feed_forward_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_layout=ROPE_LAYOUTS[arch],
        max_position=int(need("context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        moe=gguf_moe_config(reader, arch, names),
    )


def gguf_moe_config(reader: GGUFReader, arch: str, names: set[str]) -> MoEConfig | None:
    experts = field(reader, f"{arch}.expert_count")
    if not experts:
        return None
    if not any(n.endswith("ffn_gate_exps.weight") for n in names):
        raise MicroturnError(f"{arch} GGUF with {experts} experts stored one tensor per "
                             "expert (an old layout): convert it again with llama.cpp")
    size = field(reader, f"{arch}.expert_feed_forward_length") or \
        field(reader, f"{arch}.feed_forward_length")
    norm = field(reader, f"{arch}.expert_weights_norm")
    return MoEConfig(int(experts), int(field(reader, f"{arch}.expert_used_count")), int(size),
                     normalize=bool(NORMALISED_EXPERTS.get(arch, True) if norm is None
                                    else norm),
                     shared_size=int(field(reader,
                                           f"{arch}.expert_shared_feed_forward_length", 0)))


def checkpoint_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], GGUFReader]:
    """Config and float32 tensors (Hugging Face names) of a GGUF file."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    wanted = [(name, t) for t in reader.tensors
              if (name := checkpoint_name(t.name) or stacked_name(t.name))]
    # numpy releases the GIL in the bulk of dequantisation: one thread per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        loaded = pool.map(lambda item: dequantize_tensor(item[1], path), wanted)
        tensors = {name: tensor for (name, _), tensor in zip(wanted, loaded, strict=True)}
    for name in [n for n in tensors if n.endswith("*")]:  # stacked experts, one per expert
        stacked = tensors.pop(name)
        prefix, projection = name[:-1].rsplit(".", 1)
        for e in range(stacked.shape[0]):
            tensors[f"{prefix}.experts.{e}.{projection}.weight"] = stacked[e]
    if config.moe is not None and config.moe.shared_size:
        for name in [n for n in tensors if n.endswith("shared_expert_gate.weight")]:
            tensors[name] = tensors[name].reshape(1, -1)  # a [hidden] vector in the file
    return config, tensors, reader


def stacked_name(gguf_name: str) -> str | None:
    """`layers.N.mlp.PROJ*` for a stacked-experts tensor (split after dequantising)."""
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in STACKED_EXPERTS:
        return f"layers.{parts[1]}.mlp.{STACKED_EXPERTS[parts[2]]}*"
    return None


def dequantize_tensor(t: ReaderTensor, path: Path) -> torch.Tensor:
    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise MicroturnError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                             "which the gguf package cannot dequantize") from None
    except Exception as exc:
        raise MicroturnError(f"{path}: tensor {t.name} is damaged ({exc})") from None
    if not values.flags.writeable:  # a view of the read-only file mapping (F32 tensors)
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False))
