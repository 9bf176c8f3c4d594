"""Compile the C++ kernels on first use (cached by torch under ~/.cache/torch_extensions).

A machine without a compiler or without AVX2/FMA still runs: `load()` returns None and the
callers fall back to torch's own operators. Set MICROTURN_KERNELS=0 to force the fallback.
"""

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
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
    try:
        return compile_extension(
            name=NAME, sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as exc:  # no compiler, no ninja: slower, still correct
        print(f"microturn: CPU kernels unavailable ({str(exc).splitlines()[0]}); "
              "using torch's matmul", file=sys.stderr)
        return None


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
