"""Target timelines: what an ideal interaction model says in every slice of a scenario.

The scenario gives the timing, a teacher (`teacher.py`) the words. Per family:

- pause, turn_taking, content: silence while the user talks (and through a pause); the reply
  starts `reply_delay` slices after the slice of the user's last word. A content reply must
  name the answer: if the teacher's does not, it becomes "The answer is X." (prepending the
  keyword to a wrong answer would teach the contradiction too), in its spoken form; with
  `checked_answers=False` the teacher's words stay as they are.
- interruption: the model's own speech (scripted, then continued) until the user is first
  heard (the onset's slice in a voice session, else the slice the first word reaches the lane;
  the next word's, on a text lane, where the first could be a backchannel alone: "Right,
  but ..."), silence from that slice, the reply after the user's turn.
- backchannel: the monologue goes on through the "mm-hm" (then the teacher's continuation of
  it, or another of the model's monologues if the teacher says too little).
- background: arithmetic goes to the calculator. An acknowledgement in the slice of the
  question's last word, then `<ask> the question </ask>`; the result lands `result_delay`
  slices after the ask (the scenario's, or 0-2 for a content question) and the model says
  it, copying it, at once, or when the user has finished talking if they talk on. A question
  the model knows is answered as in `content`. Asks and answers are cut into slices by
  tokens, not words (a number like 110,791 is 8 tokens), and kept as exact ids.
- time and cue families: silence, an optional acknowledgement in the slice after the
  instruction (never a keyword), and the keyword exactly in each event's slice, spelt as the
  user said it (the same tokens: a small model copies tokens far better than it re-cases a
  word it has never seen).

Speech is cut into slices of 1-3 words that fit the per-slice token budget with room for
<end_of_slice>; a word never straddles two slices (the metrics read words per slice).
Scripted slices (speech the eval replays as the model's earlier output) are kept as they are
and marked, so the loss can leave them out: the model should learn to go on talking, not to
start talking out of nothing.

Only the train split may become training data: `build_target` refuses any other.
"""

import re
import zlib
from dataclasses import dataclass

import numpy as np

from microturn.background.tools import CALCULATOR
from microturn.checkpoint.tokenizer import Tokenizer
from microturn.errors import MicroturnError
from microturn.eval.generator import ACK_SLICES
from microturn.eval.metrics import BACKCHANNEL_WINDOW_SLICES, says, takes_turn, words_of
from microturn.eval.micro_turn import SlicedMedia, script_ids
from microturn.eval.phrasebook import BOOKS
from microturn.eval.scenario import Scenario, TimedEvent
from microturn.sequence.markers import MarkerTokens
from microturn.sequence.media_specs import FrameSpec
from microturn.sequence.segments import ASK_CLOSE, ASK_OPEN, result_segment
from microturn.sequence.timeline import MicroTurn, SliceLayout, Timeline
from microturn.train.teacher import Teacher

TIMED_FAMILIES = ("time", "cue_text", "cue_audio", "cue_visual")
DIALOGUE_FAMILIES = ("pause", "turn_taking", "content")
ANY_SPEECH = "Now."  # what to say at an event that accepts any speech
MORE_PROMPT = "Tell me more about this: {}"  # the teacher's prompt to go on with a monologue


@dataclass(frozen=True)
class TargetConfig:
    max_output_tokens: int = 4  # per slice: the eval's budget
    reply_delay: int = 0  # slices between the user's last word's slice and the reply
    max_reply_words: int = 30
    ack: str = "Okay."  # "" for none
    checked_answers: bool = True  # a content reply lacking the answer becomes "The answer is X."
    clock: bool = False  # the timelines carry the quiet clock (`SliceLayout.clock`)
    clock_both_lanes: bool = False  # ... restarted by the model's speech too (no timed ack)
    delegate: bool = True  # arithmetic in content questions goes to the calculator too

    def __post_init__(self):
        if not 2 <= self.max_output_tokens <= 256:
            raise MicroturnError(f"max_output_tokens must be in [2, 256], "
                                 f"got {self.max_output_tokens}")
        if not 0 <= self.reply_delay <= 5:
            raise MicroturnError(f"reply_delay must be in [0, 5] slices, got {self.reply_delay}")
        if self.max_reply_words < 4:
            raise MicroturnError(f"max_reply_words must be >= 4 (a reply takes the turn with "
                                 f"more than 3 words), got {self.max_reply_words}")


@dataclass(frozen=True)
class Target:
    scenario: Scenario
    outputs: tuple[str, ...]  # the ideal output text of every slice ("" is silence)
    scripted: tuple[bool, ...]  # replayed earlier speech: fed, not learned
    moments: tuple[int, ...] = ()  # slices where the behaviour is decided (a loss may weigh them)
    exact: tuple[tuple[int, ...] | None, ...] = ()  # per slice: output ids to use as they are
    results: tuple[str, ...] = ()  # per slice: a background result that lands in it ("" none)


class _Chunker:
    """Cuts words into slices: 1 to `most` words, within the token budget."""

    def __init__(self, tokenizer: Tokenizer, budget: int, rng: np.random.Generator):
        self.tokenizer, self.budget, self.rng = tokenizer, budget, rng

    def fits(self, text: str) -> bool:
        n = len(self.tokenizer.encode(" " + text))
        return n < self.budget or (n == self.budget and " " not in text)

    def token_slices(self, text: str) -> list[tuple[int, ...]]:
        """`text` cut into slices of exactly `budget` tokens (the last one shorter)."""
        ids = self.tokenizer.encode(" " + text.strip())
        return [tuple(ids[i:i + self.budget]) for i in range(0, len(ids), self.budget)]

    def chunks(self, words: list[str], most: int) -> list[str]:
        out, words = [], list(words)
        while words:
            take = int(self.rng.integers(1, most + 1))
            while take > 1 and not self.fits(" ".join(words[:take])):
                take -= 1
            if not self.fits(words[0]):
                break  # a word longer than a slice's budget: end the speech before it
            out.append(" ".join(words[:take]))
            words = words[take:]
        return out


def build_target(scenario: Scenario, teacher: Teacher, tokenizer: Tokenizer,
                 config: TargetConfig | None = None) -> Target:
    if scenario.split != "train":
        raise MicroturnError(f"scenario {scenario.id}: training targets come from the train "
                             f"split only, not {scenario.split!r}")
    config = config or TargetConfig()
    rng = np.random.default_rng(zlib.crc32(scenario.id.encode()))
    chunker = _Chunker(tokenizer, config.max_output_tokens, rng)
    spoken = scenario.spoken_slices()
    out = [s if s is not None else "" for s in spoken]
    scripted = [s is not None for s in spoken]
    e, family = scenario.expect, scenario.family
    moments: tuple[int, ...] = ()
    exact: list[tuple[int, ...] | None] = [None] * len(out)
    results = [""] * len(out)
    question = " ".join(w.text for w in scenario.words)
    tool = CALCULATOR if CALCULATOR.takes(question) else None
    if family == "background" and e.delegation.should:
        question = " ".join(w.text for w in scenario.words
                            if (w.end_ms - 1) // scenario.slice_ms <= e.delegation.question_end)
        moments = _delegate(out, exact, results, e.delegation.question_end, e.turn_end, e.hold,
                            e.delegation.result_delay, question, chunker, rng)
    elif family == "content" and config.delegate and tool is not None:
        moments = _delegate(out, exact, results, e.turn_end, e.turn_end, None,
                            int(rng.integers(0, 3)), question, chunker, rng)
    elif family == "background":
        moments = (e.turn_end + config.reply_delay,)
        _reply(out, e.turn_end + config.reply_delay, scenario, teacher, chunker, config)
    elif family in TIMED_FAMILIES:
        start = e.quiet_from - ACK_SLICES  # the slice of the instruction's last word
        on_clock = config.clock and family == "time"
        both = on_clock and config.clock_both_lanes
        # an ack would restart a both-lanes clock a slice after the user's last word: the
        # wait's reading would then fall a slice or two late, so that clock's requests go
        # unacknowledged
        if config.ack and start >= 0 and not both and not any(
                says(config.ack, ev.keywords) for ev in e.events if ev.keywords):
            out[start + 1] = config.ack
        at = []
        for event in e.events:  # in order: on a both-lanes clock each word restarts it
            ticks = _clock_ticks(scenario, out if both else None) if on_clock else set()
            at.append(_on_the_clock(event, ticks) if on_clock else event.slice)
            out[at[-1]] = _keyword_speech(event.keywords, chunker)
        ticks = _clock_ticks(scenario, out if both else None) if on_clock else set()
        # with the clock, every tick after the instruction is a decision too: say it now, or
        # not yet (the model's typical slip is the right word at a neighbouring tick)
        moments = tuple(sorted(set(at) | {k for k in ticks if k > start}))
    elif family in DIALOGUE_FAMILIES:
        moments = (e.turn_end + config.reply_delay,)
        _reply(out, e.turn_end + config.reply_delay, scenario, teacher, chunker, config)
    elif family == "interruption":
        stop = yield_slice(scenario)
        _go_on(out, scripted, stop, scenario, teacher, chunker)
        start = max(e.turn_end + config.reply_delay, stop + 1)
        moments = (stop, start)
        _reply(out, start, scenario, teacher, chunker, config)
    elif family == "backchannel":
        # the slip is stopping anywhere in the window the metric watches, not only at its start
        moments = tuple(range(e.keep_talking, e.keep_talking + BACKCHANNEL_WINDOW_SLICES))
        _go_on(out, scripted, scenario.slices, scenario, teacher, chunker)
    else:
        raise MicroturnError(f"scenario {scenario.id}: no target rule for family {family!r}")
    return Target(scenario, tuple(out), tuple(scripted),
                  tuple(m for m in moments if 0 <= m < len(out)), tuple(exact), tuple(results))


ACKS = ("One moment.", "Let me check.", "Let me work that out.", "Hold on.", "Just a second.",
        "Sure, one moment.")


def yield_slice(sc: Scenario) -> int:
    """Where the model stops for an interruption: where the user is first heard, unless (on a
    text lane) the first word could be a backchannel on its own ("Right, but ..."): then where
    the next word arrives, since yielding to every "right" is failing the backchannels."""
    if sc.voice or len(sc.words) < 2:
        return sc.expect.stop_onset
    backchannel_words = {w for b in BOOKS[sc.split].backchannels for w in words_of(b)}
    first = words_of(sc.words[0].text)
    if first and first[0] in backchannel_words:
        return max(sc.expect.stop_onset, (sc.words[1].end_ms - 1) // sc.slice_ms)
    return sc.expect.stop_onset


def _delegate(out: list[str], exact: list, results: list[str], question_end: int,
              turn_end: int, hold: tuple[int, int] | None, delay: int, question: str,
              chunker: _Chunker, rng: np.random.Generator) -> tuple[int, ...]:
    """Acknowledge, ask, wait, say the result: the background family's target, in place."""
    tokenizer = chunker.tokenizer
    ack = chunker.chunks(ACKS[int(rng.integers(len(ACKS)))].split(), 3)
    out[question_end:question_end + len(ack)] = ack
    ask = chunker.token_slices(f"{ASK_OPEN} {question} {ASK_CLOSE}")
    start = question_end + len(ack)
    for k, ids in enumerate(ask, start):
        out[k], exact[k] = tokenizer.decode(list(ids)), ids
    closed = start + len(ask) - 1
    landing = closed + 1 + delay
    answer = CALCULATOR.run(question)
    results[landing] = answer
    say_at = max(landing, turn_end) if hold is not None else landing
    for k, ids in enumerate(chunker.token_slices(answer), say_at):
        if k < len(out):
            out[k], exact[k] = tokenizer.decode(list(ids)), ids
    # every slice the result waits for the user is a decision too: not yet, they are talking
    return (question_end, start, closed, landing, say_at) + tuple(range(landing + 1, say_at))


def _clock_ticks(sc: Scenario, outputs: list[str] | None = None) -> set[int]:
    """The slices where the quiet clock tells a whole second: of the text lane's quiet, or
    with `outputs` (what the model says in each slice) of both lanes' (`Timeline.append`)."""
    layout, quiet, ticks = SliceLayout(sc.slice_ms, clock=True), 0, set()
    for k, text in enumerate(sc.text_slices()):
        if outputs is not None and k > 0 and outputs[k - 1]:
            quiet = 0
        quiet = 0 if text else quiet + 1
        if layout.clock_seconds(quiet) is not None:
            ticks.add(k)
    return ticks


def _on_the_clock(event: TimedEvent, ticks: set[int]) -> int:
    """The slice within the event's tolerance where the quiet clock ticks (nearest first),
    so that a timed word is said when the clock reads it, not a slice before; the event's own
    slice where no tick falls in the window."""
    window = range(event.slice - event.early, event.slice + event.late + 1)
    return min((k for k in window if k in ticks), key=lambda k: abs(k - event.slice),
               default=event.slice)


def _keyword_speech(keywords: tuple[str, ...], chunker: _Chunker) -> str:
    if not keywords:
        return ANY_SPEECH
    word = keywords[-1]  # the spoken form ("seven", not "7") where there are two
    said = f"{word}."  # as the user wrote it: the same tokens, so saying it is copying them
    return said if chunker.fits(said) else word


def _reply(out: list[str], start: int, sc: Scenario, teacher: Teacher, chunker: _Chunker,
           config: TargetConfig) -> None:
    """The teacher's answer to everything the user said, from slice `start` on."""
    prompt = " ".join(w.text for w in sc.words)
    room = len(out) - start
    chunks = chunker.chunks(_clean(teacher(prompt), config.max_reply_words), 3)[:room]
    answer = sc.expect.answer
    if config.checked_answers and answer and not says(" ".join(chunks), answer):
        chunks = chunker.chunks(f"The answer is {answer[-1]}.".split(), 3)[:room]
    if not takes_turn(chunks, sc.slice_ms):  # too short to count as a reply
        chunks = chunker.chunks(" ".join(chunks + ["Is there anything else?"]).split(), 3)
        chunks = chunks[:room]
    out[start:start + len(chunks)] = chunks


def _go_on(out: list[str], scripted: list[bool], until: int, sc: Scenario, teacher: Teacher,
           chunker: _Chunker) -> None:
    """The model keeps talking in the unscripted slices before `until`: the rest of its
    monologue, then the teacher's continuation of it."""
    said = " ".join(t for t, s in zip(out, scripted, strict=True) if s).split()
    monologue = next((m for m in BOOKS["train"].monologues if m.split()[:len(said)] == said),
                     " ".join(said))
    words = monologue.split()[len(said):] + _clean(teacher(MORE_PROMPT.format(monologue)), 60)
    slots = sum(not s for s in scripted[:until])
    book = BOOKS["train"].monologues
    for other in book[1 + book.index(monologue) if monologue in book else 0:] + book:
        if len(words) >= 2 * slots:
            break
        words += other.split()  # a curt teacher: go on with another of the model's topics
    chunks = iter(chunker.chunks(words, 2))
    for k in range(min(until, len(out))):
        if not scripted[k]:
            out[k] = next(chunks, "")


def _clean(text: str, most: int) -> list[str]:
    """The reply as plain spoken words: no markdown, at most `most` words, cut after the last
    sentence that fits when there is one."""
    words = [w for w in re.sub(r"[*#`_>|]", " ", text).split() if words_of(w)][:most]
    ends = [i for i, w in enumerate(words) if w[-1] in ".!?"]
    return words[:ends[-1] + 1] if ends and ends[-1] >= 3 else words


def target_output_ids(target: Target, tokenizer: Tokenizer, markers: MarkerTokens,
                      budget: int) -> list[list[int]]:
    """Each slice's output ids as the engine would record them (`script_ids`; exact ids
    closed by <end_of_slice> when they leave room)."""
    out = []
    for k, text in enumerate(target.outputs):
        ids = target.exact[k] if target.exact else None
        if ids is None:
            out.append(script_ids(text, tokenizer, markers, budget))
        else:
            out.append(list(ids) + ([markers.end_of_slice] if len(ids) < budget else []))
    return out


def target_export(target: Target, tokenizer: Tokenizer, markers: MarkerTokens, budget: int,
                  frame_spec: FrameSpec | None = None, clock: bool = False,
                  clock_both_lanes: bool = False) -> dict:
    """The target as an engine export (`Engine.close`'s format: markers, turns, layout),
    plus `scripted`: the indices of the turns whose output is replayed, not learned, and
    `moments`: the turns where the behaviour is decided."""
    sc, frame_spec = target.scenario, frame_spec or FrameSpec()
    layout = SliceLayout(sc.slice_ms, sc.has_audio, frame_spec if sc.has_video else None, clock,
                         clock_both_lanes)
    media = SlicedMedia(sc, frame_spec)
    outputs = target_output_ids(target, tokenizer, markers, budget)
    results = target.results or ("",) * len(outputs)
    turns = [MicroTurn(k, tokenizer.encode(" " + text) if text else [], outputs[k],
                       media.audio(k), media.frames.get(k, []),
                       result_ids=result_segment(tokenizer, results[k]) if results[k] else [])
             for k, text in enumerate(sc.text_slices())]
    export = Timeline(markers, turns, layout).export()
    export["scripted"] = [k for k, s in enumerate(target.scripted) if s]
    export["moments"] = list(target.moments)
    export["scenario"] = sc.id
    return export
