"""dMel: a log-mel filterbank with every channel quantised to a few bins (Bai et al., 2024).

Framing (fixed, so the frame count per slice is exact and streaming equals offline):
frame i covers samples [i*hop - (window - hop), (i+1)*hop) of the 16 kHz stream, with zeros
before the start. A 200 ms slice (3,200 samples) therefore yields exactly 16 frames, and a
streaming encoder needs only the last window - hop samples of the previous slice.

Features: Hann window of 800 samples (50 ms), hop 200 (12.5 ms), an 800-point FFT, magnitude,
80 triangular HTK-mel filters over 80-7,600 Hz, natural log. Quantisation: each channel is
clamped to [LOG_MIN, LOG_MAX] and cut into 16 equal bins (4 bits per channel).
"""

import numpy as np
import torch

from microturn.sequence.media_specs import AUDIO_RATE, DMelSpec


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank(spec: DMelSpec) -> torch.Tensor:
    """[channels, window // 2 + 1] triangular filters, peak 1, on the HTK mel scale."""
    fft_hz = np.linspace(0.0, AUDIO_RATE / 2, spec.window // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(spec.f_min), _hz_to_mel(spec.f_max),
                                   spec.channels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz - lower) / (centre - lower)
    falling = (upper - fft_hz) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


class DMelEncoder:
    """Streaming dMel: push 16 kHz samples, get the codes of every frame they complete."""

    def __init__(self, spec: DMelSpec | None = None):
        self.spec = spec = spec or DMelSpec()
        self.filters = mel_filterbank(spec)
        self.hann = torch.hann_window(spec.window, periodic=True)
        self._tail = np.zeros(spec.window - spec.hop, dtype=np.float32)  # history before now
        self._partial = np.zeros(0, dtype=np.float32)  # samples short of a whole hop

    def push(self, samples: np.ndarray) -> torch.Tensor:
        """-> uint8 codes [frames, channels], one frame per whole hop completed."""
        spec = self.spec
        fresh = np.concatenate([self._partial, np.asarray(samples, dtype=np.float32)])
        whole = len(fresh) - len(fresh) % spec.hop
        self._partial = fresh[whole:]
        if whole == 0:
            return torch.zeros(0, spec.channels, dtype=torch.uint8)
        signal = np.concatenate([self._tail, fresh[:whole]])
        self._tail = signal[len(signal) - (spec.window - spec.hop):]
        return quantise(log_mel(torch.from_numpy(signal), spec, self.filters, self.hann), spec)


def log_mel(signal: torch.Tensor, spec: DMelSpec, filters: torch.Tensor,
            hann: torch.Tensor) -> torch.Tensor:
    """signal [window - hop + frames * hop] -> ln mel magnitude [frames, channels]."""
    stft = torch.stft(signal, spec.window, spec.hop, window=hann, center=False,
                      return_complex=True)
    magnitude = stft.abs()  # [bins, frames]
    return torch.log((filters @ magnitude).clamp_min(1e-10)).T


def quantise(values: torch.Tensor, spec: DMelSpec) -> torch.Tensor:
    scaled = (values - spec.log_min) / (spec.log_max - spec.log_min) * spec.bins
    return scaled.floor().clamp(0, spec.bins - 1).to(torch.uint8)


def dmel(samples: np.ndarray, spec: DMelSpec | None = None) -> torch.Tensor:
    """Offline dMel of a whole 16 kHz recording: the same codes the streaming encoder gives."""
    return DMelEncoder(spec).push(samples)


def dmel_to_audio(codes: torch.Tensor, spec: DMelSpec | None = None,
                  iterations: int = 48) -> np.ndarray:
    """An approximate waveform for dMel codes [frames, channels]: bin centres -> mel
    magnitude -> linear magnitude (least squares through the filterbank) -> Griffin-Lim phase.
    For listening to what the model hears; the phase is invented, the envelope is not."""
    spec = spec or DMelSpec()
    filters = mel_filterbank(spec)
    mel = torch.exp(spec.bin_centres()[codes.long()]).T  # [channels, frames]
    magnitude = (torch.linalg.pinv(filters) @ mel).clamp_min(0.0)  # least-squares inverse
    window = torch.hann_window(spec.window, periodic=True)
    generator = torch.Generator().manual_seed(0)
    phase = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=generator))
    length = magnitude.shape[1] * spec.hop
    stft_args = dict(n_fft=spec.window, hop_length=spec.hop, win_length=spec.window,
                     window=window, center=True)
    for _ in range(iterations):
        wave = torch.istft(magnitude * phase, length=length, **stft_args)
        rebuilt = torch.stft(wave, return_complex=True, **stft_args)[:, :magnitude.shape[1]]
        phase = rebuilt / rebuilt.abs().clamp_min(1e-8)
    wave = torch.istft(magnitude * phase, length=length, **stft_args)
    return (wave / max(1.0, wave.abs().max().item())).numpy().astype(np.float32)
