"""Training throughput (tokens/s) under DDP: UltraFastBERT-1x11 against BERT-base, 1 and N processes.

Both models train under the same engine, transformers' `Trainer` (DDP through accelerate: NCCL on GPUs,
gloo on CPU processes), on the same random batches, with the same optimizer (AdamW, fused on CUDA) and
precision (bf16 mixed precision on CUDA, fp32 on the CPU): sequence-classification fine-tuning and MLM
pretraining (15% masked labels). Throughput counts the tokens of the steps after WARMUP_STEPS, all
processes together, from the first timed step's start to the end of the last.

One configuration, under torchrun (rank 0 prints and writes the JSON):
    torchrun --nproc-per-node 2 benchmarks/train_ddp.py --task mlm --batch 128 --json out.json
The whole table, launching torchrun for each process count itself:
    python benchmarks/train_ddp.py --launch 1 2 --json results.json
    python benchmarks/train_ddp.py --launch 1 2 --tiny --steps 6      # CPU smoke run at toy size

--batch is per process (the global batch grows with the process count, as DDP scaling is measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = ("seq-cls", "mlm")
MODELS = ("ultrafastbert", "bert")
WARMUP_STEPS = 3  # first steps build kernels, autotune and fill allocator caches: not timed
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, fff_depth=4, classifier_head_dim=32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS))
    parser.add_argument("--model", choices=MODELS, nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="sequences per process and step (default: 128 on CUDA, 8 on CPU)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--steps", type=int, default=20, help=f"optimizer steps, the first {WARMUP_STEPS} untimed (default 20)")
    parser.add_argument("--tiny", action="store_true", help="toy-sized models (a smoke run of the engine, not a measurement)")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--launch", type=int, nargs="+", metavar="N", help="run under `torchrun --nproc-per-node N` for each N, then print the table")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    return args


# ------------------------------------------------------------------------------------- one process


def examples(task: str, count: int, seq: int, vocab: int):
    """`count` fixed random examples (the same in every process) as a torch Dataset."""
    import torch

    from hf_fff.tools.bench import training_batch

    batch = training_batch(task, count, seq, vocab, "cpu", seed=0)

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return count

        def __getitem__(self, i):
            return {name: tensor[i] for name, tensor in batch.items()}

    return Examples()


def throughput_callback(tokens_per_step: int):
    """A TrainerCallback timing the steps after the warm-up; `.tokens_per_second()` after training."""
    import torch
    from transformers import TrainerCallback

    def synchronize():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Throughput(TrainerCallback):
        def __init__(self):
            self.start = self.stop = None
            self.timed_steps = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                synchronize()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is not None:
                synchronize()
                self.stop = time.perf_counter()
                self.timed_steps = state.global_step - WARMUP_STEPS

        def tokens_per_second(self) -> float:
            return self.timed_steps * tokens_per_step / (self.stop - self.start)

    return Throughput()


def train_once(task: str, model_name: str, args, world_size: int) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_fff.tools.bench import build_training_models

    cuda = torch.cuda.is_available()
    ultrafast, bert = build_training_models(task, "cpu", TINY if args.tiny else None)
    model = ultrafast if model_name == "ultrafastbert" else bert
    del ultrafast, bert
    batch = args.batch or (128 if cuda else 8)
    vocab = min(model.config.vocab_size, 30522)
    callback = throughput_callback(batch * world_size * args.seq)
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="train_ddp-"),
        per_device_train_batch_size=batch,
        max_steps=args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend="nccl" if cuda else "gloo",
        ddp_find_unused_parameters=False,  # every parameter of both models takes part: skip DDP's graph search
        logging_steps=args.steps,
        report_to=[],
        save_strategy="no",
        dataloader_drop_last=True,
        seed=0,
    )
    data = examples(task, args.steps * batch * world_size, args.seq, vocab)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[callback])
    trainer.train()
    result = {
        "task": task,
        "model": model_name,
        "model_class": type(model).__name__,
        "processes": world_size,
        "batch_per_process": batch,
        "seq": args.seq,
        "threads_per_process": torch.get_num_threads(),
        "timed_steps": callback.timed_steps,
        "tokens_per_s": callback.tokens_per_second(),
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def machine(world_size: int) -> dict:
    import platform

    import torch

    from hf_fff.tools.bench import _cpu_isa, _cpu_model

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else _cpu_model() or platform.machine(),
        "cpu_isa": _cpu_isa(),
        "engine": f"transformers Trainer (1 process, or DDP over {'nccl' if cuda else 'gloo'})",
        "precision": "bf16 mixed precision" if cuda else "fp32",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
    }


def run_worker(args) -> None:
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    runs = [train_once(task, model, args, world_size) for task in args.task for model in args.model]
    if rank == 0:
        results = {"meta": {**machine(world_size), "tiny": args.tiny}, "runs": runs}
        for run in runs:
            print(f"{run['task']:8} {run['model_class']:40} {run['processes']} process(es) x batch {run['batch_per_process']} x {run['seq']}: "
                  f"{run['tokens_per_s']:,.0f} tokens/s")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")


# ------------------------------------------------------------------------------------ the launcher


def launch(args) -> None:
    """Run this script under torchrun for each process count and print one table."""
    forwarded = ["--task", *args.task, "--model", *args.model, "--seq", str(args.seq), "--steps", str(args.steps)]
    forwarded += ["--batch", str(args.batch)] if args.batch else []
    forwarded += ["--tiny"] if args.tiny else []
    runs, meta = [], None
    with tempfile.TemporaryDirectory() as folder:
        for processes in args.launch:
            out = Path(folder) / f"{processes}.json"
            command = ["torchrun", "--standalone", f"--nproc-per-node={processes}", __file__, *forwarded, "--json", str(out)]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
            result = json.loads(out.read_text())
            runs += result["runs"]
            meta = meta or result["meta"]
    print(f"\n{meta['device']}, {meta['precision']}, torch {meta['torch']}, {meta['date']}{' (TINY models: smoke run, not a measurement)' if args.tiny else ''}")
    print(format_table(runs))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
        print(f"wrote {args.json_path}")


def format_table(runs: list[dict]) -> str:
    """tokens/s per (task, model, processes), the scaling over 1 process, and UltraFastBERT / BERT."""
    by_key = {(r["task"], r["model"], r["processes"]): r["tokens_per_s"] for r in runs}
    lines = ["task      model          processes  tokens/s      vs 1 process  vs BERT-base", "-" * 78]
    for (task, model, processes), speed in by_key.items():
        single = by_key.get((task, model, 1))
        bert = by_key.get((task, "bert", processes))
        scaling = f"{speed / single:.2f}x" if single and processes != 1 else ""
        versus = f"{speed / bert:.2f}x" if bert and model != "bert" else ""
        lines.append(f"{task:9} {model:14} {processes:>9}  {speed:>12,.0f}  {scaling:>12}  {versus:>11}")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    launch(arguments) if arguments.launch else run_worker(arguments)
