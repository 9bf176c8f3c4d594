"""The turn-based baseline: voice-activity detection ends the user's turn, then the same base
model answers with its chat template, streamed out at the same tokens per slice.

Settings are the common harness defaults at their most favourable (`TurnBasedSettings`):
- User activity is every word's span (what a VAD hears of the speech behind a transcript)
  plus, where the scenario has audio, silero-vad's speech segments. The harness knows an
  onset the moment it happens, before the word's text arrives.
- End of turn: no activity for `silence_timeout_ms` after the last, with words pending.
  The reply is computed instantly: its first tokens go out in the slice where the timeout
  elapses (no model latency is charged).
- Interruption: user activity lasting `min_interruption_ms` while the harness speaks stops it;
  shorter activity (a backchannel) is ignored and its words dropped.
- A reply whose start was scripted (the scenario's model already talking) continues with the
  model's own continuation of that reply once the script ends.
"""

from collections.abc import Callable
from dataclasses import dataclass

from microturn.checkpoint.loader import Checkpoint
from microturn.eval.scenario import Scenario, Transcript, render_audio
from microturn.eval.vad import speech_segments
from microturn.generate import generate_tokens


@dataclass(frozen=True)
class TurnBasedSettings:
    silence_timeout_ms: int = 500  # OpenAI Realtime server VAD / LiveKit endpointing default
    min_interruption_ms: int = 500  # LiveKit Agents' min_interruption_duration
    vad_threshold: float = 0.5  # silero's and OpenAI's default
    max_output_tokens: int = 4  # per slice, as the micro-turn system
    max_reply_tokens: int = 48
    merge_gap_ms: int = 550  # words closer than this are one stretch of speech (LiveKit's
    # silero min_silence_duration), so an utterance of short words still interrupts


class Replier:
    """Chat-template replies of the base model, greedy, memoised by prompt."""

    def __init__(self, loaded: Checkpoint, max_tokens: int):
        self.loaded, self.max_tokens = loaded, max_tokens
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def reply(self, messages: list[dict], continue_from: str = "") -> list[int]:
        tokenizer = self.loaded.tokenizer
        prompt = tokenizer.apply_chat_template(messages) + continue_from
        ids = tuple(tokenizer.encode(prompt))
        if ids not in self._cache:
            out = list(generate_tokens(self.loaded, list(ids), self.max_tokens))
            self._cache[ids] = [t for t in out if t not in tokenizer.eos_ids]
        return self._cache[ids]


def run_turn_based(loaded: Checkpoint, scenarios: list[Scenario], system: str = "turn-based",
                   settings: TurnBasedSettings | None = None,
                   progress: Callable[[int], None] | None = None) -> list[Transcript]:
    settings = settings or TurnBasedSettings()
    replier = Replier(loaded, settings.max_reply_tokens)
    out = []
    for sc in scenarios:
        out.append(_run_one(sc, loaded, replier, settings, system))
        if progress:
            progress(1)
    return out


def _run_one(sc: Scenario, loaded: Checkpoint, replier: Replier, settings: TurnBasedSettings,
             system: str) -> Transcript:
    tokenizer, s, budget = loaded.tokenizer, sc.slice_ms, settings.max_output_tokens
    activity = [(w.start_ms, w.end_ms) for w in sc.words]
    if sc.has_audio:
        activity += [(seg.start_ms, seg.end_ms)
                     for seg in speech_segments(render_audio(sc), settings.vad_threshold)]
    activity = _merged(sorted(activity), settings.merge_gap_ms)
    spoken = sc.spoken_slices()
    history: list[dict] = []
    pending: list[str] = []  # user words not yet answered
    queue: list[int] = []  # the current reply's tokens still to say
    said: list[str] = []  # what the current reply has said so far
    replying_since = 0 if spoken and spoken[0] is not None else None  # ms; None: listening
    transcript = Transcript(sc.id, system, [], [], [])
    for k in range(sc.slices):
        now = (k + 1) * s
        pending += [w.text for w in sc.words if (w.end_ms - 1) // s == k]
        text, ids = "", []
        if spoken[k] is not None:  # the reply already under way (scripted)
            text = spoken[k]
            said.append(text)
        elif replying_since is not None and _interrupted(activity, replying_since, now,
                                                         settings.min_interruption_ms):
            history.append({"role": "assistant", "content": " ".join(said)})
            queue, said, replying_since = [], [], None
        elif replying_since is not None:
            if not queue and k > 0 and spoken[k - 1] is not None:  # the script ended: go on
                prompt = history or [{"role": "user", "content": "Tell me more."}]
                queue = replier.reply(prompt, " ".join(said))
            pending = []  # heard while replying and too short to interrupt: dropped
            ids, queue = queue[:budget], queue[budget:]
            text = tokenizer.decode(ids)
            said.append(text)
            if not queue:
                history.append({"role": "assistant", "content": " ".join(said)})
                said, replying_since = [], None
        elif pending and _turn_over(activity, now, settings.silence_timeout_ms):
            history.append({"role": "user", "content": " ".join(pending)})
            pending, queue, replying_since = [], replier.reply(history), now
            ids, queue = queue[:budget], queue[budget:]
            text = tokenizer.decode(ids)
            said = [text]
            if not queue:
                history.append({"role": "assistant", "content": text})
                said, replying_since = [], None
        transcript.outputs.append(text)
        transcript.output_ids.append(ids)
        transcript.scripted.append(spoken[k] is not None)
    return transcript


def _merged(spans: list[tuple[int, int]], gap_ms: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start - out[-1][1] < gap_ms:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _interrupted(activity: list[tuple[int, int]], since: int, now: int, min_ms: int) -> bool:
    """User activity that began after `since` and has lasted min_ms by `now`."""
    return any(start >= since and min(end, now) - start >= min_ms for start, end in activity
               if start < now)


def _turn_over(activity: list[tuple[int, int]], now: int, timeout_ms: int) -> bool:
    """Silence for timeout_ms since the last activity heard by `now`."""
    heard = [end for start, end in activity if start < now]
    return bool(heard) and now - max(heard) >= timeout_ms
