"""The "cpp" backend: the C++ kernel (cuda/fff_cpu.cpp around cuda/fff_cpu_kernel.h) for CPU tensors.

JIT-built on first use. When the extension cannot be built (no compiler, no ninja, a failed build)
`hf_fff.extension` warns once and the loader returns None, so the registry falls back to the plain torch
reference. The kernel provides both the forward and the fused backward (docs/cpu_design.md).

The build targets this CPU (-march=native): the kernel's SIMD width follows the target's registers. For
measurements, HF_FFF_CPU_MARCH (or `load_module(march=...)`) builds for another target this CPU can run,
e.g. x86-64-v3 (AVX2 + FMA) on an AVX-512 machine; each target is its own cached build.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Optional

from .. import extension
from . import Kernels, register_native_backend

EXTENSION_NAME = "fff_cpu"
SOURCES = ["fff_cpu.cpp"]
HEADERS = ["fff_cpu_kernel.h", "dropout_cpu_kernel.h"]  # included by the source; their content goes into the build's cache key
MARCH_ENV = "HF_FFF_CPU_MARCH"
DEFAULT_MARCH = "native"  # the cache key includes the CPU model, so the binary is never reused on a different CPU
LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch already loaded: one OpenMP runtime, one thread pool


def cflags(march: str) -> list[str]:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise ValueError(f"{MARCH_ENV}={march!r} is not a -march value")
    return ["-O3", f"-march={march}", "-fopenmp", "-std=c++17", *extension.header_flags(HEADERS, include_dir=True)]


def resolved_march(march: Optional[str] = None) -> str:
    """The -march a build uses: `march`, else $HF_FFF_CPU_MARCH, else native."""
    return march or os.environ.get(MARCH_ENV, "").strip() or DEFAULT_MARCH


def load_module(march: Optional[str] = None):
    """The compiled extension for `march` (default: $HF_FFF_CPU_MARCH or native), or None after one warning."""
    return _load_module_for(resolved_march(march))


@functools.lru_cache(maxsize=None)
def _load_module_for(march: str):
    # Once per target and process: the flags carry a hash of the headers' content, and reading and hashing them
    # took ~0.4 ms a call, which the hashed dropout paid at every use (~100 calls in a training step).
    return extension.load_extension(EXTENSION_NAME, SOURCES, extra_cflags=cflags(march), extra_ldflags=LDFLAGS)


def load_kernels() -> Optional[Kernels]:
    module = load_module()
    return None if module is None else Kernels(forward=module.fff_forward, backward=module.fff_backward)


register_native_backend("cpp", "cpu", load_kernels)
