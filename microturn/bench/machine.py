"""What this machine can do: memory read bandwidth and matmul peak, measured with torch."""

import time
from dataclasses import dataclass

import torch


def best_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@dataclass(frozen=True)
class MachinePeaks:
    read_bytes_per_second: float
    matmul_flops_per_second: dict[str, float]  # by dtype name


def read_bandwidth(megabytes: int = 1024, repeats: int = 8) -> float:
    """Bytes/s of a streaming read (a sum) over a buffer far larger than the last-level cache."""
    buffer = torch.ones(megabytes * 2**20 // 4)  # written once, so its pages are really mapped
    seconds = best_seconds(buffer.sum, repeats)
    return buffer.numel() * 4 / seconds


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 3) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = best_seconds(lambda: a @ b, repeats, warmup=1)
    return 2 * size**3 / seconds


def measure_machine(dtypes: dict[str, torch.dtype]) -> MachinePeaks:
    """Bandwidth, and the matmul peak of each named dtype (the dtype the matmul runs in)."""
    return MachinePeaks(read_bandwidth(),
                        {name: matmul_peak(dtype) for name, dtype in dtypes.items()})
