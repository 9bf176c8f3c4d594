"""Video and images in: frames resized to a fixed size and cut into 40x40 patches.

A frame is stretched (not cropped) to `FrameSpec.height x width` with Pillow's antialiased
bilinear filter, then cut row by row into patches; `patches_to_frame` is the exact inverse of
the cut. Frames are sampled on the session clock (`FrameSpec.frames_due`, in `sequence/`).
"""

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from microturn.errors import MicroturnError
from microturn.sequence.media_specs import FrameSpec

MAX_IMAGE_PIXELS = 4096 * 4096  # a decoded image larger than this is refused


def check_pixels(image: Image.Image) -> None:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise MicroturnError(f"image: {image.width}x{image.height} is over the limit of "
                             f"{MAX_IMAGE_PIXELS} pixels")


def fit_frame(image: Image.Image, spec: FrameSpec) -> torch.Tensor:
    """A Pillow image -> uint8 [3, height, width] RGB."""
    check_pixels(image)
    # reducing_gap: a box reduction first, then the antialiased bilinear pass (4x faster on
    # camera-sized frames, visually the same)
    image = image if image.mode == "RGB" else image.convert("RGB")
    resized = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR,
                                          reducing_gap=2.0)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def decode_image(data: bytes, spec: FrameSpec) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 [3, height, width]; anything else is a clear error."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise MicroturnError(f"image: expected PNG or JPEG, got {image.format}")
        check_pixels(image)  # from the header, before decoding
        image.load()
        return fit_frame(image, spec)
    # Pillow reports a malformed file as any of these (a bad chunk length is a SyntaxError,
    # an oversized text chunk a ValueError, a cut header a struct.error)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError,
            SyntaxError, EOFError, struct.error) as error:
        raise MicroturnError(f"image: cannot decode ({error})") from None


def frame_to_patches(frame: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    """uint8 [3, H, W] -> [rows * cols, 3, patch, patch], row-major (the timeline's order)."""
    p = spec.patch
    grid = frame.reshape(3, spec.rows, p, spec.cols, p).permute(1, 3, 0, 2, 4)
    return grid.reshape(spec.rows * spec.cols, 3, p, p).contiguous()


def patches_to_frame(patches: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    p = spec.patch
    grid = patches.reshape(spec.rows, spec.cols, 3, p, p).permute(2, 0, 3, 1, 4)
    return grid.reshape(3, spec.height, spec.width).contiguous()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_video(path: str | Path, spec: FrameSpec) -> Iterator[torch.Tensor]:
    """Frame j of the session (time j / fps), as uint8 [3, height, width]. A video file: the
    last frame shown at or before that time, decoded with PyAV (FFmpeg). A directory: an
    image sequence, its PNG/JPEG files in name order, one per frame."""
    if Path(path).is_dir():
        yield from read_image_sequence(Path(path), spec)
        return
    import av  # only video files need FFmpeg

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise MicroturnError(f"{path}: cannot open video ({error})") from None
    with container:
        if not container.streams.video:
            raise MicroturnError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        shown = 1 / float(stream.average_rate) if stream.average_rate else 0.0  # per frame
        held, held_time, j = None, 0.0, 0
        try:
            for frame in container.decode(stream):
                time = frame.time if frame.time is not None else held_time + shown
                while held is not None and time > j / spec.fps:
                    yield held
                    j += 1
                held, held_time = fit_frame(frame.to_image(), spec), time
        except av.error.FFmpegError as error:
            raise MicroturnError(f"{path}: cannot decode video ({error})") from None
        while held is not None and j / spec.fps < held_time + shown:  # the last frame's time
            yield held
            j += 1


def read_image_sequence(directory: Path, spec: FrameSpec) -> Iterator[torch.Tensor]:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MicroturnError(f"{directory}: no PNG or JPEG images in it")
    for file in files:
        yield decode_image(file.read_bytes(), spec)
