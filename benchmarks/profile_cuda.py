"""Workload for Nsight Compute: the kernels behind the speed targets, each launched twice (L2 warm on the
second), so that `ncu` can report where their time goes (stall reasons, issue rate, memory throughput).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        --section Occupancy python benchmarks/profile_cuda.py [DTYPE:TOKENS:STRATEGY:SPLIT ...]

With arguments, only those cases run (e.g. float32:32768:sorted:8 for the sorted strategy at split 8; the strategy
names are those of cuda/strategies.h).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_fff.backends import cuda as cuda_backend  # noqa: E402

HIDDEN, DEPTH = 768, 11
CASES = [  # (dtype, tokens, strategy, split)
    (torch.bfloat16, 1, "subtree", 0),
    (torch.bfloat16, 1, "single", 0),
    (torch.bfloat16, 32768, "staged", 0),  # the 16-bit default at many tokens
    (torch.bfloat16, 32768, "single", 0),
    (torch.float32, 32768, "sorted", 8),  # the fp32 default at many tokens: step 1 (routing + sort), finishing kernel
]


def parse_case(text: str) -> tuple:
    """DTYPE:TOKENS:STRATEGY:SPLIT, e.g. float32:32768:sorted:8 (sorted at split 8)."""
    dtype, tokens, strategy, split = text.split(":")
    return getattr(torch, dtype), int(tokens), strategy, int(split)


def main(argv: list[str]) -> int:
    ext = cuda_backend.load_module()
    if ext is None:
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = 2 ** (DEPTH + 1) - 1
    for dtype, tokens, strategy, split in [parse_case(a) for a in argv] or CASES:
        w_in = (torch.randn(rows, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5).to(dtype)
        b_in = (torch.randn(rows, device="cuda", generator=gen) * 0.1).to(dtype)
        w_out = (torch.randn(rows, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5).to(dtype)
        x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).to(dtype)
        for _ in range(2):
            ext.fff_forward(x, w_in, b_in, w_out, DEPTH, strategy=cuda_backend.strategies()[strategy], split=split)
        torch.cuda.synchronize()
        print(f"profiled {dtype} tokens={tokens} strategy={strategy} split={split}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
