"""CUDA benchmarks of the FFF kernel, side by side with the baselines the targets name.

    python benchmarks/bench_cuda.py [--quick] [--no-compile] [--naive DIR] [--json FILE]

Times (medians of triton.testing.do_bench, which flushes L2 before every call, so weights start cold
as they would inside a model) of, at width 768, depth 11, one tree:
  * our kernel per dtype and token count (automatic strategy, plus each forced strategy where it matters),
  * dense BERT-base FF 768-3072-768 bf16 (cuBLAS), dense 768-4095-768 fp32 with TF32 off, the published
    masked FFF (the "masked" backend), and the authors' naive CUDA kernel (built from --naive, a copy of
    github.com/pbelcak/UltraFastBERT benchmark_cuda/fff_cuda kept outside the package);
  * one token: eager calls and CUDA-graph replays;
  * the whole encoder, 256 x 128 tokens, bf16: UltraFastBertModel (kernel; masked) vs transformers
    BertModel bert-base with SDPA, eager and torch.compile.
Prints the target table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hf_fff  # noqa: E402
from hf_fff.backends import cuda as cuda_backend  # noqa: E402
from hf_fff.backends import reference  # noqa: E402

HIDDEN, DEPTH = 768, 11
STRATEGY = cuda_backend.strategies()  # name -> id, the rows of cuda/strategies.h (what HF_FFF_CUDA_STRATEGY accepts)
RESULTS: dict = {}


def us(fn, **kw) -> float:
    """Median time of fn() in microseconds (L2 flushed before each call)."""
    return do_bench(fn, warmup=kw.pop("warmup", 25), rep=kw.pop("rep", 100), return_mode="median", **kw) * 1e3


def graph_us(fn, calls: int = 20) -> float:
    """Per-call time of `calls` back-to-back calls captured in one CUDA graph (no CPU launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return us(graph.replay) / calls


def record(key: str, value: float) -> float:
    RESULTS[key] = value
    print(f"  {key:<58s} {value:12.2f} us", flush=True)
    return value


def layer_weights(dtype, generator):
    rows = 2 ** (DEPTH + 1) - 1
    w_in = (torch.randn(rows, HIDDEN, device="cuda", generator=generator) * HIDDEN**-0.5).to(dtype)
    b_in = (torch.randn(rows, device="cuda", generator=generator) * 0.1).to(dtype)
    w_out = (torch.randn(rows, HIDDEN, device="cuda", generator=generator) * HIDDEN**-0.5).to(dtype)
    return w_in, b_in, w_out


def bench_layers(ext, quick: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    token_counts = [1, 64, 512, 4096, 32768] if quick else [1, 16, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    print("\n# FFF layer, width 768, depth 11, one tree (median us per call)")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        w_in, b_in, w_out = layer_weights(dtype, gen)
        for tokens in token_counts:
            x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).to(dtype)
            strategies = ["auto"]
            if tokens <= 512:
                strategies += ["single", "subtree"] + (["cluster"] if torch.cuda.get_device_capability()[0] >= 9 else [])
            if tokens >= 512 and dtype == torch.float32:
                strategies += ["sorted"]  # float32 only: staged is faster at 16 bits
            if tokens >= 1024:
                strategies += ["single", "staged"]
            for strategy in strategies:
                splits = [0]
                if strategy == "sorted" and tokens == 32768 and not quick:
                    splits = [0, 7, 9]  # the automatic split is 8
                for split in splits:
                    label = f"fff {name} M={tokens} {strategy}" + (f" split={split}" if split else "")
                    record(label, us(lambda: ext.fff_forward(x, w_in, b_in, w_out, DEPTH, strategy=STRATEGY[strategy], split=split)))
            plan = ext.plan(tokens, HIDDEN, DEPTH, 1, name, torch.cuda.get_device_properties(0).multi_processor_count)
            RESULTS[f"plan {name} M={tokens}"] = list(plan)


def kernel_breakdown(ext) -> None:
    """Per-kernel GPU time of one automatic call at 32768 tokens (torch.profiler), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(2)
    print("\n# kernel breakdown at 32768 tokens (us per call, torch.profiler, L2 warm)")
    for dtype in (torch.bfloat16, torch.float32):
        w_in, b_in, w_out = layer_weights(dtype, gen)
        x = torch.randn(32768, HIDDEN, device="cuda", generator=gen).to(dtype)
        for strategy in ("auto", "single", "staged"):
            call = lambda: ext.fff_forward(x, w_in, b_in, w_out, DEPTH, strategy=STRATEGY[strategy])  # noqa: E731
            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
            for event in prof.key_averages():
                total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
                if total > 0:
                    name = event.key.replace("(anonymous namespace)::", "").split("(")[0].split("<")[0].split("::")[-1][:40]
                    print(f"  {str(dtype)[6:]:<9s} {strategy:<7s} {name:<40s} {total / 20:9.1f} us")


def bench_baselines(naive_dir: str | None) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    print("\n# baselines")
    for tokens in (1, 32768):
        x = torch.randn(tokens, HIDDEN, device="cuda", generator=gen, dtype=torch.bfloat16)
        w1 = torch.randn(3072, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
        b1 = torch.zeros(3072, device="cuda", dtype=torch.bfloat16)
        w2 = torch.randn(HIDDEN, 3072, device="cuda", dtype=torch.bfloat16) * 0.02
        b2 = torch.zeros(HIDDEN, device="cuda", dtype=torch.bfloat16)
        dense = lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)  # noqa: E731
        record(f"dense BERT-base FF bf16 M={tokens}", us(dense))
        if tokens == 1:
            record("dense BERT-base FF bf16 M=1 graph", graph_us(dense))
    torch.backends.cuda.matmul.allow_tf32 = False
    x32 = torch.randn(32768, HIDDEN, device="cuda", generator=gen)
    w_in, b_in, w_out = layer_weights(torch.float32, gen)
    dense32 = lambda: F.linear(F.gelu(F.linear(x32, w_in, b_in)), w_out.t())  # noqa: E731
    record("dense 768-4095-768 fp32 (no TF32) M=32768", us(dense32))
    record("masked FFF fp32 M=32768", us(lambda: reference.fff_forward_masked(x32, w_in, b_in, w_out, DEPTH)))
    xb = x32.bfloat16()
    wb = [w.bfloat16() for w in (w_in, b_in, w_out)]
    record("masked FFF bf16 M=32768", us(lambda: reference.fff_forward_masked(xb, *wb, DEPTH)))
    if naive_dir:
        naive = load_naive(naive_dir)
        if naive is not None:
            n_nodes = 2 ** (DEPTH + 1) - 1
            run = lambda: naive.forward(x32, w_in, b_in, w_out, HIDDEN, DEPTH, 1, n_nodes)  # noqa: E731
            ours, _ = reference.fff_forward(x32.double(), w_in.double(), b_in.double(), w_out.double(), DEPTH)
            err = ((run().double() - ours).norm() / ours.norm()).item()
            RESULTS["naive kernel relative error vs float64"] = err
            print(f"  naive kernel output vs float64 reference: relative error {err:.2e}")
            record("authors' naive CUDA kernel fp32 M=32768", us(run, warmup=1, rep=200))


def load_naive(naive_dir: str):
    """Build the authors' kernel (benchmark_cuda/fff_cuda) from a folder outside the package."""
    from torch.utils.cpp_extension import load

    folder = Path(naive_dir)
    build = Path(os.environ.get("HF_FFF_CACHE", "/tmp")) / "naive"
    build.mkdir(parents=True, exist_ok=True)
    try:
        start = time.time()
        module = load("fff_naive_authors", [str(folder / "fff_cuda.cpp"), str(folder / "fff_cuda_kernel.cu")], build_directory=str(build))
        print(f"  built the authors' naive kernel in {time.time() - start:.0f} s")
        return module
    except Exception as error:  # their 2023 sources against today's torch: report, compare with the anchor instead
        print(f"  could not build the authors' naive kernel: {str(error).strip().splitlines()[-1]}")
        return None


def bench_one_token(ext) -> None:
    print("\n# one token, bf16")
    layer = hf_fff.FastFeedForward(HIDDEN, DEPTH).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        record("fff bf16 M=1 eager FastFeedForward module", us(lambda: layer(x)))
        record("fff bf16 M=1 eager extension call", us(lambda: ext.fff_forward(x, layer.weight_in, layer.bias_in, layer.weight_out, DEPTH)))
        record("fff bf16 M=1 graph", graph_us(lambda: layer(x)))
        for strategy in ("single", "subtree", "cluster"):
            call = lambda: ext.fff_forward(x, layer.weight_in, layer.bias_in, layer.weight_out, DEPTH, strategy=STRATEGY[strategy])  # noqa: E731
            record(f"fff bf16 M=1 graph extension call {strategy}", graph_us(call))


def bench_encoder(compile_models: bool) -> None:
    from transformers import BertConfig, BertModel

    print("\n# whole encoder, bf16, 256 x 128 tokens")
    batch, seq = 256, 128
    config = hf_fff.UltraFastBertConfig()
    ids = torch.randint(5, config.vocab_size, (batch, seq), device="cuda")
    mask = torch.ones(batch, seq, dtype=torch.long, device="cuda")
    ours = hf_fff.UltraFastBertModel(config).to(device="cuda", dtype=torch.bfloat16).eval()
    bert = BertModel._from_config(BertConfig(), attn_implementation="sdpa", add_pooling_layer=False)
    bert = bert.to(device="cuda", dtype=torch.bfloat16).eval()
    print(f"  BertModel attention: {bert.config._attn_implementation}")
    bert_ids = torch.randint(5, 30522, (batch, seq), device="cuda")
    with torch.no_grad():
        record("encoder UltraFastBERT (cuda kernel) eager", us(lambda: ours(input_ids=ids, attention_mask=mask)))
        with hf_fff.use_backend("masked"):
            record("encoder UltraFastBERT (published masked FFF) eager", us(lambda: ours(input_ids=ids, attention_mask=mask)))
        record("encoder BertModel bert-base SDPA eager", us(lambda: bert(input_ids=bert_ids, attention_mask=mask)))
        if compile_models:
            for label, model, model_ids, backend in (
                ("encoder UltraFastBERT (cuda kernel) compiled", ours, ids, None),
                ("encoder BertModel bert-base SDPA compiled", bert, bert_ids, None),
                ("encoder UltraFastBERT (published masked FFF) compiled", ours, ids, "masked"),
            ):
                torch._dynamo.reset()
                try:
                    with hf_fff.use_backend(backend or "auto"):
                        compiled = torch.compile(model, fullgraph=True)
                        start = time.time()
                        compiled(input_ids=model_ids, attention_mask=mask)
                        print(f"  compiled ({label}, fullgraph) in {time.time() - start:.0f} s")
                        record(label, us(lambda: compiled(input_ids=model_ids, attention_mask=mask)))
                except Exception as error:  # report and go on: the other rows still mean something
                    print(f"  {label}: torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def target_table() -> list[str]:
    r = RESULTS
    rows = ["| target | ours | baseline | result | must | goal |", "|---|---|---|---|---|---|"]

    def add(name, ours_key, base_key, kind, must, goal, base_value=None):
        if ours_key not in r or (base_key not in r and base_value is None):
            rows.append(f"| {name} | missing | | | {must} | {goal} |")
            return
        ours, base = r[ours_key], r.get(base_key, base_value)
        if kind == "ratio":  # ours / base, lower is better
            value = ours / base
            text = f"1/{base / ours:.1f}"
            ok_must, ok_goal = value <= must, value <= goal
            must_s, goal_s = f"<= 1/{1 / must:.0f}", f"<= 1/{1 / goal:.0f}"
        else:  # speed-up base / ours, higher is better
            value = base / ours
            text = f"{value:.2f}x"
            ok_must, ok_goal = value >= must, value >= goal
            must_s, goal_s = f">= {must}x", f">= {goal}x"
        verdict = "goal met" if ok_goal else ("must met" if ok_must else "MISSED")
        rows.append(f"| {name} | {ours:.1f} us | {base:.1f} us | {text} ({verdict}) | {must_s} | {goal_s} |")

    add("bf16, 32768 tokens vs dense BERT-base FF bf16", "fff bfloat16 M=32768 auto", "dense BERT-base FF bf16 M=32768", "ratio", 1 / 6, 1 / 10)
    add("fp32, 32768 tokens vs dense 768-4095-768 fp32", "fff float32 M=32768 auto", "dense 768-4095-768 fp32 (no TF32) M=32768", "speedup", 50, 78)
    add("1 token (eager module) vs dense BERT-base FF bf16 (eager)", "fff bf16 M=1 eager FastFeedForward module", "dense BERT-base FF bf16 M=1", "ratio", 1 / 2, 1 / 3)
    add("1 token (graph) vs dense BERT-base FF bf16 (graph)", "fff bf16 M=1 graph", "dense BERT-base FF bf16 M=1 graph", "ratio", 1 / 2, 1 / 3)
    add("32768 tokens fp32 vs the authors' naive kernel (measured)", "fff float32 M=32768 auto", "authors' naive CUDA kernel fp32 M=32768", "speedup", 200, 500)
    add("32768 tokens bf16 vs the authors' naive kernel (fp32 only; measured)", "fff bfloat16 M=32768 auto", "authors' naive CUDA kernel fp32 M=32768", "speedup", 200, 500)
    add("32768 tokens fp32 vs the naive kernel anchor (805 ns/token)", "fff float32 M=32768 auto", None, "speedup", 200, 500, base_value=805e-3 * 32768)
    add("encoder bf16 eager vs BertModel SDPA eager", "encoder UltraFastBERT (cuda kernel) eager", "encoder BertModel bert-base SDPA eager", "speedup", 1.0, 1.15)
    add("encoder bf16 compiled vs BertModel SDPA compiled", "encoder UltraFastBERT (cuda kernel) compiled", "encoder BertModel bert-base SDPA compiled", "speedup", 1.0, 1.15)
    add("encoder bf16 eager vs published masked (eager)", "encoder UltraFastBERT (cuda kernel) eager", "encoder UltraFastBERT (published masked FFF) eager", "speedup", 5, 6)
    add("encoder bf16 compiled vs published masked (compiled)", "encoder UltraFastBERT (cuda kernel) compiled", "encoder UltraFastBERT (published masked FFF) compiled", "speedup", 5, 6)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer token counts and no split sweep")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the encoders")
    parser.add_argument("--no-encoder", action="store_true")
    parser.add_argument("--encoder-only", action="store_true", help="only the whole-encoder rows (e.g. to compare HF_FFF_CUDA_STRATEGY values)")
    parser.add_argument("--naive", default=None, help="folder with the authors' fff_cuda.cpp and fff_cuda_kernel.cu")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 1
    props = torch.cuda.get_device_properties(0)
    env = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print("# environment:", json.dumps(env))
    start = time.time()
    ext = cuda_backend.load_module()
    if ext is None:
        print("the CUDA extension did not build")
        return 1
    print(f"# extension ready in {time.time() - start:.0f} s")
    if not args.encoder_only:
        bench_layers(ext, args.quick)
        kernel_breakdown(ext)
        bench_baselines(args.naive)
        bench_one_token(ext)
    if not args.no_encoder:
        bench_encoder(not args.no_compile)
    table = target_table()
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": RESULTS, "table": table}, indent=1))
    print(f"\n# targets ({env['device']}, torch {env['torch']}, {env['date']})")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
