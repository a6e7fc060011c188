"""The "cpp" backend: the C++ kernel cuda/fff_cpu.cpp for CPU tensors, JIT-built on first use.

When the extension cannot be built (no compiler, no ninja, a failed build) `hf_fff.extension` warns
once and the loader returns None, so the registry falls back to the plain torch reference.
"""

from __future__ import annotations

from typing import Optional

from .. import extension
from . import Kernels, register_native_backend

EXTENSION_NAME = "fff_cpu"
SOURCES = ["fff_cpu.cpp"]
# -march=native: the inner loops are written for the compiler to vectorise with the widest SIMD here
# (the cache key includes the CPU model, so the binary is never reused on a different CPU).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch already loaded: one OpenMP runtime, one thread pool


def load_module():
    """The compiled extension module, or None (after one warning) when it cannot be built."""
    return extension.load_extension(EXTENSION_NAME, SOURCES, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS)


def load_kernels() -> Optional[Kernels]:
    module = load_module()
    return None if module is None else Kernels(forward=module.fff_forward)


register_native_backend("cpp", "cpu", load_kernels)
