"""One session's audio and images -> each input slice's media, on the session clock.

Audio: slice k takes exactly the next `frames_per_slice * hop` samples (3,200 for 200 ms)
once all of them have arrived, as dMel codes; if they have not, its audio is absent and the
samples wait for the next slice. So a stream that arrives late or in bursts settles into a
jitter buffer instead of being cut, and every slice carries the same number of frames.
Images: each frame due in slice k (`FrameSpec.frames_due`) takes the next queued image; a due
frame with no image queued is left out. Both queues are bounded (`max_slices` slices).
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from microturn.errors import MicroturnError
from microturn.frontend.dmel import DMelEncoder
from microturn.frontend.video import frame_to_patches
from microturn.sequence.timeline import SliceLayout


@dataclass(frozen=True)
class SliceMedia:
    audio: torch.Tensor | None  # uint8 [frames_per_slice, 80], None: absent
    frames: list[torch.Tensor] = field(default_factory=list)  # uint8 [patches, 3, 40, 40]


class MediaAssembler:
    def __init__(self, layout: SliceLayout, max_slices: int = 25):
        self.layout, self.max_slices = layout, max_slices
        self.index = 0  # the next slice to take
        self.encoder = DMelEncoder() if layout.audio else None
        self.samples_per_slice = (layout.audio_frames * self.encoder.spec.hop
                                  if self.encoder else 0)
        self._audio: deque[np.ndarray] = deque()
        self._audio_samples = 0
        self._images: deque[torch.Tensor] = deque()

    @property
    def buffered_audio_slices(self) -> float:
        return self._audio_samples / self.samples_per_slice if self.samples_per_slice else 0.0

    def push_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32 samples, in order."""
        if self.encoder is None:
            raise MicroturnError("audio: this session was opened without audio")
        limit = self.max_slices * self.samples_per_slice
        if self._audio_samples + len(samples) > limit:
            raise MicroturnError(f"audio: {self._audio_samples + len(samples)} samples would "
                                 f"wait, over {self.max_slices} slices ({limit}); send slower")
        if len(samples):
            self._audio.append(np.asarray(samples, dtype=np.float32))
            self._audio_samples += len(samples)

    def push_frame(self, frame: torch.Tensor) -> None:
        """uint8 [3, height, width] (see `video.fit_frame`), in order."""
        spec = self.layout.video
        if spec is None:
            raise MicroturnError("image: this session was opened without video")
        if len(self._images) >= self.max_slices:
            raise MicroturnError(f"image: {len(self._images)} images already wait, over "
                                 f"{self.max_slices}; send at most {spec.fps} per second")
        self._images.append(frame_to_patches(frame, spec))

    def take(self) -> SliceMedia:
        """The media of the next slice (0, 1, 2, ...)."""
        audio = None
        if self.encoder is not None and self._audio_samples >= self.samples_per_slice:
            audio = self.encoder.push(self._pop_samples(self.samples_per_slice))
        frames = []
        if self.layout.video is not None:
            due = self.layout.video.frames_due(self.index, self.layout.slice_ms)
            while due and self._images:
                frames.append(self._images.popleft())
                due -= 1
        self.index += 1
        return SliceMedia(audio, frames)

    def _pop_samples(self, count: int) -> np.ndarray:
        parts, need = [], count
        while need:
            head = self._audio[0]
            if len(head) <= need:
                parts.append(self._audio.popleft())
                need -= len(head)
            else:
                parts.append(head[:need])
                self._audio[0] = head[need:]
                need = 0
        self._audio_samples -= count
        return np.concatenate(parts)
