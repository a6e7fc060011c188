"""Dropout that is cheap on the CPU: the model's dropouts (hidden, embedding, attention probabilities, head).

torch's CPU dropout draws one Bernoulli per element from a sequential generator: 9 ms for one (8, 128, 768)
activation on a 2-core machine, a fifth of an UltraFastBERT fine-tuning step. `FastDropout` is nn.Dropout
whose CPU training calls go to the compiled CPU extension instead (cuda/dropout_cpu_kernel.h): each element's
keep decision is a hash of (seed, index), 0.25 ms for the same tensor, and the backward applies the same mask
from the seed alone, so nothing but the seed is saved. The seed is drawn from torch's default CPU generator:
`torch.manual_seed` reproduces the masks, and gradient checkpointing (which restores the generator state)
recomputes the same ones. Every other call (eval, p = 0 or 1, CUDA, torch.compile, the plain-torch backend
chosen with HF_FFF_BACKEND, no compiled extension) is torch's own dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .backends import cpu as cpu_backend

_SEED_RANGE = 2**63 - 1


@torch.library.custom_op("hf_fff::hashed_dropout", mutates_args=())
def hashed_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with each element kept and scaled by 1 / (1 - p), or zeroed, by a hash of (seed, its index); 0 <= p < 1.
    CPU tensors only, and only where the CPU extension builds (FastDropout checks both)."""
    module = cpu_backend.load_module()
    if module is None:
        raise RuntimeError("hf_fff.dropout.hashed_dropout needs the compiled CPU extension, which is not available here")
    return module.dropout(x.contiguous(), p, seed)


@hashed_dropout.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed = inputs


def _backward(ctx, grad):
    # d(x * mask * scale)/dx applied to grad: the same mask and scale, recomputed from the seed
    return hashed_dropout(grad, ctx.p, ctx.seed), None, None


hashed_dropout.register_autograd(_backward, setup_context=_setup_context)


def _uses_native_cpu_kernels() -> bool:
    return backends.resolve("cpu")[0] == "cpp"


def takes_hashed_dropout(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether `fast_dropout(x, p, training)` runs the hashed CPU kernel (else it is torch's dropout)."""
    return (
        training
        and 0.0 < p < 1.0
        and x.is_cpu
        and x.is_floating_point()
        and not torch.compiler.is_compiling()
        and _uses_native_cpu_kernels()
    )


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), through the hashed CPU kernel where `takes_hashed_dropout` says so."""
    if not takes_hashed_dropout(x, p, training):
        return F.dropout(x, p, training)
    seed = int(torch.randint(_SEED_RANGE, (), dtype=torch.int64))
    return hashed_dropout(x, float(p), seed)


class FastDropout(nn.Dropout):
    """nn.Dropout (same arguments, same distribution: each element kept with probability 1 - p and scaled by
    1 / (1 - p)) whose CPU training calls use the hashed kernel of the CPU extension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        return fast_dropout(x, self.p, self.training)
