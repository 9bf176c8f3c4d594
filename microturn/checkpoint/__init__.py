"""Checkpoints: GGUF files, safetensors directories, their tokenizers, the default model."""

from microturn.checkpoint.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
