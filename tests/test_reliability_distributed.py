"""Issue 11, distributed runs: a stalled or lost process never hangs the others for torch's 30
minutes. The process group's timeout is the recipe's ``dist_timeout``; a process waiting in a
collective says so on stderr every heartbeat interval; the wait ends in a one-line error (exit 2)
naming what happened; a rendezvous that never completes is a clean error too."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from utdsl.runtime.distributed import (DistContext, DistributedError, Heartbeat, heartbeat_interval,
                                       init_distributed, peer_errors)

GLOO = DistContext(rank=0, world_size=2, backend="gloo", timeout=8.0)
HEARTBEAT = re.compile(r"rank 0 of 2: waiting for the other processes at (a DDP forward|the gradient all-reduce|"
                       r"an all-reduce) for \d+ s; if one stalled or died, the run stops after dist_timeout=4 s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_heartbeat_interval_is_a_fifth_of_the_timeout_within_1_and_60_s():
    assert [heartbeat_interval(t) for t in (2, 10, 600, 1800)] == [1.0, 2.0, 60.0, 60.0]


def test_heartbeat_reports_a_wait_every_interval_and_stops_when_it_ends():
    stream = io.StringIO()
    beat = Heartbeat(GLOO, interval=0.2, stream=stream)
    try:
        with beat.waiting("an all-reduce"):
            time.sleep(0.75)
        lines = stream.getvalue().splitlines()
        time.sleep(0.5)
        assert stream.getvalue().splitlines() == lines  # nothing once the wait is over
    finally:
        beat.close()
    assert 2 <= len(lines) <= 4
    assert lines[0] == ("rank 0 of 2: waiting for the other processes at an all-reduce for 0 s; if one stalled "
                        "or died, the run stops after dist_timeout=8 s")


@pytest.mark.parametrize("raised, message, hint", [
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
     "8000ms for recv operation to complete",
     "rank 0 of 2: another process of the distributed run stalled: no answer within dist_timeout=8 s "
     "(Timed out waiting 8000ms for recv operation to complete)",
     "raise the recipe's dist_timeout if a process is merely slow (-o dist_timeout=SECONDS); "
     "resume with utdsl train --resume runs/x (same number of processes)"),
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:208: "
     "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
     "application. Check the logs of the remote worker before reporting an error. GLHF!",
     "rank 0 of 2: another process of the distributed run died (Read error [127.0.0.1]:208: Connection reset by peer)",
     "its own output says why; resume with utdsl train --resume runs/x (same number of processes)"),
])
def test_peer_errors_say_whether_a_peer_stalled_or_died(raised, message, hint):
    with pytest.raises(DistributedError) as caught:
        with peer_errors(GLOO, lambda: "runs/x"):
            raise RuntimeError(raised)
    assert str(caught.value) == f"error: {message}\n  hint: {hint}"


def test_other_errors_pass_through_peer_errors():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with peer_errors(GLOO, "runs/x"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="timed out"):  # one process: never a peer's fault
        with peer_errors(DistContext(), "runs/x"):
            raise RuntimeError("timed out")


def test_a_rendezvous_nobody_answers_is_an_error_after_the_timeout(monkeypatch):
    port = _free_port()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    start = time.monotonic()
    with pytest.raises(DistributedError) as caught:
        init_distributed("cpu", timeout=2)
    assert time.monotonic() - start < 30
    assert str(caught.value).startswith(f"error: rank 1 of 2: the distributed run could not start at "
                                        f"127.0.0.1:{port} within dist_timeout=2 s (")
    assert "hint: start every process (torchrun --nproc-per-node N starts them all)" in str(caught.value)


# ---- two gloo processes; rank 1 stalls or dies at its second batch ------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x)


class _Points(Dataset):
    """24 labelled points; in rank 1, reading sample ``fault_at`` stalls (``stall``) or kills the
    process (``exit``)."""

    def __init__(self, fault: str, fault_at: int):
        generator = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(24, 8, generator=generator), torch.arange(24) % 3
        self.fault, self.fault_at, self.reads = fault, fault_at, 0

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.fault_at and self.fault == "stall":
            time.sleep(600)
        if self.reads == self.fault_at and self.fault == "exit":
            os._exit(3)
        return self.x[index], self.y[index]


def _worker(rank: int, port: int, out: str, fault: str) -> None:
    import utdsl
    from utdsl.runtime.recipes import Recipe
    from utdsl.runtime.rundir import RunDir
    from utdsl.runtime.train import fit

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stderr = open(os.path.join(out, f"rank{rank}.err"), "w", buffering=1)
    ctx = init_distributed("cpu", timeout=4)
    torch.manual_seed(0)
    model = utdsl.compile("fc -> parallel lowrank(r=2)\n", _Net(), torch.zeros(2, 8), inplace=True,
                          model_name="points")
    data = _Points(fault if rank == 1 else "", fault_at=6)  # batches of 4: the second batch
    recipe = Recipe(name="t", lr=0.01, epochs=2, warmup_epochs=0, batch_size=4, log_every=1, precision="fp32")
    outcome = "finished"
    try:
        with peer_errors(ctx, out):
            fit(model, data, None, recipe, RunDir(os.path.join(out, "run")), ctx=ctx)
    except DistributedError as error:
        outcome = str(error)
    except BaseException:  # shown by the test's assertion
        import traceback

        outcome = traceback.format_exc()
    finally:
        from utdsl.runtime.distributed import shutdown

        shutdown(ctx)
    Path(out, f"rank{rank}.outcome").write_text(outcome)


def _run_pair(tmp_path: Path, fault: str) -> tuple[str, str, float]:
    # spawn, not fork: torch refuses autograd in a child forked after the parent ran backward
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path), fault), nprocs=2, join=False,
                                 start_method="spawn")
    first, second = context.processes
    start = time.monotonic()
    first.join(timeout=240)
    waited = time.monotonic() - start
    if second.is_alive():  # the stalled rank: ended by the test that started it
        second.terminate()
    second.join(timeout=60)
    assert not first.is_alive(), "rank 0 hangs"
    return (tmp_path / "rank0.outcome").read_text(), (tmp_path / "rank0.err").read_text(), waited


def test_a_stalled_rank_is_reported_by_heartbeats_then_stops_the_run(tmp_path):
    outcome, err, _ = _run_pair(tmp_path, "stall")
    assert outcome.startswith("error: rank 0 of 2: another process of the distributed run stalled: no answer "
                              "within dist_timeout=4 s (Timed out waiting 4000ms for "), outcome
    assert outcome.endswith(f"resume with utdsl train --resume {tmp_path} (same number of processes)")
    beats = [line for line in err.splitlines() if line.startswith("rank 0 of 2: waiting")]
    assert beats and all(HEARTBEAT.fullmatch(line) for line in beats), err


def test_a_lost_rank_is_a_clean_error_at_once(tmp_path):
    outcome, _, waited = _run_pair(tmp_path, "exit")
    assert outcome.startswith("error: rank 0 of 2: another process of the distributed run died ("), outcome
    assert "Connection" in outcome and "hint: its own output says why" in outcome


# ---- the command line under two processes ------------------------------------------------------

WRAPPER = '''
import os, sys, time
from utdsl.runtime import fit
real = fit.make_loader
def make_loader(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
        if i == 1 and os.environ["RANK"] == "1":
            if os.environ["FAULT"] == "exit":
                os._exit(3)
            time.sleep(600)
        yield batch
fit.make_loader = make_loader
from utdsl.cli import main
main(sys.argv[1:])
'''
MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress", "--device", "cpu"]


@pytest.mark.slow  # two processes that import torch and compile a ViT: about a minute on 2 cores
@pytest.mark.parametrize("fault", ["stall", "exit"])
def test_train_under_two_processes_stops_cleanly_when_a_rank_stalls_or_dies(tmp_path, fault):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    out, port = tmp_path / "run", _free_port()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "FAULT": fault,
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(wrapper), "train", "lora", *MICRO, "--epochs", "1",
                                           "--batch-size", "32", "-o", "dist_timeout=4", "--out", str(out)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err = processes[0].communicate(timeout=300)
    finally:
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode == 2, err
    assert "Traceback" not in err
    if fault == "stall":
        assert "error: rank 0 of 2: another process of the distributed run stalled: no answer within " \
               "dist_timeout=4 s (Timed out waiting 4000ms for " in err
        assert HEARTBEAT.search(err)
    else:
        assert "error: rank 0 of 2: another process of the distributed run died (" in err
    assert f"resume with utdsl train --resume {out} (same number of processes)" in err


def test_eval_waits_as_long_as_the_run_s_dist_timeout(tmp_path, cli, monkeypatch):
    """``utdsl eval`` bounds its collectives by the recipe's ``dist_timeout`` of the run it reads,
    not torch's 30 minutes."""
    import utdsl.runtime.distributed as distributed

    out = tmp_path / "run"
    assert cli("train", "lora", *MICRO, "--epochs", "1", "-o", "dist_timeout=7", "--out", str(out))[0] == 0
    timeouts = []
    real = distributed.init_distributed
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda device=None, timeout=None: (timeouts.append(timeout), real(device, timeout))[1])
    assert cli("eval", str(out), "--num-workers", "0")[0] == 0
    assert timeouts == [7.0]
