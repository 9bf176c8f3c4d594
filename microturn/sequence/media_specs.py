"""What a slice of media is, independent of any decoder: the audio rate, the dMel framing and
the video frame grid. The front-end computes features to these specs; the timeline counts
positions by them.

dMel framing (fixed, so the frame count per slice is exact and streaming equals offline):
frame i covers samples [i*hop - (window - hop), (i+1)*hop) of the 16 kHz stream, with zeros
before the start. A 200 ms slice (3,200 samples) therefore yields exactly 16 frames.

Video: frame j belongs at j / fps seconds on the session clock, so slice k carries the frames
whose time falls inside it (`FrameSpec.frames_due`), the same count on every replay.
"""

from dataclasses import dataclass
from fractions import Fraction

import torch

from microturn.errors import MicroturnError

AUDIO_RATE = 16_000  # samples per second the front-end works at


@dataclass(frozen=True)
class DMelSpec:
    channels: int = 80
    bins: int = 16
    window: int = 800  # 50 ms at 16 kHz
    hop: int = 200  # 12.5 ms
    f_min: float = 80.0
    f_max: float = 7_600.0
    log_min: float = -5.0  # ln mel magnitude; quieter is the lowest bin
    log_max: float = 5.0  # louder is the highest bin (loud speech peaks near 4.3)

    def frames_per_slice(self, slice_ms: int) -> int:
        samples = slice_ms * AUDIO_RATE // 1000
        if (slice_ms * AUDIO_RATE) % 1000 or samples % self.hop:
            raise ValueError(f"slice_ms {slice_ms} is not a whole number of "
                             f"{self.hop * 1000 / AUDIO_RATE} ms dMel hops")
        return samples // self.hop

    def bin_centres(self) -> torch.Tensor:
        width = (self.log_max - self.log_min) / self.bins
        return self.log_min + width * (torch.arange(self.bins) + 0.5)


@dataclass(frozen=True)
class FrameSpec:
    height: int = 120
    width: int = 160
    patch: int = 40
    fps: float = 2.0  # frames per second of session time

    def __post_init__(self):
        if self.height % self.patch or self.width % self.patch:
            raise MicroturnError(f"frame {self.height}x{self.width} is not a whole number of "
                                 f"{self.patch}x{self.patch} patches")
        if not 0 < self.fps <= 30:
            raise MicroturnError(f"fps must be in (0, 30], got {self.fps}")

    @property
    def rows(self) -> int:
        return self.height // self.patch

    @property
    def cols(self) -> int:
        return self.width // self.patch

    def frames_due(self, slice_index: int, slice_ms: int) -> int:
        """How many frames slice k carries: those with j / fps in [k, k + 1) * slice."""
        rate = Fraction(self.fps).limit_denominator(1000) * Fraction(slice_ms, 1000)
        return _ceil(rate * (slice_index + 1)) - _ceil(rate * slice_index)


def _ceil(value: Fraction) -> int:
    return -((-value.numerator) // value.denominator)
