"""Backend registry for the FFF op: which implementation runs for a device type.

A backend is a function `forward(x, weight_in, bias_in, weight_out, depth) -> (y, leaves)` taking
contiguous 2-D `x` (M, H) and the (T*N, H) / (T*N,) weights, all of one dtype on one device (see
`reference.fff_forward`, which is the contract). Native backends are loaded lazily on first use: a
loader returns the forward function, or None when the native code cannot be built (it warns once).

The choice is automatic (the native backend for the device when it loads, else "reference") and can be
forced with the environment variable HF_FFF_BACKEND or `hf_fff.set_backend` / `hf_fff.use_backend`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import reference

ForwardFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]
ENV_VAR = "HF_FFF_BACKEND"
AUTO = "auto"
REFERENCE = "reference"
MASKED = "masked"  # the published dense-and-mask computation, for baselines; never chosen automatically
_TORCH_BACKENDS = {REFERENCE: reference.fff_forward, MASKED: reference.fff_forward_masked}


@dataclass
class NativeBackend:
    name: str
    device_type: str
    loader: Callable[[], Optional[ForwardFn]]  # builds/loads the extension; None when unavailable
    _forward: Optional[ForwardFn] = None
    _tried: bool = False

    def forward_fn(self) -> Optional[ForwardFn]:
        if not self._tried:
            with _LOCK:
                if not self._tried:
                    self._forward = self.loader()
                    self._tried = True
        return self._forward


_LOCK = threading.Lock()
_NATIVE: dict[str, NativeBackend] = {}  # by backend name
_forced: Optional[str] = None  # set_backend(); overrides the environment variable


def register_native_backend(name: str, device_type: str, loader: Callable[[], Optional[ForwardFn]]) -> None:
    _NATIVE[name] = NativeBackend(name, device_type, loader)


def available_backends() -> list[str]:
    return [*_TORCH_BACKENDS, *_NATIVE]


def requested_backend() -> str:
    choice = _forced if _forced is not None else os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO
    if choice not in (AUTO, *available_backends()):
        raise ValueError(f"unknown FFF backend {choice!r} (from {ENV_VAR} or set_backend); choose one of {[AUTO, *available_backends()]}")
    return choice


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every FFF call in this process ("auto", "reference", "masked", "cpp", "cuda"); None restores the default."""
    global _forced
    if name is not None and name.lower() not in (AUTO, *available_backends()):
        raise ValueError(f"unknown FFF backend {name!r}; choose one of {[AUTO, *available_backends()]}")
    _forced = None if name is None else name.lower()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_backend`, restoring the previous choice on exit."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def resolve(device_type: str) -> tuple[str, ForwardFn]:
    """(backend name, forward function) that will run for tensors on `device_type`."""
    choice = requested_backend()
    if choice in _TORCH_BACKENDS:
        return choice, _TORCH_BACKENDS[choice]
    if choice != AUTO:
        backend = _NATIVE[choice]
        if backend.device_type != device_type:
            raise RuntimeError(f"FFF backend {choice!r} runs on {backend.device_type} tensors, got {device_type} tensors")
        forward = backend.forward_fn()
        if forward is None:
            raise RuntimeError(f"FFF backend {choice!r} was forced but could not be loaded (see the warning above)")
        return choice, forward
    for backend in _NATIVE.values():
        if backend.device_type == device_type:
            forward = backend.forward_fn()
            if forward is not None:
                return backend.name, forward
    return REFERENCE, reference.fff_forward


def _reset_for_tests() -> None:
    """Forget loaded native backends so that a test can exercise loading again."""
    for backend in _NATIVE.values():
        backend._forward, backend._tried = None, False
from . import cpu  # noqa: E402,F401  (registers the C++ CPU backend)
from . import cuda  # noqa: E402,F401  (registers the CUDA backend)
