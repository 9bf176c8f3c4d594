"""Voice activity from silero-vad (the `silero-vad` package ships its TorchScript model).

The model reads 512-sample chunks of 16 kHz audio (32 ms) and keeps its state across them,
as a live pipeline runs it. A chunk is speech above `threshold`; speech ends once the
probability stays under `threshold - 0.15` (silero's own hysteresis)."""

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from microturn.errors import MicroturnError

CHUNK = 512
RATE = 16_000


@dataclass(frozen=True)
class Segment:
    start_ms: int
    end_ms: int


@cache
def _model():
    try:
        from silero_vad import load_silero_vad
    except ImportError as exc:
        raise MicroturnError("the turn-based harness needs silero-vad: "
                             "pip install silero-vad==6.2.3") from exc
    return load_silero_vad()


@torch.inference_mode()
def speech_segments(samples: np.ndarray, threshold: float = 0.5) -> list[Segment]:
    """Speech segments of a 16 kHz mono stream, streamed chunk by chunk."""
    model = _model()
    model.reset_states()
    segments, start, on = [], 0, False
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        p = float(model(audio[i:i + CHUNK], RATE))
        t = i * 1000 // RATE
        if not on and p >= threshold:
            on, start = True, t
        elif on and p < threshold - 0.15:
            on = False
            segments.append(Segment(start, t))
    if on:
        segments.append(Segment(start, len(audio) * 1000 // RATE))
    return segments
