"""A small workload for compute-sanitizer (memcheck, racecheck): every kernel and strategy, every dtype.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py [STRATEGY ...]

SANITIZE_DTYPES=float32 (a comma-separated list) limits the dtypes (racecheck is slow).

With strategy names (e.g. cluster; the names of cuda/strategies.h) only those strategies' cases run. The sorted
strategy covers the pipelined fp32 finishing kernel on Hopper and the barrier-staged one elsewhere.

Shapes are small (the sanitizer slows kernels 10-100x) but cover partial vectors, tails of the token
loops (odd token counts: the staged strategy's last pair), several trees, the sorted strategy's counting sort (at
every split whose rows fit) and the general path. Exits non-zero if an output differs from the float64 oracle, so a
run proves both at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _oracle import check_forward  # noqa: E402
from hf_fff.backends import cuda as cuda_backend  # noqa: E402
from test_cuda_backend import make_problem, run_poisoned, smem_limit, sorted_bytes  # noqa: E402

STRATEGY = cuda_backend.strategies()


def main(only: list[str]) -> int:
    unknown = set(only) - set(STRATEGY)
    if unknown:
        print(f"unknown strategies {sorted(unknown)}: choose from {sorted(STRATEGY)}")
        return 2
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
                strategies = ["auto", "general"]
            else:
                strategies = ["auto", "single", "general", "subtree"] + (["staged"] if trees == 1 else [])
                if trees == 1 and dtype == torch.float32:
                    strategies.append("sorted")
                if torch.cuda.get_device_capability()[0] >= 9:
                    strategies.append("cluster")
            if tokens > 1000:  # many buckets and pairs: the large-token strategies only (memcheck is slow)
                strategies = [s for s in strategies if s in ("sorted", "staged")]
            if tokens > 5000:  # more than one round of the staged strategy's pairs (rows from shared memory)
                strategies = ["staged"]
            for name in (s for s in strategies if not only or s in only):
                splits = [0]
                if name == "sorted":  # the splits whose bucket rows fit in shared memory, then automatic
                    splits = [sp for sp in range(2, min(depth, 10) + 1) if sorted_bytes(depth, sp, hidden, args[0].element_size()) <= smem] + [0]
                if name == "staged":  # staged: one level, then as many as fit
                    splits = [1, 0]
                for split in splits:
                    check_forward(*args, depth, *run_poisoned(ext, *args, depth, strategy=STRATEGY[name], split=split))
                    cases += 1
    torch.cuda.synchronize()
    print(f"sanitizer workload: {cases} cases, all outputs match the float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
