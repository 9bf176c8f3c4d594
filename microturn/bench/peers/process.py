"""Each engine of `bench peers` measured in a process of its own.

An engine that shares a process with torch shares it with torch's OpenMP team: threads that
spin after every parallel region, on the cores the other engine's threads need. llama.cpp
measured inside the run that had just run microturn got capacity 0; alone, 2. So every
(engine, shape) runs in a fresh interpreter that builds only that engine, and a llama.cpp
process never imports torch at all (each record says so: `process`)."""

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from microturn.bench.peers.base import Shape
from microturn.bench.peers.harness import PeerRecord, Workload, measure


@dataclass(frozen=True)
class PeerJob:
    """Everything a process needs to build one engine and measure it: plain values only."""
    engine: str
    shape: Shape
    model: str | None  # what microturn and reprefill load (None: the default model)
    dtype: str
    gguf: str  # what transformers and llama.cpp load
    trained_context: int
    kv_bytes_per_token: int  # f16 K and V of one token, for the llama.cpp peers
    threads: int
    text: list[int]
    turns: int
    slice_ms: int
    capacity_turns: int
    max_capacity: int
    budget_s: float

    @property
    def context(self) -> int:
        """Tokens a long session may hold: every micro-turn's positions and markers."""
        return max(512, (self.turns + 8) * (Workload(self.text, self.shape).per_turn + 4))


def build_peer(job: PeerJob):
    name = job.engine
    if name == "llama-server":
        from microturn.bench.peers.llamacpp_server import LlamaServerPeer

        return LlamaServerPeer(Path(job.gguf), job.context, job.trained_context, job.threads,
                               job.kv_bytes_per_token)
    if name.startswith("llamacpp"):
        if name == "llamacpp-batched":
            from microturn.bench.peers.llamacpp_batched import LlamaCppBatchedPeer

            return LlamaCppBatchedPeer(Path(job.gguf), job.context, job.trained_context,
                                       job.threads, job.kv_bytes_per_token,
                                       job.shape.input_tokens + job.shape.audio_positions)
        from microturn.bench.peers.llamacpp_peer import LlamaCppPeer

        return LlamaCppPeer(Path(job.gguf), job.context, job.trained_context, job.threads,
                            job.kv_bytes_per_token)
    import torch

    torch.set_num_threads(job.threads)
    if name.startswith("transformers"):
        from microturn.bench.peers.transformers_peer import TransformersPeer

        return TransformersPeer(Path(job.gguf), torch.bfloat16 if name.endswith("bf16")
                                else torch.float32)
    from microturn.checkpoint.loader import load_model

    loaded = load_model(job.model, job.dtype, "cpu")
    if name == "reprefill":
        from microturn.bench.peers.reprefill import ReprefillPeer

        return ReprefillPeer(loaded)
    from microturn.bench.peers.microturn_peer import MicroturnPeer

    return MicroturnPeer(loaded, name == "microturn", job.shape)


def run_job(job: PeerJob) -> PeerRecord:
    """Build the engine and measure it, in whatever process calls this."""
    from rich.console import Console

    peer = build_peer(job)
    Console(highlight=False, soft_wrap=True).print(f"[bold]{peer.name}[/] "
                                                   f"({job.shape.name}): {peer.config}")
    log = Console(highlight=False, soft_wrap=True).log
    record = measure(peer, Workload(job.text, job.shape), job.turns, job.slice_ms,
                     job.capacity_turns, job.max_capacity, job.budget_s, log)
    record.process = {"pid": os.getpid(), "torch_imported": "torch" in sys.modules,
                      "threads": _os_threads()}
    return record


def run_in_own_process(job: PeerJob) -> PeerRecord:
    """`run_job` in a fresh interpreter (`python -m` this module): nothing inherited from this
    process, not even its `__main__` (multiprocessing's spawn would re-import the CLI, and with
    it torch). The job goes in on stdin, the record or the exception comes back in a file."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.pickle"
        child = subprocess.run([sys.executable, "-m", __name__, str(result)],
                               input=pickle.dumps(job), check=False)
        if not result.exists():
            raise RuntimeError(f"the {job.engine} process exited with {child.returncode} "
                               "and no result")
        outcome = pickle.loads(result.read_bytes())
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))



if __name__ == "__main__":
    job = pickle.loads(sys.stdin.buffer.read())
    try:
        outcome = run_job(job)
    except Exception as exc:  # handed back to the parent, which reports it
        outcome = exc
    with open(sys.argv[1], "wb") as f:
        pickle.dump(outcome, f)
