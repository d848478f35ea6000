"""DDP on CPU: two gloo processes train the tiny model; both ranks end with identical tuner
weights, rank 0 alone writes, evaluation counts each sample once, and a distributed resume is exact."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trainkit import blobs, fast_recipe, tiny_model, trainable
from utdsl.runtime.distributed import init_distributed, shutdown
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, WORLD, "gloo")
    recipe = fast_recipe(epochs=2, grad_accum=2, batch_size=4, log_every=5)
    train, test = blobs(44), blobs(15, seed=0)  # 44 = 2 x 22: 6 batches of 4 a rank (last short)
    report = {}
    try:
        for name, kwargs in (("whole", {}), ("part", {"stop_after_steps": 4, "checkpoint_every": 2})):
            model = tiny_model()
            result = fit(model, train, test, recipe, RunDir(os.path.join(out, name)), ctx=ctx, **kwargs)
            report[name] = {"step": result.state.step,
                            "samples": result.last_eval.samples if result.last_eval else None}
            save_file({k: v.contiguous() for k, v in trainable(model).items()},
                      os.path.join(out, f"{name}.rank{rank}.safetensors"))
        model = tiny_model(tuner_seed=7)
        result = fit(model, train, test, recipe, RunDir(os.path.join(out, "part")), ctx=ctx, resume=True,
                     checkpoint_every=2)
        report["resumed"] = {"step": result.state.step, "samples": result.last_eval.samples}
        save_file({k: v.contiguous() for k, v in trainable(model).items()},
                  os.path.join(out, f"resumed.rank{rank}.safetensors"))
    finally:
        shutdown(ctx)
    with open(os.path.join(out, f"report.rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


def test_two_gloo_ranks_hold_identical_tuners(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"report.rank{r}.json").read_text()) for r in range(WORLD)]
    assert reports[0] == reports[1]
    # 22 samples a rank -> 6 batches of 4 -> 3 optimizer steps an epoch, 2 epochs
    assert reports[0]["whole"] == {"step": 6, "samples": 15} and reports[0]["part"]["step"] == 4
    assert reports[0]["resumed"] == {"step": 6, "samples": 15}
    start = trainable(tiny_model())
    weights = {(name, r): load_file(str(tmp_path / f"{name}.rank{r}.safetensors"))
               for name in ("whole", "resumed") for r in range(WORLD)}
    for key, tensor in weights["whole", 0].items():
        assert not torch.equal(tensor, start[key])
        for other in weights.values():
            assert torch.equal(tensor, other[key]), key
    run = RunDir(tmp_path / "whole")
    assert [r["epoch"] for r in run.read_metrics() if r["kind"] == "epoch"] == [0, 1]

    def timeless(rows):
        return [{k: v for k, v in r.items() if "throughput" not in k and k != "peak_memory_mb"} for r in rows]

    # the step-5 line spans the mid-epoch state of step 4: its loss sums both ranks across the resume
    assert [r["step"] for r in run.read_metrics() if r["kind"] == "step"] == [5]
    assert timeless(RunDir(tmp_path / "part").read_metrics()) == timeless(run.read_metrics())
    assert load_file(str(run.checkpoint("last"))).keys() == start.keys()
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.slow
def test_torchrun_cli_trains_and_resumes(tmp_path):
    """``torchrun --nproc-per-node 2 -m utdsl train`` on CPU (gloo), then a resume under torchrun."""
    import subprocess
    import sys

    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(_free_port()), "-m", "utdsl"]
    micro = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
             "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
             "--num-workers", "0", "--no-progress", "--device", "cpu"]
    done = subprocess.run([*torchrun, "train", "lora", *micro, "--epochs", "1", "--batch-size", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 epochs, 10 steps" in done.stdout and done.stdout.count("run ") == 1  # rank 0 alone prints
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    done = subprocess.run([*torchrun, "train", "--resume", str(out), "--num-workers", "0", "--no-progress",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
