"""The FFF conditional matmul as one `torch.library` custom op, plus its checked public entry point.

Declared once here (schema, fake implementation for meta/FakeTensor tracing, autograd); the device
kernels live in `hf_fff.backends`. Being a custom op keeps `torch.compile(fullgraph=True)` free of graph
breaks and lets CUDA graphs capture the kernel launch.
"""

from __future__ import annotations

import torch

from . import backends
from .backends import reference
from .backends.reference import check_fff_arguments
# The modeling code imports its dropouts from here, as it does the FFF entry points: ops.py is the one module
# the trust_remote_code export replaces with plain torch (hf_fff.tools.remote_code), dropouts included.
from .dropout import FastDropout, fast_dropout, takes_hashed_dropout  # noqa: F401


@torch.library.custom_op("hf_fff::fff_forward", mutates_args=())
def fff_forward(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw op: x (M, H) contiguous, weights (T*N, H), bias (T*N,) -> (y (M, H), leaves (M, T) int64).

    Use `fast_feedforward` instead: it validates and reshapes. Dispatches to the selected backend.
    """
    _, forward = backends.resolve(x.device.type)
    return forward(x, weight_in, bias_in, weight_out, depth)


@fff_forward.register_fake
def _(x, weight_in, bias_in, weight_out, depth):
    trees = weight_in.shape[0] // reference.nodes_per_tree(depth)
    return x.new_empty(x.shape), x.new_empty((x.shape[0], trees), dtype=torch.long)


@torch.library.custom_op("hf_fff::fff_backward", mutates_args=())
def fff_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
    leaves: torch.Tensor,
    backend: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op: gradients of fff_forward w.r.t. (x, weight_in, bias_in, weight_out) along the saved leaves.

    grad_y and x (M, H) contiguous, leaves (M, T) int64 as fff_forward returned them. A custom op of its
    own so that a compiled training step keeps it as one node. backend: the backend that ran the forward
    (autograd passes it, so a `use_backend` block's choice holds on autograd's threads too); "" means the
    current choice.
    """
    _, backward = backends.resolve_backward(x.device.type, backend)
    return backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)


@fff_backward.register_fake
def _(grad_y, x, weight_in, bias_in, weight_out, depth, leaves, backend=""):
    return x.new_empty(x.shape), weight_in.new_empty(weight_in.shape), bias_in.new_empty(bias_in.shape), weight_out.new_empty(weight_out.shape)


def _setup_context(ctx, inputs, output):
    # Saved: x and the (tokens, trees) leaves, plus references to the weights. O(tokens * (hidden + trees)):
    # a leaf fixes its whole path, so backward recomputes the visited logits instead of storing them.
    x, weight_in, bias_in, weight_out, depth = inputs
    ctx.save_for_backward(x, weight_in, bias_in, weight_out, output[1])
    ctx.depth = depth
    ctx.backend = backends.resolve_kernels(x.device.type)[0]  # this thread's choice, which ran the forward


def _backward(ctx, grad_y, _grad_leaves):
    x, weight_in, bias_in, weight_out, leaves = ctx.saved_tensors
    grads = fff_backward(grad_y.contiguous(), x, weight_in, bias_in, weight_out, ctx.depth, leaves, ctx.backend)
    return (*grads, None)


fff_forward.register_autograd(_backward, setup_context=_setup_context)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Number of active TorchDispatchModes (profilers, FakeTensorMode, ...); private in torch, so if it ever
# disappears every call simply takes the dispatcher path.
_DISPATCH_MODE_DEPTH = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _needs_dispatcher(x: torch.Tensor, weight_in: torch.Tensor, bias_in: torch.Tensor, weight_out: torch.Tensor) -> bool:
    """Whether this call must go through the registered op rather than straight to the backend.

    The op is what torch.compile, autograd, FakeTensor/meta tracing and dispatch modes (profilers, flop
    counters) see; in a plain eager inference call they are all absent, and skipping the Python
    dispatcher round trip (about 9 us) keeps small calls close to the kernel's own cost. Written out
    tensor by tensor: generator expressions here cost about a microsecond per call.
    """
    if torch.compiler.is_compiling() or _DISPATCH_MODE_DEPTH is None or _DISPATCH_MODE_DEPTH() > 0:
        return True
    plain = _PLAIN_TENSOR_TYPES
    if type(x) not in plain or type(weight_in) not in plain or type(bias_in) not in plain or type(weight_out) not in plain:
        return True  # FakeTensor, DTensor and other subclasses
    return torch.is_grad_enabled() and (x.requires_grad or weight_in.requires_grad or bias_in.requires_grad or weight_out.requires_grad)


def run_fff(x: torch.Tensor, weight_in: torch.Tensor, bias_in: torch.Tensor, weight_out: torch.Tensor, depth: int):
    """fast_feedforward without argument checks, for callers that already validated (the module).

    Returns y shaped like x and the leaves as (tokens, trees): shaping them costs a view call (~1.5 us on the
    host, a sizeable part of a one-token call), so callers that want them shape them (`leaves_like`).
    """
    flat = x.dim() == 2
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if not (weight_in.is_contiguous() and bias_in.is_contiguous() and weight_out.is_contiguous()):
        weight_in, bias_in, weight_out = weight_in.contiguous(), bias_in.contiguous(), weight_out.contiguous()
    if _needs_dispatcher(x2d, weight_in, bias_in, weight_out):
        y, leaves = fff_forward(x2d, weight_in, bias_in, weight_out, depth)
    else:
        # `x.device.type` builds a new string each call (~0.4 us); `is_cpu` answers the common case for free.
        device_type = "cpu" if x2d.is_cpu else x2d.device.type
        y, leaves = backends.resolve(device_type)[1](x2d, weight_in, bias_in, weight_out, depth)
    # view_as: one C++ call; `view(x.shape)` first builds a torch.Size in Python (~1.4 us more)
    return (y if flat else y.view_as(x)), leaves


def leaves_like(x: torch.Tensor, leaves: torch.Tensor, trees: int) -> torch.Tensor:
    """run_fff's (tokens, trees) leaves shaped (..., trees) after x's leading dimensions."""
    return leaves if x.dim() == 2 else leaves.view(*x.shape[:-1], trees)


def fast_feedforward(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FFF over any leading shape: x (..., H) -> (y (..., H), leaves (..., T) int64).

    Row t*N + n of `weight_in` / `bias_in` is node n of tree t; row t*N + n of `weight_out` is that
    node's output direction (the transpose of the original `linear_out.weight`).
    """
    trees = check_fff_arguments(x, weight_in, bias_in, weight_out, depth)
    y, leaves = run_fff(x, weight_in, bias_in, weight_out, depth)
    return y, leaves_like(x, leaves, trees)
