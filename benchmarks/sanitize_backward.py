"""Small fused-backward calls for compute-sanitizer (memcheck, racecheck): every kernel path, few tokens.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_backward.py
"""

from __future__ import annotations


import torch

from hf_fff.backends import cuda as cuda_backend
from hf_fff.backends import reference

# (tokens, hidden, trees, depth, dtype): the vector token pass, the scalar and any-width ones, 4 and 32 level sums,
# several chunks with nodes spanning them (crowded leaves), the one-block sort of small calls and CUB's device sort.
CASES = [
    (600, 64, 2, 3, torch.bfloat16),
    (4500, 128, 1, 11, torch.float32),
    (300, 33, 1, 17, torch.float32),
    (520, 1030, 1, 2, torch.float16),
    (1, 7, 3, 0, torch.float32),
]


def main() -> None:
    kernels = cuda_backend.load_kernels()
    assert kernels is not None and kernels.backward is not None
    generator = torch.Generator(device="cuda").manual_seed(0)
    for tokens, hidden, trees, depth, dtype in CASES:
        rows = trees * reference.nodes_per_tree(depth)
        x, grad_y = (torch.randn(tokens, hidden, device="cuda", generator=generator).to(dtype) for _ in range(2))
        weight_in, weight_out = ((torch.randn(rows, hidden, device="cuda", generator=generator) * hidden**-0.5).to(dtype) for _ in range(2))
        bias_in = torch.randn(rows, device="cuda", generator=generator).to(dtype)
        leaves = torch.randint(0, 2**depth, (tokens, trees), device="cuda", generator=generator)
        leaves[: tokens // 2] = 2**depth - 1  # a long run: nodes spanning several chunks
        grads = kernels.backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
        want = reference.fff_backward(*(t.double() for t in (grad_y, x, weight_in, bias_in, weight_out)), depth, leaves)
        errors = [((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(grads, want)]
        print(f"tokens {tokens} hidden {hidden} trees {trees} depth {depth} {dtype}: relative errors " + " ".join(f"{e:.2e}" for e in errors))
        assert max(errors) < 2e-2
    torch.cuda.synchronize()
    print("sanitize_backward: done")


if __name__ == "__main__":
    main()
