"""Scenarios from a seed: `generate(split, seed, per_family)` gives the same set every time.

Each family draws its template, words, durations and timings from its own generator, keyed by
(split, seed, family, index): adding a family or scenarios changes no other scenario. The
training split and the held-out split draw from disjoint phrasebooks (`phrasebook.py`).

The user speaks at a rate drawn per scenario (about 120-200 words a minute); a word lasts
`100 + rate * letters` ms with a short gap after it. Everything numeric (durations, delays,
counts, tone pitch and level, colours) is drawn from a range.
"""

import math
from collections.abc import Callable

import numpy as np

from microturn.errors import MicroturnError
from microturn.eval.phrasebook import BOOKS, Book, number_forms
from microturn.eval.scenario import (
    Delegation,
    Expectation,
    Scenario,
    Screen,
    Sound,
    TimedEvent,
    Word,
)

SPLIT_KEYS = {"train": 1, "heldout": 2}
ACK_SLICES = 3  # after an instruction, a short acknowledgement is allowed for this many slices
CUE_LATE = 2  # a cue may be answered up to this many slices after the slice it arrived in
TIME_TOLERANCE = 1  # a timed word may come this many slices early or late
REPLY_SLICES = 15  # slices of silence left after a request for the reply (3 s at 200 ms)


class Speaker:
    """Lays out the user's words on the clock."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.ms_per_letter = float(rng.uniform(40, 68))
        self.gap = (15, 90)

    def say(self, text: str, at_ms: int) -> tuple[list[Word], int]:
        words, t = [], at_ms
        for token in text.split():
            letters = sum(c.isalnum() for c in token)
            length = int(100 + self.ms_per_letter * letters)
            words.append(Word(token, t, t + length))
            t += length + int(self.rng.integers(*self.gap))
        return words, words[-1].end_ms if words else at_ms


def _slice_of(ms: int, slice_ms: int) -> int:
    """The slice in which something that ends at `ms` reaches the lane."""
    return max(0, (ms - 1) // slice_ms)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _spoken_chunks(text: str, slices: int, rng: np.random.Generator) -> list[str]:
    """The model's scripted speech, one or two words a slice (about speaking pace)."""
    words, out = text.split(), []
    while words and len(out) < slices:
        take = int(rng.integers(1, 3))
        out.append(" ".join(words[:take]))
        words = words[take:]
    return out


# -- families ----------------------------------------------------------------------------------

def pause(rng, book: Book, slice_ms: int) -> dict:
    speaker = Speaker(rng)
    opener = f"{_pick(rng, book.openers)} {_pick(rng, book.fillers)},"
    first, cut = speaker.say(opener, int(rng.integers(200, 800)))
    gap = int(rng.integers(300, 1501))
    rest, end = speaker.say(_pick(rng, book.topics) + ".", cut + gap)
    turn_end = _slice_of(end, slice_ms)
    return dict(words=first + rest, slices=turn_end + REPLY_SLICES,
                expect=Expectation(turn_end=turn_end,
                                   hold=(_slice_of(cut, slice_ms),
                                         _slice_of(rest[0].end_ms, slice_ms))),
                note=f"{gap} ms pause inside an unfinished sentence")


def turn_taking(rng, book: Book, slice_ms: int) -> dict:
    words, end = Speaker(rng).say(_pick(rng, book.requests), int(rng.integers(200, 1000)))
    turn_end = _slice_of(end, slice_ms)
    return dict(words=words, slices=turn_end + REPLY_SLICES,
                expect=Expectation(turn_end=turn_end, hold=(0, turn_end)),
                note="a complete request, then silence")


def content(rng, book: Book, slice_ms: int) -> dict:
    question, answer = _question(rng, book)
    words, end = Speaker(rng).say(question, int(rng.integers(200, 1000)))
    turn_end = _slice_of(end, slice_ms)
    return dict(words=words, slices=turn_end + REPLY_SLICES,
                expect=Expectation(turn_end=turn_end, hold=(0, turn_end), answer=answer),
                note=f"answer: {answer[0]}")


def _question(rng, book: Book) -> tuple[str, tuple[str, ...]]:
    kind = int(rng.integers(4))
    if kind == 0:
        country, city = _pick(rng, book.capitals)
        return _pick(rng, book.capital_questions).format(country=country), (city,)
    if kind == 1:
        a, b = int(rng.integers(1, 13)), int(rng.integers(1, 13))
        return _pick(rng, book.sum_questions).format(a=a, b=b), number_forms(a + b)
    if kind == 2:
        thing, colour = _pick(rng, book.thing_colours)
        return _pick(rng, book.colour_questions).format(thing=thing), (colour,)
    question, answer = _pick(rng, book.yes_no)
    return question, (answer,)


def interruption(rng, book: Book, slice_ms: int) -> dict:
    speaker = Speaker(rng)
    onset_ms = int(rng.integers(1500, 3500))
    onset = onset_ms // slice_ms  # the slice whose audio carries the first word's onset
    text = _pick(rng, book.interruptions)
    answer: tuple[str, ...] = ()
    if rng.random() < 0.5:  # the interruption carries a question whose answer is checkable
        question, answer = _question(rng, book)
        text = f"{text} {question}"
    words, end = speaker.say(text, onset_ms)
    voiced = rng.random() < 0.5  # a voice session: the audio carries the first word's onset
    stop_at = onset if voiced else _slice_of(words[0].end_ms, slice_ms)  # heard here first
    turn_end = _slice_of(end, slice_ms)
    spoken = [""] + _spoken_chunks(_pick(rng, book.monologues), stop_at - 1, rng)
    media = {}
    if voiced:
        media = dict(voice=_pick(rng, book.voices), voice_level=float(rng.uniform(0.3, 0.8)),
                     noise_level=float(rng.uniform(0.002, 0.02)),
                     audio_seed=int(rng.integers(2**31)))
    return dict(words=words, slices=turn_end + REPLY_SLICES, spoken=tuple(spoken), **media,
                expect=Expectation(turn_end=turn_end, stop_onset=stop_at, answer=answer),
                note="the user talks over the model" + (f" ({media['voice']})" if voiced else ""))


def backchannel(rng, book: Book, slice_ms: int) -> dict:
    at_ms = int(rng.integers(1500, 3500))
    words, end = Speaker(rng).say(_pick(rng, book.backchannels), at_ms)
    at = _slice_of(end, slice_ms)
    spoken = [""] + _spoken_chunks(_pick(rng, book.monologues), at - 1, rng)
    return dict(words=words, slices=at + 8, spoken=tuple(spoken),
                expect=Expectation(keep_talking=at), note=f"backchannel {words[0].text!r}")


def time(rng, book: Book, slice_ms: int) -> dict:
    speaker = Speaker(rng)
    kind = rng.random()
    if kind < book.counting_share:
        n, m = int(rng.integers(1, 4)), int(rng.integers(3, 6))
        text = _pick(rng, book.counting).format(n=_number(rng, n), m=_number(rng, m))
        steps = [(i * n, number_forms(i)) for i in range(1, m + 1)]
    elif kind < book.counting_share + 0.15:  # "tell me when n seconds are up"
        n = int(rng.integers(*book.wait_s))
        text = _pick(rng, book.when_passed).format(n=_number(rng, n))
        steps = [(n, ())]
    else:
        n, word = int(rng.integers(*book.wait_s)), _pick(rng, book.targets)
        text = _pick(rng, book.timed).format(n=_number(rng, n), word=word)
        steps = [(n, (word,))]
    words, end = speaker.say(text, int(rng.integers(200, 800)))
    events = tuple(TimedEvent(round((end + s * 1000) / slice_ms) - 1, keys, TIME_TOLERANCE,
                              TIME_TOLERANCE) for s, keys in steps)
    start = _slice_of(end, slice_ms)
    return dict(words=words, slices=events[-1].slice + 4,
                expect=Expectation(events=events, quiet_from=start + ACK_SLICES),
                note=f"speak at {', '.join(f'+{s}s' for s, _ in steps)}")


def _number(rng, n: int) -> str:
    return number_forms(n)[int(rng.integers(2))] if n < 20 else str(n)


def cue_text(rng, book: Book, slice_ms: int) -> dict:
    speaker = Speaker(rng)
    cue, word = _pick(rng, book.cue_words), _pick(rng, book.targets)
    text = _pick(rng, book.text_cues).format(cue=cue, word=word)
    words, end = speaker.say(text, int(rng.integers(200, 800)))
    chatter = _pick(rng, book.chatter).split()
    chatter.insert(int(rng.integers(1, len(chatter) + 1)), cue)  # the cue, inside a sentence
    after, _ = speaker.say(" ".join(chatter), end + int(rng.integers(600, 2500)))
    hit = next(w for w in after if w.text == cue)
    at = _slice_of(hit.end_ms, slice_ms)
    start = _slice_of(end, slice_ms)
    return dict(words=words + after, slices=max(at + 6, _slice_of(after[-1].end_ms, slice_ms) + 3),
                expect=Expectation(events=(TimedEvent(at, (word,), 0, CUE_LATE),),
                                   quiet_from=start + ACK_SLICES),
                note=f"cue word {cue!r} at slice {at}")


def cue_audio(rng, book: Book, slice_ms: int) -> dict:
    speaker = Speaker(rng)
    (name, kind), word = _pick(rng, book.sound_names), _pick(rng, book.targets)
    text = _pick(rng, book.audio_cues).format(sound=name, word=word)
    words, end = speaker.say(text, int(rng.integers(200, 800)))
    start_ms = end + int(rng.integers(*book.sound_onset_ms))
    length = {"beep": int(rng.integers(150, 450)), "chime": int(rng.integers(300, 800)),
              "click": int(rng.integers(20, 60))}[kind]
    sound = Sound(kind, start_ms, length, float(rng.uniform(500, 2500)),
                  float(rng.uniform(0.2, 0.7)))
    at = start_ms // slice_ms  # the slice whose audio carries the sound's onset
    start = _slice_of(end, slice_ms)
    return dict(words=words, slices=at + 6, sounds=(sound,),
                noise_level=float(rng.uniform(0.002, 0.02)), audio_seed=int(rng.integers(2**31)),
                expect=Expectation(events=(TimedEvent(at, (word,), 0, CUE_LATE),),
                                   quiet_from=start + ACK_SLICES),
                note=f"{kind} at {start_ms} ms")


def cue_visual(rng, book: Book, slice_ms: int, fps: float = 2.0) -> dict:
    speaker = Speaker(rng)
    word = _pick(rng, book.targets)
    background = tuple(int(v) for v in rng.integers(60, 160, 3))
    if rng.random() < 0.6:
        name, colour = _pick(rng, book.colours)
        text = _pick(rng, book.visual_colour_cues).format(colour=name, word=word)
        change = dict(colour=colour)
    else:
        name = _pick(rng, book.shapes)
        text = _pick(rng, book.visual_shape_cues).format(shape=name, word=word)
        change = dict(shape=name, shape_colour=tuple(int(v) for v in rng.integers(0, 256, 3)))
    words, end = speaker.say(text, int(rng.integers(200, 800)))
    change_ms = end + int(rng.integers(1500, 6001))
    first_frame_ms = math.ceil(change_ms * fps / 1000) * 1000 / fps
    at = int(first_frame_ms // slice_ms)  # the slice that carries the first changed frame
    start = _slice_of(end, slice_ms)
    return dict(words=words, slices=at + 6, audio_seed=int(rng.integers(2**31)),
                screen=Screen(background, change_ms, **change),
                expect=Expectation(events=(TimedEvent(at, (word,), 0, CUE_LATE),),
                                   quiet_from=start + ACK_SLICES),
                note=f"{name} at {change_ms} ms")


def background(rng, book: Book, slice_ms: int) -> dict:
    """Arithmetic no one does in their head (the model should hand it to the background
    worker, say it is on it, and say the answer when it comes back), sometimes with the user
    talking on meanwhile (the answer waits for them); or a question the model knows the
    answer to (it should just answer)."""
    speaker = Speaker(rng)
    if rng.random() < 0.3:
        kind = int(rng.integers(3))
        if kind == 0:
            country, city = _pick(rng, book.capitals)
            question, answer = _pick(rng, book.capital_questions).format(country=country), (city,)
        elif kind == 1:
            thing, colour = _pick(rng, book.thing_colours)
            question, answer = _pick(rng, book.colour_questions).format(thing=thing), (colour,)
        else:
            question, said = _pick(rng, book.yes_no)
            answer = (said,)
        words, end = speaker.say(question, int(rng.integers(200, 1000)))
        q_end = _slice_of(end, slice_ms)
        return dict(words=words, slices=q_end + REPLY_SLICES,
                    expect=Expectation(turn_end=q_end, answer=answer,
                                       delegation=Delegation(False, q_end)),
                    note=f"answer it directly: {answer[0]}")
    (phrase, symbol), template = _pick(rng, book.operations), _pick(rng, book.hard_sums)
    a, b = int(rng.integers(120, 10000)), int(rng.integers(13, 1000))
    value = {"*": a * b, "+": a + b, "-": a - b}[symbol]
    words, end = speaker.say(template.format(a=f"{a:,}", op=phrase, b=f"{b:,}"),
                             int(rng.integers(200, 1000)))
    q_end = turn_end = _slice_of(end, slice_ms)
    delay = int(rng.integers(1, 9))
    hold = None
    if rng.random() < 0.5:  # the user talks on while the answer is being worked out
        aside, end = speaker.say(_pick(rng, book.asides), end + int(rng.integers(1200, 2500)))
        words += aside
        turn_end = _slice_of(end, slice_ms)
        hold = (_slice_of(aside[0].end_ms, slice_ms), turn_end)
    return dict(words=words, slices=max(turn_end, q_end + 8 + delay) + 12,
                expect=Expectation(turn_end=turn_end, hold=hold, answer=(f"{value:,}",),
                                   delegation=Delegation(True, q_end, delay)),
                note=f"delegate {a} {symbol} {b} = {value:,} (back after {delay} slices"
                     + (", user talking)" if hold else ")"))


FAMILIES: dict[str, Callable[..., dict]] = {
    "pause": pause, "turn_taking": turn_taking, "interruption": interruption,
    "backchannel": backchannel, "time": time, "cue_text": cue_text, "cue_audio": cue_audio,
    "cue_visual": cue_visual, "content": content, "background": background,
}


def parse_families(text: str | None) -> list[str]:
    if not text:
        return list(FAMILIES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in FAMILIES]:
        raise MicroturnError(f"families: unknown {', '.join(unknown)}; "
                             f"choose from {', '.join(FAMILIES)}")
    return names


def generate(split: str, seed: int = 0, per_family: int = 10,
             families: list[str] | None = None, slice_ms: int = 200) -> list[Scenario]:
    if split not in BOOKS:
        raise MicroturnError(f"split: {split!r} is not one of {', '.join(BOOKS)}")
    if per_family < 1:
        raise MicroturnError(f"per_family must be >= 1, got {per_family}")
    book, out = BOOKS[split], []
    for name in families or list(FAMILIES):
        family_key = list(FAMILIES).index(name)
        for i in range(per_family):
            rng = np.random.default_rng([SPLIT_KEYS[split], seed, family_key, i])
            fields = FAMILIES[name](rng, book, slice_ms)
            fields["words"] = tuple(fields["words"])
            out.append(Scenario(id=f"{split}-{name}-{seed}-{i}", family=name, split=split,
                                slice_ms=slice_ms, **fields))
    return out
