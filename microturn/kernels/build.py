"""Compile the C++ kernels on first use (cached by torch under ~/.cache/torch_extensions).

A machine without a compiler or without AVX2/FMA still runs: `load()` returns None and the
callers fall back to torch's own operators. Set MICROTURN_KERNELS=0 to force the fallback.
"""

import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).with_name("csrc")  # one file per family; headers shared
NAME = "microturn_cpu_kernels"


def cpu_supports_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def cpu_has_bf16_gemm() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def load() -> ModuleType | None:
    if os.environ.get("MICROTURN_KERNELS", "1") == "0" or not cpu_supports_avx2():
        return None
    from torch.utils.cpp_extension import load as compile_extension

    _put_ninja_on_path()

    if not _cached():
        print("microturn: compiling CPU kernels (first run only, about a minute)...",
              file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        # ninja compiles the files in parallel and, after an edit, only what changed; torch
        # hashes only the sources, so the headers' hash goes into the flags
        module = compile_extension(
            name=NAME, sources=[str(p) for p in sorted(CSRC.glob("*.cpp"))],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp",
                          f"-DMICROTURN_HEADERS={headers_hash()}"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja: slower, still correct
        print(f"microturn: CPU kernels unavailable ({str(exc).splitlines()[0]}); "
              "using torch's matmul", file=sys.stderr)
        return None
    if (seconds := time.perf_counter() - started) > 5:
        print(f"microturn: CPU kernels built in {seconds:.0f} s", file=sys.stderr, flush=True)
    return module


def headers_hash() -> str:
    digest = hashlib.sha256()
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def _cached() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory(NAME, verbose=False)).glob("*.so"))


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pip package's binary is there only in an
    activated environment."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
