"""microturn: engine, server and trainer for interaction models streamed in micro-turns."""

from microturn.checkpoint import Checkpoint, LoadedModel, load_checkpoint, load_model
from microturn.errors import MicroturnError

__version__ = "0.1.0"
__all__ = ["Checkpoint", "LoadedModel", "MicroturnError", "load_checkpoint", "load_model"]
