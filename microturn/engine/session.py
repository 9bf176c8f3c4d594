"""Per-session state: small, typed, updated in place each tick (never rebuilt from history)."""

from collections import deque
from dataclasses import dataclass, field

import torch

from microturn.errors import MicroturnError
from microturn.sampling import SamplingParams
from microturn.sequence.media_specs import DMelSpec, FrameSpec
from microturn.sequence.residency import Eviction, Residency
from microturn.sequence.timeline import SliceLayout, Timeline


@dataclass(frozen=True)
class SessionParams:
    max_output_tokens: int = 8  # per output slice
    slice_ms: int = 200
    sampling: SamplingParams = field(default_factory=SamplingParams)
    force_output: bool = False  # emit exactly max_output_tokens, ignoring end/silence (benchmarks)
    # True: every tick this session is in runs the batch-invariant kernels, even when the
    # engine's own mode is off; None/False: the engine's mode
    deterministic: bool | None = None
    audio: bool = False  # every input slice carries an audio segment (dMel frames or absent)
    video: FrameSpec | None = None  # every input slice carries a video segment

    def __post_init__(self):
        if not 1 <= self.max_output_tokens <= 256:
            raise MicroturnError(f"max_output_tokens must be in [1, 256], "
                                 f"got {self.max_output_tokens}")
        if not 20 <= self.slice_ms <= 10_000:
            raise MicroturnError(f"slice_ms must be in [20, 10000], got {self.slice_ms}")
        if self.audio:
            try:
                DMelSpec().frames_per_slice(self.slice_ms)
            except ValueError as error:
                raise MicroturnError(f"slice_ms: {error}") from None


def params_from_export(export: dict) -> "SessionParams":
    """The parameters of the session an export was made by: what `Engine.open(from_export)`
    needs to continue it as it would have gone on."""
    layout = export.get("layout") or {}
    session, sampling = export.get("session") or {}, export.get("sampling") or {}
    video = layout.get("video")
    return SessionParams(
        max_output_tokens=session.get("max_output_tokens", 8),
        slice_ms=layout.get("slice_ms", session.get("slice_ms", 200)),
        sampling=SamplingParams(**{k: sampling[k] for k in ("temperature", "top_k", "top_p",
                                                            "seed") if k in sampling}),
        force_output=session.get("force_output", False),
        deterministic=export.get("deterministic"), audio=layout.get("audio", False),
        video=FrameSpec(**video) if video else None)


@dataclass
class Resume:
    """A session opened from an export, its history still being fed a chunk per tick."""
    tokens: list[int]  # the history to feed (everything the export had fed)
    audio: torch.Tensor | None  # the history's dMel codes and patches, in sequence order
    patches: torch.Tensor | None
    evictions: deque  # the export's `Eviction`s to replay, in order
    unfed: list[int]  # the export's last sampled token(s), fed with the next slice
    at: int = 0  # tokens fed so far
    audio_at: int = 0  # media rows fed so far
    patches_at: int = 0


@dataclass
class Session:
    id: int
    params: SessionParams
    row: int  # this session's row of the KV pool's block table
    timeline: Timeline
    generator: torch.Generator
    residency: Residency  # which tokens' KV is resident (the long-session policy's state)
    num_blocks: int = 0
    length: int = 0  # KV slots written
    next_position: int = 0  # position of the next token fed
    unfed: list[int] = field(default_factory=list)  # sampled, fed at the next forward
    pending: deque = field(default_factory=deque)  # queued input slices (MicroTurns to come)
    fed: list[int] = field(default_factory=list)  # every token fed, in order
    logits: list[torch.Tensor] = field(default_factory=list)  # per fed token (keep_logits only)
    # sequence index -> log p(token at that index | everything before), as the sampler computed
    # it: every sampled token, and with keep_logits every fed token too
    logprobs: dict[int, float] = field(default_factory=dict)
    # sequence index -> log p(sampled token) under the distribution it was drawn from
    # (temperature, top-k, top-p; 0.0 greedy): the behaviour policy's, for importance ratios
    policy_logprobs: dict[int, float] = field(default_factory=dict)
    evictions: list[Eviction] = field(default_factory=list)
    closed: bool = False
    failed: str | None = None  # why the session can take no more steps (e.g. kv_pool_full)
    resume: Resume | None = None  # opened from an export: its history is still being fed


@dataclass(frozen=True)
class SliceOutput:
    session_id: int
    index: int  # micro-turn index
    output_ids: list[int]
    failed: str | None = None  # the session could not take this slice (its reason); close it


@dataclass(frozen=True)
class SessionInfo:
    """What a caller may read of an open session (`Engine.session_info`)."""
    id: int
    layout: SliceLayout
    turns: int  # micro-turns taken by ticks so far
    sequence_tokens: int  # the timeline's length: fed tokens and the one sampled, not yet fed
    kv_slots: int  # KV slots written (fewer than fed tokens after an eviction)
    kv_blocks: int
    evictions: int
    text_since: int  # every text and marker token from this sequence index on is resident
    media_since: int  # every media position from this sequence index on is resident
    last_input: tuple[int, ...]  # the last micro-turn's input half, markers included
