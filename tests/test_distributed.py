"""Distributed training on CPU processes over gloo, launched with torchrun as users launch it.

DDP through `Trainer`: 2 processes and 1 process with the same global batch and seed log the same losses
and end with the same parameters; the 2 ranks end bit-identical (the FFF weight gradients, dense tensors
with only visited rows nonzero, all-reduce like any other). FSDP2: `fully_shard` of each encoder layer,
the custom op computing on the unsharded weights inside the layer, with and without bf16 mixed precision.
The worker is tests/_distributed_worker.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _distributed_worker as worker

pytestmark = pytest.mark.slow  # each torchrun launch starts fresh Python processes (~10-30 s apiece)

WORKER = Path(__file__).with_name("_distributed_worker.py")


def torchrun(mode: str, processes: int, out_dir: Path) -> list[dict]:
    """Run the worker in `processes` processes; return each rank's results."""
    # torchrun's own entry point on this interpreter (the worker puts the checkout's hf_fff on its path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(WORKER), mode, str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out_dir / f"{mode}-world{processes}-rank{rank}.pt") for rank in range(processes)]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    return torchrun("trainer", 1, out_dir), torchrun("trainer", 2, out_dir)


def assert_same_parameters(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("task", ["seq-cls", "mlm"])
def test_ddp_trainer_gives_the_one_process_loss_curve_and_parameters(trainer_runs, task):
    (single,), (rank0, rank1) = trainer_runs
    assert len(single[task]["losses"]) == worker.STEPS
    # DDP's all-reduce sums in another order than one process's batch: equal to float tolerance, not bits.
    torch.testing.assert_close(torch.tensor(rank0[task]["losses"]), torch.tensor(single[task]["losses"]), rtol=1e-5, atol=1e-6)
    assert_same_parameters(rank0[task]["params"], single[task]["params"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", ["seq-cls", "mlm"])
def test_ddp_ranks_end_with_identical_fff_weights_that_moved(trainer_runs, task):
    (single,), (rank0, rank1) = trainer_runs
    assert_same_parameters(rank1[task]["params"], rank0[task]["params"], rtol=0, atol=0)
    initial = dict(worker.build_model(task).named_parameters())
    fff = [name for name in rank0[task]["params"] if name.endswith((".ffn.weight_in", ".ffn.bias_in", ".ffn.weight_out"))]
    assert len(fff) == 3 * worker.tiny_config().num_hidden_layers
    for name in fff:
        assert not torch.equal(rank0[task]["params"][name], initial[name].detach()), f"{name} did not train"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    return torchrun("fsdp", 1, out_dir), torchrun("fsdp", 2, out_dir)


def test_fsdp2_sharded_layers_train_like_one_process(fsdp_runs):
    (single,), (rank0, rank1) = fsdp_runs
    run = "fsdp-fp32"
    assert rank0[run]["parameter_types"] == ["DTensor"]  # every parameter sharded between the steps
    torch.testing.assert_close(torch.tensor(rank0[run]["losses"]), torch.tensor(single[run]["losses"]), rtol=1e-5, atol=1e-6)
    assert_same_parameters(rank0[run]["params"], single[run]["params"], rtol=1e-4, atol=1e-5)
    assert_same_parameters(rank1[run]["params"], rank0[run]["params"], rtol=0, atol=0)


def test_fsdp2_bf16_mixed_precision_trains_and_keeps_ranks_in_step(fsdp_runs):
    (single,), (rank0, rank1) = fsdp_runs
    run = "fsdp-bf16"
    losses = torch.tensor(rank0[run]["losses"])
    assert torch.isfinite(losses).all() and losses[-1] < losses[0]
    # bf16 compute: close to the single process's bf16 run, not bit-equal (reductions differ in order)
    torch.testing.assert_close(losses, torch.tensor(single[run]["losses"]), rtol=2e-2, atol=2e-2)
    assert_same_parameters(rank1[run]["params"], rank0[run]["params"], rtol=0, atol=0)
    assert all(value.dtype == torch.float32 for value in rank0[run]["params"].values())  # fp32 master weights
