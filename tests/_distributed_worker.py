"""One process of the distributed tests (tests/test_distributed.py), started by `torchrun`.

    torchrun --standalone --nproc-per-node N tests/_distributed_worker.py {trainer,fsdp} OUT_DIR

trainer: `Trainer` (DDP over gloo when N > 1) fine-tunes a tiny UltraFastBertForSequenceClassification and
    pretrains a tiny UltraFastBertForMaskedLM for a few steps with the global batch GLOBAL_BATCH, whatever N.
fsdp: FSDP2 (`fully_shard` on every encoder layer, then the root) over gloo, a plain AdamW loop on the MLM
    model, without and with bf16 mixed precision.
Each rank writes OUT_DIR/<mode>-world<N>-rank<r>.pt: per run, the logged losses and the final (full) parameters.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the worktree's hf_fff, under torchrun too

import hf_fff  # noqa: E402

import _model_helpers  # noqa: E402  (tests/, the script's own folder, is first on sys.path)

GLOBAL_BATCH = 8
SEQ_LEN = 12
VOCAB = 128
STEPS = 4
MASK_TOKEN_ID = 3


def tiny_config(**overrides) -> hf_fff.UltraFastBertConfig:
    # No dropout: the ranks draw different random masks than a single process would.
    return _model_helpers.tiny_config(vocab_size=VOCAB, **_model_helpers.NO_DROPOUT, **overrides)


class FixedExamples(torch.utils.data.Dataset):
    """Examples drawn once from a fixed seed: every process sees the same data set."""

    def __init__(self, task: str, n: int = GLOBAL_BATCH * STEPS):
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(MASK_TOKEN_ID + 1, VOCAB, (n, SEQ_LEN), generator=generator)
        if task == "seq-cls":
            self.labels = torch.randint(0, 2, (n,), generator=generator)
            self.ids[self.labels == 1, 2] = MASK_TOKEN_ID + 1  # learnable: a marker token decides the class
        else:  # masked LM: 15% targets, fixed here so that no collator randomness differs between runs
            masked = torch.rand(n, SEQ_LEN, generator=generator) < 0.15
            masked[:, 0] = True
            self.labels = torch.where(masked, self.ids, torch.full_like(self.ids, -100))
            self.ids = torch.where(masked, torch.full_like(self.ids, MASK_TOKEN_ID), self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def build_model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "seq-cls":
        return hf_fff.UltraFastBertForSequenceClassification(tiny_config(num_labels=2))
    return hf_fff.UltraFastBertForMaskedLM(tiny_config())


def run_trainer(task: str, out_dir: Path, world_size: int) -> dict:
    from transformers import Trainer

    model = build_model(task)
    args = _model_helpers.training_args(
        out_dir / f"trainer-{task}-{world_size}",
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=STEPS,
        data_seed=0,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=FixedExamples(task))
    trainer.train()
    return {"losses": _model_helpers.logged_losses(trainer), "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def run_fsdp(out_dir: Path, mixed_precision: bool) -> dict:
    """A plain loop over FSDP2: each rank takes its contiguous share of every global batch."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model("mlm")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    for layer in model.ultrafastbert.encoder.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = FixedExamples("mlm")
    share = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * share
        batch = data[start : start + share]
        # Sum over this rank's targets / targets of the whole global batch: FSDP averages gradients over
        # ranks, so multiply by the world size to get the gradient of the global-batch mean loss.
        global_targets = (data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]["labels"] != -100).sum()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), batch["labels"].view(-1), ignore_index=-100, reduction="sum")
        (loss_sum / global_targets * world_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        losses.append((total / global_targets).item())
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    sharded_types = sorted({type(p).__name__ for p in model.parameters()})
    return {"losses": losses, "params": full, "parameter_types": sharded_types}


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if mode == "trainer":
        results = {task: run_trainer(task, out_dir, world_size) for task in ("seq-cls", "mlm")}
    elif mode == "fsdp":
        dist.init_process_group("gloo")
        results = {f"fsdp-{'bf16' if mp else 'fp32'}": run_fsdp(out_dir, mp) for mp in (False, True)}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.save(results, out_dir / f"{mode}-world{world_size}-rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
