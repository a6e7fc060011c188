"""`hf-fff bench`: the FFF layer and the whole UltraFastBERT encoder against dense baselines.

Layer: FastFeedForward at hidden 768, depth 11 (UltraFastBERT-1x11's) with the automatic backend, the
plain torch reference and the published masking computation, against torch dense feedforwards
768-3072-768 (BERT-base's) and 768-4095-768 (the same neuron count as one depth-11 tree).
Encoder: UltraFastBERT-1x11 (random weights) against transformers' BertModel with the bert-base config
and SDPA attention, on the same batch.
Training (`--train`): one optimizer step of UltraFastBERT-1x11 against BERT-base with the same task head and
batch, and the FFF backward alone against dense feedforward backwards.

Every group of implementations is timed side by side in one process: blocks of consecutive calls of
each, alternating round-robin, so that machine noise hits all of them alike; reported times are
medians of steady-state calls (see `time_side_by_side`). Device-generic:
on CUDA each call is timed with CUDA events, on the CPU with a monotonic clock.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .. import backends
from ..backends import reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_SECONDS_PER_ROW = 0.3  # cheap calls are repeated until each row has this much timing in it
MAX_SAMPLES = 2000
ROUNDS = 5  # alternating blocks per implementation


@dataclass
class Row:
    """One implementation timed in one setting."""

    group: str  # "layer", "encoder", "train" or "backward"
    tokens: int  # tokens per call
    name: str
    median_s: float
    min_s: float
    samples: int
    speedup: dict[str, float] = field(default_factory=dict)  # baseline name -> baseline time / this time
    peak_memory_bytes: Optional[int] = None  # training steps on CUDA only (see `step_peak_memory`)

    @property
    def ns_per_token(self) -> float:
        return self.median_s * 1e9 / max(self.tokens, 1)


# ---------------------------------------------------------------------------------------- timing


CUDA_BURST = 10  # calls per CUDA sample


def _clock(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs `fn` and returns the duration of one call in seconds.

    On CUDA one sample is a burst of CUDA_BURST back-to-back calls between two events: timing a
    single small call between events measures the host's launch latency (the GPU idles until the
    launch arrives), for the dense baselines as much as for FFF, instead of the device work.
    """
    if device.type == "cuda":

        def timed(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CUDA_BURST):
                fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3 / CUDA_BURST

        return timed

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def time_side_by_side(
    candidates: dict[str, tuple[Optional[str], Callable[[], object]]],
    device: torch.device,
    repeats: int,
    rounds: int = ROUNDS,
    *,
    grad: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in steady state; a candidate is (FFF backend or None, fn).

    Each candidate runs in blocks of consecutive calls whose first call is a discarded warm-up (it
    pays for the caches the other candidates just evicted), and the blocks alternate round-robin
    `rounds` times, so that drifts in machine load hit every candidate alike. Each candidate gets at
    least `repeats` samples, and cheap ones more (about MIN_SECONDS_PER_ROW of timing, at most
    MAX_SAMPLES) so that medians of microsecond calls are stable. The backend is switched outside
    the timed region. Inference runs under `torch.inference_mode()`; `grad=True` (training steps,
    backward passes) leaves autograd on.
    """
    timed = _clock(device)
    rounds = max(1, min(rounds, repeats))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with contextlib.nullcontext() if grad else torch.inference_mode():
        per_block = {}
        for name, (backend, fn) in candidates.items():
            with backends.use_backend(backend or backends.AUTO):
                estimate = min(timed(fn) for _ in range(2))
            wanted = max(repeats, min(MAX_SAMPLES, math.ceil(MIN_SECONDS_PER_ROW / max(estimate, 1e-9))))
            per_block[name] = math.ceil(wanted / rounds)
        for _ in range(rounds):
            for name, (backend, fn) in candidates.items():
                with backends.use_backend(backend or backends.AUTO):
                    timed(fn)
                    samples[name] += [timed(fn) for _ in range(per_block[name])]
    return samples


def _rows(group: str, tokens: int, samples: dict[str, list[float]], baselines: Sequence[str]) -> list[Row]:
    rows = [Row(group, tokens, name, statistics.median(times), min(times), len(times)) for name, times in samples.items()]
    by_name = {row.name: row for row in rows}
    for row in rows:
        if row.name not in baselines:
            row.speedup = {base: by_name[base].median_s / row.median_s for base in baselines}
    return rows


# ------------------------------------------------------------------------------------ the layer


def dense_feedforward(hidden: int, intermediate: int) -> nn.Module:
    """A transformer's dense feedforward: Linear, exact GELU, Linear."""
    return nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))


def dense_name(hidden: int, intermediate: int) -> str:
    return f"dense {hidden}-{intermediate}-{hidden}"


def bench_layer(device, dtype, tokens: Sequence[int], repeats: int, hidden: int, depth: int) -> list[Row]:
    from ..modeling_ultrafastbert import FastFeedForward

    generator = torch.Generator().manual_seed(0)
    fff = FastFeedForward(hidden, depth).to(device=device, dtype=dtype).eval()
    neurons = reference.nodes_per_tree(depth)
    dense = {dense_name(hidden, width): dense_feedforward(hidden, width).to(device=device, dtype=dtype).eval() for width in (4 * hidden, neurons)}
    auto_backend = backends.resolve(device.type)[0]  # builds the native kernel now, not inside a timing
    rows = []
    for count in tokens:
        x = torch.randn(count, hidden, generator=generator).to(device=device, dtype=dtype)
        candidates = {
            f"FFF ({auto_backend}, auto)": (backends.AUTO, lambda: fff(x)),
            "FFF (reference torch)": (backends.REFERENCE, lambda: fff(x)),
            "FFF (masked, published)": (backends.MASKED, lambda: fff(x)),
            **{name: (None, lambda module=module: module(x)) for name, module in dense.items()},
        }
        rows += _rows("layer", count, time_side_by_side(candidates, device, repeats), baselines=list(dense))
    return rows


# ---------------------------------------------------------------------------------- the encoder


def build_encoders(device, dtype, model_overrides: Optional[dict] = None):
    """(UltraFastBERT-1x11 encoder, BertModel bert-base with SDPA), random weights, eval mode.

    `model_overrides` (hidden_size, num_hidden_layers, num_attention_heads, vocab_size) shrink both
    alike for tests; BERT's intermediate size stays 4 * hidden_size as in bert-base.
    """
    from transformers import BertConfig, BertModel

    from .. import UltraFastBertConfig, UltraFastBertModel

    overrides = dict(model_overrides or {})
    torch.manual_seed(0)
    ultrafast = UltraFastBertModel(UltraFastBertConfig(**overrides, attn_implementation="sdpa"))
    if "hidden_size" in overrides:
        overrides["intermediate_size"] = 4 * overrides["hidden_size"]
    overrides.pop("fff_depth", None)
    overrides.pop("fff_trees", None)
    bert = BertModel(BertConfig(**overrides, attn_implementation="sdpa"))
    return ultrafast.to(device=device, dtype=dtype).eval(), bert.to(device=device, dtype=dtype).eval()


def bench_encoder(device, dtype, batch: int, seq: int, repeats: int, model_overrides: Optional[dict] = None) -> tuple[list[Row], dict]:
    ultrafast, bert = build_encoders(device, dtype, model_overrides)
    generator = torch.Generator().manual_seed(0)
    vocab = min(ultrafast.config.vocab_size, bert.config.vocab_size)
    input_ids = torch.randint(1, vocab, (batch, seq), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    bert_name = f"BertModel bert-base ({bert.config.num_hidden_layers} layers, sdpa)"
    layers = ultrafast.config.num_hidden_layers
    candidates = {
        f"UltraFastBERT-1x{ultrafast.config.fff_depth} ({layers} layers, {backends.resolve(device.type)[0]})": (
            backends.AUTO,
            lambda: ultrafast(input_ids=input_ids, attention_mask=attention_mask),
        ),
        f"UltraFastBERT-1x{ultrafast.config.fff_depth} ({layers} layers, masked)": (
            backends.MASKED,
            lambda: ultrafast(input_ids=input_ids, attention_mask=attention_mask),
        ),
        bert_name: (None, lambda: bert(input_ids=input_ids, attention_mask=attention_mask)),
    }
    rows = _rows("encoder", batch * seq, time_side_by_side(candidates, device, repeats), baselines=[bert_name])
    geometry = {
        "batch": batch,
        "seq": seq,
        "ultrafastbert": {k: getattr(ultrafast.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "fff_depth", "fff_trees")},
        "bert": {k: getattr(bert.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")},
    }
    return rows, geometry


# -------------------------------------------------------------------------------- training steps
#
# `hf-fff bench --train`: one optimizer step (forward, backward, AdamW) of UltraFastBERT-1x11 against
# transformers' BERT-base with the same task head, batch and precision, and the FFF backward alone against
# dense feedforward backwards. Parameters stay float32; on CUDA the step runs under bf16 autocast. AdamW is
# the fused one on every device: Trainer's default optimizer (adamw_torch_fused) with torch >= 2.8, CPU included.

TRAIN_TASKS = ("seq-cls", "mlm")
MLM_PROBABILITY = 0.15  # BERT's share of masked positions (DataCollatorForLanguageModeling's default)
MASK_TOKEN_ID = 4  # any in-vocabulary id will do for random weights; both models see the same one
TRAIN_LEARNING_RATE = 1e-5  # small: random weights must not diverge over the timed steps


def default_train_batches(device: torch.device) -> dict[str, tuple[int, ...]]:
    """Batch sizes (sequences of 128 tokens) per task: one small fine-tuning batch on the CPU; on CUDA a fine-tuning
    batch of 32 and of 128 and an MLM pretraining batch of 128."""
    if device.type == "cuda":
        return {"seq-cls": (32, 128), "mlm": (128,)}
    return {"seq-cls": (8,), "mlm": (8,)}


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA (mixed-precision training as Trainer's bf16=True runs it); plain fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def build_training_models(task: str, device, model_overrides: Optional[dict] = None) -> tuple[nn.Module, nn.Module]:
    """(UltraFastBERT-1x11, BERT-base with SDPA) with the `task` head ("seq-cls": 2 labels, "mlm"), random
    fp32 weights, train mode (dropout on). `model_overrides` shrinks both alike, as in `build_encoders`."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from .. import UltraFastBertConfig, UltraFastBertForMaskedLM, UltraFastBertForSequenceClassification

    if task not in TRAIN_TASKS:
        raise ValueError(f"unknown training task {task!r}; choose one of {TRAIN_TASKS}")
    overrides = dict(model_overrides or {})
    bert_overrides = {k: v for k, v in overrides.items() if k not in ("fff_depth", "fff_trees", "classifier_head_dim")}
    if "hidden_size" in overrides:
        bert_overrides["intermediate_size"] = 4 * overrides["hidden_size"]
    torch.manual_seed(0)
    if task == "seq-cls":
        ultrafast = UltraFastBertForSequenceClassification(UltraFastBertConfig(**overrides, num_labels=2, attn_implementation="sdpa"))
        bert = BertForSequenceClassification(BertConfig(**bert_overrides, num_labels=2, attn_implementation="sdpa"))
    else:
        ultrafast = UltraFastBertForMaskedLM(UltraFastBertConfig(**overrides, attn_implementation="sdpa"))
        bert = BertForMaskedLM(BertConfig(**bert_overrides, attn_implementation="sdpa"))
    return ultrafast.to(device).train(), bert.to(device).train()


def sparse_prediction_copy(model: nn.Module) -> nn.Module:
    """A copy of an UltraFastBertForMaskedLM (same weights, device and mode) with `config.sparse_prediction` on."""
    sparse = copy.deepcopy(model)
    sparse.config.sparse_prediction = True
    return sparse


def training_batch(task: str, batch: int, seq: int, vocab: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with all-ones attention; class labels (seq-cls) or 15% masked-LM labels (mlm)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(MASK_TOKEN_ID + 1, vocab, (batch, seq), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if task == "seq-cls":
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    else:
        masked = torch.rand(batch, seq, generator=generator) < MLM_PROBABILITY
        masked.view(-1)[0] = True  # at least one target, so the loss is defined at toy sizes
        inputs["labels"] = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
        inputs["input_ids"] = torch.where(masked, torch.full_like(input_ids, MASK_TOKEN_ID), input_ids)
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # fused on every device: what Trainer runs by default; the foreach AdamW costs 4-9x more per step on a 2-core CPU
    return torch.optim.AdamW(model.parameters(), lr=TRAIN_LEARNING_RATE, fused=True)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """A function running one step: zero the gradients, forward with loss, backward, optimizer step."""
    precision = autocast_dtype(device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def step_peak_memory(step: Callable[[], object], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> Optional[int]:
    """Peak bytes one training step of `model` needs on a CUDA device: its parameters and optimizer state
    plus the highest allocation above them during a step (activations, gradients, temporaries). Other
    models resident on the device do not count. None on the CPU: torch keeps no allocation statistics
    there, and process RSS deltas mostly show the allocator's caching, not the step's needs."""
    if device.type != "cuda":
        return None
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return resident + torch.cuda.max_memory_allocated(device) - before


# torch.compile's modes; those that capture CUDA graphs replay the step from one graph per shape, which lifts
# the host's launch cost off small batches.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compiled_training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, device: torch.device, name: str, *, fullgraph: bool, mode: str = "default"
) -> Callable[[], torch.Tensor]:
    """`training_step` of `torch.compile(model, mode=mode)` (the module's forward and, through AOTAutograd, its
    backward; the optimizer step stays eager, as Trainer's torch_compile runs it), compiled here by warm-up steps so
    that the compile time is reported and never timed."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    compiled = training_step(torch.compile(model, fullgraph=fullgraph, mode=None if mode == "default" else mode), optimizer, inputs, device)
    graphs = mode in CUDA_GRAPH_MODES

    def step() -> torch.Tensor:
        if graphs and device.type == "cuda":
            # each call is a new training iteration: the graphs may reuse the previous step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        return compiled()

    start = time.perf_counter()
    for _ in range(3 if graphs else 1):  # CUDA graph trees record on the steps after the first
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"  compiled {name} in {time.perf_counter() - start:.0f} s")
    return step


def bench_training_step(
    task: str, device, batch: int, seq: int, repeats: int, model_overrides: Optional[dict] = None, *, compile_mode: Optional[str] = None
) -> tuple[list[Row], dict]:
    """One task at one batch size: UltraFastBERT (automatic FFF backend; for "mlm" also with sparse prediction;
    then the masked backend) and BERT-base; with a `compile_mode` (one of COMPILE_MODES), also both models under
    torch.compile in that mode, each compared with BERT-base eager and BERT-base compiled."""
    ultrafast, bert = build_training_models(task, device, model_overrides)
    vocab = min(ultrafast.config.vocab_size, bert.config.vocab_size)
    inputs = training_batch(task, batch, seq, vocab, device)
    ultrafast_optimizer, bert_optimizer = make_optimizer(ultrafast), make_optimizer(bert)
    ultrafast_step = training_step(ultrafast, ultrafast_optimizer, inputs, device)
    bert_step = training_step(bert, bert_optimizer, inputs, device)
    head = "ForSequenceClassification" if task == "seq-cls" else "ForMaskedLM"
    ufb = f"UltraFastBert{head} 1x{ultrafast.config.fff_depth} ({ultrafast.config.num_hidden_layers} layers"
    bert_name = f"Bert{head} bert-base ({bert.config.num_hidden_layers} layers, sdpa)"
    ufb_name = f"{ufb}, {backends.resolve(device.type)[0]})"
    candidates = {ufb_name: (backends.AUTO, ultrafast_step)}
    owners = {ultrafast_step: (ultrafast, ultrafast_optimizer), bert_step: (bert, bert_optimizer)}
    if task == "mlm":  # the crammed recipe's sparse prediction: the same model decoding the labelled positions only
        sparse = sparse_prediction_copy(ultrafast)
        sparse_optimizer = make_optimizer(sparse)
        sparse_step = training_step(sparse, sparse_optimizer, inputs, device)
        candidates[f"{ufb_name} sparse prediction"] = (backends.AUTO, sparse_step)
        owners[sparse_step] = (sparse, sparse_optimizer)
    # The masked backend computes as the published code does in both directions: every node, then a mask.
    candidates[f"{ufb}, masked, published)"] = (backends.MASKED, ultrafast_step)
    candidates[bert_name] = (None, bert_step)
    baselines = [bert_name]
    if compile_mode is not None:
        compiled = "compiled" if compile_mode == "default" else f"compiled {compile_mode}"
        # fullgraph for UltraFastBERT: a graph break around the FFF op raises instead of hiding in the timing
        ufb_compiled = compiled_training_step(ultrafast, ultrafast_optimizer, inputs, device, f"{ufb_name} {compiled}", fullgraph=True, mode=compile_mode)
        bert_compiled = compiled_training_step(bert, bert_optimizer, inputs, device, f"{bert_name} {compiled}", fullgraph=False, mode=compile_mode)
        candidates[f"{ufb_name} {compiled}"] = (backends.AUTO, ufb_compiled)
        candidates[f"{bert_name} {compiled}"] = (None, bert_compiled)
        owners[ufb_compiled], owners[bert_compiled] = owners[ultrafast_step], owners[bert_step]
        baselines.append(f"{bert_name} {compiled}")
    rows = _rows("train", batch * seq, time_side_by_side(candidates, device, repeats, grad=True), baselines=baselines)
    for row, (backend, step) in zip(rows, candidates.values()):
        with backends.use_backend(backend or backends.AUTO):
            row.peak_memory_bytes = step_peak_memory(step, *owners[step], device)
    setting = {
        "task": task,
        "batch": batch,
        "seq": seq,
        "precision": "bf16 autocast, fp32 parameters" if autocast_dtype(device) else "fp32",
        "optimizer": "AdamW (fused=True)",
        "compiled": compile_mode is not None,
        "compile_mode": compile_mode,
        "baselines": baselines,
        "rows": [_row_dict(r) for r in rows],
    }
    return rows, setting


def bench_layer_backward(device, dtype, tokens: Sequence[int], repeats: int, hidden: int, depth: int) -> list[Row]:
    """Gradients of x and every weight, given the output gradient, of the FFF layer and dense feedforwards.

    Each candidate's forward graph is built once outside the timing; a sample is one
    `torch.autograd.grad(..., retain_graph=True)`, so only the backward is timed.
    """
    from ..modeling_ultrafastbert import FastFeedForward

    generator = torch.Generator().manual_seed(0)
    fff = FastFeedForward(hidden, depth).to(device=device, dtype=dtype)
    neurons = reference.nodes_per_tree(depth)
    dense = {dense_name(hidden, width): dense_feedforward(hidden, width).to(device=device, dtype=dtype) for width in (4 * hidden, neurons)}
    auto_backend = backends.resolve(device.type)[0]
    rows = []
    for count in tokens:
        x = torch.randn(count, hidden, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
        grad_y = torch.randn(count, hidden, generator=generator).to(device=device, dtype=dtype)

        def backward_of(output: torch.Tensor, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
            return lambda: torch.autograd.grad(output, inputs, grad_y, retain_graph=True)

        fff_inputs = (x, fff.weight_in, fff.bias_in, fff.weight_out)
        with backends.use_backend(backends.AUTO):
            y_auto = fff(x)
        with backends.use_backend(backends.REFERENCE):
            y_reference = fff(x)
        # the published computation under autograd: dense products of every node, the unvisited masked to 0
        y_masked = reference.fff_forward_masked(x, fff.weight_in, fff.bias_in, fff.weight_out, depth)[0]
        candidates = {
            f"FFF backward ({auto_backend}, auto)": (backends.AUTO, backward_of(y_auto, fff_inputs)),
            "FFF backward (reference torch)": (backends.REFERENCE, backward_of(y_reference, fff_inputs)),
            "FFF backward (masked, published: dense autograd)": (None, backward_of(y_masked, fff_inputs)),
            **{f"{name} backward": (None, backward_of(module(x), (x, *module.parameters()))) for name, module in dense.items()},
        }
        rows += _rows("backward", count, time_side_by_side(candidates, device, repeats, grad=True), baselines=[f"{name} backward" for name in dense])
    return rows


def run_train_bench(
    device: str = "cpu",
    repeats: int = 5,
    batches: Optional[dict[str, Sequence[int]]] = None,
    seq: int = 128,
    backward_tokens: Optional[Sequence[int]] = None,
    json_path: Optional[str] = None,
    *,
    compile_mode: Optional[str] = None,
    hidden: int = 768,
    depth: int = 11,
    model_overrides: Optional[dict] = None,
) -> dict:
    """`hf-fff bench --train`: the training-step tables and the backward table; print them, optionally
    write JSON; return the results dict. Defaults per device: `default_train_batches`, and the backward at
    4096 tokens on the CPU, 32768 on CUDA. A `compile_mode` (`--compile [MODE]`) adds both models' steps under
    torch.compile in that mode to each training table."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is visible")
    batches = default_train_batches(device) if batches is None else batches
    backward_tokens = ((32768,) if device.type == "cuda" else (4096,)) if backward_tokens is None else tuple(backward_tokens)
    layer_dtype = autocast_dtype(device) or torch.float32
    meta = {**machine_info(device), "dtype": str(layer_dtype).replace("torch.", ""), "train_precision": "bf16 autocast" if autocast_dtype(device) else "fp32"}
    isa = f", ISA {'/'.join(meta['cpu_isa'])}" if device.type == "cpu" else ""
    print(f"hf-fff bench --train on {meta['device_name']} ({meta['device']}{isa}, {meta['cpu_threads']} CPU threads), "
          f"{meta['train_precision']}, torch {meta['torch']}, {meta['date']}; FFF backend: {meta['fff_backend']}")
    results: dict = {"meta": meta, "train": []}
    for task, sizes in batches.items():
        for batch in sizes:
            rows, setting = bench_training_step(task, device, batch, seq, repeats, model_overrides, compile_mode=compile_mode)
            print(f"\nTraining step ({task}), batch {batch} x {seq} tokens, {setting['precision']}, {setting['optimizer']}, "
                  f"random weights (median of side-by-side steps)")
            print(format_table(rows, setting["baselines"], "tokens"))
            results["train"].append(setting)
            _release(device)
    if not backward_tokens:  # the training tables only
        return _finish_train_bench(results, json_path)
    backward_rows = bench_layer_backward(device, layer_dtype, backward_tokens, repeats, hidden, depth)
    backward_baselines = [f"{dense_name(hidden, 4 * hidden)} backward", f"{dense_name(hidden, reference.nodes_per_tree(depth))} backward"]
    print(f"\nBackward alone (grads of x and all weights), hidden {hidden}, depth {depth}, 1 tree, {meta['dtype']} (median of side-by-side calls)")
    print(format_table(backward_rows, backward_baselines, "tokens"))
    results["backward"] = {"hidden": hidden, "depth": depth, "baselines": backward_baselines, "rows": [_row_dict(r) for r in backward_rows]}
    return _finish_train_bench(results, json_path)


def _finish_train_bench(results: dict, json_path: Optional[str]) -> dict:
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    return results


def _release(device: torch.device) -> None:
    """Give back the previous setting's models before the next one is built (GPU memory, CPU RAM)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()



# ------------------------------------------------------------------------------------- reporting


def machine_info(device: torch.device) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model() or platform.processor() or platform.machine()
    return {
        "cpu_isa": _cpu_isa(),
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "fff_backend": backends.resolve(device.type)[0],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# The SIMD extensions the CPU kernel's speed depends on, as /proc/cpuinfo (lscpu) names them.
ISA_FLAGS = ("avx512f", "avx512_bf16", "avx2", "fma", "f16c", "asimd", "sve")


def _cpu_isa() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [flag for flag in ISA_FLAGS if flag in flags]


def _format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def format_table(rows: Sequence[Row], baselines: Sequence[str], first_column: str) -> str:
    with_memory = any(row.peak_memory_bytes is not None for row in rows)
    header = [first_column, "implementation", "median", "ns/token", *(f"vs {b}" for b in baselines), *(["peak memory"] if with_memory else [])]
    lines = [header]
    for row in rows:
        ratios = [f"{row.speedup[b]:.2f}x" if b in row.speedup else "1x (baseline)" if row.name == b else "" for b in baselines]
        memory = [f"{row.peak_memory_bytes / 2**20:,.0f} MiB" if row.peak_memory_bytes is not None else ""] if with_memory else []
        lines.append([str(row.tokens), row.name, _format_time(row.median_s), f"{row.ns_per_token:,.0f}", *ratios, *memory])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


def plot_results(results: dict, path: str) -> None:
    """Two panels: the layer's speed-up over the dense baseline of equal neuron count (per token
    count, log scale), and the encoders' time per batch with their speed-up over BertModel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder = results.get("encoder")
    figure, axes = plt.subplots(1, 2 if encoder else 1, figsize=(14 if encoder else 7, 4.8), squeeze=False)
    _plot_layer_speedups(axes[0][0], results["layer"])
    if encoder:
        _plot_encoder_times(axes[0][1], encoder)
    meta = results["meta"]
    figure.suptitle(
        f"hf-fff bench: {meta['device_name']} ({meta['device']}, {meta['cpu_threads']} threads), {meta['dtype']}, "
        f"torch {meta['torch']}, {meta['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_layer_speedups(ax, layer: dict) -> None:
    baseline = layer["baselines"][-1]
    rows = [row for row in layer["rows"] if row["speedup"]]  # the FFF implementations
    names = list(dict.fromkeys(row["name"] for row in rows))
    token_counts = list(dict.fromkeys(row["tokens"] for row in rows))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [next(r["speedup"][baseline] for r in rows if r["name"] == name and r["tokens"] == t) for t in token_counts]
        positions = [k + (i - (len(names) - 1) / 2) * width for k in range(len(token_counts))]
        bars = ax.bar(positions, values, width, label=name, color=_color(name))
        ax.bar_label(bars, labels=[f"{v:.1f}x" for v in values], fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    top = max((v for r in rows for v in r["speedup"].values()), default=1.0)
    ax.set_ylim(top=max(top, 1.0) * 12)  # room for the legend above the bars
    ax.set_xticks(range(len(token_counts)), [f"{t} token{'' if t == 1 else 's'}" for t in token_counts])
    ax.set_ylabel(f"speed-up over {baseline} (log scale)")
    ax.set_title(f"FFF layer {layer['hidden']} x depth {layer['depth']}: higher is better", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=len(names))


def _color(name: str, baseline: bool = False) -> str:
    """One colour per kind of implementation, the same in both panels."""
    if baseline:
        return "tab:gray"
    return "tab:orange" if "masked" in name else "tab:blue" if "reference" in name else "tab:green"


def _plot_encoder_times(ax, encoder: dict) -> None:
    baseline = encoder["baselines"][0]
    rows = encoder["rows"]
    millis = [row["median_s"] * 1e3 for row in rows]
    bars = ax.barh(range(len(rows)), millis, color=[_color(row["name"], baseline=not row["speedup"]) for row in rows])
    labels = [f"{ms:.0f} ms (speed-up {row['speedup'][baseline]:.2f}x)" if row["speedup"] else f"{ms:.0f} ms (baseline)" for ms, row in zip(millis, rows)]
    ax.bar_label(bars, labels=labels, fontsize=8, padding=3)
    ax.set_yticks(range(len(rows)), [row["name"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(millis) * 1.45)
    ax.set_xlabel("time per batch (ms): lower is better")
    ax.set_title(f"Whole encoder, batch {encoder['batch']} x {encoder['seq']} tokens", fontsize=10)


def run_bench(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: Sequence[int] = (1, 128, 4096),
    repeats: int = 10,
    encoder: bool = True,
    encoder_batch: int = 8,
    encoder_seq: int = 128,
    json_path: Optional[str] = None,
    plot_path: Optional[str] = None,
    *,
    hidden: int = 768,
    depth: int = 11,
    model_overrides: Optional[dict] = None,
) -> dict:
    """Time everything, print the tables, optionally write JSON and a PNG; return the results dict."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is visible")
    meta = {**machine_info(device), "dtype": str(dtype).replace("torch.", "")}
    print(f"hf-fff bench on {meta['device_name']} ({meta['device']}, {meta['cpu_threads']} CPU threads), "
          f"{meta['dtype']}, torch {meta['torch']}, {meta['date']}; FFF backend: {meta['fff_backend']}")

    layer_rows = bench_layer(device, dtype, tokens, repeats, hidden, depth)
    layer_baselines = [dense_name(hidden, 4 * hidden), dense_name(hidden, reference.nodes_per_tree(depth))]
    print(f"\nFFF layer, hidden {hidden}, depth {depth}, 1 tree (median of >= {repeats} side-by-side calls)")
    print(format_table(layer_rows, layer_baselines, "tokens"))
    results = {
        "meta": meta,
        "layer": {"hidden": hidden, "depth": depth, "baselines": layer_baselines, "rows": [_row_dict(r) for r in layer_rows]},
    }

    if encoder:
        encoder_rows, geometry = bench_encoder(device, dtype, encoder_batch, encoder_seq, max(3, repeats // 4), model_overrides)
        bert_name = next(r.name for r in encoder_rows if not r.speedup)
        print(f"\nWhole encoder, batch {encoder_batch} x {encoder_seq} tokens, random weights (median of side-by-side calls)")
        print(format_table(encoder_rows, [bert_name], "tokens"))
        results["encoder"] = {**geometry, "baselines": [bert_name], "rows": [_row_dict(r) for r in encoder_rows]}

    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    if plot_path:
        plot_results(results, plot_path)
        print(f"wrote {plot_path}")
    return results


def _row_dict(row: Row) -> dict:
    return {**asdict(row), "ns_per_token": row.ns_per_token}


# ------------------------------------------------------------------------------------------ CLI
