"""The four marker tokens of the micro-turn timeline and the input-only media tokens of audio
and video segments (`MediaTokens`): plain records of token ids. Finding the markers in a
checkpoint's vocabulary, or adding them, is loading's job (`checkpoint/interaction.py`).
"""

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from microturn.errors import MicroturnError


@dataclass(frozen=True)
class MediaTokens:
    """Input-only tokens of the audio and video segments, with ids past the vocabulary
    (`base` = its size): the front-end embeds them and the output head never sees them, so
    adding media changes nothing for text. Five markers with a learned row each, then two
    placeholders whose vector is the data at that position (a dMel frame, a patch)."""
    base: int

    num_markers = 5  # audio_start, video_start, frame_start, row_end, absent

    @property
    def audio_start(self) -> int:  # opens the audio segment of an input slice
        return self.base

    @property
    def video_start(self) -> int:  # opens the video segment
        return self.base + 1

    @property
    def frame_start(self) -> int:  # opens one frame of the video segment
        return self.base + 2

    @property
    def row_end(self) -> int:  # closes one row of a frame's patches
        return self.base + 3

    @property
    def absent(self) -> int:  # the segment's modality carried nothing this slice
        return self.base + 4

    @property
    def audio_frame(self) -> int:  # placeholder: one dMel frame
        return self.base + 5

    @property
    def patch(self) -> int:  # placeholder: one 40x40 patch
        return self.base + 6


@dataclass(frozen=True)
class MarkerTokens:
    input_start: int  # opens input slice k
    output_start: int  # opens output slice k: the model speaks after it
    silence: int  # an input slice with nothing in it; or the model choosing to stay silent
    end_of_slice: int  # the model ends its output slice early
    added: tuple[str, ...] = ()  # markers that were not in the checkpoint's vocabulary
    vocab_size: int = 0  # the model's vocabulary with the markers: media ids start here
    digits: tuple[int, ...] = ()  # the tokens "0".."9": the quiet clock's (`SliceLayout.clock`)

    @cached_property
    def media(self) -> MediaTokens:
        return MediaTokens(self.vocab_size)

    def ends_output(self, token: int) -> bool:
        return token in (self.silence, self.end_of_slice)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"added": list(self.added), "digits": list(self.digits)}

    @classmethod
    def from_dict(cls, data: dict) -> "MarkerTokens":
        return cls(**(data | {"added": tuple(data.get("added", ())),
                              "digits": tuple(data.get("digits", ()))}))

    def number(self, value: int) -> list[int]:
        """`value` spelt in digit tokens, as the tokenizer spells numbers in text."""
        if len(self.digits) != 10:
            raise MicroturnError("the quiet clock needs the tokenizer's digit tokens 0-9")
        return [self.digits[int(d)] for d in str(value)]
