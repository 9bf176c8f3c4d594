"""Engine: resident sessions, one batched input step and a few batched decode steps per tick.

    engine = Engine(load_model(), EngineConfig())
    sid = engine.open(SessionParams(max_output_tokens=8))
    engine.append(sid, tokenizer.encode(" hello"))   # the input slice that arrived
    outputs = engine.tick()                           # {sid: SliceOutput}
    engine.close(sid)                                 # -> the session's timeline export

A tick (1) takes every session with a queued input slice, (2) runs all their new tokens
(the previous slice's last output token, then `<in> … <out>`) through the model in ONE forward
pass over a ragged batch, sampling each session's first output token, then (3) runs decode
steps batched across the sessions still speaking, one token each, until every slice is full or
ended. Per-session bookkeeping is O(new tokens); the KV pool never moves.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import count

import torch

from microturn.checkpoint.loader import LoadedModel
from microturn.engine.kv_pool import KVPool, PoolStats
from microturn.engine.paged_attention import PagedAttention, PagedBatch, Segment
from microturn.engine.session import Resume, Session, SessionInfo, SessionParams, SliceOutput
from microturn.engine.tick_profile import TickProfile
from microturn.engine.torch_thread import on_torch_thread
from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.kernels import ops, policy
from microturn.sampling import draw_seed, greedy_tokens, sample_with_logprob
from microturn.sequence.markers import MarkerTokens, MediaTokens
from microturn.sequence.media_specs import FrameSpec
from microturn.sequence.residency import Eviction, Residency, replay
from microturn.sequence.segments import MAX_RESULT_TOKENS
from microturn.sequence.timeline import MicroTurn, SliceLayout, Timeline, turn_media


@dataclass(frozen=True)
class EngineConfig:
    kv_budget_mb: int = 512
    # slots per KV block: 256 keeps each kv head's keys and values in 32 KiB runs (bf16), which
    # attention reads faster than shorter ones (docs/LOG.md has the measurements)
    block_size: int = 256
    max_sessions: int = 64
    context_limit: int | None = None  # KV slots per session; default: the trained context
    sink_tokens: int = 64  # kept forever at the start of a long session (rounded up to blocks)
    evict_fraction: float = 0.25  # share of the context dropped at once when it is full
    # media sessions: old slices' media positions go before their text (`residency.py`); the
    # newest media_window of the context keeps its media
    compact_media: bool = True
    media_window: float = 0.25
    keep_logits: bool = False  # record logits and log-probabilities for every fed token
    deterministic: bool | None = None  # batch-invariant kernels; None: the process default
    resume_chunk: int = 256  # history tokens a session opened from an export feeds per tick

    def __post_init__(self):
        if self.kv_budget_mb <= 0:
            raise MicroturnError(f"kv_budget_mb must be > 0, got {self.kv_budget_mb}")
        if not 1 <= self.block_size <= 1024:
            raise MicroturnError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.max_sessions <= 0:
            raise MicroturnError(f"max_sessions must be > 0, got {self.max_sessions}")
        if not 16 <= self.resume_chunk <= 8192:
            raise MicroturnError(f"resume_chunk must be in [16, 8192], got {self.resume_chunk}")
        if not 0.0 < self.evict_fraction < 1.0:
            raise MicroturnError(f"evict_fraction must be in (0, 1), got {self.evict_fraction}")
        if not 0.0 < self.media_window < 1.0:
            raise MicroturnError(f"media_window must be in (0, 1), got {self.media_window}")


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.markers: MarkerTokens = loaded.markers
        self.loaded, self.model = loaded, loaded.model
        self.context_limit = config.context_limit or loaded.config.max_position
        blocks_per_session = -(-self.context_limit // config.block_size)
        self.sink_blocks = -(-config.sink_tokens // config.block_size)
        self.media_window_blocks = max(1, int(config.media_window * blocks_per_session))
        if self.sink_blocks + 2 > blocks_per_session:
            raise MicroturnError(f"context_limit {self.context_limit} leaves no window after "
                                 f"a sink of {config.sink_tokens} tokens")
        self.pool = KVPool(loaded.config, config.kv_budget_mb * 2**20, config.block_size,
                           config.max_sessions, blocks_per_session, self.model.dtype,
                           self.model.device)
        self.deterministic = (policy.deterministic() if config.deterministic is None
                              else config.deterministic)
        self.sessions: dict[int, Session] = {}
        self.frontend: FrontEnd | None = loaded.frontend  # else the first media session loads it
        self.frontend_seconds = 0.0  # time spent embedding media (benchmarks read it)
        self.profile: TickProfile | None = None  # set by `bench engine --profile`
        self._ids = count(1)
        self._lock = threading.Lock()  # one tick at a time; open/append/close between ticks

    # -- session lifecycle -------------------------------------------------------------------

    def open(self, params: SessionParams | None = None, from_export: dict | None = None) -> int:
        """A new session; or, from an export (`export`/`close` of this or another engine with
        the same model), the same session continued: its history is fed again a chunk per
        tick (`resume_chunk` tokens, its evictions replayed where they happened), then its
        slices are taken. In deterministic mode every token and log-probability after that
        is bitwise what the session would have produced had it never left. `params` must
        give the export's sampling for that (`SessionParams.from_export`)."""
        params = params or SessionParams()
        layout = SliceLayout(params.slice_ms, params.audio, params.video, self.loaded.clock,
                             self.loaded.clock_both_lanes)
        timeline, resume = (self._resume_from(from_export, layout) if from_export is not None
                            else (Timeline(self.markers, layout=layout), None))
        if (params.audio or params.video) and self.frontend is None:
            self.frontend = self.loaded.load_frontend()
        with self._lock:
            if not self.pool.free_blocks:
                raise MicroturnError(f"kv pool full: all {self.pool.num_blocks} blocks in use; "
                                     "close a session or raise --kv-budget-mb")
            row = self.pool.take_row()
            if row is None:
                raise MicroturnError(f"max_sessions reached ({self.config.max_sessions} open)")
            sid = next(self._ids)
            generator = torch.Generator(device="cpu").manual_seed(params.sampling.seed)
            residency = Residency(self.pool.block_size, self.sink_blocks * self.pool.block_size)
            session = self.sessions[sid] = Session(sid, params, row, timeline, generator,
                                                   residency)
            if resume is not None:
                session.resume = resume
                for name in ("logprobs", "policy_logprobs"):
                    values = from_export.get(name) or []
                    setattr(session, name, {i: v for i, v in enumerate(values) if v is not None})
            return sid

    def _resume_from(self, export: dict, layout: SliceLayout) -> tuple[Timeline, "Resume"]:
        """The export's timeline and what is left to feed, checked against this engine."""
        try:
            timeline = Timeline.from_export(export)
            unfed, evictions = int(export["unfed"]), export.get("evictions") or []
        except (KeyError, TypeError, ValueError) as error:
            raise MicroturnError(f"from_export: not a resumable session export ({error!r} "
                                 f"missing or malformed)") from None
        if "layout" not in export:  # a plain text session's export leaves its layout out
            timeline.layout = SliceLayout(export.get("session", {}).get("slice_ms", 200))
        if timeline.markers.to_dict() != self.markers.to_dict():
            raise MicroturnError("from_export: its marker tokens differ from this model's; "
                                 "resume on the model that made it")
        if timeline.layout != layout:
            raise MicroturnError(f"from_export: its layout {timeline.layout.to_dict()} differs "
                                 f"from the session's {layout.to_dict()} (slice_ms, audio, "
                                 f"video and the model's clock must match)")
        kv = export.get("kv") or {}
        mine = {"block_size": self.pool.block_size, "context_limit": self.context_limit,
                "sink_slots": self.sink_blocks * self.pool.block_size}
        if evictions and kv != mine:
            raise MicroturnError(f"from_export: its evictions were made with KV layout {kv}; "
                                 f"this engine has {mine}")
        tokens = timeline.tokens()
        if not 0 <= unfed <= min(1, len(tokens)):
            raise MicroturnError(f"from_export: unfed must be 0 or 1, got {unfed}")
        history = tokens[:len(tokens) - unfed]
        if any(not 0 <= t < self.loaded.config.vocab_size + MediaTokens.num_markers + 2
               for t in history):
            raise MicroturnError("from_export: a token id outside this model's vocabulary")
        audio, patches = timeline.media()
        try:
            records = [Eviction.from_dict(e) for e in evictions]
            replay(records, self.pool.block_size, mine["sink_slots"], history,
                   self.markers.vocab_size)
        except (KeyError, TypeError, ValueError) as error:
            raise MicroturnError(f"from_export: evictions: {error}") from None
        return timeline, Resume(history, audio, patches, deque(records), tokens[len(history):])

    def warm_up(self, input_tokens: int = 16, media: bool = False) -> None:
        """One throwaway tick (kernels load, weights pack, caches fill) so that the first real
        tick is not the slow one. media: also load the front-end and run audio and video
        through it (a server does, so the first media session pays nothing extra)."""
        sid = self.open(SessionParams(max_output_tokens=2, audio=media,
                                      video=FrameSpec() if media else None))
        layout = self.layout(sid)
        audio = torch.zeros(layout.audio_shape, dtype=torch.uint8) if media else None
        frames = [torch.zeros(layout.frame_shape, dtype=torch.uint8)] if media else []
        self.append(sid, [self.markers.silence] * input_tokens, audio, frames)
        self.tick()
        self.close(sid)

    def append(self, sid: int, input_ids: list[int], audio: torch.Tensor | None = None,
               frames: list[torch.Tensor] = (), output_ids: list[int] | None = None,
               result_ids: list[int] = ()) -> None:
        """Queue the input slice that arrived (no ids: silence). One slice per tick. Media
        sessions may add the slice's dMel codes (uint8 [frames_per_slice, 80]; None: absent)
        and up to the frames due in it, each as patches (uint8 [patches, 3, 40, 40]).
        output_ids: the slice's output is scripted, not sampled (speech the model already
        said, a teacher's turn): fed with the input, no log-probabilities recorded.
        result_ids: a background result that arrived in this slice (`segments.result_segment`),
        fed after the slice's text."""
        session = self._session(sid)
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in input_ids):
            raise MicroturnError(f"input_ids: token ids must be in [0, {vocab})")
        if output_ids is not None:
            budget = session.params.max_output_tokens
            if not 1 <= len(output_ids) <= budget:
                raise MicroturnError(f"output_ids: a scripted slice holds 1 to {budget} "
                                     f"tokens, got {len(output_ids)}")
            if any(not 0 <= t < vocab for t in output_ids):
                raise MicroturnError(f"output_ids: token ids must be in [0, {vocab})")
        if len(result_ids) > MAX_RESULT_TOKENS or any(not 0 <= t < vocab for t in result_ids):
            raise MicroturnError(f"result_ids: at most {MAX_RESULT_TOKENS} token ids, each in "
                                 f"[0, {vocab})")
        turn = MicroTurn(len(session.timeline.turns) + len(session.pending), list(input_ids),
                         list(output_ids or ()), result_ids=list(result_ids))
        session.timeline.layout.check(turn.index, audio, frames)
        turn.audio, turn.frames = audio, list(frames)
        session.pending.append(turn)

    def close(self, sid: int) -> dict:
        """Free the session's blocks at once; return its export (see `export`)."""
        with self._lock:
            session = self._session(sid)
            self.pool.release(session.row, session.num_blocks)
            session.closed = True
            del self.sessions[sid]
            return self._export(session)

    def export(self, sid: int) -> dict:
        """The session so far: its timeline, and for every token of `timeline.tokens()` the
        log-probability the sampler computed for it (None where none was computed), plus
        what a trainer needs to recompute them (dtype, mode, evictions)."""
        with self._lock:
            return self._export(self._session(sid))

    def _export(self, s: Session) -> dict:
        tokens = s.timeline.tokens()
        unfed = len(s.resume.unfed) if s.resume is not None else len(s.unfed)
        return {**s.timeline.export(), "unfed": unfed,
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "deterministic": self.deterministic or bool(s.params.deterministic),
                "session": {"max_output_tokens": s.params.max_output_tokens,
                            "slice_ms": s.params.slice_ms,
                            "force_output": s.params.force_output},
                "sampling": {"temperature": s.params.sampling.temperature,
                             "top_k": s.params.sampling.top_k, "top_p": s.params.sampling.top_p,
                             "seed": s.params.sampling.seed},
                "logprobs": [s.logprobs.get(i) for i in range(len(tokens))],
                "policy_logprobs": [s.policy_logprobs.get(i) for i in range(len(tokens))],
                "evictions": [e.to_dict() for e in s.evictions],
                "kv": {"block_size": self.pool.block_size, "context_limit": self.context_limit,
                       "sink_slots": self.sink_blocks * self.pool.block_size}}

    # -- what callers may read ---------------------------------------------------------------

    def layout(self, sid: int) -> SliceLayout:
        """The media segments every input slice of the session carries."""
        return self._session(sid).timeline.layout

    def session_info(self, sid: int) -> SessionInfo:
        """A snapshot of one session's size: its sequence, its KV, its last micro-turn."""
        s = self._session(sid)
        last = s.timeline.turns[-1] if s.timeline.turns else None
        return SessionInfo(
            id=sid, layout=s.timeline.layout, turns=len(s.timeline.turns),
            sequence_tokens=len(s.fed) + len(s.unfed), kv_slots=s.length,
            kv_blocks=s.num_blocks, evictions=len(s.evictions),
            text_since=s.residency.compacted[0] if s.residency.compacted
            else (0 if not s.evictions else s.residency.raw_start),
            media_since=s.residency.raw_start if s.evictions else 0,
            last_input=tuple(s.timeline.input_tokens(last)) if last else ())

    def resuming(self, sid: int) -> bool:
        """The session was opened from an export and is still being fed its history."""
        return self._session(sid).resume is not None

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    def _session(self, sid: int) -> Session:
        if sid not in self.sessions:
            raise MicroturnError(f"session {sid}: no such open session")
        return self.sessions[sid]

    # -- the tick ----------------------------------------------------------------------------

    @torch.inference_mode()
    def tick(self) -> dict[int, SliceOutput]:
        with self._lock:
            active = [s for s in self.sessions.values() if s.pending or s.resume is not None]
            if not active:
                return {}
            mode = self.deterministic or any(s.params.deterministic for s in active)
            with policy.deterministic_mode(mode):
                if self.profile is None:
                    return self._tick(active)
                self.profile.begin()
                outputs = self._tick(active)
                self.profile.end()
                return outputs

    def _tick(self, active: list[Session]) -> dict[int, SliceOutput]:
        """The input step for every active session (a resuming one feeds its next chunk of
        history instead), then decode steps for those still speaking; each step is prepare
        -> forward -> sample -> record. A session that cannot get room in the pool leaves the
        tick alone (`failed`): the others' steps go on. Sessions that took a slice get its
        output; a resuming one gets none until its history is fed."""
        feeds, media, draws, took = [], [], [], []
        for s in active:
            if s.resume is not None:
                feed, audio, patches = self._history_chunk(s)
                feeds.append(feed)
                media.append((audio, patches))
                draws.append(False)
                continue
            turn = s.pending.popleft()
            s.timeline.append(turn)
            feeds.append(s.unfed + s.timeline.input_tokens(turn) + turn.output_ids)
            media.append(turn_media([turn]))
            draws.append(not turn.output_ids)  # a scripted slice is fed whole, never sampled
            took.append(s)
            s.unfed = []
        stepping = self._admit(active, feeds)
        chosen = [i for i, s in enumerate(active) if s in stepping]
        if stepping:
            audio = [media[i][0] for i in chosen if media[i][0] is not None]
            patches = [media[i][1] for i in chosen if media[i][1] is not None]
            self._step(stepping, [feeds[i] for i in chosen],
                       torch.cat(audio) if audio else None,
                       torch.cat(patches) if patches else None, [draws[i] for i in chosen])
        for s in active:
            if s.resume is not None and s.resume.at == len(s.resume.tokens):
                s.unfed, s.resume = s.resume.unfed, None  # the history is back: go on
        speaking = [active[i] for i in chosen if draws[i] and not self._slice_done(active[i])]
        while speaking:
            speaking = self._admit(speaking, [s.unfed for s in speaking])
            if speaking:
                self._step(speaking, [s.unfed for s in speaking])
            speaking = [s for s in speaking if not self._slice_done(s)]
        return {s.id: SliceOutput(s.id, s.timeline.turns[-1].index,
                                  list(s.timeline.turns[-1].output_ids), s.failed)
                for s in took}

    def _history_chunk(self, s: Session) -> tuple[list[int], torch.Tensor | None,
                                                   torch.Tensor | None]:
        """A resuming session's next chunk of history (and its media rows), cut where the
        session once evicted, that eviction replayed first: the same blocks dropped at the
        same point, so every later token sees the window it saw before."""
        r = s.resume
        while r.evictions and r.evictions[0].at_token == r.at:
            self._apply(s, r.evictions.popleft())
        end = min(r.at + self.config.resume_chunk, len(r.tokens),
                  r.evictions[0].at_token if r.evictions else len(r.tokens))
        feed = r.tokens[r.at:end]
        m = self.markers.media
        n_audio, n_patches = feed.count(m.audio_frame), feed.count(m.patch)
        audio = r.audio[r.audio_at:r.audio_at + n_audio] if n_audio else None
        patches = r.patches[r.patches_at:r.patches_at + n_patches] if n_patches else None
        r.at, r.audio_at, r.patches_at = end, r.audio_at + n_audio, r.patches_at + n_patches
        return feed, audio, patches

    def _admit(self, sessions: list[Session], feeds: list[list[int]]) -> list[Session]:
        """The sessions that have room for their feed (reserved now); the rest are marked
        failed and take no step, here or later, before anything of theirs is fed."""
        admitted = []
        for s, feed in zip(sessions, feeds, strict=True):
            if s.failed is None:
                try:
                    self._reserve(s, len(feed))
                except PoolFull as exc:
                    s.failed = exc.reason
                    continue
                admitted.append(s)
        return admitted

    async def tick_async(self) -> dict[int, SliceOutput]:
        """The tick on the process's torch thread (`torch_thread.py`), so an asyncio server
        keeps serving meanwhile."""
        return await on_torch_thread(self.tick)

    def _slice_done(self, s: Session) -> bool:
        out = s.timeline.turns[-1].output_ids
        if len(out) >= s.params.max_output_tokens:
            return True
        return not s.params.force_output and self.markers.ends_output(out[-1])

    def _step(self, sessions: list[Session], feeds: list[list[int]],
              audio: torch.Tensor | None = None, patches: torch.Tensor | None = None,
              draws: list[bool] | None = None) -> None:
        """One forward over every session's new tokens; sample one token per session (where
        `draws` says so: a scripted slice draws nothing). Media positions in the feeds take
        their vectors from `audio` and `patches`."""
        lap = self.profile.lap if self.profile is not None else _no_profile
        lap(None)
        step = self._prepare(sessions, feeds)
        lap("prepare")
        logits = self._forward(step, audio, patches)
        lap("forward")
        draws = draws or [True] * len(sessions)
        drawn = self._draw_all(sessions, step.last_rows(logits), draws)
        lap("sample")
        self._record(step, logits, drawn)
        lap("record")

    def _prepare(self, sessions: list[Session], feeds: list[list[int]]) -> "_Step":
        """One row of tokens and positions with each session's segment (room in the pool was
        reserved by `_admit`); the sessions' counters advance past the feeds."""
        segments, tokens, positions = [], [], []
        for s, feed in zip(sessions, feeds, strict=True):
            segments.append(Segment(s.row, len(tokens), len(tokens) + len(feed), s.length))
            tokens += feed
            positions += range(s.next_position, s.next_position + len(feed))
            s.fed += feed
            s.length += len(feed)
            s.next_position += len(feed)
        return _Step(sessions, segments, tokens, positions, self.config.keep_logits)

    def _forward(self, step: "_Step", audio: torch.Tensor | None,
                 patches: torch.Tensor | None) -> torch.Tensor:
        """Logits of each session's last token (with keep_logits: of every token)."""
        device = self.model.device
        backend = PagedAttention(self.pool, PagedBatch.build(self.pool, step.segments))
        rows = (torch.arange(len(step.tokens)) if step.keep
                else torch.tensor([seg.end - 1 for seg in step.segments]))
        ids = torch.tensor([step.tokens], device=device)
        embeds = None
        if self.frontend is not None and max(step.tokens) >= self.markers.vocab_size:
            started = time.perf_counter()
            embeds = self.frontend.embed(self.model.embed_tokens, ids, audio, patches)
            self.frontend_seconds += time.perf_counter() - started
        return self.model(ids, torch.tensor([step.positions], device=device), backend,
                          logits_at=rows.to(device), embeds=embeds)[0]

    def _record(self, step: "_Step", logits: torch.Tensor, drawn: list[int | None]) -> None:
        """Log-probabilities in one batched call: each drawn token (sequence index
        len(s.fed)), and with keep_logits each fed token after the first of its forward;
        then the drawn tokens join their slices, to be fed next."""
        keep, ends = step.keep, step.ends
        rows, targets, owners, indices = [], [], [], []
        for i, (s, seg, token) in enumerate(zip(step.sessions, step.segments, drawn,
                                                strict=True)):
            if token is not None:
                rows.append(ends[i] if keep else i)
                targets.append(token)
                owners.append(s)
                indices.append(len(s.fed))
            if keep:  # (media positions have no token probability)
                first = len(s.fed) - (seg.end - seg.start)
                for row, index in zip(range(seg.start, seg.end - 1),
                                      range(first + 1, len(s.fed)), strict=True):
                    if s.fed[index] < self.markers.vocab_size:
                        rows.append(row)
                        targets.append(s.fed[index])
                        owners.append(s)
                        indices.append(index)
                s.logits.append(logits[seg.start:seg.end].float().cpu())
        if rows:
            values = ops.token_logprobs(logits[rows], torch.tensor(targets)).tolist()
            for s, index, value in zip(owners, indices, values, strict=True):
                s.logprobs[index] = value
        for s, token in zip(step.sessions, drawn, strict=True):
            if token is None:  # scripted: its last token is already fed
                continue
            s.timeline.turns[-1].output_ids.append(token)
            s.unfed = [token]

    def _draw_all(self, sessions: list[Session], rows: torch.Tensor,
                  draws: list[bool]) -> list[int | None]:
        """One token per session that draws; the greedy ones in one batched call."""
        greedy = [i for i, (s, draw) in enumerate(zip(sessions, draws, strict=True))
                  if draw and s.params.sampling.greedy]
        drawn: list[int | None] = [None] * len(sessions)
        if greedy:
            picked = rows[greedy] if len(greedy) < len(sessions) else rows
            for i, token in zip(greedy, greedy_tokens(picked), strict=True):
                drawn[i] = token
                sessions[i].policy_logprobs[len(sessions[i].fed)] = 0.0
        for i, (s, draw) in enumerate(zip(sessions, draws, strict=True)):
            if draw and drawn[i] is None:
                drawn[i] = self._draw(s, rows[i])
        return drawn

    @staticmethod
    def _draw(s: Session, logits: torch.Tensor) -> int:
        params = s.params.sampling
        if not params.greedy:  # the draw depends on the seed and the token's index only
            s.generator.manual_seed(draw_seed(params.seed, len(s.fed)))
        token, s.policy_logprobs[len(s.fed)] = sample_with_logprob(logits, params, s.generator)
        return token

    def _reserve(self, s: Session, new_tokens: int) -> None:
        """Make room for new_tokens slots: grow by whole blocks; at the context limit (or when
        the pool is full) evict the session's own oldest micro-turns after the sink."""
        if new_tokens > self.context_limit - self.sink_blocks * self.pool.block_size:
            raise MicroturnError(f"session {s.id}: a step of {new_tokens} tokens does not fit "
                                 f"the context limit of {self.context_limit}")
        if s.length + new_tokens > self.context_limit:
            self._evict(s, s.length + new_tokens - self.context_limit)
        while s.num_blocks * self.pool.block_size < s.length + new_tokens:
            if not self.pool.grow(s.row, s.num_blocks):
                if s.num_blocks <= self.sink_blocks + 1:
                    raise PoolFull(f"session {s.id}: kv pool full, cannot grow")
                self._evict(s, s.length + new_tokens - s.num_blocks * self.pool.block_size)
                continue
            s.num_blocks += 1

    def _evict(self, s: Session, slots_needed: int) -> None:
        """Long-session policy (`sequence/residency.py`). A media session first compacts its
        oldest raw blocks outside the media window: their media positions go, their text and
        markers stay. Where that is not room enough, whole blocks right after the sink go, the
        compacted zone's first; before anything was compacted at least evict_fraction of the
        context at once (so the O(blocks) table shift is rare). Kept tokens keep their
        positions: rotary scores depend on position differences, so what the window sees of
        itself is unchanged."""
        bs, residency = self.pool.block_size, s.residency
        need, freed = -(-slots_needed // bs), 0
        layout = s.timeline.layout
        if self.config.compact_media and (layout.audio or layout.video):
            region = (len(s.fed) - residency.raw_start) // bs - self.media_window_blocks
            if region > 1 and (e := residency.plan_compaction(
                    s.fed, len(s.fed), region, self.markers.vocab_size)):
                self._apply(s, e)
                freed = (e.slots - e.kept_slots) // bs
        if freed >= need:
            return
        at_least = 1 if residency.compacted else \
            int(self.config.evict_fraction * self.context_limit) // bs
        evict = min(max(need - freed, at_least, 1),
                    s.num_blocks - self.sink_blocks - 1)  # keep the block being written
        self._apply(s, Eviction(len(s.fed), self.sink_blocks * bs, evict * bs))

    def _apply(self, s: Session, e: Eviction) -> None:
        """One eviction on the session's blocks (live, or replayed on resume)."""
        bs = self.pool.block_size
        if e.kept:  # slot offsets inside the region, which starts at the raw zone's start
            offsets = torch.tensor([t - s.residency.raw_start for first, n in e.kept
                                    for t in range(first, first + n)])
            self.pool.compact(s.row, s.num_blocks, e.first_slot // bs, e.slots // bs, offsets)
        else:
            self.pool.drop(s.row, s.num_blocks, e.first_slot // bs, e.slots // bs)
        s.residency.apply(e)
        s.num_blocks -= (e.slots - e.kept_slots) // bs
        s.length -= e.slots - e.kept_slots
        s.evictions.append(e)


def _no_profile(phase: str | None) -> None:
    pass


class PoolFull(MicroturnError):
    """A session needs a block, the pool has none, and it has none of its own to evict."""
    reason = "kv_pool_full"


@dataclass(frozen=True)
class _Step:
    """One forward's batch: the sessions, their segments of the token row, its positions."""
    sessions: list[Session]
    segments: list[Segment]
    tokens: list[int]
    positions: list[int]
    keep: bool  # keep_logits: logits of every token, not only each session's last

    @property
    def ends(self) -> list[int]:
        return [seg.end - 1 for seg in self.segments]

    def last_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Each session's last-token logits."""
        return logits[self.ends] if self.keep else logits
