"""utdsl bench without Ray: suites, the trial plan and the choice of the best setting, the
aggregation math on known numbers, the published rows, resumption (exactly the finished trials are
skipped) and the report of a failing trial, on tiny fake VTAB/FGVC trees with the inline executor.
The Ray executor is tested in test_bench_ray.py."""

from __future__ import annotations

import json
import statistics

import pytest
from benchkit import settings, write_fgvc, write_vtab

from utdsl.runtime.bench.execute import InlineExecutor
from utdsl.runtime.bench.plan import Trial, final_trials, search_trials, select_best, trial_recipe
from utdsl.runtime.bench.published import published_rows
from utdsl.runtime.bench.report import trial_line
from utdsl.runtime.bench.results import BenchResult, TaskResult, markdown, published_means, summarize
from utdsl.runtime.bench.run import _job, prepare_configs, run_bench
from utdsl.runtime.bench.suites import FGVC_TASKS, VTAB_GROUPS, BenchError, resolve_suite
from utdsl.runtime.bench.trials import TrialReport, check_config, read_outcome, run_trial, trial_state
from utdsl.runtime.data import build_dataset
from utdsl.runtime.data.fgvc import FGVC
from utdsl.runtime.data.vtab import VTAB
from utdsl.runtime.recipes import load_recipe

# ----------------------------------------------------------------------------- suites


def test_suites_hold_the_standard_tasks_and_groups():
    vtab = resolve_suite("vtab1k")
    assert [t.name for t in vtab.tasks] == [n for names in VTAB_GROUPS.values() for n in names]
    assert sorted(t.name for t in vtab.tasks) == sorted(VTAB)
    assert vtab.groups == ("Natural", "Specialized", "Structured")
    assert [sum(t.group == g for t in vtab.tasks) for g in vtab.groups] == [7, 4, 8]
    assert (vtab.search, vtab.final, vtab.recipe) == (("train800", "val200"), ("train800val200", "test"), "noah_vtab")
    fgvc = resolve_suite("FGVC")
    assert [t.data for t in fgvc.tasks] == [f"fgvc:{n}" for n in FGVC_TASKS] and set(FGVC_TASKS) == set(FGVC)
    assert (fgvc.search, fgvc.final, fgvc.recipe, fgvc.groups) == (("train", "val"), ("trainval", "test"),
                                                                   "vpt_fgvc", ())
    digits = resolve_suite("digits")
    assert ([t.data for t in digits.tasks], digits.final, digits.needs_root) == (["digits"], ("train", "test"), False)


def test_a_task_list_is_a_suite_of_its_family_in_the_papers_order():
    suite = resolve_suite("vtab:eurosat, dtd ,clevr_count")
    assert (suite.name, suite.family, [t.name for t in suite.tasks]) == ("custom", "vtab1k",
                                                                         ["dtd", "eurosat", "clevr_count"])
    assert resolve_suite("fgvc:cub").family == "fgvc"


@pytest.mark.parametrize("text, message, hint", [
    ("vtab1", "unknown suite or task 'vtab1'", "did you mean 'vtab1k', 'dmlab'?"),
    ("dtd,cub", "the task list mixes suites (fgvc, vtab1k); their protocols differ", "run one bench a suite"),
    ("dtd,dtd", "task 'dtd' is listed twice in --suite", None),
    ("imagenet:dtd", "unknown task 'imagenet:dtd'", "tasks are vtab:<task> or fgvc:<name>"),
])
def test_suite_errors(text, message, hint):
    with pytest.raises(BenchError) as info:
        resolve_suite(text)
    assert (info.value.diagnostics[0].message, info.value.diagnostics[0].hint) == (message, hint)


def test_fgvc_trainval_is_train_and_val_together(tmp_path):
    write_fgvc(tmp_path)
    sets = {s: build_dataset("fgvc:cub", tmp_path / "cub", s, None) for s in ("train", "val", "trainval")}
    assert sets["trainval"].samples == sets["train"].samples + sets["val"].samples
    assert sets["trainval"].info.num_classes == 3 and sets["trainval"].info.split == "trainval"


# ----------------------------------------------------------------------------- plan

def test_trials_grid_names_and_recipes():
    suite = resolve_suite("vtab1k")
    grid = search_trials("dtd", [5e-4, 1e-3], [1e-4, 0.0], seed=0)
    assert [t.name for t in grid] == ["search-lr0.0005-wd0.0001-seed0", "search-lr0.0005-wd0-seed0",
                                      "search-lr0.001-wd0.0001-seed0", "search-lr0.001-wd0-seed0"]
    finals = final_trials("dtd", 1e-3, 1e-5, seeds=[0, 1])
    assert [t.key for t in finals] == ["dtd/final-lr0.001-wd1e-05-seed0", "dtd/final-lr0.001-wd1e-05-seed1"]
    base = load_recipe("noah_vtab", {"epochs": 7, "eval_every": 2})
    search = trial_recipe(base, grid[0], suite)
    assert (search.lr, search.weight_decay, search.seed, search.train_split, search.eval_split, search.eval_every) \
        == (5e-4, 1e-4, 0, "train800", "val200", 2)
    final = trial_recipe(base, finals[1], suite)
    assert (final.lr, final.seed, final.train_split, final.eval_split, final.eval_every) \
        == (1e-3, 1, "train800val200", "test", 7)


def test_best_setting_highest_val_top1_ties_to_smaller_lr_then_smaller_wd():
    t = {(lr, wd): Trial("dtd", "search", lr, wd, 0) for lr in (1e-3, 5e-3) for wd in (0.0, 1e-2)}
    assert select_best({t[1e-3, 0.0]: 50.0, t[5e-3, 0.0]: 60.0, t[1e-3, 1e-2]: None, t[5e-3, 1e-2]: 55.0}) \
        == t[5e-3, 0.0]
    assert select_best({t[5e-3, 0.0]: 60.0, t[1e-3, 1e-2]: 60.0, t[5e-3, 1e-2]: 60.0}) == t[1e-3, 1e-2]
    assert select_best({t[5e-3, 1e-2]: 60.0, t[5e-3, 0.0]: 60.0}) == t[5e-3, 0.0]
    assert select_best({t[1e-3, 0.0]: None}) is None


# ----------------------------------------------------------------------------- aggregation

def _result(values: dict[str, list[float | None]], suite="caltech101,dtd,eurosat,clevr_count") -> BenchResult:
    the_suite = resolve_suite(suite)
    tasks = [TaskResult(t.name, t.group, [0, 1], lr=1e-3, wd=1e-4, val_top1=70.0, test_top1=values[t.name])
             for t in the_suite.tasks]
    record = {"spec_name": "lora", "model": "vit_b16", "lrs": [1e-3], "wds": [1e-4], "seeds": [0, 1],
              "recipe": {"name": "noah_vtab", "optimizer": "adamw", "epochs": 100, "batch_size": 64, "input_size": 224}}
    return BenchResult(record, the_suite, tasks, [])


KNOWN = {"caltech101": [60.0, 62.0], "dtd": [50.0, 54.0], "eurosat": [80.0, 82.0], "clevr_count": [30.0, 38.0]}


def test_means_over_tasks_groups_and_seeds_on_known_numbers():
    result = _result(KNOWN)
    assert [(t.mean, t.std) for t in result.tasks] == [
        (61.0, pytest.approx(2 ** 0.5)), (52.0, pytest.approx(8 ** 0.5)), (81.0, pytest.approx(2 ** 0.5)),
        (34.0, pytest.approx(32 ** 0.5))]
    summary = result.summary
    assert summary["groups"] == {"Natural": {"mean": 56.5, "std": pytest.approx(3 / 2 ** 0.5), "tasks": 2, "of": 2},
                                 "Specialized": {"mean": 81.0, "std": pytest.approx(2 ** 0.5), "tasks": 1, "of": 1},
                                 "Structured": {"mean": 34.0, "std": pytest.approx(32 ** 0.5), "tasks": 1, "of": 1}}
    # per seed: mean of groups 55.0 and 59.333..., flat mean 55.0 and 59.0
    assert summary["mean_groups"] == {"mean": pytest.approx(57.1666667), "std": pytest.approx(4.3333333 / 2 ** 0.5),
                                      "groups": 3}
    assert summary["mean_tasks"] == {"mean": 57.0, "std": pytest.approx(2 * 2 ** 0.5), "tasks": 4}
    assert summary["complete"] is True and summary["tasks"] == ["caltech101", "dtd", "eurosat", "clevr_count"]


def test_a_failed_task_leaves_the_means_and_the_published_rows_over_the_others():
    result = _result({**KNOWN, "clevr_count": [30.0, None]})
    summary = result.summary
    assert (summary["complete"], summary["tasks"], summary["of"]) == (False, ["caltech101", "dtd", "eurosat"], 4)
    assert summary["groups"]["Structured"] == {"mean": None, "std": None, "tasks": 0, "of": 1}
    assert summary["mean_groups"]["mean"] == pytest.approx((56.5 + 81.0) / 2)
    lora = dict((row.method, means) for row, means in result.published)["LoRA (r=8)"]
    assert lora == {"groups": {"Natural": pytest.approx(80.4), "Specialized": 95.3, "Structured": None},
                    "mean_tasks": pytest.approx((91.4 + 69.4 + 95.3) / 3),
                    "mean_groups": pytest.approx((80.4 + 95.3) / 2)}
    text = markdown(result)
    assert ("| **lora (this bench)** | 61.00 ± 1.41 | 52.00 ± 2.83 | 81.00 ± 1.41 | 30.00† | 56.50 ± 2.12* |"
            in text)
    assert "\\* over the 3 of 4 tasks whose every final run succeeded" in text


def test_markdown_puts_published_rows_beside_ours_with_their_sources():
    lines = markdown(_result(KNOWN)).splitlines()
    table = lines[lines.index("## Top-1 (%)") + 2:]
    assert table[0] == ("| method | caltech101 | dtd | eurosat | clevr_count | Natural | Specialized | Structured | "
                        "mean (groups) | mean (tasks) |")
    assert table[2] == ("| **lora (this bench)** | 61.00 ± 1.41 | 52.00 ± 2.83 | 81.00 ± 1.41 | 34.00 ± 5.66 | "
                        "56.50 ± 2.12 | 81.00 ± 1.41 | 34.00 ± 5.66 | 57.17 ± 3.06 | 57.00 ± 2.83 |")
    assert "| LoRA (r=8) [1] | 91.40 | 69.40 | 95.30 | 82.90 | 80.40 | 95.30 | 82.90 | 86.20 | 84.75 |" in table
    assert "| Convpass [2] | 91.16 | 72.18 | 96.13 | 82.26 | 81.67 | 96.13 | 82.26 | 86.69 | 85.43 |" in table
    sources = [line for line in lines if line.startswith("[")]
    assert sources[0].startswith("[1] FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer (Jie and "
                                 "Deng, AAAI 2023), Table 1: Full results on the VTAB-1K benchmark, "
                                 "https://arxiv.org/abs/2212.03145 (read at https://github.com/JieShibo/PETL-ViT/")
    assert sources[1].startswith("[2] Convolutional Bypasses Are Better Vision Transformer Adapters")


def test_published_rows_are_complete_and_reproduce_their_papers_averages():
    rows = published_rows("vtab1k")
    assert [r.method for r in rows] == [
        "Full fine-tuning", "Linear probing", "BitFit", "VPT-Shallow", "VPT-Deep", "Adapter (h=8)",
        "AdaptFormer (h=8)", "LoRA (r=8)", "NOAH", "FacT-TT (r=4)", "FacT-TT (r<=16)", "FacT-TK (r=8)",
        "FacT-TK (r<=32)", "Convpass-attn", "Convpass", "SSF"]
    suite = resolve_suite("vtab1k")
    for row in rows:
        assert sorted(row.top1) == sorted(VTAB) and row.source.url and row.source.table and row.source.read_at
        assert row.source.mean in ("groups", "tasks"), row.method
        means = published_means(row, suite, [t.name for t in suite.tasks])
        # per-task numbers are rounded to 0.1 (0.01), the reported average too: within 0.15, as the source averages
        assert means[f"mean_{row.source.mean}"] == pytest.approx(row.reported_mean, abs=0.15), row.method
    fgvc_rows = published_rows("fgvc")
    assert [r.method for r in fgvc_rows] == [
        "Full fine-tuning", "Linear probing", "Adapter", "AdaptFormer", "Prefix Tuning", "U-Tuning", "BitFit",
        "VPT-Shallow", "VPT-Deep", "SSF", "LoRA", "GPS", "HST", "LAST", "SNF"]
    fgvc = resolve_suite("fgvc")
    for row in fgvc_rows:
        assert sorted(row.top1) == sorted(FGVC_TASKS) and row.source.url and row.source.table and row.source.read_at
        assert row.source.mean == "tasks" and row.params_m is not None, row.method
        means = published_means(row, fgvc, list(FGVC_TASKS))
        assert means["mean_groups"] is None and means["groups"] == {}
        assert means["mean_tasks"] == pytest.approx(row.reported_mean, abs=0.15), row.method
    assert published_rows("digits") == ()


# ----------------------------------------------------------------------------- trials on disk

def test_trial_line():
    trial = Trial("dtd", "search", 1e-3, 1e-4, 0)
    assert trial_line(TrialReport(trial, "done", {"top1": 45.0}, seconds=12.34), 3, 12) == \
        "[3/12] dtd/search-lr0.001-wd0.0001-seed0: val top-1 45.00 (12.3 s)"
    assert trial_line(TrialReport(trial, "failed", error="DataError: bad\nmore"), 4, 12) == \
        "[4/12] dtd/search-lr0.001-wd0.0001-seed0: FAILED: DataError: bad"


class CountingExecutor(InlineExecutor):
    """The inline executor, remembering which trials were submitted."""

    def __init__(self):
        super().__init__(device="cpu")
        self.submitted = []

    def submit(self, job):
        self.submitted.append(job.trial.key)
        super().submit(job)


def test_resume_skips_exactly_the_finished_trials_and_resumes_the_partial_one(tmp_path):
    from utdsl.runtime.config import RunConfig
    from utdsl.runtime.train import train

    bench = settings(tmp_path / "bench", "eurosat", write_vtab(tmp_path / "vtab", tasks=("eurosat",)))
    executor = CountingExecutor()
    configs = prepare_configs(bench)
    done, partial = (_job(bench, executor, configs, t) for t in search_trials("eurosat", bench.lrs, bench.wds, 0))
    assert trial_state(done.run_dir) == "new"
    assert run_trial(done).status == "done" and trial_state(done.run_dir) == "finished"
    # a killed run: its state saved after its first step of two
    train(RunConfig.model_validate(partial.config), partial.run_dir, checkpoint_every=1, stop_after_steps=1,
          progress=False, echo=lambda text: None)
    assert trial_state(partial.run_dir) == "partial"
    reports = []
    result = run_bench(bench, executor, on_report=lambda report, n, total: reports.append((report, n, total)))
    final = "eurosat/final-lr0.005-wd0.0001-seed0" if result.tasks[0].lr == 5e-3 else \
        "eurosat/final-lr0.001-wd0.0001-seed0"
    assert executor.submitted == ["eurosat/search-lr0.005-wd0.0001-seed0", final]
    assert [(r.trial.key, r.status, r.resumed, n, total) for r, n, total in reports] == [
        ("eurosat/search-lr0.001-wd0.0001-seed0", "skipped", False, 1, 3),
        ("eurosat/search-lr0.005-wd0.0001-seed0", "done", True, 2, 3),
        (final, "done", False, 3, 3)]
    best = select_best({r.trial: r.top1 for r, _, _ in reports[:2]})
    assert (result.tasks[0].lr, result.tasks[0].val_top1) == (best.lr, read_outcome(best.path(bench.out))["top1"])
    assert result.tasks[0].test_top1 == [read_outcome(tmp_path / "bench" / final)["top1"]]
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["tasks"][0]["test_top1"] == result.tasks[0].test_top1 and saved["failed_trials"] == 0
    assert saved["tasks"][0]["trainable_params"] > 0 and saved["tasks"][0]["images_per_s"] > 0
    # a second run trains nothing
    again = CountingExecutor()
    rerun = run_bench(bench, again)
    assert again.submitted == [] and [r.status for r in rerun.trials] == ["skipped"] * 3
    assert rerun.tasks[0].test_top1 == result.tasks[0].test_top1


def test_a_trial_directory_of_other_settings_stops_the_bench_before_it_runs(tmp_path):
    root = write_vtab(tmp_path / "vtab", tasks=("eurosat",))
    first = settings(tmp_path / "bench", "eurosat", root, lrs=(1e-3,))
    trial = search_trials("eurosat", [1e-3], [1e-4], 0)[0]
    job = _job(first, InlineExecutor(device="cpu"), prepare_configs(first), trial)
    (tmp_path / "bench" / "eurosat" / job.trial.name).mkdir(parents=True)
    (tmp_path / "bench" / "eurosat" / job.trial.name / "config.json").write_text(
        json.dumps({**job.config, "recipe": {**job.config["recipe"], "epochs": 3}, "utdsl_version": "0.0.1"}))
    with pytest.raises(BenchError) as info:
        check_config(job.run_dir, job.config)
    assert str(info.value) == (f"error: trial '{job.run_dir}' was made with other settings (recipe.epochs differ)\n"
                               "  hint: give the bench another --out, or the settings it was started with")
    executor = CountingExecutor()
    with pytest.raises(BenchError):
        run_bench(first, executor)
    assert executor.submitted == []


def test_a_failing_trial_is_reported_and_the_command_exits_1(tmp_path, cli):
    root = write_vtab(tmp_path / "vtab", tasks=("eurosat",), broken={"eurosat": "test"})
    code, out, err = cli("bench", "lora", "--suite", "vtab:eurosat", "--data-root", str(root), "--model", "vit_t16",
                         "--model-arg", "depth=1", "--input-size", "32", "--epochs", "1", "--batch-size", "8",
                         "-o", "warmup_epochs=0", "--lr", "1e-3", "--wd", "1e-4", "--inline", "--retries", "0",
                         "--out", str(tmp_path / "bench"))
    assert code == 1
    assert "[1/2] eurosat/search-lr0.001-wd0.0001-seed0: val top-1 " in err
    assert ("[2/2] eurosat/final-lr0.001-wd0.0001-seed0: FAILED: error: data set 'vtab:eurosat' [test]: "
            "1 of 8 images cannot be read:") in err
    assert "1 trial(s) failed" in err and "results.md" in out
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["failed_trials"] == 1 and saved["summary"]["tasks"] == []
    assert [(t["phase"], t["status"]) for t in saved["trials"]] == [("search", "done"), ("final", "failed")]
    text = (tmp_path / "bench" / "results.md").read_text()
    assert "## Failed trials (1)" in text and "| eurosat/final-lr0.001-wd0.0001-seed0 | error: data set" in text


def test_bench_user_errors_exit_2(cli, tmp_path):
    code, _, err = cli("bench", "lora", "--suite", "vtab1k", "--inline")
    assert code == 2 and "suite 'vtab1k' needs --data-root" in err
    code, _, err = cli("bench", "lora", "--suite", "dtd", "--data-root", str(tmp_path), "--inline", "-o", "lr=0.1")
    assert code == 2 and "the bench searches lr; give the values with --lr" in err
    code, _, err = cli("bench", "lora", "--suite", "digits", "--lr", "fast", "--inline")
    assert code == 2 and "--lr takes comma-separated numbers" in err


def test_std_is_the_sample_standard_deviation():
    assert statistics.stdev([50.0, 54.0]) == pytest.approx(8 ** 0.5)
    assert summarize([TaskResult("digits", None, [0], test_top1=[75.0])], resolve_suite("digits"))["mean_tasks"] \
        == {"mean": 75.0, "std": None, "tasks": 1}
