"""utdsl bench on Ray: a tiny VTAB bench end to end on a local Ray instance of 2 CPUs (trials as
Ray tasks, one CPU each), with Ray's retry of a trial that crashes once and the report of one that
keeps failing; slow: an FGVC bench over two seeds and the digits demo from the command line.
One Ray session serves the module. Measured on the shared 2-core test machine: starting Ray
10-16 s, the first trials 20-30 s more (each worker imports torch once), then 1-3 s a trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchkit import settings, write_fgvc, write_vtab

ray = pytest.importorskip("ray")

from utdsl.runtime.bench.execute import RayExecutor  # noqa: E402
from utdsl.runtime.bench.run import run_bench  # noqa: E402


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_tiny_vtab_bench_on_ray_retries_a_crash_and_reports_a_trial_that_keeps_failing(ray_session, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()

    def flaky(job):  # the real trial, but eurosat's search crashes once and dtd's final always
        from utdsl.runtime.bench.trials import run_trial

        if job.trial.task == "dtd" and job.trial.phase == "final":
            raise RuntimeError("boom, always")
        mark = markers / job.trial.name
        if job.trial.task == "eurosat" and not mark.exists():
            mark.touch()
            raise RuntimeError("boom, once")
        return run_trial(job)

    executor = RayExecutor(cpus_per_trial=1, retries=1, runner=flaky)
    assert (executor.owned, executor.device, executor.threads()) == (False, "cpu", 1)
    vtab = run_bench(settings(tmp_path / "bench", "eurosat,dtd", write_vtab(tmp_path / "vtab"), lrs=(1e-3,)),
                     executor)
    assert sorted(p.name for p in markers.iterdir()) == ["final-lr0.001-wd0.0001-seed0",
                                                         "search-lr0.001-wd0.0001-seed0"]
    assert [(r.trial.key, r.status, r.error) for r in vtab.trials] == [
        ("dtd/search-lr0.001-wd0.0001-seed0", "done", None),
        ("dtd/final-lr0.001-wd0.0001-seed0", "failed", "RuntimeError: boom, always (after 2 attempts)"),
        ("eurosat/search-lr0.001-wd0.0001-seed0", "done", None),
        ("eurosat/final-lr0.001-wd0.0001-seed0", "done", None)]
    dtd, eurosat = vtab.tasks
    assert (dtd.test_top1, eurosat.complete, vtab.summary["tasks"]) == ([None], True, ["eurosat"])
    assert eurosat.test_top1[0] == vtab.trials[3].metrics["top1"]
    assert vtab.summary["mean_tasks"]["mean"] == eurosat.mean
    assert min(eurosat.trainable_params, eurosat.flops, eurosat.peak_memory_mb, eurosat.images_per_s) > 0
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["bench"]["executor"] == "Ray, 2 CPUs and 0 GPUs, 1 CPU a trial, 1 retries"
    assert len(saved["published"]) == 16 and saved["failed_trials"] == 1
    assert "| dtd/final-lr0.001-wd0.0001-seed0 | RuntimeError: boom, always (after 2 attempts) |" in \
        (tmp_path / "bench" / "results.md").read_text()
    assert {p.name for p in (tmp_path / "bench").iterdir()} == {
        "bench.json", "dtd", "eurosat", "results.csv", "results.json", "results.md", "trials.csv"}


@pytest.mark.slow
def test_an_fgvc_bench_on_ray_and_its_trials_are_run_directories(ray_session, tmp_path):
    from utdsl.runtime.evaluate import evaluate_checkpoint

    fgvc = run_bench(settings(tmp_path / "bench", "fgvc:cub", write_fgvc(tmp_path / "fgvc"), seeds=2),
                     RayExecutor(cpus_per_trial=0.5, retries=0))
    assert [r.status for r in fgvc.trials] == ["done"] * 4 and fgvc.tasks[0].complete
    assert fgvc.tasks[0].std is not None and fgvc.summary["mean_tasks"]["tasks"] == 1
    # a trial is an ordinary run directory: utdsl eval reproduces its test top-1
    final = tmp_path / "bench" / "cub" / f"final-lr{fgvc.tasks[0].lr:g}-wd0.0001-seed1"
    result, _ = evaluate_checkpoint(final)
    assert result.top1 == fgvc.tasks[0].test_top1[1]


@pytest.mark.slow
def test_digits_demo_on_ray_from_the_command_line(ray_session, cli, tmp_path):
    code, out, err = cli("bench", "lora", "--suite", "digits", "--model", "vit_t16", "--model-arg", "depth=1",
                         "--input-size", "32", "--epochs", "1", "--out", str(tmp_path / "bench"))
    assert code == 0, err
    assert "[3/3] digits/final-lr" in err and (Path(tmp_path) / "bench" / "results.md").is_file()
