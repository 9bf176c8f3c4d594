"""The deterministic switch: batch-invariant kernels for every op, or the fastest op per shape.

Deterministic (the default): every linear, norm, rotary, attention and log-softmax runs one of
our kernels, whose result for a row depends only on that row (and, for attention, on its
position and the keys before it). The engine's sampler and the trainer's full-sequence pass
then produce the same bits. Off: large matmuls and long attention go to torch (MKL / flash
attention), whose reduction order changes with the batch shape.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()
_default = True


def deterministic() -> bool:
    return getattr(_state, "deterministic", _default)


def set_default(flag: bool) -> None:
    """Process-wide default (the CLI's --deterministic/--no-deterministic)."""
    global _default
    _default = flag


@contextmanager
def deterministic_mode(flag: bool) -> Iterator[None]:
    """Run the enclosed forward passes (on this thread) in the given mode."""
    before = getattr(_state, "deterministic", None)
    _state.deterministic = flag
    try:
        yield
    finally:
        if before is None:
            del _state.deterministic
        else:
            _state.deterministic = before
