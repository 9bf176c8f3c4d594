"""microturn's streaming-session engine as a peer: every session resident, one batched tick
per micro-turn for all of them."""

from microturn.checkpoint.loader import LoadedModel
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams


class MicroturnPeer:
    def __init__(self, loaded: LoadedModel, deterministic: bool, output_tokens: int,
                 max_sessions: int = 64, kv_budget_mb: int = 2048):
        self.name = "microturn" if deterministic else "microturn-fast"
        mode = "deterministic (batch-invariant kernels)" if deterministic else \
            "shape-dependent kernels (--no-deterministic)"
        self.config = (f"streaming sessions, {str(loaded.model.dtype)[6:]}, {mode}; one "
                       "batched tick per micro-turn; markers <in>/<out> add 2-3 tokens per turn")
        self.engine = Engine(loaded, EngineConfig(kv_budget_mb=kv_budget_mb,
                                                  max_sessions=max_sessions,
                                                  deterministic=deterministic))
        self.params = SessionParams(max_output_tokens=output_tokens, force_output=True)

    def open(self) -> int:
        return self.engine.open(self.params)

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        for sid, tokens in zip(sessions, inputs, strict=True):
            self.engine.append(sid, tokens)
        self.engine.tick()

    def resident_bytes(self, session: int) -> int:
        return self.engine.session_info(session).kv_blocks * self.engine.pool_stats().block_bytes

    def close(self, session: int) -> None:
        self.engine.close(session)
