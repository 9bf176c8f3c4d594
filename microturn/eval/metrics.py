"""Every metric is a plain function of (scenario, what a system said per slice).

Take-over (Full-Duplex-Bench v1's rule, on the output lane): a stretch of the model's output
takes the turn when it holds more than 3 words or its speech spans at least 1 s (from the first
slice with words to the end of the last). Output slice k is heard from (k + 1) * slice_ms, the
close of input slice k. `docs/EVAL.md` defines each family's verdict.
"""

import math
import re
import statistics
from dataclasses import dataclass, field

from microturn.eval.scenario import Scenario, TimedEvent
from microturn.sequence.segments import AskReader

TAKEOVER_WORDS = 3  # more words than this take the turn
TAKEOVER_MS = 1000  # or speech spanning at least this long
STOP_WINDOW_SLICES = 5  # an interruption must be yielded to within this many slices (1 s)
BACKCHANNEL_WINDOW_SLICES = 5  # after "mm-hm" the model must keep talking over this window

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_speech(text: str) -> bool:
    return bool(words_of(text))


def says(text: str, keywords: tuple[str, ...]) -> bool:
    """One of `keywords` appears as whole words (any keyword of () counts any speech)."""
    said = " " + " ".join(words_of(text)) + " "
    if not keywords:
        return said.strip() != ""
    return any(f" {' '.join(words_of(k))} " in said for k in keywords)


def says_across(outputs: list[str], keywords: tuple[str, ...]) -> bool:
    """`says` over several slices: a word may be split between two (a number is several
    tokens), so the slices are read both as they join and with a space between them."""
    return says("".join(outputs), keywords) or says(" ".join(outputs), keywords)


def takes_turn(outputs: list[str], slice_ms: int) -> bool:
    spoken = [k for k, text in enumerate(outputs) if is_speech(text)]
    if not spoken:
        return False
    n_words = sum(len(words_of(outputs[k])) for k in spoken)
    span = (spoken[-1] - spoken[0] + 1) * slice_ms
    return n_words > TAKEOVER_WORDS or span >= TAKEOVER_MS


def first_speech(outputs: list[str], start: int, end: int | None = None) -> int | None:
    end = len(outputs) if end is None else end
    return next((k for k in range(start, min(end, len(outputs))) if is_speech(outputs[k])),
                None)


@dataclass
class Verdict:
    """One scenario's score: `passed` for the family's headline, `values` for the rest."""
    scenario_id: str
    family: str
    passed: bool
    values: dict[str, float | bool | None] = field(default_factory=dict)
    reason: str = ""


def split_asks(outputs: list[str]) -> tuple[list[str], list[tuple[int, str]]]:
    """(the speech of every output slice, (slice it closed in, query) of every ask): asks
    are not speech, and every metric reads speech."""
    reader, speech, asks = AskReader(), [], []
    for k, text in enumerate(outputs):
        said, queries = reader.push(text)
        speech.append(said)
        asks += [(k, q) for q in queries]
    return speech, asks


def score(scenario: Scenario, outputs: list[str]) -> Verdict:
    if len(outputs) != scenario.slices:
        raise ValueError(f"{scenario.id}: {len(outputs)} output slices for {scenario.slices}")
    speech, asks = split_asks(outputs)
    if scenario.family == "background":
        return _background(scenario, speech, asks)
    return SCORERS[scenario.family](scenario, speech)


def _pause(sc: Scenario, out: list[str]) -> Verdict:
    start, end = sc.expect.hold
    took = takes_turn(out[start:end], sc.slice_ms)
    return Verdict(sc.id, sc.family, not took, {"tor": took},
                   "took the turn in the pause" if took else "waited through the pause")


def _reply(sc: Scenario, out: list[str]) -> tuple[bool, float | None]:
    """Did the model take the turn after the user's last word; its latency in ms."""
    end = sc.expect.turn_end
    took = takes_turn(out[end:], sc.slice_ms)
    first = first_speech(out, end)
    if not took or first is None:
        return False, None
    last_word_end = max(w.end_ms for w in sc.words)
    return True, float(max(0, sc.slice_end_ms(first) - last_word_end))


def _turn_taking(sc: Scenario, out: list[str]) -> Verdict:
    took, latency = _reply(sc, out)
    return Verdict(sc.id, sc.family, took, {"tor": took, "latency_ms": latency},
                   f"replied after {latency:.0f} ms" if took else "no reply")


def _content(sc: Scenario, out: list[str]) -> Verdict:
    took, latency = _reply(sc, out)
    right = says_across(out[sc.expect.turn_end:], sc.expect.answer)
    return Verdict(sc.id, sc.family, right, {"correct": right, "tor": took,
                                             "latency_ms": latency},
                   f"{'said' if right else 'did not say'} {sc.expect.answer[0]!r}")


def _interruption(sc: Scenario, out: list[str]) -> Verdict:
    onset = sc.expect.stop_onset
    stop = next((k for k in range(onset, min(onset + STOP_WINDOW_SLICES, sc.slices))
                 if not is_speech(out[k])), None)
    onset_ms = next(w.start_ms for w in sc.words if (w.end_ms - 1) // sc.slice_ms >= onset)
    stop_ms = None if stop is None else float(sc.slice_end_ms(stop) - onset_ms)
    took, latency = _reply(sc, out)
    tor = stop is not None and took
    values = {"tor": tor, "stopped": stop is not None, "stop_latency_ms": stop_ms,
              "latency_ms": latency, "voice": bool(sc.voice)}
    if sc.expect.answer:
        values["correct"] = says_across(out[sc.expect.turn_end:], sc.expect.answer)
    reason = ("kept talking over the user" if stop is None else
              f"stopped after {stop_ms:.0f} ms, " + ("then replied" if took else "no reply"))
    return Verdict(sc.id, sc.family, tor, values, reason)


def _backchannel(sc: Scenario, out: list[str]) -> Verdict:
    at = sc.expect.keep_talking
    kept = takes_turn(out[at:at + BACKCHANNEL_WINDOW_SLICES], sc.slice_ms)
    return Verdict(sc.id, sc.family, kept, {"tor": not kept},
                   "kept talking" if kept else "stopped at the backchannel")


def _timed(sc: Scenario, out: list[str]) -> Verdict:
    """TimeSpeak / CueSpeak: each event's words inside its window, no stray speech between."""
    events, quiet = sc.expect.events, sc.expect.quiet_from
    hits, reasons, latencies = [], [], []
    for event in events:
        lo, hi = _window(event, sc.slices)
        hit = next((k for k in range(lo, hi + 1) if says(out[k], event.keywords)), None)
        hits.append(hit is not None)
        if hit is None:
            reasons.append(f"nothing right in slices {lo}-{hi}")
        else:
            latencies.append(float((hit - event.slice) * sc.slice_ms))
    allowed = {k for e in events for k in range(_window(e, sc.slices)[0],
                                               _window(e, sc.slices)[1] + 1)}
    stray = [k for k in range(quiet, sc.slices) if k not in allowed and is_speech(out[k])]
    if events:  # after the last window the task is over; with none (a catch trial) it never is
        stray = [k for k in stray if k < _window(events[-1], sc.slices)[1]]
    echo = [k for k in range(quiet) if any(says(out[k], e.keywords) for e in events
                                            if e.keywords)]
    if stray:
        reasons.append(f"spoke at slice {stray[0]}, outside every window")
    if echo:
        reasons.append(f"said the word early, at slice {echo[0]}")
    passed = all(hits) and not stray and not echo
    offset = statistics.median(latencies) if latencies else None
    return Verdict(sc.id, sc.family, passed, {"accuracy": passed, "offset_ms": offset},
                   "; ".join(reasons) or "right words at the right time")


def _window(event: TimedEvent, slices: int) -> tuple[int, int]:
    return max(0, event.slice - event.early), min(slices - 1, event.slice + event.late)


def _background(sc: Scenario, out: list[str], asks: list[tuple[int, str]]) -> Verdict:
    """Delegated when (and only when) it should have been; acknowledged at once; the answer
    said after it landed, correctly, never over the user."""
    d, e = sc.expect.delegation, sc.expect
    delegated = bool(asks)
    values: dict = {"should": d.should, "delegated": delegated,
                    "recall": delegated if d.should else None,
                    "precision": d.should if delegated else None,
                    "ack_ms": None, "delivery_ms": None, "barged": None}
    if not d.should:
        right = says_across(out[d.question_end:], e.answer)
        values["correct"] = right
        passed = right and not delegated
        reason = ("asked for help it did not need" if delegated else
                  f"{'said' if right else 'did not say'} {e.answer[0]!r} itself")
        return Verdict(sc.id, sc.family, passed, values, reason)
    last_question_word = max(w.end_ms for w in sc.words
                             if (w.end_ms - 1) // sc.slice_ms <= d.question_end)
    first = first_speech(out, d.question_end)
    if first is not None and (not asks or first <= asks[0][0] + 1 + d.result_delay):
        values["ack_ms"] = float(max(0, sc.slice_end_ms(first) - last_question_word))
    if e.hold is not None:
        values["barged"] = any(is_speech(out[k]) for k in range(*e.hold))
    right, landed = False, None
    if asks:
        landed = asks[0][0] + 1 + d.result_delay
        done = next((k for k in range(landed, sc.slices)
                     if says_across(out[landed:k + 1], e.answer)), None)
        right = done is not None
        if right:
            values["delivery_ms"] = float((done - landed + 1) * sc.slice_ms)
    values["correct"] = right
    passed = delegated and right and not values["barged"]
    reason = ("never asked the background" if not delegated else
              "talked over the user" if values["barged"] else
              f"said {e.answer[0]}" if right else f"did not say {e.answer[0]} once it landed")
    return Verdict(sc.id, sc.family, passed, values, reason)


SCORERS = {"pause": _pause, "turn_taking": _turn_taking, "content": _content,
           "interruption": _interruption, "backchannel": _backchannel, "time": _timed,
           "cue_text": _timed, "cue_audio": _timed, "cue_visual": _timed}


# -- aggregation -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    value: float
    low: float  # 95 % Wilson interval
    high: float
    n: int


def wilson(successes: int, n: int, z: float = 1.96) -> Rate:
    if n == 0:
        return Rate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval holds p exactly; min/max keep a rounding (21 of 21: 0.9999999999999999) out
    return Rate(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n)


def rate(verdicts: list[Verdict], key: str) -> Rate:
    values = [bool(v.values[key]) for v in verdicts if v.values.get(key) is not None]
    return wilson(sum(values), len(values))


def median_ms(verdicts: list[Verdict], key: str, missing_as_inf: bool = False) -> float | None:
    """Median over the scenarios that have the value (or all, a missing one counting as
    never: an interruption never yielded to has an infinite stop latency)."""
    values = [v.values.get(key) for v in verdicts]
    values = [math.inf if x is None else x for x in values] if missing_as_inf else \
        [x for x in values if x is not None]
    return statistics.median(values) if values else None
