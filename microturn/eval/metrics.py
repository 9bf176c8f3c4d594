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


def score(scenario: Scenario, outputs: list[str]) -> Verdict:
    if len(outputs) != scenario.slices:
        raise ValueError(f"{scenario.id}: {len(outputs)} output slices for {scenario.slices}")
    return SCORERS[scenario.family](scenario, outputs)


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
    right = says(" ".join(out[sc.expect.turn_end:]), sc.expect.answer)
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
              "latency_ms": latency}
    if sc.expect.answer:
        values["correct"] = says(" ".join(out[sc.expect.turn_end:]), sc.expect.answer)
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
    return Rate(p, max(0.0, centre - half), min(1.0, centre + half), n)


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
