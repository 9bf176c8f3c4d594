"""What the tensor-parallel tests run inside each rank (spawned processes import this)."""

import random

import torch
import torch.distributed as dist

from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.sampling import SamplingParams


def drive(engine, vocab: int, sessions: int = 3, ticks: int = 8) -> list[dict]:
    """Sessions opened and closed at different ticks, random slices, sampled at 0.8."""
    rng = random.Random(0)
    live, exports = {}, []
    for t in range(ticks):
        if t < sessions:
            live[t] = engine.open(SessionParams(max_output_tokens=3, sampling=SamplingParams(
                temperature=0.8, seed=t)))
        for sid in live.values():
            engine.append(sid, [rng.randrange(300, vocab) for _ in range(rng.randint(0, 6))])
        engine.tick()
        if t == ticks - 2 and 0 in live:
            exports.append(engine.close(live.pop(0)))
    exports += [engine.close(sid) for sid in live.values()]
    return exports


def one_device(loaded) -> list[dict]:
    engine = Engine(loaded, EngineConfig(kv_budget_mb=64))
    engine.warm_up()
    return drive(engine, 2000)


def tp_engine(model_file: str, reduce: str = "chain") -> list[dict] | None:
    from microturn.parallel.replicated import ReplicatedEngine, follow, rank_loaded

    loaded = rank_loaded(torch.load(model_file, weights_only=False), reduce)
    engine = Engine(loaded, EngineConfig(kv_budget_mb=64))
    engine.warm_up()
    if dist.get_rank() > 0:
        follow(engine)
        return None
    replicated = ReplicatedEngine(engine)
    exports = drive(replicated, 2000)
    replicated.stop()
    return exports
