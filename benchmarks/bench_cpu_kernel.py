"""Time the CPU kernel in one process: `python benchmarks/bench_cpu_kernel.py [--repeats N] [--json PATH]`.

On this machine, side by side: the kernel built for AVX2 (-march=x86-64-v3) and for the native target
(AVX-512 where present), the plain torch reference and the dense 768-4095-768 layer the FFF replaces, at
1, 128 and 4096 tokens on 1 and 2 threads, each call starting from evicted caches; the fused backward against
the forward at 4096 tokens; and the one-thread vs two-thread times of small calls behind the kernel's thread
threshold. fp32, the BERT layer (hidden 768, one tree of depth 11). Medians of interleaved repeats. The
machine's load average is printed beside the numbers: on a busy machine they are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_fff.backends import cpu, reference  # noqa: E402

HIDDEN, DEPTH = 768, 11
NODES = 2 ** (DEPTH + 1) - 1  # 4095: the dense layer of the same width
TOKENS = (1, 128, 4096)
THREADS = (1, 2)
THRESHOLD_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "model": platform.processor()}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        info["model"] = fields.get("Model name", info["model"]).strip()
        flags = set(fields.get("Flags", "").split())
        info["isa"] = [name for name in ("sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if name in flags]
        info["cpus"] = fields.get("CPU(s)", "").strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# Written before each timed call of the forward tables so that every call starts with cold caches, as a layer in a
# model does (the other layers ran in between). Without it, a build timed right after another build of the same
# kernel finds the tree rows that one read still cached: at 1 token that made the second over 2x "faster".
# 64 MB: many times a core's L2 and more than the 25 MB of tree rows; a large shared L3 may still keep some rows,
# as it would between a model's layers.
CACHE_EVICTION = torch.empty(64 * 2**20 // 4)


def median_times(functions: dict, repeats: int, idle_s: float = 0.0, cold: bool = False) -> dict:
    """Median wall time (s) of each function, called in turn `repeats` times after one warm-up each.

    idle_s > 0 sleeps that long before every call, so that the OpenMP threads stop spinning and their
    vCPUs go idle: what a call arriving after a pause pays. cold=True evicts the caches before every call.
    """
    for fn in functions.values():
        fn()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            if idle_s:
                time.sleep(idle_s)
            if cold:
                CACHE_EVICTION.fill_(0.0)
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def layer(tokens: int, generator: torch.Generator):
    x = torch.randn(tokens, HIDDEN, generator=generator)
    weight_in = torch.randn(NODES, HIDDEN, generator=generator) * HIDDEN**-0.5
    bias_in = torch.randn(NODES, generator=generator) * 0.1
    weight_out = torch.randn(NODES, HIDDEN, generator=generator) * (DEPTH + 1) ** -0.5
    return x, weight_in, bias_in, weight_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    modules = {"native": cpu.load_module("native")}
    if platform.machine() in ("x86_64", "AMD64"):
        modules["avx2"] = cpu.load_module("x86-64-v3")
    modules = {name: module for name, module in modules.items() if module is not None}
    if not modules:
        print("the fff_cpu extension could not be built here")
        return 1
    description = cpu_description()
    results = {
        "cpu": description,
        "builds": {name: module.isa for name, module in modules.items()},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
        "forward_ms": {},
        "backward_ms": {},
        "threshold_us": {},
    }
    print(f"CPU: {description.get('model')} ({description.get('cpus')} CPUs), ISA {' '.join(description.get('isa', []))}")
    print(f"builds: {results['builds']}; torch {torch.__version__}; load average {results['load_average_before']}")

    generator = torch.Generator().manual_seed(0)
    x_all, weight_in, bias_in, weight_out = layer(max(TOKENS), generator)
    dense_in, dense_bias = weight_in.clone(), bias_in.clone()
    dense_out_t = weight_out.t().contiguous()  # (768, 4095): y = GELU(x W1^T + b) W2
    previous_threads = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for tokens in TOKENS:
                x = x_all[:tokens].contiguous()
                functions = {f"fff_{name}": (lambda m=m, x=x: m.fff_forward(x, weight_in, bias_in, weight_out, DEPTH)) for name, m in modules.items()}
                functions["reference"] = lambda x=x: reference.fff_forward(x, weight_in, bias_in, weight_out, DEPTH)
                functions["dense"] = lambda x=x: F.linear(F.gelu(F.linear(x, dense_in, dense_bias)), dense_out_t)
                repeats = args.repeats if tokens < 4096 else max(3, args.repeats // 3)
                with torch.inference_mode():
                    times = median_times(functions, repeats, cold=True)
                results["forward_ms"][f"{threads}t_{tokens}"] = {name: round(t * 1e3, 4) for name, t in times.items()}
                line = "  ".join(f"{name} {t * 1e3:9.3f} ms" for name, t in times.items())
                ratios = "  ".join(f"dense/{name} {times['dense'] / times[name]:6.1f}x" for name in functions if name.startswith("fff_"))
                print(f"forward  {threads} thread(s) {tokens:5d} tokens: {line}  | {ratios}")
            grad_y = torch.randn(4096, HIDDEN, generator=generator)
            for name, module in modules.items():
                _, leaves = module.fff_forward(x_all, weight_in, bias_in, weight_out, DEPTH)
                times = median_times(
                    {
                        "forward": lambda m=module: m.fff_forward(x_all, weight_in, bias_in, weight_out, DEPTH),
                        "backward": lambda m=module, leaves=leaves: m.fff_backward(grad_y, x_all, weight_in, bias_in, weight_out, DEPTH, leaves),
                        "reference_backward": lambda leaves=leaves: reference.fff_backward(grad_y, x_all, weight_in, bias_in, weight_out, DEPTH, leaves),
                    },
                    max(3, args.repeats // 3),
                )
                results["backward_ms"][f"{threads}t_{name}"] = {k: round(v * 1e3, 3) for k, v in times.items()}
                print(
                    f"backward {threads} thread(s)  4096 tokens, {name}: forward {times['forward'] * 1e3:.3f} ms, backward {times['backward'] * 1e3:.3f} ms "
                    f"({times['backward'] / times['forward']:.2f}x the forward), torch reference backward {times['reference_backward'] * 1e3:.1f} ms"
                )
        # The thread threshold: the same call forced onto one and two threads (native build).
        torch.set_num_threads(max(2, previous_threads))
        module = modules["native"]
        print("threshold (native build, forced thread counts; auto = the kernel's own choice; idle = after 50 ms without calls):")
        for tokens in THRESHOLD_TOKENS:
            x = x_all[:tokens].contiguous()
            calls = {f"{n}": (lambda n=n, x=x: module.fff_forward(x, weight_in, bias_in, weight_out, DEPTH, threads=n)) for n in (1, 2, 0)}
            warm = median_times(calls, args.repeats * 2)
            idle = median_times(calls, max(5, args.repeats // 2), idle_s=0.05)
            results["threshold_us"][str(tokens)] = {
                **{("auto" if k == "0" else f"{k}t"): round(v * 1e6, 1) for k, v in warm.items()},
                **{("auto" if k == "0" else f"{k}t") + "_idle": round(v * 1e6, 1) for k, v in idle.items()},
            }
            print(
                f"  {tokens:4d} tokens: back-to-back 1 thread {warm['1'] * 1e6:9.1f} us, 2 threads {warm['2'] * 1e6:9.1f} us, auto {warm['0'] * 1e6:9.1f} us;"
                f" after idle 1 thread {idle['1'] * 1e6:9.1f} us, 2 threads {idle['2'] * 1e6:9.1f} us, auto {idle['0'] * 1e6:9.1f} us"
            )
    finally:
        torch.set_num_threads(previous_threads)
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average after: {results['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
