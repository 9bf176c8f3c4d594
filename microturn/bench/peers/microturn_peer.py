"""microturn's streaming-session engine as a peer: every session resident, one batched tick
per micro-turn for all of them. At a shape with audio each session is a voice session: the
text tokens, then a slice of real audio through the front-end (dMel) in the positions the
other engines fill with text."""

from microturn.bench.engine_bench import MediaSource
from microturn.bench.peers.base import Shape
from microturn.checkpoint.loader import LoadedModel
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams


class MicroturnPeer:
    def __init__(self, loaded: LoadedModel, deterministic: bool, shape: Shape,
                 max_sessions: int = 64, kv_budget_mb: int = 2048):
        self.name = "microturn" if deterministic else "microturn-fast"
        mode = "deterministic (batch-invariant kernels)" if deterministic else \
            "shape-dependent kernels (--no-deterministic)"
        audio = "; real audio as dMel through the front-end" if shape.audio_positions else ""
        self.config = (f"streaming sessions, {str(loaded.model.dtype)[6:]}, {mode}; one "
                       "batched tick per micro-turn; markers <in>/<out> add 2-3 tokens per "
                       f"turn{audio}")
        self.engine = Engine(loaded, EngineConfig(kv_budget_mb=kv_budget_mb,
                                                  max_sessions=max_sessions,
                                                  deterministic=deterministic))
        self.text_tokens, self.audio_positions = shape.input_tokens, shape.audio_positions
        self.params = SessionParams(max_output_tokens=shape.output_tokens, force_output=True,
                                    audio=bool(shape.audio_positions))
        self.media: dict[int, MediaSource] = {}

    def open(self) -> int:
        sid = self.engine.open(self.params)
        if self.audio_positions:
            self.media[sid] = MediaSource(self.engine.layout(sid), sid)
        return sid

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        for sid, tokens in zip(sessions, inputs, strict=True):
            if sid in self.media:
                media = self.media[sid].next_slice()
                self.engine.append(sid, tokens[:self.text_tokens], media.audio)
            else:
                self.engine.append(sid, tokens)
        self.engine.tick()

    def resident_bytes(self, session: int) -> int:
        return self.engine.session_info(session).kv_blocks * self.engine.pool_stats().block_bytes

    def close(self, session: int) -> None:
        self.media.pop(session, None)
        self.engine.close(session)
