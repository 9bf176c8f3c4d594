"""Turn a checkpoint's tensors (Hugging Face names, unfused) into a Decoder on a device and dtype.

Both loaders hand over the same naming, so fusing q/k/v and gate/up happens in one place.
The module is built on the meta device and the loaded tensors are assigned, so no time is spent
initialising weights that are about to be replaced.
"""

import torch

from microturn.errors import MicroturnError
from microturn.model.config import ModelConfig
from microturn.model.decoder import Decoder
from microturn.model.rotary import inverse_frequencies


def fuse_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint names to the Decoder's parameter names, concatenating fused projections."""
    tensors = {name.removeprefix("model."): t for name, t in tensors.items()}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise MicroturnError(f"checkpoint: tensor {name!r} is missing")
        return tensors.pop(name)

    out["embed_tokens.weight"] = take("embed_tokens.weight")
    out["norm.weight"] = take("norm.weight")
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "self_attn.qkv_proj.weight"] = torch.cat(
            [take(attn + f"{p}_proj.weight") for p in "qkv"])
        if config.attention_bias:
            out[dst + "self_attn.qkv_proj.bias"] = torch.cat(
                [take(attn + f"{p}_proj.bias") for p in "qkv"])
        out[dst + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        if config.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = take(attn + "q_norm.weight")
            out[dst + "self_attn.k_norm.weight"] = take(attn + "k_norm.weight")
        if config.moe is not None and config.moe.is_sparse(i):
            out |= _moe_tensors(config, take, src, dst)
        else:
            out[dst + "mlp.gate_up_proj.weight"] = torch.cat(
                [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")])
            out[dst + "mlp.down_proj.weight"] = take(src + "mlp.down_proj.weight")
    tensors.pop("lm_head.weight", None)  # tied checkpoints may still carry a copy
    return out


def _moe_tensors(config: ModelConfig, take, src: str, dst: str) -> dict[str, torch.Tensor]:
    """One MoE layer's router, experts (gate and up fused) and shared expert. Mixtral names
    its experts' projections w1 (gate), w3 (up), w2 (down) under block_sparse_moe."""
    out = {}
    if config.architecture == "mixtral":
        base, names = src + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        base, names = src + "mlp.", ("gate_proj", "up_proj", "down_proj")
    out[dst + "mlp.router.weight"] = take(base + "gate.weight")
    for e in range(config.moe.experts):
        expert, mine = f"{base}experts.{e}.", f"{dst}mlp.experts.{e}."
        gate, up, down = (take(expert + f"{n}.weight") for n in names)
        out[mine + "gate_up_proj.weight"] = torch.cat([gate, up])
        out[mine + "down_proj.weight"] = down
    if config.moe.shared_size:
        shared = base + "shared_expert."
        out[dst + "mlp.shared_expert.gate_up_proj.weight"] = torch.cat(
            [take(shared + "gate_proj.weight"), take(shared + "up_proj.weight")])
        out[dst + "mlp.shared_expert.down_proj.weight"] = take(shared + "down_proj.weight")
        out[dst + "mlp.shared_expert_gate.weight"] = take(base + "shared_expert_gate.weight")
    return out


def build_decoder(config: ModelConfig, tensors: dict[str, torch.Tensor],
                  dtype: torch.dtype, device: torch.device | str) -> Decoder:
    state = fuse_tensors(config, tensors)
    with torch.device("meta"):
        model = Decoder(config)
    expected = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MicroturnError(f"checkpoint: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the config implies {tuple(expected[name].shape)}")
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta).to(device)
    return model.eval().requires_grad_(False)
