"""Where a CUDA training step's time goes: UltraFastBERT-1x11 beside BERT-base, kernel time by kind.

    python benchmarks/profile_train.py [--task seq-cls|mlm] [--batch 32] [--steps 5] [--free-fff]
                                       [--sparse-prediction] [--compile]

The same models, batch, bf16 autocast and fused AdamW as `hf-fff bench --train`. For each model it prints the
wall time of a step (CUDA-synchronised median), the GPU's busy time in that step (sum of kernel times) and that
busy time split by kernel kind (GEMM, attention, FFF, normalisation, dropout, optimizer, other elementwise), the
four longest cast/copy and other elementwise kernels, and the ten longest of all. A step whose busy time is well
below its wall time is bound by the host's launches. The models run one after the other, not interleaved: compare
their kernel sums, not their walls.

--free-fff adds a model: UltraFastBERT-1x11 whose FFF layers cost nothing (each returns its input, so the
dropout and residual add after it still run). Its step bounds what any FFF kernel can give the model's step. Its
optimizer step leaves out the FFF's parameters too (100 M of 164 M, ~1 ms of fused AdamW on an H100), which no
kernel removes: add that back when reading the bound.
--sparse-prediction (mlm) adds the same model with `config.sparse_prediction` on.
--compile times and profiles the steps under torch.compile (default mode; the optimizer stays eager).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_fff.tools import bench  # noqa: E402

# First match wins: (kind, substrings of the kernel name, lower case).
KINDS = (
    ("fff", ("hf_fff", "bwd::", "token_pass", "weight_pass", "fixup", "keys_kernel", "fff_")),
    ("attention", ("flash", "fmha", "attention", "attn", "softmax")),
    ("gemm", ("gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "nvjet", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("layer_norm", "layernorm", "norm_")),
    ("dropout", ("dropout", "bernoulli", "philox", "masked_scale")),
    ("sort/scan", ("radix", "sort", "scan", "cub::")),
    ("cast/copy", ("copy", "cast", "to_copy", "convert")),
    ("reduce", ("reduce", "sum_", "nll", "cross_entropy", "log_softmax")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, needles in KINDS:
        if any(needle in lower for needle in needles):
            return kind
    return "other elementwise"


def wall_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_ms(step, steps: int) -> dict[str, float]:
    """Kernel name -> total CUDA milliseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1e3 / steps
    return totals


def report(name: str, step, steps: int) -> dict:
    for _ in range(3):
        step()
    wall = wall_ms(step, steps)
    kernels = kernel_ms(step, steps)
    kind_by_kernel = {kernel: kind_of(kernel) for kernel in kernels}
    by_kind: dict[str, float] = defaultdict(float)
    for kernel, ms in kernels.items():
        by_kind[kind_by_kernel[kernel]] += ms
    busy = sum(kernels.values())
    print(f"\n== {name}: step {wall:.2f} ms wall, {busy:.2f} ms of kernels ({busy / wall:.0%} busy)")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"   {kind:<18} {ms:7.2f} ms")
    for kind in ("cast/copy", "other elementwise"):
        print(f"   longest {kind}:")
        of_kind = sorted(((ms, kernel) for kernel, ms in kernels.items() if kind_by_kernel[kernel] == kind), reverse=True)
        for ms, kernel in of_kind[:4]:
            print(f"     {ms:7.3f} ms  {kernel[:110]}")
    print("   longest kernels:")
    for kernel, ms in sorted(kernels.items(), key=lambda item: -item[1])[:10]:
        print(f"     {ms:7.3f} ms  {kernel[:110]}")
    return {"wall_ms": wall, "busy_ms": busy, "by_kind": dict(by_kind)}


def free_fff_copy(model: nn.Module) -> nn.Module:
    """A copy of an UltraFastBERT model whose FFF layers return their input: the step without any FFF cost."""
    from hf_fff.modeling_ultrafastbert import UltraFastBertLayer

    free = copy.deepcopy(model)
    for layer in free.modules():
        if isinstance(layer, UltraFastBertLayer):
            layer.ffn = nn.Identity()
    return free


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="seq-cls", choices=bench.TRAIN_TASKS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--free-fff", action="store_true", help="add UltraFastBERT-1x11 with FFF layers that cost nothing")
    parser.add_argument("--sparse-prediction", action="store_true", help="mlm: add UltraFastBERT-1x11 with sparse prediction")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (default mode)")
    args = parser.parse_args()
    device = torch.device("cuda")
    ultrafast, bert = bench.build_training_models(args.task, device)
    vocab = min(ultrafast.config.vocab_size, bert.config.vocab_size)
    inputs = bench.training_batch(args.task, args.batch, args.seq, vocab, device)
    compiled = ", torch.compile" if args.compile else ""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.task}, batch {args.batch} x {args.seq}, bf16 autocast, AdamW fused{compiled}")
    models = [("UltraFastBERT-1x11", ultrafast)]
    if args.sparse_prediction and args.task == "mlm":
        models.append(("UltraFastBERT-1x11, sparse prediction", bench.sparse_prediction_copy(ultrafast)))
    if args.free_fff:
        models.append(("UltraFastBERT-1x11, FFF free", free_fff_copy(ultrafast)))
    models.append(("BERT-base", bert))
    results = {}
    for name, model in models:
        optimizer = bench.make_optimizer(model)
        if args.compile:
            step = bench.compiled_training_step(model, optimizer, inputs, device, name, fullgraph=False)
        else:
            step = bench.training_step(model, optimizer, inputs, device)
        results[name] = report(name, step, args.steps)
    base = results["BERT-base"]["wall_ms"]
    print(f"\n{'step':<38} wall ms  vs BERT-base")
    for name, result in results.items():
        print(f"{name:<38} {result['wall_ms']:7.2f}  {base / result['wall_ms']:.2f}x")


if __name__ == "__main__":
    main()
