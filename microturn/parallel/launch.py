"""Ranks on this machine: `world` processes joined by a gloo process group on loopback.

    results = run_ranks(2, tp_logits, model_file, tokens, "chain", False)

`fn(*args)` runs in every rank with the group up (one torch thread each: the ranks share the
cores); rank 0's return value comes back.
"""

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from microturn.errors import MicroturnError
from microturn.model.attention_backend import CausalAttention


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args):
    if world < 1:
        raise MicroturnError(f"tp: world size must be >= 1, got {world}")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        mp.start_processes(_rank_main, args=(world, free_port(), out, fn, args), nprocs=world,
                           start_method="spawn")
        return torch.load(out, weights_only=False)


def tp_logits(model_file: str, tokens: list[int], reduce: str = "chain",
              sequence: bool = False) -> torch.Tensor:
    """Logits of `tokens` from this rank's shard of the model saved at `model_file`
    (`torch.save` of a Decoder), the whole sequence in one pass."""
    from microturn.parallel.tensor_parallel import shard_model

    model = shard_model(torch.load(model_file, weights_only=False), reduce, sequence)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        return model(ids, torch.arange(len(tokens)).unsqueeze(0), CausalAttention())
