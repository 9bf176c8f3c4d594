"""All decoder layers of a paged pass in one native call (`paged_decoder_layers`).

The C++ function runs the same kernels in the same order as the Python layer loop, so it gives
the same bits; what it removes is the ~15 Python-dispatched calls per layer that dominate a
decode step's overhead. It applies on the CPU kernels' paged path without autograd, for the
Llama/Qwen2 layer (no q/k norm), and where the Python loop would also take the kernels.
"""

import torch

from microturn.kernels import ops, policy
from microturn.model.rotary import RotaryAngles


def applies(model, x: torch.Tensor, backend) -> bool:
    return (getattr(backend, "paged", None) is not None and ops.kernels_for(x) is not None
            and not torch.is_grad_enabled() and not model.config.qk_norm and x.shape[0] == 1
            and (policy.deterministic() or x.shape[1] <= ops.SMALL_BATCH_ROWS))


def run_layers(model, x: torch.Tensor, rotary: RotaryAngles, backend) -> torch.Tensor:
    """x [1, N, hidden] after the embedding -> after the last layer (before the final norm)."""
    c, paged = model.config, backend.paged
    empty = x.new_empty(0)
    weights = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        bias = attn.qkv_proj.bias
        weights += [layer.input_layernorm.weight, attn.qkv_proj.panels(),
                    empty if bias is None else bias, attn.o_proj.panels(),
                    layer.post_attention_layernorm.weight, mlp.gate_up_proj.panels(),
                    mlp.down_proj.panels()]
    b, pool = paged.batch, paged.pool
    out = ops.kernels_for(x).paged_decoder_layers(
        x[0], weights, c.rms_norm_eps, rotary.cos, rotary.sin, c.num_heads, c.num_kv_heads,
        c.head_dim, c.intermediate_size, c.rope_layout == "interleaved", pool.k, pool.v,
        pool.block_table, b.rows, b.keys, b.starts, b.write_blocks, b.write_offsets)
    return out.unsqueeze(0)
