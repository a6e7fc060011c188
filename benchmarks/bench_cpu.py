"""Record a CPU benchmark like benchmarks/results/cpu-amd-epyc-zen5.md: `python benchmarks/bench_cpu.py --out benchmarks/results/cpu-MACHINE`.

Runs `hf_fff.tools.bench.run_bench` at the README's settings (fp32; FFF layer 768 x depth 11 at 1, 128 and
4096 tokens; whole encoders at batch 8 x 128) and writes OUT.json and OUT.png. Close other work first: the
timings are only as quiet as the machine (the load average before and after is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from hf_fff.tools.bench import run_bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="minimum side-by-side calls per implementation")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu", help="output path without extension, e.g. benchmarks/results/cpu-MACHINE")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = run_bench(device="cpu", repeats=args.repeats, json_path=None, plot_path=f"{args.out}.png")
    results["meta"]["load_average_before"] = [round(value, 2) for value in load_before]
    results["meta"]["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}.json (load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
