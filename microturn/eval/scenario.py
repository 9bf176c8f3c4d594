"""A scenario: a scripted input stream on the micro-turn clock, with the behaviour it expects.

Everything is text and timestamps, so any system (the engine in micro-turn mode, a turn-based
harness, another tokenizer) can run it and any metric can score it:

- `words`: what the user says, each word with its start and end (ms from the session start).
  A word reaches the text lane in the slice where it ends, as a live transcript would.
- `spoken`: the model's own earlier speech, replayed as its output of those slices (the
  interruption and backchannel families start with the model talking).
- `sounds` / `screen`: audio and video, described (a tone at a time, a colour from a time)
  and rendered on demand (`render_audio`, `render_frames`), so a scenario stays small JSON.
- `voice`: an espeak-ng voice that speaks the user's words into the audio stream (`voice.py`),
  so a voice session hears a word's onset in its slice, before its text arrives.
- `expect`: slice indices the metrics read (`metrics.py`).

Slice k's output is heard from the close of input slice k, at (k + 1) * slice_ms: the earliest
moment a model can answer what arrived in slice k.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from microturn.eval.voice import add_voice
from microturn.sequence.media_specs import AUDIO_RATE


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class Sound:
    """A tone in the audio stream: a beep (sine), a chime (decaying harmonics) or a click."""
    kind: str  # "beep" | "chime" | "click"
    start_ms: int
    length_ms: int
    hz: float
    level: float  # peak amplitude in [0, 1]


@dataclass(frozen=True)
class Screen:
    """The video: a background, and from `change_ms` on either a new colour or a shape on it."""
    background: tuple[int, int, int]
    change_ms: int | None = None
    colour: tuple[int, int, int] | None = None  # the whole screen turns this colour
    shape: str | None = None  # or a shape appears: circle, square, diamond, cross, triangle
    shape_colour: tuple[int, int, int] = (255, 255, 255)
    noise: int = 6  # per-pixel noise amplitude, so frames are never exactly equal


@dataclass(frozen=True)
class TimedEvent:
    """Something the model must say in output slices [slice - early, slice + late]."""
    slice: int
    keywords: tuple[str, ...] = ()  # any one must be said; () accepts any speech
    early: int = 1
    late: int = 1


@dataclass(frozen=True)
class Delegation:
    """The background family: should the model hand the question to the background worker?
    Where it does, the result lands `result_delay` slices after the slice its ask closed in
    (plus one: the next input slice), as a slow tool's would."""
    should: bool
    question_end: int  # the slice of the question's last word
    result_delay: int = 0


@dataclass(frozen=True)
class Expectation:
    """Slice indices (output lane) that define the right behaviour; None: not part of it."""
    turn_end: int | None = None  # the user's last utterance ends in this slice: reply after it
    hold: tuple[int, int] | None = None  # the model must not take the turn in [from, to)
    stop_onset: int | None = None  # the user starts talking over the model here: stop
    keep_talking: int | None = None  # the user back-channels here: keep talking
    answer: tuple[str, ...] = ()  # the reply to the last utterance must contain one of these
    events: tuple[TimedEvent, ...] = ()  # timed or cued speech (time and cue families)
    quiet_from: int | None = None  # from here, speech outside the events' windows is wrong
    delegation: Delegation | None = None  # the background family


@dataclass(frozen=True)
class Scenario:
    id: str
    family: str
    split: str
    slice_ms: int
    slices: int
    words: tuple[Word, ...]
    expect: Expectation
    spoken: tuple[str, ...] = ()  # the model's scripted output text of slices 0, 1, ...
    sounds: tuple[Sound, ...] = ()
    noise_level: float = 0.0  # background noise of the audio stream (0: no audio stream)
    screen: Screen | None = None
    audio_seed: int = 0
    voice: str = ""  # an espeak-ng voice speaking `words` into the audio ("": none)
    voice_level: float = 0.0  # the voice's peak amplitude
    note: str = ""  # one line for people: what is being tested

    @property
    def has_audio(self) -> bool:
        return self.noise_level > 0 or bool(self.sounds) or bool(self.voice)

    @property
    def result_delay(self) -> int:
        """Slices between an ask and its result landing: the background family's, else 0."""
        return self.expect.delegation.result_delay if self.expect.delegation else 0

    @property
    def has_video(self) -> bool:
        return self.screen is not None

    def text_slices(self) -> list[str]:
        """What the text lane carries in each slice: the words that end in it."""
        lanes = [[] for _ in range(self.slices)]
        for word in self.words:
            k = min(self.slices - 1, max(0, (word.end_ms - 1) // self.slice_ms))
            lanes[k].append(word.text)
        return [" ".join(words) for words in lanes]

    def spoken_slices(self) -> list[str | None]:
        """The scripted output per slice (None where the model speaks for itself)."""
        return [self.spoken[k] if k < len(self.spoken) else None for k in range(self.slices)]

    def slice_end_ms(self, k: int) -> int:
        return (k + 1) * self.slice_ms

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scenario":
        expect = dict(data["expect"])
        expect["events"] = tuple(TimedEvent(**{**e, "keywords": tuple(e["keywords"])})
                                 for e in expect["events"])
        expect["answer"] = tuple(expect["answer"])
        if expect["hold"] is not None:
            expect["hold"] = tuple(expect["hold"])
        if expect.get("delegation") is not None:
            expect["delegation"] = Delegation(**expect["delegation"])
        screen = data.get("screen")
        if screen is not None:
            screen = Screen(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in screen.items()})
        return cls(**{**data, "words": tuple(Word(**w) for w in data["words"]),
                      "expect": Expectation(**expect), "spoken": tuple(data["spoken"]),
                      "sounds": tuple(Sound(**s) for s in data["sounds"]), "screen": screen})


# -- media rendering ---------------------------------------------------------------------------

def render_audio(scenario: Scenario) -> np.ndarray:
    """The scenario's audio stream: 16 kHz mono float32, `slices` slices long."""
    samples = scenario.slices * scenario.slice_ms * AUDIO_RATE // 1000
    rng = np.random.default_rng(scenario.audio_seed)
    out = (rng.standard_normal(samples) * scenario.noise_level).astype(np.float32)
    for sound in scenario.sounds:
        start = sound.start_ms * AUDIO_RATE // 1000
        n = min(sound.length_ms * AUDIO_RATE // 1000, samples - start)
        if n <= 0:
            continue
        t = np.arange(n) / AUDIO_RATE
        if sound.kind == "beep":
            wave = np.sin(2 * np.pi * sound.hz * t)
            ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms edges, no click
            wave *= ramp
        elif sound.kind == "chime":
            wave = sum(np.sin(2 * np.pi * sound.hz * h * t) / h for h in (1, 2, 3))
            wave *= np.exp(-t / (sound.length_ms / 3000))
        else:  # click: a short burst of broadband noise
            wave = rng.standard_normal(n) * np.exp(-t / 0.01)
        out[start:start + n] += (sound.level * wave / np.abs(wave).max()).astype(np.float32)
    if scenario.voice:
        add_voice(out, scenario.words, scenario.voice, scenario.voice_level)
    return np.clip(out, -1.0, 1.0)


def render_frames(scenario: Scenario, fps: float = 2.0, height: int = 120,
                  width: int = 160) -> list[tuple[int, torch.Tensor]]:
    """(time_ms, uint8 [3, height, width]) for every frame of the session at `fps`."""
    screen = scenario.screen
    if screen is None:
        return []
    rng = np.random.default_rng(scenario.audio_seed + 1)
    total_ms = scenario.slices * scenario.slice_ms
    out = []
    for j in range(int(total_ms * fps / 1000)):
        at = round(j * 1000 / fps)
        changed = screen.change_ms is not None and at >= screen.change_ms
        base = screen.colour if changed and screen.colour is not None else screen.background
        image = np.empty((height, width, 3), dtype=np.int16)
        image[:] = base
        if changed and screen.shape is not None:
            _draw_shape(image, screen.shape, screen.shape_colour)
        image += rng.integers(-screen.noise, screen.noise + 1, image.shape, dtype=np.int16)
        frame = torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1)
        out.append((at, frame.contiguous()))
    return out


def _draw_shape(image: np.ndarray, shape: str, colour: tuple[int, int, int]) -> None:
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    cy, cx, r = h / 2, w / 2, h / 4
    if shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (abs(y - cy) <= r) & (abs(x - cx) <= r)
    elif shape == "diamond":
        mask = abs(y - cy) + abs(x - cx) <= r
    elif shape == "cross":
        mask = ((abs(y - cy) <= r / 3) & (abs(x - cx) <= r)) | \
               ((abs(x - cx) <= r / 3) & (abs(y - cy) <= r))
    else:  # triangle, point up
        mask = (y >= cy - r) & (y <= cy + r) & (abs(x - cx) <= (y - (cy - r)) / 2)
    image[mask] = colour


@dataclass
class Transcript:
    """What a system did in one scenario: its output text per slice, and where it came from
    (scripted: replayed, not the system's own)."""
    scenario_id: str
    system: str
    outputs: list[str]
    scripted: list[bool] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # background results landed per slice
