"""The decoder: a Llama/Qwen-family transformer that takes explicit positions and a KV backend.

`forward` returns logits only for the time steps asked for: the 49k-wide output head is the
single largest matmul of a decode step, and a prefill needs it for one token, not all of them.
"""

import torch
from torch import nn

from microturn.model import native_layers
from microturn.model.attention import SelfAttention
from microturn.model.attention_backend import AttentionBackend
from microturn.model.config import ModelConfig
from microturn.model.linear import Embedding, Linear
from microturn.model.mlp import SwiGLU
from microturn.model.moe import MoE
from microturn.model.rmsnorm import RMSNorm
from microturn.model.rotary import RotaryAngles, inverse_frequencies


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoE(config.hidden_size, config.moe)
                    if config.moe is not None and config.moe.is_sparse(layer)
                    else SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, x, rotary, backend):
        x = x + self.self_attn(self.input_layernorm(x), rotary, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 always (not a buffer, so .to(bf16) cannot round the frequencies)
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend, logits_at: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T', vocab] for the steps in `logits_at` (all T steps when None)."""
        self._begin_pass(token_ids, positions, backend)
        if native_layers.applies(self, token_ids, backend):  # one native call, the same bits
            return native_layers.run_forward(self, token_ids, positions, backend, logits_at,
                                             embeds)
        hidden = self._hidden_states(token_ids, positions, backend, embeds)
        if logits_at is not None:
            hidden = hidden[:, logits_at]
        return self.lm_head(hidden)

    def _begin_pass(self, token_ids: torch.Tensor, positions: torch.Tensor,
                    backend: AttentionBackend) -> None:
        if token_ids.shape != positions.shape or token_ids.dim() != 2:
            raise ValueError(f"token_ids {tuple(token_ids.shape)} and positions "
                             f"{tuple(positions.shape)} must both be [batch, steps]")
        backend.prepare(token_ids.shape[1])
        if self.inv_freq.device != token_ids.device:
            self.inv_freq = self.inv_freq.to(token_ids.device)

    def _hidden_states(self, token_ids: torch.Tensor, positions: torch.Tensor,
                       backend: AttentionBackend, embeds: torch.Tensor | None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] through the modules (after `_begin_pass`):
        the trainer's path, and the one the native call reproduces bit for bit. `embeds`
        [B, T, hidden], when given, replaces the token embedding (media inputs)."""
        x = self.embed_tokens(token_ids) if embeds is None else embeds
        rotary = RotaryAngles.at(positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, rotary, backend)
        return self.norm(x)


def init_random_weights(model: Decoder, seed: int = 0, std: float = 0.02) -> Decoder:
    """Fill a freshly built Decoder with random weights (tiny test models, new parameters)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.randn(param.shape, generator=generator) * std
                param.copy_(values.to(param.dtype))
    return model
