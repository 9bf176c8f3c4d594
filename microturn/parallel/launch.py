"""Ranks on this machine: `world` processes joined by a gloo process group on loopback.

    results = run_ranks(2, tp_logits, model_file, tokens, "chain", False)

`fn(*args)` runs in every rank with the group up (one torch thread each: the ranks share the
cores); rank 0's return value comes back.
"""

import os
import signal
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
        ranks = mp.start_processes(_rank_main, args=(world, free_port(), out, fn, args),
                                   nprocs=world, start_method="spawn", join=False)
        # a SIGTERM for this process is rank 0's to handle (a server finishes its tick, tells
        # its clients and stops the other ranks); the ranks end, and so does the wait
        before = signal.signal(signal.SIGTERM,
                               lambda *_: os.kill(ranks.processes[0].pid, signal.SIGTERM))
        try:
            while not ranks.join():
                pass
        except mp.ProcessRaisedException as error:  # one line, as every CLI error is
            last = str(error).strip().splitlines()[-1]
            raise MicroturnError(last.split("Error: ", 1)[-1]) from None
        finally:
            signal.signal(signal.SIGTERM, before)
        return torch.load(out, weights_only=False) if Path(out).exists() else None


def rank_model(source: str, dtype: str = "bf16", reduce: str = "chain",
               sequence: bool = False):
    """This rank's shard of a model: `source` is a checkpoint (GGUF or directory; "" for the
    default) or a `torch.save`d Decoder (`*.pt`)."""
    from microturn.checkpoint.loader import load_checkpoint
    from microturn.parallel.tensor_parallel import shard_model

    if source.endswith(".pt"):
        model = torch.load(source, weights_only=False)
    else:
        model = load_checkpoint(source or None, dtype, "cpu").model
    return shard_model(model, reduce, sequence)


def tp_logits(source: str, tokens: list[int], reduce: str = "chain",
              sequence: bool = False) -> torch.Tensor:
    """Logits of `tokens` from this rank's shard, the whole sequence in one pass."""
    model = rank_model(source, reduce=reduce, sequence=sequence)
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0),
                     CausalAttention())


def tp_generate(source: str, dtype: str, prompt: list[int], max_tokens: int, sampling,
                eos: list[int], stream) -> list[int]:
    """Tokens after `prompt`, every rank drawing the same (identical logits, the same seeded
    draw); rank 0 hands each to `stream`. No KV cache under TP yet: each token re-runs the
    whole sequence."""
    from microturn.sampling import draw_seed, sample

    model = rank_model(source, dtype)
    tokens, out = list(prompt), []
    generator = torch.Generator()
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0),
                           CausalAttention(), logits_at=torch.tensor([len(tokens) - 1]))
        generator.manual_seed(draw_seed(sampling.seed, len(tokens)))
        token = sample(logits[0, -1], sampling, generator)
        tokens.append(token)
        out.append(token)
        if dist.get_rank() == 0 and stream is not None:
            stream(token)
        if token in eos:
            break
    return out


class TextStream:
    """Writes tokens to stdout as text as they come (picklable: built in the parent, used in
    rank 0, which loads the tokenizer on the first token)."""

    def __init__(self, source: str):
        self.source, self.decoder = source, None

    def __call__(self, token: int) -> None:
        import sys

        from microturn.checkpoint.loader import load_tokenizer
        from microturn.checkpoint.tokenizer import StreamingDecoder

        if self.decoder is None:
            self.decoder = StreamingDecoder(load_tokenizer(self.source or None))
        sys.stdout.write(self.decoder.push(token))
        sys.stdout.flush()
