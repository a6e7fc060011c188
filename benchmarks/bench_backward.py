"""Time the FFF backward: the fused CUDA kernel, the plain-torch reference, and a dense BERT-base FF backward.

    python benchmarks/bench_backward.py [--tokens 1024 32768] [--dtypes bf16 fp32] [--profile]

One process, one GPU, medians of triton.testing.do_bench (CUDA events). The FFF layer is BERT-base's width
(768), one tree of depth 11 (UltraFastBERT-1x11), with the leaves its forward actually reaches on random
inputs. The dense baseline is nn.Linear(768, 3072), exact GELU, nn.Linear(3072, 768): its forward runs
untimed, then torch.autograd.grad of the output (w.r.t. the input and the four parameters) is timed.
--profile adds the fused backward's per-kernel times at each size. --variants A/B-times kernel choices side by side
in this process: while a candidate kernel is measured, the extension picks it by an HF_FFF_* environment knob read
at each launch (the loser and the knob are deleted afterwards). Each variant is a comma-separated list of
NAME=VALUE settings; the table gives each one's median and its gradients' largest difference from the first
variant's.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os

import torch
import torch.nn as nn
from triton.testing import do_bench

import hf_fff
from hf_fff.backends import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HIDDEN, DEPTH, TREES, DENSE = 768, 11, 1, 3072


def median_us(fn) -> float:
    return do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def fff_problem(tokens: int, dtype: torch.dtype, kernels):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    rows = TREES * reference.nodes_per_tree(DEPTH)
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=generator).to(dtype)
    weight_in = (torch.randn(rows, HIDDEN, device="cuda", generator=generator) * HIDDEN**-0.5).to(dtype)
    bias_in = (torch.randn(rows, device="cuda", generator=generator) * 0.1).to(dtype)
    weight_out = (torch.randn(rows, HIDDEN, device="cuda", generator=generator) * (DEPTH + 1) ** -0.5).to(dtype)
    _, leaves = kernels.forward(x, weight_in, bias_in, weight_out, DEPTH)
    grad_y = torch.randn(tokens, HIDDEN, device="cuda", generator=generator).to(dtype)
    return grad_y, x, weight_in, bias_in, weight_out, DEPTH, leaves


def dense_backward(tokens: int, dtype: torch.dtype):
    """A closure timing BERT-base's FF backward (cuBLAS GEMMs through autograd)."""
    ff = nn.Sequential(nn.Linear(HIDDEN, DENSE), nn.GELU(), nn.Linear(DENSE, HIDDEN)).to(device="cuda", dtype=dtype)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
    y = ff(x)
    grad_y = torch.randn_like(y)
    wrt = [x, *ff.parameters()]
    return lambda: torch.autograd.grad(y, wrt, grad_y, retain_graph=True)


def profile_kernels(kernels, problem) -> list[tuple[str, float]]:
    """(kernel name, mean us per call) of the fused backward, from torch.profiler over 20 calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        kernels.backward(*problem)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            kernels.backward(*problem)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            rows.append((event.key[:70], device_us / 20))
    return sorted(rows, key=lambda r: -r[1])[:14]


def parse_variant(text: str) -> dict[str, str]:
    settings = dict(item.split("=", 1) for item in text.split(",") if item)
    if not settings or any(not name.startswith("HF_FFF_") for name in settings):
        raise argparse.ArgumentTypeError(f"a variant is NAME=VALUE[,NAME=VALUE...] of HF_FFF_* settings, got {text!r}")
    return settings


def under(settings: dict[str, str], fn):
    """fn() with the environment variables of `settings` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compare_variants(kernels, variants: list[dict[str, str]], dtypes: list[str], token_counts: list[int], profile: bool) -> None:
    names = [",".join(f"{k.removeprefix('HF_FFF_')}={v}" for k, v in variant.items()) for variant in variants]
    print("A/B of the fused backward, medians in us (max |grad - first variant's grad| in brackets)")
    for name in names:
        print(f"  {name}")
    for dtype_name, tokens in itertools.product(dtypes, token_counts):
        problem = fff_problem(tokens, DTYPES[dtype_name], kernels)
        first = under(variants[0], lambda: kernels.backward(*problem))
        cells = []
        for variant in variants:
            grads = under(variant, lambda: kernels.backward(*problem))
            diff = max((g.float() - f.float()).abs().max().item() for g, f in zip(grads, first))
            cells.append(f"{under(variant, lambda: median_us(lambda: kernels.backward(*problem))):8.1f} [{diff:.1e}]")
        print(f"{dtype_name:>5} {tokens:>6} | " + " | ".join(cells), flush=True)
        if profile:
            for name, variant in zip(names, variants):
                print(f"  kernels under {name}:")
                for kernel, us in under(variant, lambda: profile_kernels(kernels, problem)):
                    print(f"    {us:8.1f}  {kernel}")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", nargs="+", type=parse_variant, metavar="NAME=VALUE[,...]")
    args = parser.parse_args()

    from hf_fff.backends import cuda as cuda_backend

    kernels = cuda_backend.load_kernels()
    assert kernels is not None and kernels.backward is not None, "the CUDA extension did not build"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, hf_fff {hf_fff.__version__ if hasattr(hf_fff, '__version__') else ''}, {datetime.date.today()}")
    if args.variants:
        compare_variants(kernels, args.variants, args.dtypes, args.tokens, args.profile)
        return
    print(f"FFF {TREES}x{DEPTH} width {HIDDEN} backward vs dense {HIDDEN}-{DENSE}-{HIDDEN} FF backward; medians in us")
    header = f"{'dtype':>5} {'tokens':>6} | {'fused':>8} {'reference':>9} {'dense':>8} | {'dense/fused':>11} {'ref/fused':>9}"
    print(header)
    print("-" * len(header))
    for name in args.dtypes:
        dtype = DTYPES[name]
        for tokens in args.tokens:
            problem = fff_problem(tokens, dtype, kernels)
            fused = median_us(lambda: kernels.backward(*problem))
            ref = median_us(lambda: reference.fff_backward(*problem))
            dense = median_us(dense_backward(tokens, dtype))
            print(f"{name:>5} {tokens:>6} | {fused:8.1f} {ref:9.1f} {dense:8.1f} | {dense / fused:11.2f} {ref / fused:9.2f}", flush=True)
            torch.cuda.empty_cache()
    if args.profile:
        for name, tokens in itertools.product(args.dtypes, args.tokens):
            problem = fff_problem(tokens, DTYPES[name], kernels)
            print(f"\nfused backward kernels, {name}, {tokens} tokens (us per call):")
            for kernel, us in profile_kernels(kernels, problem):
                print(f"  {us:8.1f}  {kernel}")


if __name__ == "__main__":
    main()
