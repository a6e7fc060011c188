"""The one test oracle every FFF backend is held against: random layers and float64 checks of y, leaves and gradients.

A fast kernel may route a token differently from float64 only where a visited logit is a near-tie (within
its accumulation's rounding of zero); everything else must match the float64 computation along the path the
kernel took, within bounds derived from the dtype's rounding (no hand-tuned atol).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from hf_fff.backends import reference

# Final rounding of y in the output dtype (float64: accumulation order only).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# A logit within this fraction of sum |x_i w_i| + |b| of zero is a near-tie that either branch may take
# (fp32 accumulation; float64 inputs accumulate in float64).
ROUTE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# Gradients: relative (norm-wise) error of each gradient against float64 along the kernel's path. Inputs are
# rounded to the dtype in both, so only the accumulation and the final rounding differ.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def random_layer(tokens: int, hidden: int, trees: int, depth: int, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu"):
    """Fresh (x, weight_in, bias_in, weight_out) with logits of order 1 and y of order 1 at any width and depth.

    Drawn in float64 on the CPU from `seed`, then cast and moved, so every device and dtype sees the same values.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = trees * reference.nodes_per_tree(depth)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = normal(tokens, hidden)
    weight_in = normal(rows, hidden, scale=hidden**-0.5)
    bias_in = normal(rows, scale=0.1)
    weight_out = normal(rows, hidden, scale=(trees * (depth + 1)) ** -0.5)
    return x, weight_in, bias_in, weight_out


def _path(x, weight_in, bias_in, leaves, depth):
    """float64 rows, logits and |terms| sums along the paths to `leaves`, each (M, T, L)."""
    rows = reference.path_rows(leaves, depth)
    x64, w_rows, b_rows = x.double(), weight_in.double()[rows], bias_in.double()[rows]
    logits = torch.einsum("mh,mtlh->mtl", x64, w_rows) + b_rows
    magnitude = torch.einsum("mh,mtlh->mtl", x64.abs(), w_rows.abs()) + b_rows.abs()
    return rows, logits, magnitude


def near_ties(x, weight_in, bias_in, leaves, depth) -> torch.Tensor:
    """(M,) bool: tokens with a visited logit within rounding of zero (their path may differ between backends)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    _, logits, magnitude = _path(x, weight_in, bias_in, leaves, depth)
    return (logits.abs() <= ROUTE_TOL[x.dtype] * magnitude).flatten(1).any(dim=1)


def check_forward(x, weight_in, bias_in, weight_out, depth, y, leaves) -> None:
    """Assert a backend's (y, leaves) for (x, weights) are right, per token and tree, against float64."""
    tokens = x.shape[0]
    trees = weight_in.shape[0] // reference.nodes_per_tree(depth)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert leaves.shape == (tokens, trees) and leaves.dtype == torch.int64
    if tokens == 0:
        return
    assert not torch.isnan(y).any(), "unwritten (poisoned) or NaN output elements"
    assert ((leaves >= 0) & (leaves < 2**depth)).all(), "leaf out of range (unwritten?)"
    rows, logits, magnitude = _path(x, weight_in, bias_in, leaves, depth)
    # The walk went right at level l < depth iff bit (depth - 1 - l) of the leaf is set.
    levels = torch.arange(depth, device=x.device)
    went_right = ((leaves.unsqueeze(-1) >> (depth - 1 - levels)) & 1).bool()
    route_tol = ROUTE_TOL[x.dtype]
    wrong = (went_right != (logits[..., :depth] > 0)) & (logits[..., :depth].abs() > route_tol * magnitude[..., :depth])
    assert not wrong.any(), f"{int(wrong.any(-1).any(-1).sum())} tokens took a branch that float64 contradicts"
    # y along the backend's path. Error sources: the final rounding (RTOL |y|) and, per visited node, the
    # logit's accumulation error through GELU's slope plus GELU's own rounding, times that node's output row.
    g = F.gelu(logits)
    g_err = route_tol * (g.abs() + magnitude * reference.gelu_derivative(logits).abs())
    g_err += 2.0**-22 * logits.abs()  # 0.5 z (1 + erf(z / sqrt 2)) in fp32 cancels for z << 0 (as torch's GELU)
    out_rows = weight_out.double()[rows]
    y64 = torch.einsum("mtl,mtlh->mh", g, out_rows)
    scale = torch.einsum("mtl,mtlh->mh", g_err, out_rows.abs())
    err = (y.double() - y64).abs()
    finfo = torch.finfo(x.dtype)
    bound = RTOL[x.dtype] * y64.abs() + scale + finfo.smallest_normal * finfo.eps  # last: one subnormal step
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"y off by {worst:.3g}x the bound (max abs err {err.max().item():.3g})"


def backward_float64(grad_y, x, weight_in, bias_in, weight_out, depth, leaves):
    """The four gradients in float64 along the given leaves (the reference backward on upcast inputs)."""
    return reference.fff_backward(*(t.double() for t in (grad_y, x, weight_in, bias_in, weight_out)), depth, leaves)


def check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, depth, leaves, rtol: Optional[float] = None) -> None:
    """Assert a backend's (grad_x, grad_weight_in, grad_bias_in, grad_weight_out) against float64 along `leaves`.

    Rows no token visited must be exactly zero; every gradient has its input's shape and dtype; the norm-wise
    relative error of each is within the dtype's GRAD_RTOL.
    """
    names = ("grad_x", "grad_weight_in", "grad_bias_in", "grad_weight_out")
    inputs = (x, weight_in, bias_in, weight_out)
    expected = backward_float64(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
    visited = torch.zeros(weight_in.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0]:
        visited[reference.path_rows(leaves, depth).reshape(-1)] = True
    tol = rtol if rtol is not None else GRAD_RTOL[x.dtype]
    for name, got, want, source in zip(names, grads, expected, inputs):
        assert got.shape == source.shape and got.dtype == source.dtype, f"{name}: {got.shape}/{got.dtype}, wanted {source.shape}/{source.dtype}"
        assert torch.isfinite(got).all(), f"{name} has NaN/inf (unwritten?)"
        if name != "grad_x":
            assert not got[~visited].any(), f"{name} is nonzero on rows no token visited"
        err = (got.double() - want).norm().item()
        ref = want.norm().item()
        assert err <= tol * ref + 1e-30 * math.sqrt(want.numel()), f"{name}: relative error {err / max(ref, 1e-300):.3g} > {tol:g}"
