"""Backend registry for the FFF ops: which implementation runs for a device type.

A backend is a pair of functions (`Kernels`):
  forward(x, weight_in, bias_in, weight_out, depth) -> (y, leaves)
  backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves) -> (grad_x, grad_weight_in, grad_bias_in, grad_weight_out)
taking contiguous 2-D `x` / `grad_y` (M, H), the (T*N, H) / (T*N,) weights and the (M, T) int64 leaves, all
of one dtype on one device (`reference.fff_forward` and `reference.fff_backward` are the contract). A backend
without a backward of its own uses the reference backward. Native backends are loaded lazily on first use:
a loader returns its `Kernels`, or None when the native code cannot be built (it warns once).

The choice is automatic (the native backend for the device when it loads, else "reference") and can be
forced for the whole process with the environment variable HF_FFF_BACKEND or `hf_fff.set_backend`, and
for one thread with `hf_fff.use_backend` (which overrides both in that thread only).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import reference

ForwardFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]
BackwardFn = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Kernels:
    """What a backend computes with: its forward and (optionally) its own backward."""

    forward: ForwardFn
    backward: Optional[BackwardFn] = None  # None: the reference backward (plain torch) runs


ENV_VAR = "HF_FFF_BACKEND"
AUTO = "auto"
REFERENCE = "reference"
MASKED = "masked"  # the published dense-and-mask computation, for baselines; never chosen automatically
_TORCH_BACKENDS = {
    REFERENCE: Kernels(reference.fff_forward, reference.fff_backward),
    MASKED: Kernels(reference.fff_forward_masked, reference.fff_backward_masked),
}


@dataclass
class NativeBackend:
    name: str
    device_type: str
    loader: Callable[[], Optional[Kernels]]  # builds/loads the extension; None when unavailable
    _kernels: Optional[Kernels] = None
    _tried: bool = False

    def kernels(self) -> Optional[Kernels]:
        if not self._tried:
            with _LOCK:
                if not self._tried:
                    self._kernels = self._load()
                    self._tried = True
        return self._kernels

    def _load(self) -> Optional[Kernels]:
        """The loader's kernels; a loader that raises (say, a cached module without the expected entry
        point `fff_forward`) counts as unavailable after one warning, instead of failing every FFF call."""
        try:
            return self.loader()
        except Exception as error:
            warnings.warn(
                f"hf_fff: the FFF backend {self.name!r} could not be loaded ({type(error).__name__}: {error}); "
                "using the plain torch implementation instead, which is slower.",
                RuntimeWarning,
                stacklevel=4,
            )
            return None


_LOCK = threading.Lock()
_NATIVE: dict[str, NativeBackend] = {}  # by backend name
_forced: Optional[str] = None  # set_backend(); overrides the environment variable


class _ThreadChoice(threading.local):
    """use_backend()'s choice in this thread; overrides set_backend and the environment. A class attribute
    as the default: reading it costs a plain attribute lookup (getattr with a default costs ~4x more)."""

    forced: Optional[str] = None


_THREAD = _ThreadChoice()
# resolve()'s choice by (effective forced choice, environment value, device type): a torch backend's function or a
# loaded native backend. Resolving costs ~2 us of Python, a sizeable part of a one-token call; anything that
# can change the choice clears this. The native forward is read from the backend at each call, so a
# patched or reloaded backend is seen at once.
_RESOLVED: dict[tuple, "tuple[str, Optional[NativeBackend], Optional[Kernels]]"] = {}


def register_native_backend(name: str, device_type: str, loader: Callable[[], Optional[Kernels]]) -> None:
    _NATIVE[name] = NativeBackend(name, device_type, loader)
    _RESOLVED.clear()


def available_backends() -> list[str]:
    return [*_TORCH_BACKENDS, *_NATIVE]


def _forced_here() -> Optional[str]:
    """The forced choice in force for this thread: use_backend's, else set_backend's, else None."""
    local = _THREAD.forced
    return local if local is not None else _forced


def requested_backend() -> str:
    forced = _forced_here()
    choice = forced if forced is not None else (_environment_choice() or AUTO).strip().lower() or AUTO
    if choice not in (AUTO, *available_backends()):
        raise ValueError(f"unknown FFF backend {choice!r} (from {ENV_VAR} or set_backend); choose one of {[AUTO, *available_backends()]}")
    return choice


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every FFF call in this process ("auto", "reference", "masked", "cpp", "cuda"); None restores the default.

    A thread inside a `use_backend` block keeps that block's choice until the block ends."""
    global _forced
    if name is not None and name.lower() not in (AUTO, *available_backends()):
        raise ValueError(f"unknown FFF backend {name!r}; choose one of {[AUTO, *available_backends()]}")
    _forced = None if name is None else name.lower()
    _RESOLVED.clear()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for the FFF calls of this thread inside the block; the previous choice of this
    thread comes back on exit (None: back to set_backend / HF_FFF_BACKEND / automatic).

    The choice is thread-local: other threads do not see it and keep whatever set_backend, HF_FFF_BACKEND
    or their own use_backend block says, so overlapping blocks in several threads cannot leave each other's
    choice behind. Work this thread hands to other threads sees their choice, not this block's (DataLoader
    workers, thread pools), with one exception: the backward of an FFF call made inside the block runs on the
    backend that ran its forward, also where autograd runs it on its own device threads (CUDA tensors).
    """
    if name is not None and name.lower() not in (AUTO, *available_backends()):
        raise ValueError(f"unknown FFF backend {name!r}; choose one of {[AUTO, *available_backends()]}")
    previous = _THREAD.forced
    _THREAD.forced = None if name is None else name.lower()
    try:
        yield
    finally:
        _THREAD.forced = previous


try:  # CPython's os._Environ (POSIX and Windows) since 3.2
    _ENVIRON_DATA, _ENVIRON_KEY = os.environ._data, os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except AttributeError:
    _ENVIRON_DATA, _ENVIRON_KEY = None, None


def _environment_choice() -> Optional[str]:
    """HF_FFF_BACKEND as os.environ holds it now, read on every call so that a change takes effect at once.

    `os.environ.get` costs ~1.2 us when the variable is unset (Mapping.get raises and catches KeyError), a
    tenth of a one-token call; the mapping's own dict answers in ~50 ns. Both see the same data: os.environ
    keeps `_data` in step with every assignment. Interpreters without it take the public path."""
    if _ENVIRON_DATA is None:
        return os.environ.get(ENV_VAR)
    value = _ENVIRON_DATA.get(_ENVIRON_KEY)
    return None if value is None else os.environ.decodevalue(value)


def resolve_kernels(device_type: str) -> tuple[str, Kernels]:
    """(backend name, its kernels) that will run for tensors on `device_type`."""
    local = _THREAD.forced
    key = (local if local is not None else _forced, _environment_choice(), device_type)
    choice = _RESOLVED.get(key)
    if choice is None:
        choice = _RESOLVED[key] = _choose(device_type)  # errors raise and are not cached
    name, native, torch_kernels = choice
    if native is None:
        return name, torch_kernels
    kernels = native._kernels
    return (name, kernels) if kernels is not None else _choose_native_again(device_type)


def resolve(device_type: str) -> tuple[str, ForwardFn]:
    """(backend name, forward function) that will run for tensors on `device_type`."""
    name, kernels = resolve_kernels(device_type)
    return name, kernels.forward


def resolve_backward(device_type: str, backend: str = "") -> tuple[str, BackwardFn]:
    """(backend name, backward function) for tensors on `device_type`: the backend's own, else the reference's.

    backend: the name of the backend whose forward produced the leaves (the op's autograd records it), so that
    the backward matches the forward whichever thread runs it; "" resolves the current choice.
    """
    if backend:
        name, kernels = backend, _kernels_named(backend, device_type)
    else:
        name, kernels = resolve_kernels(device_type)
    return name, kernels.backward if kernels.backward is not None else reference.fff_backward


def _kernels_named(name: str, device_type: str) -> Kernels:
    """The kernels of the backend called `name` (already chosen once for a forward, so it loads)."""
    if name in _TORCH_BACKENDS:
        return _TORCH_BACKENDS[name]
    native = _NATIVE.get(name)
    kernels = native.kernels() if native is not None and native.device_type == device_type else None
    if kernels is None:
        raise RuntimeError(f"FFF backend {name!r} is not available for {device_type} tensors")
    return kernels


def _choose_native_again(device_type: str) -> tuple[str, Kernels]:
    """The cached native backend was reset (tests): choose afresh."""
    _RESOLVED.clear()
    return resolve_kernels(device_type)


def _choose(device_type: str) -> "tuple[str, Optional[NativeBackend], Optional[Kernels]]":
    choice = requested_backend()
    if choice in _TORCH_BACKENDS:
        return choice, None, _TORCH_BACKENDS[choice]
    if choice != AUTO:
        backend = _NATIVE[choice]
        if backend.device_type != device_type:
            raise RuntimeError(f"FFF backend {choice!r} runs on {backend.device_type} tensors, got {device_type} tensors")
        if backend.kernels() is None:
            raise RuntimeError(f"FFF backend {choice!r} was forced but could not be loaded (see the warning above)")
        return choice, backend, None
    for backend in _NATIVE.values():
        if backend.device_type == device_type and backend.kernels() is not None:
            return backend.name, backend, None
    return REFERENCE, None, _TORCH_BACKENDS[REFERENCE]


def _reset_for_tests() -> None:
    """Forget loaded native backends so that a test can exercise loading again."""
    for backend in _NATIVE.values():
        backend._kernels, backend._tried = None, False
    _RESOLVED.clear()
from . import cpu  # noqa: E402,F401  (registers the C++ CPU backend)
from . import cuda  # noqa: E402,F401  (registers the CUDA backend)
