"""Audio in: any file soundfile reads, or PCM16 over the wire, as 16 kHz mono float32.

Other rates go through soxr (a band-limited polyphase resampler, 'HQ' quality); stereo and
multichannel audio is averaged to mono before resampling.
"""

from pathlib import Path

import numpy as np
import soundfile
import soxr

from microturn.errors import MicroturnError
from microturn.sequence.media_specs import AUDIO_RATE

MAX_RATE = 384_000


def to_model_audio(samples: np.ndarray, rate: int) -> np.ndarray:
    """[frames] or [frames, channels] at `rate` -> float32 [frames'] at 16 kHz."""
    if not 1_000 <= rate <= MAX_RATE:
        raise MicroturnError(f"sample_rate must be in [1000, {MAX_RATE}], got {rate}")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise MicroturnError(f"audio must be [frames] or [frames, channels], "
                             f"got shape {samples.shape}")
    if rate != AUDIO_RATE:
        samples = soxr.resample(samples, rate, AUDIO_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def read_audio(path: str | Path) -> np.ndarray:
    """A WAV/FLAC/OGG file as 16 kHz mono float32 in [-1, 1]."""
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise MicroturnError(f"{path}: cannot read audio ({error})") from None
    return to_model_audio(samples, rate)


class Pcm16Stream:
    """PCM16 little-endian chunks (mono or interleaved channels, any rate) -> 16 kHz mono
    float32, resampled as a stream so chunk boundaries leave no seams."""

    def __init__(self, rate: int = AUDIO_RATE, channels: int = 1):
        if not 1_000 <= rate <= MAX_RATE:
            raise MicroturnError(f"sample_rate must be in [1000, {MAX_RATE}], got {rate}")
        if not 1 <= channels <= 8:
            raise MicroturnError(f"channels must be in [1, 8], got {channels}")
        self.rate, self.channels = rate, channels
        self._resampler = (None if rate == AUDIO_RATE else
                           soxr.ResampleStream(rate, AUDIO_RATE, 1, dtype="float32",
                                               quality="HQ"))

    def push(self, data: bytes) -> np.ndarray:
        frame_bytes = 2 * self.channels
        if len(data) % frame_bytes:
            raise MicroturnError(f"audio: PCM16 with {self.channels} channel(s) needs a "
                                 f"multiple of {frame_bytes} bytes, got {len(data)}")
        pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        mono = pcm.reshape(-1, self.channels).mean(axis=1) if self.channels > 1 else pcm
        if self._resampler is None:
            return mono
        return self._resampler.resample_chunk(mono)
