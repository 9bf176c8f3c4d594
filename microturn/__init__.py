"""microturn: engine, server and trainer for interaction models streamed in micro-turns."""

from microturn.errors import MicroturnError

__version__ = "0.1.0"
__all__ = ["Checkpoint", "LoadedModel", "MicroturnError", "load_checkpoint", "load_model"]


def __getattr__(name: str):
    # the checkpoint names load torch; a process that never runs torch (a llama.cpp peer in
    # `bench peers`) imports microturn's lighter modules without it
    if name in ("Checkpoint", "LoadedModel", "load_checkpoint", "load_model"):
        from microturn import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'microturn' has no attribute {name!r}")
