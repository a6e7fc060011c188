"""The "cuda" backend: the CUDA kernels in cuda/ for CUDA tensors, JIT-built on first use.

Nothing is compiled at import (this module imports on CPU-only machines too): the build happens when the
first CUDA tensor reaches the FFF op. When it cannot happen (no nvcc, no ninja, a failed build),
`hf_fff.extension` warns once and the loader returns None, so the registry falls back to the plain torch
reference on the GPU.

The kernel picks its strategy from the problem size (choose_strategy in cuda/dispatch.cuh; docs/cuda_design.md says
why). The strategies are the rows of cuda/strategies.h, which `strategy_table()` reads, so their names are known
without a build. For measurements, the environment variables HF_FFF_CUDA_STRATEGY (auto or a name of that table)
and HF_FFF_CUDA_SPLIT (sorted's bucket level; staged's top levels held in shared memory) force one, read once when
the backend loads. For tests, HF_FFF_CUDA_NO_COOPERATIVE (read at every call) makes the sorted strategy sort with
separate launches, as it must where a cooperative launch of one block per SM is refused (MPS, green contexts).

The fused backward of cuda/backward.cuh (deterministic: fixed summation order, no atomics) computes the CUDA
gradients; HF_FFF_CUDA_BACKWARD=reference (read when the backend loads) puts the plain-torch reference backward
in its place. float64 stays on the torch reference in both directions.
"""

from __future__ import annotations

import functools
import os
import re
from typing import NamedTuple, Optional

import torch

from .. import extension
from . import Kernels, reference, register_native_backend

EXTENSION_NAME = "fff_cuda"
# The binding (host compiler, torch) and the CUDA translation units (nvcc, no torch headers).
SOURCES = [
    "fff_cuda.cpp", "fff_cuda_plan.cu", "fff_cuda_f32.cu", "fff_cuda_f16.cu", "fff_cuda_bf16.cu", "fff_cuda_backward.cpp", "fff_cuda_backward.cu",
]
CUDA_UNITS = [source for source in SOURCES if source.endswith(".cu")]
# The sources include these; listed so that the build cache key changes when they do.
HEADERS = [
    "fff_cuda.h", "strategies.h", "primitives.cuh", "common.cuh", "launch.cuh", "walk.cuh", "few_tokens.cuh", "staged.cuh", "sorted.cuh",
    "dispatch.cuh", "backward.h", "backward.cuh", "binding.h",
]
# -lineinfo: compute-sanitizer and profilers can name source lines; it costs nothing at run time.
# No --use_fast_math: erff and the fp32 accumulation must match the torch reference.
CUDA_CFLAGS = ["-O3", "-lineinfo"]
CFLAGS = ["-O3"]



class Strategy(NamedTuple):
    """A row of cuda/strategies.h."""

    name: str
    id: int
    purpose: str


# X(enumerator, name, id, "purpose"), one row per line (strategies.h asks its editors to keep it so).
_STRATEGY_ROW = re.compile(r'^\s*X\(\s*k\w+\s*,\s*(\w+)\s*,\s*(\d+)\s*,\s*"([^"]*)"\s*\)')


def strategy_table() -> list[Strategy]:
    """The rows of cuda/strategies.h, in order (auto, id 0, is not a row)."""
    text = extension.resolve_source("strategies.h").read_text()
    rows = [Strategy(m.group(1), int(m.group(2)), m.group(3)) for m in map(_STRATEGY_ROW.match, text.splitlines()) if m]
    if not rows:
        raise RuntimeError("cuda/strategies.h has no strategy rows")
    return rows


@functools.lru_cache(maxsize=None)
def strategies() -> dict[str, int]:
    """{name: id} of every strategy HF_FFF_CUDA_STRATEGY takes: auto (0) and the rows of cuda/strategies.h."""
    return {"auto": 0, **{row.name: row.id for row in strategy_table()}}


STRATEGY_ENV = "HF_FFF_CUDA_STRATEGY"
SPLIT_ENV = "HF_FFF_CUDA_SPLIT"


def load_module():
    """The compiled extension module, or None (after one warning) when it cannot be built."""
    return extension.load_extension(
        EXTENSION_NAME,
        SOURCES,
        with_cuda=True,
        extra_cflags=CFLAGS,
        extra_cuda_cflags=CUDA_CFLAGS + extension.header_flags(HEADERS),
    )


def forced_strategy() -> tuple[int, int]:
    """(strategy, split) from the environment; (0, 0) means automatic."""
    name = os.environ.get(STRATEGY_ENV, "auto").strip().lower() or "auto"
    table = strategies()
    if name not in table:
        raise ValueError(f"{STRATEGY_ENV}={name!r}: choose one of {sorted(table)}")
    split = int(os.environ.get(SPLIT_ENV, "0") or 0)
    return table[name], split


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


BACKWARD_ENV = "HF_FFF_CUDA_BACKWARD"


def fused_backward_enabled() -> bool:
    """Whether the fused CUDA backward runs (the default; HF_FFF_CUDA_BACKWARD=reference turns it off), read
    when the backend loads. tests/test_cuda_backward.py is its GPU suite."""
    value = os.environ.get(BACKWARD_ENV, "fused").strip().lower() or "fused"
    if value not in ("fused", "reference"):
        raise ValueError(f"{BACKWARD_ENV}={value!r}: choose 'fused' or 'reference'")
    return value == "fused"


def load_kernels() -> Optional[Kernels]:
    module = load_module()
    if module is None:
        return None
    strategy, split = forced_strategy()
    kernel = module.fff_forward if strategy == 0 and split == 0 else functools.partial(module.fff_forward, strategy=strategy, split=split)

    def forward(x, weight_in, bias_in, weight_out, depth):
        if x.dtype not in KERNEL_DTYPES:  # float64 (gradcheck, references): the torch path, on the GPU
            return reference.fff_forward(x, weight_in, bias_in, weight_out, depth)
        return kernel(x, weight_in, bias_in, weight_out, depth)

    def backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves):
        # The fused kernel (cuda/backward.cuh) is deterministic, so it also serves
        # torch.use_deterministic_algorithms(True); float64 takes the torch path, as in forward.
        if x.dtype not in KERNEL_DTYPES:
            return reference.fff_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
        return module.fff_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)

    return Kernels(forward=forward, backward=backward if fused_backward_enabled() else None)


register_native_backend("cuda", "cuda", load_kernels)
