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
# resolve()'s choice by (forced choice, environment value, device type): a torch backend's function or a
# loaded native backend. Resolving costs ~2 us of Python, a sizeable part of a one-token call; anything that
# can change the choice clears this. The native forward is read from the backend at each call, so a
# patched or reloaded backend is seen at once.
_RESOLVED: dict[tuple, "tuple[str, Optional[NativeBackend], Optional[ForwardFn]]"] = {}


def register_native_backend(name: str, device_type: str, loader: Callable[[], Optional[ForwardFn]]) -> None:
    _NATIVE[name] = NativeBackend(name, device_type, loader)
    _RESOLVED.clear()


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
    _RESOLVED.clear()


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
        _RESOLVED.clear()


def resolve(device_type: str) -> tuple[str, ForwardFn]:
    """(backend name, forward function) that will run for tensors on `device_type`."""
    key = (_forced, os.environ.get(ENV_VAR), device_type)
    choice = _RESOLVED.get(key)
    if choice is None:
        choice = _RESOLVED[key] = _choose(device_type)  # errors raise and are not cached
    name, native, torch_forward = choice
    if native is None:
        return name, torch_forward
    forward = native._forward
    return (name, forward) if forward is not None else _choose_native_again(device_type)


def _choose_native_again(device_type: str) -> tuple[str, ForwardFn]:
    """The cached native backend was reset (tests): choose afresh."""
    _RESOLVED.clear()
    return resolve(device_type)


def _choose(device_type: str) -> "tuple[str, Optional[NativeBackend], Optional[ForwardFn]]":
    choice = requested_backend()
    if choice in _TORCH_BACKENDS:
        return choice, None, _TORCH_BACKENDS[choice]
    if choice != AUTO:
        backend = _NATIVE[choice]
        if backend.device_type != device_type:
            raise RuntimeError(f"FFF backend {choice!r} runs on {backend.device_type} tensors, got {device_type} tensors")
        if backend.forward_fn() is None:
            raise RuntimeError(f"FFF backend {choice!r} was forced but could not be loaded (see the warning above)")
        return choice, backend, None
    for backend in _NATIVE.values():
        if backend.device_type == device_type and backend.forward_fn() is not None:
            return backend.name, backend, None
    return REFERENCE, None, reference.fff_forward


def _reset_for_tests() -> None:
    """Forget loaded native backends so that a test can exercise loading again."""
    for backend in _NATIVE.values():
        backend._forward, backend._tried = None, False
    _RESOLVED.clear()
from . import cpu  # noqa: E402,F401  (registers the C++ CPU backend)
from . import cuda  # noqa: E402,F401  (registers the CUDA backend)
