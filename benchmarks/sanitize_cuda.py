"""A small workload for compute-sanitizer (memcheck, racecheck): every kernel and strategy, every dtype.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py [STRATEGY ...]

SANITIZE_DTYPES=float32 (a comma-separated list) limits the dtypes (racecheck is slow).

With strategy numbers (e.g. 8 for cluster) only those strategies' cases run. The sorted strategy (7) covers the
pipelined fp32 finishing kernel on Hopper (sorted_pipelined, 11, is the same strategy).

Shapes are small (the sanitizer slows kernels 10-100x) but cover partial vectors, tails of the token
loops (odd token counts: the staged strategy's last pair), several trees, the bucketed sort (with a split at every level) and the general path. Exits
non-zero if an output differs from the float64 reference, so a run proves both at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hf_fff.backends import cuda as cuda_backend  # noqa: E402
from test_cuda_backend import (  # noqa: E402
    check_against_float64,
    make_problem,
    run_poisoned,
    smem_limit,
    sorted_bytes,
    sorted_tensor_fits,
    tensor_core_fits,
)


def main(only: list[int]) -> int:
    print("sanitizer workload: loading the extension", flush=True)
    ext = cuda_backend.load_module()
    if ext is None:
        print("the CUDA extension did not build")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    smem = smem_limit()
    cases = 0
    dtypes = [getattr(torch, name) for name in os.environ.get("SANITIZE_DTYPES", "float32,float16,bfloat16").split(",")]
    for dtype in dtypes:
        for tokens, hidden, depth, trees in ((1, 768, 11, 1), (45, 200, 5, 3), (300, 768, 7, 1), (70, 30, 3, 2), (100, 1040, 9, 1), (2100, 776, 11, 1), (9001, 768, 11, 1)):
            args = make_problem(tokens, hidden, depth, trees, dtype, gen)
            per_vector = 16 // args[0].element_size()
            if hidden % per_vector or hidden > 8 * 32 * per_vector:  # off the fast paths
                strategies = [0, 4]
            else:
                strategies = [0, 1, 2, 4, 6, 10] + ([3, 7] if trees == 1 else [])
                if torch.cuda.get_device_capability()[0] >= 9:
                    strategies.append(8)  # clusters
            if dtype != torch.float32 and trees == 1 and 6 <= depth <= 11 and hidden % per_vector == 0 and tensor_core_fits(hidden):
                strategies.append(5)
            if trees == 1 and sorted_tensor_fits(depth, max(1, depth - 4), hidden, args[0].element_size()):
                strategies.append(9)
            if tokens > 1000:  # many groups and buckets: the large-token strategies only (memcheck is slow)
                strategies = [s for s in strategies if s in (5, 7, 10)]
            if tokens > 5000:  # more than one round of the staged strategy's pairs (rows from shared memory)
                strategies = [10]
            for strategy in (s for s in strategies if not only or s in only):
                splits = range(1, min(depth, 10) + 1) if strategy == 3 else [0]
                if strategy == 7:  # the splits whose bucket rows fit in shared memory, then automatic
                    splits = [sp for sp in range(1, min(depth, 10) + 1) if sorted_bytes(depth, sp, hidden, args[0].element_size()) <= smem] + [0]
                if strategy == 10:  # staged: nothing, one level, then as many as fit
                    splits = [1, 0]
                for split in splits:
                    check_against_float64(*args, depth, *run_poisoned(ext, *args, depth, strategy=strategy, split=split))
                    cases += 1
    torch.cuda.synchronize()
    print(f"sanitizer workload: {cases} cases, all outputs match the float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]]))
