"""Rewards for on-policy training, read off the interactivity benchmark's own metrics.

A rollout (one scenario streamed through the engine) earns a reward per output slice, placed
at the slice whose output decided it, so that credit can go to the tokens that caused it
(`advantage.py`). Two kinds, weights in `RewardWeights`:

- `passed`: the family's verdict from `eval.metrics.score` (the benchmark's headline: TOR,
  TimeSpeak / CueSpeak accuracy, content, delegation), at the last slice. It alone decides
  what "better" means; the terms below only say *where* a rollout went right or wrong.
- local terms, at the slice they concern: a timed or cued word inside its window (earlier in
  the window earns more) or missed; stray speech outside every window or in a pause; the
  reply's start (sooner earns more); stopping after an interruption (sooner earns more) and
  each slice talked over the user first; keeping the turn through a backchannel; asking the
  background worker when (and only when) it should; a content keyword said.

Speech is read as the metrics read it: words, asks taken out (`split_asks`).
"""

from dataclasses import dataclass

from microturn.eval.metrics import (
    BACKCHANNEL_WINDOW_SLICES,
    STOP_WINDOW_SLICES,
    is_speech,
    says,
    says_across,
    score,
    split_asks,
)
from microturn.eval.scenario import Scenario


@dataclass(frozen=True)
class RewardWeights:
    passed: float = 1.0  # the benchmark's verdict
    timing: float = 0.5  # a word in its window, a reply's start, a stop, an ask
    stray: float = 0.25  # each slice of speech where there must be none
    content: float = 0.5  # the answer's keyword said


@dataclass(frozen=True)
class SliceRewards:
    values: tuple[float, ...]  # one per output slice
    passed: bool

    @property
    def total(self) -> float:
        return sum(self.values)


def slice_rewards(scenario: Scenario, outputs: list[str],
                  weights: RewardWeights | None = None) -> SliceRewards:
    w = weights or RewardWeights()
    verdict = score(scenario, outputs)
    speech, asks = split_asks(outputs)
    r = [0.0] * scenario.slices
    REWARDERS[_kind(scenario.family)](scenario, speech, asks, r, w)
    r[-1] += w.passed if verdict.passed else 0.0
    return SliceRewards(tuple(r), verdict.passed)


def _kind(family: str) -> str:
    return "timed" if family in ("time", "cue_text", "cue_audio", "cue_visual") else family


def _decay(late: int, span: int) -> float:
    """1 when on time, falling to 0 at `span` slices late."""
    return max(0.0, 1.0 - late / span)


def _timed(sc: Scenario, out: list[str], asks, r: list[float], w: RewardWeights) -> None:
    windows = []
    for event in sc.expect.events:
        lo, hi = max(0, event.slice - event.early), min(sc.slices - 1, event.slice + event.late)
        windows.append((lo, hi))
        hit = next((k for k in range(lo, hi + 1) if says(out[k], event.keywords)), None)
        if hit is None:
            r[hi] -= w.timing
        else:
            r[hit] += w.timing * _decay(hit - lo, hi - lo + 2)
    allowed = {k for lo, hi in windows for k in range(lo, hi + 1)}
    last = windows[-1][1] if windows else sc.slices
    for k in range(sc.expect.quiet_from or 0, last):
        if k not in allowed and is_speech(out[k]):
            r[k] -= w.stray
    for k in range(sc.expect.quiet_from or 0):  # the cue word said before its time
        if any(e.keywords and says(out[k], e.keywords) for e in sc.expect.events):
            r[k] -= w.stray


def _reply(sc: Scenario, out: list[str], r: list[float], w: RewardWeights,
           span: int = 5) -> None:
    """After the user's last utterance: speak soon (the metric's take-over follows)."""
    end = sc.expect.turn_end
    first = next((k for k in range(end, sc.slices) if is_speech(out[k])), None)
    if first is None:
        r[-1] -= w.timing
    else:
        r[first] += w.timing * _decay(first - end, span)


def _hold(sc: Scenario, out: list[str], r: list[float], w: RewardWeights) -> None:
    if sc.expect.hold is not None:
        for k in range(*sc.expect.hold):
            if is_speech(out[k]):
                r[k] -= w.stray


def _answer(sc: Scenario, out: list[str], start: int, r: list[float],
            w: RewardWeights) -> None:
    done = next((k for k in range(start, sc.slices) if says_across(out[start:k + 1],
                                                                   sc.expect.answer)), None)
    if done is None:
        r[-1] -= w.content
    else:
        r[done] += w.content


def _pause(sc, out, asks, r, w) -> None:
    _hold(sc, out, r, w)


def _turn_taking(sc, out, asks, r, w) -> None:
    _hold(sc, out, r, w)
    _reply(sc, out, r, w)


def _content(sc, out, asks, r, w) -> None:
    _hold(sc, out, r, w)
    _reply(sc, out, r, w)
    _answer(sc, out, sc.expect.turn_end, r, w)


def _interruption(sc, out, asks, r, w) -> None:
    onset = sc.expect.stop_onset
    end = min(onset + STOP_WINDOW_SLICES, sc.slices)
    stop = next((k for k in range(onset, end) if not is_speech(out[k])), None)
    for k in range(onset, end if stop is None else stop):
        r[k] -= w.stray  # talking over the user
    if stop is None:
        r[end - 1] -= w.timing
    else:
        r[stop] += w.timing * _decay(stop - onset, STOP_WINDOW_SLICES)
    _reply(sc, out, r, w)


def _backchannel(sc, out, asks, r, w) -> None:
    at = sc.expect.keep_talking
    for k in range(at, min(at + BACKCHANNEL_WINDOW_SLICES, sc.slices)):
        r[k] += w.stray if is_speech(out[k]) else -w.stray


def _background(sc, out, asks, r, w) -> None:
    d = sc.expect.delegation
    _hold(sc, out, r, w)
    if not d.should:
        for k, _ in asks[:1]:
            r[k] -= w.timing
        _answer(sc, out, d.question_end, r, w)
        return
    if not asks:
        r[min(sc.slices - 1, d.question_end + 2)] -= w.timing
        return
    k = asks[0][0]
    r[k] += w.timing * _decay(k - d.question_end - 1, 5)
    _answer(sc, out, min(sc.slices - 1, k + 1 + d.result_delay), r, w)


REWARDERS = {"timed": _timed, "pause": _pause, "turn_taking": _turn_taking,
             "content": _content, "interruption": _interruption, "backchannel": _backchannel,
             "background": _background}
