"""The user's voice: a scenario's words spoken by espeak-ng into its audio stream.

Each word is synthesised on its own and laid down from its `start_ms`, at its natural length,
cut (with a short fade) where the next word starts; so the stream has speech exactly where
the transcript says the user is talking, and its onset is heard in the slice it happens in,
before the word's end brings its text to the text lane. Words are cached per voice.
"""

import subprocess
from functools import lru_cache

import numpy as np
import soxr

from microturn.errors import MicroturnError
from microturn.frontend.espeak import ESPEAK_RATE, espeak_argv, wav_samples
from microturn.sequence.media_specs import AUDIO_RATE

WORDS_PER_MINUTE = 175
FADE_MS = 8  # a cut word fades out over this long instead of clicking


@lru_cache(maxsize=8192)
def spoken_word(voice: str, text: str) -> np.ndarray:
    """One word in `voice` at 16 kHz, peak 1, leading and trailing silence trimmed."""
    done = subprocess.run(espeak_argv(voice, WORDS_PER_MINUTE, text, "a voiced scenario"),
                          capture_output=True, check=False)
    samples = wav_samples(done.stdout)
    if done.returncode != 0 or not samples.size:
        raise MicroturnError(f"voice: espeak-ng could not speak {text!r} in {voice!r}")
    samples = soxr.resample(samples, ESPEAK_RATE, AUDIO_RATE, quality="HQ")
    loud = np.flatnonzero(np.abs(samples) > 0.02 * np.abs(samples).max())
    if not loud.size:
        return np.zeros(0, dtype=np.float32)
    samples = samples[loud[0]:loud[-1] + 1]
    return (samples / np.abs(samples).max()).astype(np.float32)


def add_voice(out: np.ndarray, words, voice: str, level: float) -> None:
    """Mix `words` (`Word`s, in order) spoken in `voice` into `out` (16 kHz) at peak `level`."""
    fade = FADE_MS * AUDIO_RATE // 1000
    for i, word in enumerate(words):
        start = word.start_ms * AUDIO_RATE // 1000
        stop = words[i + 1].start_ms * AUDIO_RATE // 1000 if i + 1 < len(words) else out.size
        samples = spoken_word(voice, word.text)[:max(0, min(stop, out.size) - start)]
        if not samples.size:
            continue
        if samples.size > fade:
            samples = samples.copy()
            samples[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        out[start:start + samples.size] += level * samples
