"""Real media for the front-end tests: speech from espeak-ng, a video through a real encoder."""

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

SPEECH = ("Hello there. This is microturn listening while it speaks. Every two hundred "
          "milliseconds it hears a slice of audio and answers in the same breath.")


def speech_wav(directory: Path, text: str = SPEECH) -> Path:
    """espeak-ng's voice as a WAV file (22,050 Hz mono PCM16: the front-end resamples it)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it: apt-get install espeak-ng)")
    path = directory / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def frame_colour(index: int) -> tuple[int, int, int]:
    """The solid colour of test-video frame `index`: the frame is recoverable from pixels."""
    return (40 * (index % 6), 255 - 30 * (index % 8), 128)


def write_test_video(directory: Path, seconds: float = 3.0, fps: int = 10,
               size: tuple[int, int] = (320, 240)) -> Path:
    """An MPEG-4 file written through PyAV (FFmpeg's encoder): frame i is a solid
    `frame_colour(i)` with a white square moving along the top row."""
    import av

    path = directory / "video.mp4"
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.bit_rate = 4_000_000
        for i in range(int(seconds * fps)):
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            pixels[:] = frame_colour(i)
            x = (i * 16) % (width - 40)
            pixels[:40, x:x + 40] = 255
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
