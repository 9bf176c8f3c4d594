"""A whole paged forward pass in one native call (`paged_decoder_forward`): token ids (or media
embeddings) to the logits asked for.

The C++ function runs the same kernels in the same order as the Python modules, so it gives
the same bits; what it removes is the ~15 Python-dispatched calls per layer (and ~10 around
the layers) that dominate a decode step's overhead. It applies on the CPU kernels' paged path
without autograd, for the Llama/Qwen2 layer (no q/k norm), and where the Python loop would also
take the kernels.
"""

import weakref

import torch

from microturn.kernels import ops, policy
from microturn.kernels.huge_pages import copies_on_huge_pages
from microturn.model.attention_backend import AttentionBackend


def applies(model, x: torch.Tensor, backend: AttentionBackend) -> bool:
    # (every check here meets cold caches after a pass over the weights, ~5-20 us each: the
    # row count goes first so a decode never asks the thread-local policy)
    return (backend.paged is not None and ops.kernels_for(x) is not None
            and not torch.is_grad_enabled() and not model.config.qk_norm and x.shape[0] == 1
            and model.config.moe is None and not getattr(model, "sharded", False)
            and (x.shape[1] <= ops.SMALL_BATCH_ROWS or policy.deterministic()))


# per model: (the parameter generation it was built at, the native stack). Kept beside the
# model, not on it, so copying or pickling a model never meets the native object.
_stacks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Bumped whenever any module anywhere registers a parameter (`module.weight = Parameter(...)`,
# `load_state_dict(assign=True)`, a new module): a replaced weight is then seen without walking
# ~200 parameter slots each step. In-place updates and `.data` swaps keep the parameter and
# change its version or storage, which the native stack checks itself (`fresh()`).
_generation = 0


def _parameter_registered(module, name, param) -> None:
    global _generation
    _generation += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_parameter_registered)


def layer_stack(model, kernels):
    """The native weight stack, built once and rebuilt whenever a weight is replaced or
    updated in place (a trainer's optimizer step bumps its version): a decode step then hands
    the kernel one object instead of ~200 tensors."""
    cached = _stacks.get(model)
    if cached is not None and cached[0] == _generation and cached[1].fresh():
        return cached[1]
    generation = _generation
    empty = torch.empty(0, dtype=model.dtype, device=model.device)
    # every packed weight moves to one huge-page allocation, in the order a step reads them:
    # the decode team alternates which thread takes a matrix's first half, so one thread's
    # stream runs straight on into the next matrix (csrc/decoder_pass.cpp, decoder_layers)
    linears = [lin for layer in model.layers for lin in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
        layer.mlp.down_proj)] + [model.lm_head]
    moved = copies_on_huge_pages([lin.panels() for lin in linears])
    for lin, panels in zip(linears, moved, strict=True):
        lin.keep_panels(panels)
    weights, sources = [], []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        bias = attn.qkv_proj.bias
        weights += [layer.input_layernorm.weight, attn.qkv_proj.panels(),
                    empty if bias is None else bias, attn.o_proj.panels(),
                    layer.post_attention_layernorm.weight, mlp.gate_up_proj.panels(),
                    mlp.down_proj.panels()]
        sources += [layer.input_layernorm.weight, attn.qkv_proj.weight, attn.o_proj.weight,
                    layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight,
                    mlp.down_proj.weight] + ([] if bias is None else [bias])
    weights += [model.embed_tokens.weight, model.norm.weight, model.lm_head.panels()]
    sources += [model.embed_tokens.weight, model.norm.weight, model.lm_head.weight]
    c = model.config
    shape = kernels.ModelShape(c.rms_norm_eps, c.num_heads, c.num_kv_heads, c.head_dim,
                               c.intermediate_size, c.rope_layout == "interleaved",
                               model.inv_freq)
    stack = kernels.layer_stack([w.detach() for w in weights], [t.detach() for t in sources],
                                c.vocab_size, shape)
    _stacks[model] = (generation, stack)
    return stack


def run_forward(model, token_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend,
                logits_at: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
    """The whole forward pass (embedding to logits at `logits_at`) in one native call: the
    Python modules' kernels in their order, so the same bits, without ~10 dispatched ops."""
    paged = backend.paged
    kernels = ops.kernels_for(token_ids)
    b, pool = paged.batch, paged.pool
    where = kernels.PagedPass(pool.k, pool.v, pool.block_table, b.rows, b.keys, b.starts,
                              b.write_blocks, b.write_offsets)
    return kernels.paged_decoder_forward(layer_stack(model, kernels), where, token_ids,
                                         None if embeds is None else embeds[0], positions,
                                         logits_at)
