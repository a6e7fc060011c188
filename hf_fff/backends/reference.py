"""Plain-torch FFF: the oracle every fast backend is tested against, and the fallback everywhere.

It computes exactly the published layer (see crammed_model.md) but touches only the visited nodes:
for each of the `depth + 1` levels it gathers one row of `weight_in` / `weight_out` per token and tree.
Accumulation is float32 (float64 for float64 inputs) whatever the input dtype, and routing decisions
are taken on those accumulated logits, as the kernels do. The argument contract every backend relies on
(`check_fff_arguments`) lives here too, because this torch-only file is what published repos carry as
their FFF for trust_remote_code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nodes_per_tree(depth: int) -> int:
    """A complete binary tree of `depth + 1` levels, stored heap-style: node n has children 2n+1, 2n+2."""
    return 2 ** (depth + 1) - 1


MAX_DEPTH = 30  # leaves are addressed with int64 shifts; deeper trees would not fit in memory anyway


def check_fff_arguments(x: torch.Tensor, weight_in: torch.Tensor, bias_in: torch.Tensor, weight_out: torch.Tensor, depth: int) -> int:
    """Raise a clear error for anything the kernels cannot take; return the number of trees."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"FFF depth must be an int in [0, {MAX_DEPTH}], got {depth!r}")
    for name, tensor in (("x", x), ("weight_in", weight_in), ("bias_in", bias_in), ("weight_out", weight_out)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"FFF {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"FFF {name} must be a floating-point tensor, got {tensor.dtype}")
    if x.dim() < 1:
        raise ValueError("FFF input must have at least one dimension (..., hidden)")
    hidden = x.shape[-1]
    n_nodes = nodes_per_tree(depth)
    if weight_in.dim() != 2 or weight_in.shape[1] != hidden or weight_in.shape[0] == 0 or weight_in.shape[0] % n_nodes:
        raise ValueError(
            f"FFF weight_in must have shape (trees * {n_nodes}, {hidden}) for depth {depth} and input width {hidden}, "
            f"got {tuple(weight_in.shape)}"
        )
    if weight_out.shape != weight_in.shape:
        raise ValueError(f"FFF weight_out must have the shape of weight_in {tuple(weight_in.shape)}, got {tuple(weight_out.shape)}")
    if bias_in.shape != (weight_in.shape[0],):
        raise ValueError(f"FFF bias_in must have shape ({weight_in.shape[0]},), got {tuple(bias_in.shape)}")
    dtypes = {t.dtype for t in (x, weight_in, bias_in, weight_out)}
    if len(dtypes) != 1:
        raise TypeError(f"FFF input and weights must share one dtype, got x {x.dtype}, weights {weight_in.dtype}/{bias_in.dtype}/{weight_out.dtype}")
    devices = {t.device for t in (x, weight_in, bias_in, weight_out)}
    if len(devices) != 1:
        raise ValueError(f"FFF input and weights must be on one device, got {sorted(str(d) for d in devices)}")
    return weight_in.shape[0] // n_nodes


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def path_rows(leaves: torch.Tensor, depth: int) -> torch.Tensor:
    """Rows of the weight matrices visited on the way to `leaves`.

    leaves: (M, T) leaf index in [0, 2**depth) per token and tree.
    returns: (M, T, depth + 1) row indices into the (T * N, H) weights, root first. A leaf fixes its
    whole path in a heap-ordered tree, so backward needs nothing but the leaves.
    """
    trees = leaves.shape[1]
    levels = torch.arange(depth + 1, device=leaves.device)
    level_start = (1 << levels) - 1  # first node index of each level
    in_tree = level_start + (leaves.unsqueeze(-1) >> (depth - levels))  # (M, T, L)
    tree_start = torch.arange(trees, device=leaves.device) * nodes_per_tree(depth)
    return in_tree + tree_start.view(1, trees, 1)


def fff_forward(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, H); weight_in, weight_out (T*N, H); bias_in (T*N,) -> (y (M, H) in x.dtype, leaves (M, T) int64)."""
    tokens, _ = x.shape
    n_nodes = nodes_per_tree(depth)
    trees = weight_in.shape[0] // n_nodes
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    tree_start = torch.arange(trees, device=x.device) * n_nodes  # (T,)
    node = torch.zeros(tokens, trees, dtype=torch.long, device=x.device)  # index within each tree
    y = torch.zeros_like(xa)
    for level in range(depth + 1):
        rows = node + tree_start  # (M, T)
        logit = torch.einsum("mh,mth->mt", xa, weight_in[rows].to(acc)) + bias_in[rows].to(acc)
        y = y + torch.einsum("mt,mth->mh", F.gelu(logit), weight_out[rows].to(acc))
        if level < depth:
            node = 2 * node + 1 + (logit > 0).long()  # left on <= 0, right on > 0
    leaves = node - (2**depth - 1)
    return y.to(x.dtype), leaves


def gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    """d/dz of the exact (erf) GELU: Phi(z) + z * phi(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def fff_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
    leaves: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of fff_forward w.r.t. (x, weight_in, bias_in, weight_out), touching visited rows only.

    Routing is piecewise constant, so the gradient is that of the fixed path the forward pass took:
    exactly the gradient of the original masked layer, whose unvisited neurons are multiplied by 0.
    """
    tokens, hidden = x.shape
    acc = accumulation_dtype(x.dtype)
    rows = path_rows(leaves, depth).reshape(tokens, leaves.shape[1] * (depth + 1))  # (M, K), K = T * (depth + 1)
    xa, ga = x.to(acc), grad_y.to(acc)
    w_in = weight_in[rows].to(acc)  # (M, K, H)
    w_out = weight_out[rows].to(acc)
    logit = torch.einsum("mh,mkh->mk", xa, w_in) + bias_in[rows].to(acc)
    grad_logit = torch.einsum("mh,mkh->mk", ga, w_out) * gelu_derivative(logit)

    flat_rows = rows.reshape(-1)
    grad_x = torch.einsum("mk,mkh->mh", grad_logit, w_in)
    grad_w_in = torch.zeros(weight_in.shape, dtype=acc, device=x.device)
    grad_w_in.index_add_(0, flat_rows, (grad_logit.unsqueeze(-1) * xa.unsqueeze(1)).reshape(-1, hidden))
    grad_b_in = torch.zeros(bias_in.shape, dtype=acc, device=x.device)
    grad_b_in.index_add_(0, flat_rows, grad_logit.reshape(-1))
    grad_w_out = torch.zeros(weight_out.shape, dtype=acc, device=x.device)
    grad_w_out.index_add_(0, flat_rows, (F.gelu(logit).unsqueeze(-1) * ga.unsqueeze(1)).reshape(-1, hidden))
    return (
        grad_x.to(x.dtype),
        grad_w_in.to(weight_in.dtype),
        grad_b_in.to(bias_in.dtype),
        grad_w_out.to(weight_out.dtype),
    )


def fff_backward_masked(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
    leaves: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published computation's backward: what autograd does through `fff_forward_masked`.

    Every logit is recomputed and every product is dense (T*N columns), the unvisited columns multiplied by
    the 0 of the mask; the same gradients as `fff_backward` at the cost of a dense layer's backward, which is
    what the `masked` baseline must cost in training comparisons.
    """
    tokens = x.shape[0]
    acc = accumulation_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    xa, ga = x.to(acc), grad_y.to(acc)
    w_in, w_out = weight_in.to(acc), weight_out.to(acc)
    logits = torch.addmm(bias_in.to(acc), xa, w_in.t())  # (M, T*N)
    mask = torch.zeros_like(logits)
    if tokens:
        mask.scatter_(1, path_rows(leaves, depth).reshape(tokens, -1), 1.0)
    activation = F.gelu(logits) * mask
    grad_logits = (ga @ w_out.t()) * gelu_derivative(logits) * mask
    return (
        (grad_logits @ w_in).to(x.dtype),
        (grad_logits.t() @ xa).to(weight_in.dtype),
        grad_logits.sum(0).to(bias_in.dtype),
        (activation.t() @ ga).to(weight_out.dtype),
    )


def fff_forward_masked(
    x: torch.Tensor,
    weight_in: torch.Tensor,
    bias_in: torch.Tensor,
    weight_out: torch.Tensor,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published (masking) implementation: all T*N logits, GELU, zero the unvisited, dense product.

    Same function as `fff_forward` at the cost of a dense (H, T*N, H) layer; kept as the baseline the
    benchmarks compare against and as a second oracle (it is how the original code computes).
    """
    tokens, _ = x.shape
    n_nodes = nodes_per_tree(depth)
    trees = weight_in.shape[0] // n_nodes
    acc = accumulation_dtype(x.dtype) if x.device.type == "cpu" else x.dtype
    logits = torch.addmm(bias_in.to(acc), x.to(acc), weight_in.to(acc).t()).view(tokens, trees, n_nodes)
    node = torch.zeros(tokens, trees, 1, dtype=torch.long, device=x.device)
    mask = torch.zeros_like(logits)
    for level in range(depth + 1):
        mask.scatter_(2, node, 1.0)
        if level < depth:
            node = 2 * node + 1 + (logits.gather(2, node) > 0).long()
    activations = (F.gelu(logits) * mask).view(tokens, trees * n_nodes)
    y = activations @ weight_out.to(acc)
    return y.to(x.dtype), node.squeeze(-1) - (2**depth - 1)
