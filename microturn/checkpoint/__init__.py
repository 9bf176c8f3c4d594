"""Checkpoints: GGUF files, safetensors directories, their tokenizers, the default model."""

from microturn.checkpoint.loader import Checkpoint, LoadedModel, load_checkpoint, load_model

__all__ = ["Checkpoint", "LoadedModel", "load_checkpoint", "load_model"]
