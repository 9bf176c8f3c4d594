"""The micro-turn timeline: the one definition of the interleaved sequence.

Micro-turn k is

    <in> TEXT [RESULT] [AUDIO] [VIDEO] <out> output tokens of slice k

- TEXT: the text tokens that arrived in slice k, or `<silence>`. With the quiet clock
  (`SliceLayout.clock`), a silent slice in which the text lane's quiet reaches a whole second
  says so: `<silence> 1 2` is the slice where 12 s have passed since text last arrived (with
  `SliceLayout.clock_both_lanes`, since text arrived or the model last spoke).
- RESULT: a background worker's answer that arrived in slice k, `<result> text </result>` in
  plain tokens (`segments.py`); absent in most slices. The output's counterpart, the model's
  `<ask> query </ask>`, is ordinary output text.
- AUDIO (sessions with audio): `<audio>` then exactly `frames_per_slice` dMel frames
  (16 for 200 ms: one per 12.5 ms hop), or `<audio> <absent>` when no audio arrived.
- VIDEO (sessions with video): `<video>`, then for each frame the slice carries
  `<frame>` and its patches row by row, each row closed by `<row>`; or `<video> <absent>`.
  Slice k carries the frames due in it on the session clock (`FrameSpec.frames_due`).

The output is what the model emitted: up to the slice's budget, possibly ended early by
<end_of_slice>, or a lone <silence>. A text-only session has no AUDIO or VIDEO segment, so its
sequence is exactly the text timeline. The engine feeds exactly `Timeline.tokens()` (with
`media()` for the audio and patch positions); a trainer builds the same from an export.
"""

import base64
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import torch

from microturn.errors import MicroturnError
from microturn.sequence.markers import MarkerTokens
from microturn.sequence.media_specs import DMelSpec, FrameSpec


@dataclass(frozen=True)
class SliceLayout:
    """Which media segments every input slice of a session carries."""
    slice_ms: int = 200
    audio: bool = False
    video: FrameSpec | None = None
    # Silent slices carry the seconds since the text lane last carried anything, at each whole
    # second: counting 75 identical slices to within one is hard for a small model, reading
    # "12" after "say it in 12 seconds" is not. Part of the format a model was trained on.
    clock: bool = False
    # The clock also starts again after a slice in which the model spoke: it tells the
    # seconds since anyone last spoke, so "count every 3 seconds" is "speak at 3" each time,
    # not "speak at 3 x the next number". Also part of the format.
    clock_both_lanes: bool = False

    def clock_seconds(self, quiet_slices: int) -> int | None:
        """The whole seconds the clock announces in the `quiet_slices`-th quiet slice in a
        row, or None when it does not cross one."""
        if not self.clock or quiet_slices < 1:
            return None
        now = quiet_slices * self.slice_ms // 1000
        return now if now > (quiet_slices - 1) * self.slice_ms // 1000 else None

    @cached_property
    def audio_frames(self) -> int:
        return DMelSpec().frames_per_slice(self.slice_ms) if self.audio else 0

    @property
    def audio_shape(self) -> tuple[int, int]:
        return (self.audio_frames, DMelSpec().channels)

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        """One frame as the timeline holds it: its patches, row-major."""
        v = self.video
        return (v.rows * v.cols, 3, v.patch, v.patch)

    def check(self, index: int, audio: torch.Tensor | None, frames: list[torch.Tensor]) -> None:
        """Refuse media that slice `index` of this layout cannot carry, naming the field."""
        if audio is not None:
            if not self.audio:
                raise MicroturnError("audio: this session was opened without audio")
            if tuple(audio.shape) != self.audio_shape or audio.dtype != torch.uint8:
                raise MicroturnError(f"audio: expected uint8 dMel codes of shape "
                                     f"{self.audio_shape}, got {audio.dtype} "
                                     f"{tuple(audio.shape)}")
            if int(audio.max()) >= DMelSpec().bins:
                raise MicroturnError(f"audio: dMel codes must be < {DMelSpec().bins}")
        if not frames:
            return
        if self.video is None:
            raise MicroturnError("frames: this session was opened without video")
        due = self.video.frames_due(index, self.slice_ms)
        if len(frames) > due:
            raise MicroturnError(f"frames: slice {index} carries at most {due} frame(s) at "
                                 f"{self.video.fps} fps, got {len(frames)}")
        for frame in frames:
            if tuple(frame.shape) != self.frame_shape or frame.dtype != torch.uint8:
                raise MicroturnError(f"frames: expected uint8 patches of shape "
                                     f"{self.frame_shape}, got {frame.dtype} "
                                     f"{tuple(frame.shape)}")

    def to_dict(self) -> dict:
        video = None if self.video is None else dataclasses.asdict(self.video)
        data = {"slice_ms": self.slice_ms, "audio": self.audio, "video": video}
        return (data | ({"clock": True} if self.clock else {})
                | ({"clock_both_lanes": True} if self.clock_both_lanes else {}))

    @classmethod
    def from_dict(cls, data: dict | None) -> "SliceLayout":
        if not data:
            return cls()
        video = data.get("video")
        return cls(data["slice_ms"], data["audio"], FrameSpec(**video) if video else None,
                   bool(data.get("clock", False)), bool(data.get("clock_both_lanes", False)))


@dataclass
class MicroTurn:
    index: int
    input_ids: list[int]  # empty: nothing arrived (fed as <silence>)
    output_ids: list[int] = field(default_factory=list)
    audio: torch.Tensor | None = None  # uint8 [frames_per_slice, 80] dMel codes, or absent
    frames: list[torch.Tensor] = field(default_factory=list)  # uint8 [patches, 3, 40, 40] each
    quiet: int = 0  # slices in a row, this one included, with no text in (set by `Timeline`)
    result_ids: list[int] = field(default_factory=list)  # a `<result>` segment, or none


@dataclass
class Timeline:
    markers: MarkerTokens
    turns: list[MicroTurn] = field(default_factory=list)
    layout: SliceLayout = field(default_factory=SliceLayout)

    def __post_init__(self):
        turns, self.turns = self.turns, []
        for turn in turns:
            self.append(turn)

    def append(self, turn: MicroTurn) -> None:
        """Add the next micro-turn, counting the quiet for the clock: the text lane's, and
        with `clock_both_lanes` the model's too (after a slice it spoke in, the count starts
        again at 1, as after a slice the user's text came in)."""
        before = self.turns[-1].quiet if self.turns else 0
        if self.layout.clock_both_lanes and self.turns and self.spoke(self.turns[-1]):
            before = 0
        turn.quiet = 0 if turn.input_ids else before + 1
        self.turns.append(turn)

    def spoke(self, turn: MicroTurn) -> bool:
        """Did the model say anything in the turn (more than silence or an early end)?"""
        return any(not self.markers.ends_output(t) for t in turn.output_ids)

    def input_tokens(self, turn: MicroTurn) -> list[int]:
        """What the model is fed for the input half of a micro-turn, markers included."""
        m, media, layout = self.markers, self.markers.media, self.layout
        out = [m.input_start, *(turn.input_ids or [m.silence])]
        if (seconds := layout.clock_seconds(turn.quiet)) is not None:
            out += m.number(seconds)
        out += turn.result_ids
        if layout.audio:
            out += ([media.audio_start, *[media.audio_frame] * layout.audio_frames]
                    if turn.audio is not None else [media.audio_start, media.absent])
        if layout.video is not None:
            out.append(media.video_start)
            row = [media.patch] * layout.video.cols + [media.row_end]
            for _ in turn.frames:
                out += [media.frame_start, *row * layout.video.rows]
            if not turn.frames:
                out.append(media.absent)
        out.append(m.output_start)
        return out

    def tokens(self) -> list[int]:
        out: list[int] = []
        for turn in self.turns:
            out += self.input_tokens(turn)
            out += turn.output_ids
        return out

    def media(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return turn_media(self.turns)

    def output_mask(self) -> list[bool]:
        """For each token of `tokens()`: did the model emit it (True) or was it fed (False)."""
        mask: list[bool] = []
        for turn in self.turns:
            mask += [False] * len(self.input_tokens(turn))
            mask += [True] * len(turn.output_ids)
        return mask

    def export(self) -> dict:
        data = {"markers": self.markers.to_dict(), "turns": [_turn_export(t) for t in self.turns]}
        if self.layout != SliceLayout(self.layout.slice_ms):
            data["layout"] = self.layout.to_dict()
        return data

    @classmethod
    def from_export(cls, data: dict) -> "Timeline":
        layout = SliceLayout.from_dict(data.get("layout"))
        return cls(MarkerTokens.from_dict(data["markers"]),
                   [_turn_import(t, layout) for t in data["turns"]], layout)


def turn_media(turns: list[MicroTurn]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dMel codes [n, 80] | None, patches [n, 3, 40, 40] | None) of `turns`, in sequence
    order: the data behind the audio and patch placeholders."""
    audio = [t.audio for t in turns if t.audio is not None]
    patches = [f for t in turns for f in t.frames]
    return (torch.cat(audio) if audio else None, torch.cat(patches) if patches else None)


def _turn_export(turn: MicroTurn) -> dict:
    data = {"index": turn.index, "input_ids": list(turn.input_ids),
            "output_ids": list(turn.output_ids)}
    if turn.result_ids:
        data["result_ids"] = list(turn.result_ids)
    if turn.audio is not None:  # raw bytes, base64: 1.3 kB a slice instead of 4 kB of JSON
        data["audio"] = base64.b64encode(turn.audio.numpy().tobytes()).decode()
    if turn.frames:
        data["frames"] = [base64.b64encode(f.numpy().tobytes()).decode() for f in turn.frames]
    return data


def _turn_import(data: dict, layout: SliceLayout) -> MicroTurn:
    turn = MicroTurn(data["index"], list(data["input_ids"]), list(data["output_ids"]),
                     result_ids=list(data.get("result_ids", ())))
    if "audio" in data:
        turn.audio = _tensor(data["audio"]).view(layout.audio_shape)
    if "frames" in data:
        turn.frames = [_tensor(f).view(layout.frame_shape) for f in data["frames"]]
    return turn


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
