"""A plain-Python model of the fused CUDA backward's bookkeeping (cuda/backward.cuh), for CPU tests.

It follows the kernels step by step: the stable per-tree sort by leaf, the token pass's coefficients, the
weight pass's chunk walk (running sums per level, flushed when a node's run ends: straight to the gradient,
or to slot 0 / slot 1 of the chunk's partials), and the fixup that adds a spanning node's partials in chunk
order. Columns are vectorised (a thread's column is an element of a row here); the column `hidden` of the
w_in side is the bias. Partials start as NaN, so a fixup that reads a slot no chunk wrote shows in the result.
Run on small problems against reference.fff_backward, it checks the indexing before any GPU run.
"""

from __future__ import annotations

import pathlib
import re

import torch
import torch.nn.functional as F

from hf_fff.backends import reference

BACKWARD_HEADER = pathlib.Path(__file__).resolve().parent.parent / "cuda" / "backward.h"


def header_constants() -> dict[str, int]:
    """The `constexpr int kName = value;` constants of cuda/backward.h, read from the header itself so that this
    model cannot drift from the kernels' chunking when a constant changes there."""
    return {name: int(value) for name, value in re.findall(r"constexpr int (k\w+) = (\d+);", BACKWARD_HEADER.read_text())}


def chunk_size(levels: int, tokens: int, hidden: int, trees: int, sms: int = 132) -> int:
    """backward_chunk in cuda/backward.h: the largest chunk, or fewer tokens (a multiple of kSmallestChunk, at least
    that) when that leaves fewer than kWeightBlocksPerSm weight-pass blocks per SM."""
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    k = header_constants()
    largest = 128 if levels > 16 else k["kLargestChunk"]
    # backward_weight_tiles: kBackwardColumns column pairs a block over the hidden + 1 columns
    blocks_per_chunk = ceil_div((hidden + 2) // 2, k["kBackwardColumns"]) * trees
    wanted_chunks = ceil_div(k["kWeightBlocksPerSm"] * sms, blocks_per_chunk)
    rounded = ceil_div(ceil_div(tokens, wanted_chunks), k["kSmallestChunk"]) * k["kSmallestChunk"]
    return min(largest, max(k["kSmallestChunk"], rounded))


def chunked_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves, chunk=None):
    tokens, hidden = x.shape
    levels = depth + 1
    trees = leaves.shape[1]
    n_nodes = reference.nodes_per_tree(depth)
    acc = reference.accumulation_dtype(x.dtype)
    chunk = chunk or chunk_size(levels, tokens, hidden, trees)
    grad_w_in = torch.zeros(weight_in.shape, dtype=acc)
    grad_b_in = torch.zeros(bias_in.shape, dtype=acc)
    grad_w_out = torch.zeros(weight_out.shape, dtype=acc)
    if tokens == 0:
        return torch.zeros_like(x), grad_w_in.to(x.dtype), grad_b_in.to(x.dtype), grad_w_out.to(x.dtype)

    keys = (leaves & ((1 << depth) - 1)).t().contiguous()  # (trees, tokens)
    sorted_leaf, order = torch.sort(keys, stable=True, dim=1)
    xa, ga = x.to(acc), grad_y.to(acc)
    w_in, b_in, w_out = weight_in.to(acc), bias_in.to(acc), weight_out.to(acc)

    # Token pass: coefficients per (token, tree, level) and grad_x.
    coef_in = torch.empty(tokens, trees, levels, dtype=acc)
    coef_out = torch.empty(tokens, trees, levels, dtype=acc)
    grad_x = torch.zeros(tokens, hidden, dtype=acc)
    for tree in range(trees):
        for level in range(levels):
            rows = tree * n_nodes + (1 << level) - 1 + (keys[tree] >> (depth - level))  # (tokens,)
            z = (xa * w_in[rows]).sum(-1) + b_in[rows]
            dg = (ga * w_out[rows]).sum(-1)
            coef_in[:, tree, level] = dg * reference.gelu_derivative(z)
            coef_out[:, tree, level] = F.gelu(z)
            grad_x += coef_in[:, tree, level, None] * w_in[rows]

    # Weight pass.
    chunks = -(-tokens // chunk)
    partial_in = torch.full((trees, chunks, levels, 2, hidden + 1), float("nan"), dtype=acc)
    partial_out = torch.full((trees, chunks, levels, 2, hidden), float("nan"), dtype=acc)
    written = torch.zeros(trees * n_nodes, dtype=torch.long)  # times each row was written, must end <= 1

    def write_row(row, sum_in, sum_out):
        grad_w_in[row] = sum_in[:hidden]
        grad_b_in[row] = sum_in[hidden]
        grad_w_out[row] = sum_out
        written[row] += 1

    for tree in range(trees):
        leaf_of = sorted_leaf[tree].tolist()
        for c in range(chunks):
            start, end = c * chunk, min((c + 1) * chunk, tokens)
            prev_leaf = leaf_of[start - 1] if start > 0 else -1
            next_leaf = leaf_of[end] if end < tokens else -1
            sum_in = torch.zeros(levels, hidden + 1, dtype=acc)
            sum_out = torch.zeros(levels, hidden, dtype=acc)
            for at in range(start, end):
                token = int(order[tree, at])
                sum_in[:, :hidden] += coef_in[token, tree, :, None] * xa[token]
                sum_in[:, hidden] += coef_in[token, tree]
                sum_out += coef_out[token, tree, :, None] * ga[token]
                leaf = leaf_of[at]
                last = at == end - 1
                if last:
                    first = 0
                else:
                    diff = leaf ^ leaf_of[at + 1]
                    first = depth - (diff.bit_length() - 1) if diff else levels
                for level in range(first, levels):
                    shift = depth - level
                    node = leaf >> shift
                    started_before = prev_leaf >= 0 and (prev_leaf >> shift) == node
                    runs_past = last and next_leaf >= 0 and (next_leaf >> shift) == node
                    if not started_before and not runs_past:
                        write_row(tree * n_nodes + (1 << level) - 1 + node, sum_in[level], sum_out[level])
                    else:
                        slot = 0 if started_before else 1
                        partial_in[tree, c, level, slot] = sum_in[level]
                        partial_out[tree, c, level, slot] = sum_out[level]
                    sum_in[level] = 0
                    sum_out[level] = 0

    # Fixup.
    if chunks > 1:
        for tree in range(trees):
            leaf_of = sorted_leaf[tree]
            for c in range(chunks):
                start, end = c * chunk, min((c + 1) * chunk, tokens)
                for level in range(levels):
                    shift = depth - level
                    node = int(leaf_of[end - 1]) >> shift
                    runs_past = end < tokens and int(leaf_of[end]) >> shift == node
                    started_before = start > 0 and int(leaf_of[start - 1]) >> shift == node
                    if not runs_past or started_before:
                        continue
                    past = int(torch.searchsorted(leaf_of, (node + 1) << shift))  # first leaf beyond the node
                    last_chunk = (past - 1) // chunk
                    sum_in = partial_in[tree, c, level, 1].clone()
                    sum_out = partial_out[tree, c, level, 1].clone()
                    for c2 in range(c + 1, last_chunk + 1):
                        sum_in += partial_in[tree, c2, level, 0]
                        sum_out += partial_out[tree, c2, level, 0]
                    write_row(tree * n_nodes + (1 << level) - 1 + node, sum_in, sum_out)
    assert int(written.max()) <= 1, "a gradient row was written twice"
    return grad_x.to(x.dtype), grad_w_in.to(x.dtype), grad_b_in.to(x.dtype), grad_w_out.to(x.dtype)
