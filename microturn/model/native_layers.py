"""All decoder layers of a paged pass in one native call (`paged_decoder_layers`).

The C++ function runs the same kernels in the same order as the Python layer loop, so it gives
the same bits; what it removes is the ~15 Python-dispatched calls per layer that dominate a
decode step's overhead. It applies on the CPU kernels' paged path without autograd, for the
Llama/Qwen2 layer (no q/k norm), and where the Python loop would also take the kernels.
"""

import weakref

import torch

from microturn.kernels import ops, policy
from microturn.model.rotary import RotaryAngles


def applies(model, x: torch.Tensor, backend) -> bool:
    return (getattr(backend, "paged", None) is not None and ops.kernels_for(x) is not None
            and not torch.is_grad_enabled() and not model.config.qk_norm and x.shape[0] == 1
            and (policy.deterministic() or x.shape[1] <= ops.SMALL_BATCH_ROWS))


# per model: (its weight slots, their state when the stack was built, the native stack). Kept
# beside the model, not on it, so copying or pickling a model never meets the native object.
_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weight_slots(model) -> list[tuple[dict, str]]:
    """Where each layer's weights live: (a module's parameter dict, name). Reading them through
    these dicts each step is ~10x cheaper than nn.Module attribute lookups."""
    slots = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        slots += [(layer.input_layernorm._parameters, "weight"),
                  (attn.qkv_proj._parameters, "weight"), (attn.qkv_proj._parameters, "bias"),
                  (attn.o_proj._parameters, "weight"),
                  (layer.post_attention_layernorm._parameters, "weight"),
                  (mlp.gate_up_proj._parameters, "weight"),
                  (mlp.down_proj._parameters, "weight")]
    return slots


def _state(slots: list[tuple[dict, str]]) -> list:
    """Each weight's identity, storage and version, flat: [id, data_ptr, version, ...]."""
    state = []
    for params, name in slots:
        t = params.get(name)
        state += (None, None, None) if t is None else (
            id(t), t.data_ptr(), 0 if t.is_inference() else t._version)
    return state


def _unchanged(slots: list[tuple[dict, str]], state: list) -> bool:
    """`_state(slots) == state`, without building containers: it runs every decode step, and
    a few hundred tuples a step would wake Python's cyclic garbage collector."""
    i = 0
    for params, name in slots:
        t = params.get(name)
        if t is None:
            if state[i] is not None:
                return False
        elif (id(t) != state[i] or t.data_ptr() != state[i + 1]
              or (0 if t.is_inference() else t._version) != state[i + 2]):
            return False
        i += 3
    return True


def layer_stack(model, kernels):
    """The native weight stack, built once and rebuilt whenever a weight is replaced or
    updated in place (a trainer's optimizer step bumps its version): a decode step then hands
    the kernel one object instead of ~200 tensors."""
    cached = _stacks.get(model)
    if cached is not None and _unchanged(cached[0], cached[1]):
        return cached[2]
    slots = _weight_slots(model)
    empty = torch.empty(0, dtype=model.dtype, device=model.device)
    weights = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        bias = attn.qkv_proj.bias
        weights += [layer.input_layernorm.weight, attn.qkv_proj.panels(),
                    empty if bias is None else bias, attn.o_proj.panels(),
                    layer.post_attention_layernorm.weight, mlp.gate_up_proj.panels(),
                    mlp.down_proj.panels()]
    stack = kernels.layer_stack(weights)
    _stacks[model] = (slots, _state(slots), stack)
    return stack


def run_layers(model, x: torch.Tensor, rotary: RotaryAngles, backend) -> torch.Tensor:
    """x [1, N, hidden] after the embedding -> after the last layer (before the final norm)."""
    c, paged = model.config, backend.paged
    kernels = ops.kernels_for(x)
    b, pool = paged.batch, paged.pool
    out = kernels.paged_decoder_layers(
        x[0], layer_stack(model, kernels), c.rms_norm_eps, rotary.cos, rotary.sin, c.num_heads,
        c.num_kv_heads, c.head_dim, c.intermediate_size, c.rope_layout == "interleaved",
        pool.k, pool.v, pool.block_table, b.rows, b.keys, b.starts, b.write_blocks,
        b.write_offsets)
    return out.unsqueeze(0)
