"""What this machine can do: memory read bandwidth and matmul peak, measured with torch."""

import platform
import time
from dataclasses import dataclass

import torch

from microturn.kernels.huge_pages import huge_page_bytes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
    return BandwidthSampler(megabytes).best(repeats)


class BandwidthSampler:
    """One streaming read (a sum) of a buffer far larger than the last-level cache per call.
    A shared machine's bandwidth drifts by tens of percent within minutes, so a benchmark takes
    samples between its timed passes and holds each pass to the bandwidth of its own minutes."""

    def __init__(self, megabytes: int = 256):
        # on huge pages, as the weights a forward pass streams: read through 4 KiB pages the
        # same sum measured ~30 % less here (a TLB miss per page), which would flatter floors
        self.buffer = huge_page_bytes(megabytes * 2**20).view(torch.float32)
        self.buffer.fill_(1.0)  # written once: its pages are mapped
        self.samples: list[float] = []

    def sample(self) -> float:
        started = time.perf_counter()
        self.buffer.sum()
        rate = self.buffer.numel() * 4 / (time.perf_counter() - started)
        self.samples.append(rate)
        return rate

    def best(self, repeats: int) -> float:
        for _ in range(2):
            self.buffer.sum()  # warm-up
        return max(self.sample() for _ in range(repeats))


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 12) -> float:
    """FLOP/s of the best of `repeats` square matmuls (~5 ms each here): a peak, so the best; a
    shared VM halves a few of them now and then, and a low peak would lower every floor's
    ratio below what the machine can do (one run sampled three and reported 0.85x a floor)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    seconds = best_seconds(lambda: a @ b, repeats, warmup=1)
    return 2 * size**3 / seconds


def thread_round_trip_ns() -> float | None:
    """Nanoseconds for a cache line to go from the first intra-op thread to the second and back
    (the median of five samples): ~60-80 when two vCPUs share a last-level cache, several times
    that across chiplets, which a VM may switch between within minutes. None without the CPU
    kernels or a second thread."""
    from microturn.kernels import build

    kernels = build.load()
    if kernels is None or torch.get_num_threads() < 2:
        return None
    return kernels.thread_round_trip_ns() or None  # 0: the pool gave it one thread


def measure_machine(dtypes: dict[str, torch.dtype]) -> MachinePeaks:
    """Bandwidth, and the matmul peak of each named dtype (the dtype the matmul runs in)."""
    return MachinePeaks(read_bandwidth(),
                        {name: matmul_peak(dtype) for name, dtype in dtypes.items()})
