"""Where a tick's wall time goes, for `microturn bench engine --profile`: the engine's own
steps (prepare, forward, sample, record, and the tick's bookkeeping around them) timed here,
the forward split by the kernels' phase clock (`phase_clock.h`: embedding, each layer op,
the head) and what the forward spends in Python and the media front-end around the pass."""

import time
from dataclasses import dataclass, field

from microturn.kernels.build import load

ENGINE_PHASES = ("prepare", "forward", "sample", "record")


@dataclass
class TickProfile:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ENGINE_PHASES, 0.0))
    tick_seconds: float = 0.0
    ticks: int = 0
    started: float = field(default=0.0, repr=False)
    lap_at: float = field(default=0.0, repr=False)

    def __post_init__(self):
        kernels = load()
        if kernels is not None:
            kernels.phase_profile(True)
            kernels.phase_seconds()  # start from zero

    def begin(self) -> None:
        self.started = self.lap_at = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """Time since the last lap goes to `phase` (None: to no phase, a new start)."""
        now = time.perf_counter()
        if phase is not None:
            self.seconds[phase] += now - self.lap_at
        self.lap_at = now

    def end(self) -> None:
        self.tick_seconds += time.perf_counter() - self.started
        self.ticks += 1

    def rows(self, frontend_seconds: float = 0.0) -> list[tuple[str, float]]:
        """(phase, ms per tick), the pass's phases inside `forward`, adding up to the tick."""
        kernels, per = load(), 1e3 / max(1, self.ticks)
        passes = {}
        if kernels is not None:
            passes = kernels.phase_seconds()
            kernels.phase_profile(False)
        inside = sum(passes.values())
        rows = [(f"forward: {name}", s * per) for name, s in passes.items()]
        rows.append(("forward: media front-end", frontend_seconds * per))
        rows.append(("forward: Python around the pass",
                     (self.seconds["forward"] - inside - frontend_seconds) * per))
        rows += [(name, self.seconds[name] * per) for name in ("prepare", "sample", "record")]
        rows.append(("tick bookkeeping (admit, timeline)",
                     (self.tick_seconds - sum(self.seconds.values())) * per))
        return rows
