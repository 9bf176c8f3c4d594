"""An engine served on N tensor-parallel ranks: one engine per rank, driven in lockstep.

Every rank runs an identical `Engine` over its shard of the model (its heads, its columns,
a KV pool of its key/value heads). Rank 0 serves: the scheduler calls `open`, `append` and
`close` on a `ReplicatedEngine`, which runs them on rank 0's engine and records them; at each
tick it sends the recorded calls to the other ranks in one broadcast, and every rank applies
them in the same order and ticks. The forward's reductions keep the ranks in lockstep, their
logits are bitwise one device's, so every rank samples the same tokens and stays an exact
replica of rank 0's sessions. The scheduler never mutates the engine during a tick (it awaits
the tick), so recording between ticks captures the order exactly.
"""

from dataclasses import replace

import torch.distributed as dist

from microturn.checkpoint.loader import LoadedModel
from microturn.engine.engine import Engine
from microturn.engine.torch_thread import on_torch_thread
from microturn.parallel.tensor_parallel import plan_shards, shard_model


def rank_loaded(loaded: LoadedModel, reduce: str = "chain") -> LoadedModel:
    """This rank's shard of an interaction model (markers installed, adapter merged): the
    model and the config its KV pool is sized by."""
    c = loaded.config
    shard = plan_shards(c.num_heads, c.num_kv_heads, c.intermediate_size,
                        dist.get_world_size())[dist.get_rank()]
    mine = replace(c, num_heads=shard.q_heads[1] - shard.q_heads[0],
                   num_kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
                   intermediate_size=shard.columns[1] - shard.columns[0])
    out = object.__new__(type(loaded))
    out.__dict__.update(loaded.__dict__)
    out.model, out.config = shard_model(loaded.model, reduce), mine
    return out


class ReplicatedEngine:
    """Rank 0's engine, its mutations recorded for the other ranks (`follow`)."""

    def __init__(self, engine: Engine):
        self.engine, self.calls = engine, []

    def open(self, *args, **kwargs) -> int:
        self.calls.append(("open", args, kwargs))
        return self.engine.open(*args, **kwargs)

    def append(self, *args, **kwargs) -> None:
        self.calls.append(("append", args, kwargs))
        self.engine.append(*args, **kwargs)

    def close(self, *args, **kwargs) -> dict:
        self.calls.append(("close", args, kwargs))
        return self.engine.close(*args, **kwargs)

    def tick(self):
        calls, self.calls = self.calls, []
        dist.broadcast_object_list([("tick", calls)], src=0)
        return self.engine.tick()

    async def tick_async(self):
        return await on_torch_thread(self.tick)

    def stop(self) -> None:
        dist.broadcast_object_list([("stop", [])], src=0)

    def __getattr__(self, name):  # read-only calls: rank 0's engine answers alone
        return getattr(self.engine, name)


def follow(engine: Engine) -> int:
    """A rank other than 0: apply rank 0's calls and tick, until it stops. Returns the ticks."""
    ticks = 0
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        kind, calls = message[0]
        if kind == "stop":
            return ticks
        for name, args, kwargs in calls:
            getattr(engine, name)(*args, **kwargs)
        engine.tick()
        ticks += 1
