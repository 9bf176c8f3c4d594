"""The decoder model and its parts."""

from microturn.model.attention_backend import CausalAttention
from microturn.model.config import ModelConfig
from microturn.model.decoder import Decoder

__all__ = ["CausalAttention", "Decoder", "ModelConfig"]
