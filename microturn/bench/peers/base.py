"""What every peer engine implements, and the workload they all serve.

A peer serves sessions that each stream micro-turns: I input tokens in, then exactly O output
tokens out (greedy, never stopping early), the output fed back before the next input, so every
engine does the same work per micro-turn. `turn` serves one micro-turn for every session given,
as well as the engine can: batched if it can batch, else one session after another.
"""

from dataclasses import dataclass
from typing import Protocol


class PeerUnavailable(Exception):
    """The peer's package is not installed (or cannot load the model here)."""


class Peer(Protocol):
    name: str
    config: str  # the configuration it runs with, in words (printed with the results)

    def open(self) -> object: ...

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None: ...

    def resident_bytes(self, session) -> int:
        """Memory the session keeps between micro-turns (its KV)."""
        ...

    def close(self, session) -> None: ...


@dataclass(frozen=True)
class Shape:
    name: str
    input_tokens: int
    output_tokens: int
    # A voice session's audio positions per slice (`<audio>` and its dMel frames). microturn
    # feeds real audio there; an engine without an audio front-end gets as many more text
    # tokens instead, so every engine puts the same positions through the model a slice.
    audio_positions: int = 0


ENGINES = ("microturn", "microturn-fast", "transformers-bf16", "transformers-fp32",
           "llamacpp-batched", "llama-server", "llamacpp-sequential", "reprefill")
SHAPES = {"speech": Shape("speech", 16, 2), "sglang": Shape("sglang", 16, 8),
          "audio": Shape("audio", 16, 2)}  # its audio positions are the layout's (run.py)
