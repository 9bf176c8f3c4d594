"""espeak-ng's output (Debian's `espeak-ng`, no downloads): its streamed WAV to samples.

Shared by spoken output (`server/speech.py`) and the eval's user voices (`eval/voice.py`).
"""

import shutil

import numpy as np

from microturn.errors import MicroturnError

ESPEAK_RATE = 22_050  # espeak-ng's native output rate


def wav_samples(wav: bytes) -> np.ndarray:
    """float32 samples of espeak-ng's streamed WAV (its header's lengths are placeholders)."""
    at = wav.find(b"data")
    if at < 0:
        return np.zeros(0, dtype=np.float32)
    pcm = wav[at + 8:]
    return np.frombuffer(pcm[:len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def espeak_argv(voice: str, words_per_minute: int, text: str, needed_for: str) -> list[str]:
    """The command that speaks `text` as WAV on stdout; a clear error where espeak-ng is not
    installed (`needed_for` says what wanted it)."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise MicroturnError(f"{needed_for} needs espeak-ng (apt-get install espeak-ng)")
    return [binary, "--stdout", "-v", voice, "-s", str(words_per_minute), "--", text]
