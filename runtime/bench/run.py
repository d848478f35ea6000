"""``utdsl bench``: run a spec on a suite under the suite's protocol and write the results.

:func:`run_bench` is the driver. It checks every task's data (all four splits) and the spec
before any trial starts, then submits each task's search trials to an executor (Ray, or inline),
and as soon as a task's search is complete, chooses its best setting (:func:`.plan.select_best`)
and submits its final runs. Trials whose run directory already holds a finished run are not
submitted (``skipped``); partial ones resume (see :mod:`.trials`). A trial directory made with
other settings stops the bench before anything runs. At the end the results are aggregated and
written (:mod:`.results`); failed trials are listed there and in the returned result.

Layout of a bench directory::

    BENCH/bench.json                       the bench's settings (rewritten by each invocation)
    BENCH/<task>/search-lr<lr>-wd<wd>-seed<s>/   a run directory (utdsl eval / plot work on it)
    BENCH/<task>/final-lr<lr>-wd<wd>-seed<s>/
    BENCH/results.json results.csv trials.csv results.md
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from utdsl.files import atomic_write

from ..config import RunConfig
from ..recipes import Recipe
from .plan import Trial, final_trials, search_trials, select_best, trial_recipe
from .results import BenchResult, TaskResult, write_results
from .suites import BenchError, Suite, Task, data_root_of
from .trials import TrialJob, TrialReport, check_config, read_outcome, trial_state

__all__ = ["BenchSettings", "run_bench", "prepare_configs"]


@dataclass
class BenchSettings:
    """What a bench runs: the spec on ``model`` over ``suite``, the recipe every trial starts from,
    the grid, the number of seeds, and where the bench directory is."""

    spec: str
    suite: Suite
    out: Path
    recipe: Recipe
    model: str = "vit_b16"
    data_root: str | None = None
    lrs: tuple[float, ...] = ()
    wds: tuple[float, ...] = ()
    seeds: int = 1
    spec_overrides: dict[str, str] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False
    num_workers: int = 0
    yes: bool = False

    def __post_init__(self) -> None:
        self.lrs = tuple(self.lrs or self.suite.lrs)
        self.wds = tuple(self.wds or self.suite.wds)
        if self.seeds < 1:
            raise BenchError(f"--seeds must be at least 1, not {self.seeds}")
        if not self.lrs or not self.wds:
            raise BenchError("the lr x weight-decay grid is empty")

    @property
    def seed_list(self) -> list[int]:
        return [self.recipe.seed + i for i in range(self.seeds)]


def prepare_configs(settings: BenchSettings) -> dict[str, RunConfig]:
    """One run configuration a task (with the first search trial's recipe), checking the spec,
    the weights and every split each task's trials read, before anything runs."""
    from ..config import num_classes_of, resolve_config
    from ..data import build_dataset

    suite = settings.suite
    first = search_trials(suite.tasks[0].name, settings.lrs[:1], settings.wds[:1], settings.recipe.seed)[0]
    recipe = trial_recipe(settings.recipe, first, suite)
    configs: dict[str, RunConfig] = {}
    base: RunConfig | None = None
    for task in suite.tasks:
        root = data_root_of(suite, task, settings.data_root)
        probes = {split: build_dataset(task.data, root, split, None) for split in (*suite.search, *suite.final)}
        if base is None:
            base = resolve_config(spec=settings.spec, model=settings.model, data=task.data, data_root=root,
                                  recipe=recipe, spec_overrides=settings.spec_overrides, weights=settings.weights,
                                  pretrained=settings.pretrained, model_kwargs=settings.model_kwargs)
            configs[task.name] = base
        else:
            configs[task.name] = base.model_copy(update={"data": task.data, "data_root": root,
                                                         "num_classes": num_classes_of(probes[suite.search[0]])})
    return configs


def _job(settings: BenchSettings, executor, configs: dict[str, RunConfig], trial: Trial) -> TrialJob:
    recipe = trial_recipe(settings.recipe, trial, settings.suite)
    config = configs[trial.task].model_copy(update={"recipe": recipe, "world_size": 1})
    run_dir = trial.path(settings.out).resolve()
    expected = config.model_dump(mode="json")
    check_config(run_dir, expected)
    return TrialJob(trial, str(run_dir), expected, device=executor.device, threads=executor.threads(),
                    num_workers=settings.num_workers)


_TRIAL_DIR = re.compile(r"^(search|final)-lr(.+)-wd(.+)-seed(-?[0-9]+)$")


def _check_existing(settings: BenchSettings, executor, configs: dict[str, RunConfig]) -> None:
    """Every trial directory already in the bench must hold a run of this bench's settings: a
    :class:`BenchError` before anything runs otherwise."""
    for task in settings.suite.tasks:
        folder = Path(settings.out) / task.name
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            match = _TRIAL_DIR.match(path.name)
            if not match or not (path / "config.json").is_file():
                continue
            try:
                trial = Trial(task.name, match[1], float(match[2]), float(match[3]), int(match[4]))
            except ValueError:
                continue
            _job(settings, executor, configs, trial)


def _settings_record(settings: BenchSettings, configs: dict[str, RunConfig], executor) -> dict[str, Any]:
    import utdsl

    first = next(iter(configs.values()))
    return {"spec": settings.spec, "spec_name": first.spec_name, "spec_overrides": settings.spec_overrides,
            "model": settings.model, "model_kwargs": settings.model_kwargs, "weights": first.weights,
            "weights_sha256": first.weights_sha256, "pretrained": settings.pretrained,
            "suite": settings.suite.name, "family": settings.suite.family,
            "tasks": [t.name for t in settings.suite.tasks], "data_root": settings.data_root,
            "search_splits": list(settings.suite.search), "final_splits": list(settings.suite.final),
            "recipe": settings.recipe.model_dump(mode="json"), "lrs": list(settings.lrs), "wds": list(settings.wds),
            "seeds": settings.seed_list, "executor": executor.describe(), "utdsl_version": utdsl.__version__}


def _trainable_on_meta(config: RunConfig) -> int:
    """Trainable parameters of the compiled model, counted on the meta device (no memory): the
    figure for a run whose metrics do not carry it."""
    import torch

    import utdsl
    from ..config import model_kwargs, spec_of
    from ..models import create_model
    from ..profiling import parameter_counts

    base = create_model(config.model, device="meta", num_classes=config.num_classes, **model_kwargs(config))
    size = config.recipe.input_size
    tuned = utdsl.compile(spec_of(config), base, torch.zeros(2, 3, size, size, device="meta"), inplace=True,
                          model_name=config.model)
    return parameter_counts(tuned)[0]


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _task_result(task: Task, settings: BenchSettings, reports: dict[Trial, TrialReport], best: Trial | None,
                 config: RunConfig) -> TaskResult:
    result = TaskResult(task.name, task.group, settings.seed_list)
    if best is None:
        return result
    result.lr, result.wd, result.val_top1 = best.lr, best.wd, reports[best].top1
    finals = [reports.get(t) for t in final_trials(task.name, best.lr, best.wd, settings.seed_list)]
    result.test_top1 = [r.top1 if r is not None else None for r in finals]
    ok = [r.metrics for r in finals if r is not None and r.ok]
    for name in ("trainable_params", "flops", "peak_memory_mb", "images_per_s"):
        setattr(result, name, _mean([m.get(name) for m in ok]))
    if result.trainable_params is None and ok:
        result.trainable_params = _trainable_on_meta(config)
    return result


def run_bench(settings: BenchSettings, executor, *, on_report: Callable[[TrialReport, int, int], Any] | None = None,
              on_plan: Callable[[dict[str, Any]], Any] | None = None) -> BenchResult:
    """Run the bench (see the module docstring) on ``executor`` and write its results.

    ``on_plan`` receives the settings record before the first trial; ``on_report`` every trial's
    report with the count of reports so far and the planned total (which shrinks when a task's
    search fails entirely). The executor is not closed here."""
    from ..budget import check_tuner_memory

    suite, out = settings.suite, Path(settings.out)
    configs = prepare_configs(settings)
    check_tuner_memory(next(iter(configs.values())), settings.yes)
    record = _settings_record(settings, configs, executor)
    _check_existing(settings, executor, configs)
    searches = {t.name: search_trials(t.name, settings.lrs, settings.wds, settings.recipe.seed) for t in suite.tasks}
    jobs = {trial: _job(settings, executor, configs, trial) for trials in searches.values() for trial in trials}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n",
                                                                        encoding="utf-8"))
    if on_plan:
        on_plan(record)
    reports: dict[Trial, TrialReport] = {}
    best: dict[str, Trial | None] = {}
    total = len(jobs) + len(suite.tasks) * settings.seeds

    def finish(report: TrialReport) -> None:
        nonlocal total
        reports[report.trial] = report
        task = report.trial.task
        if report.trial.phase == "search" and task not in best and all(t in reports for t in searches[task]):
            chosen = best[task] = select_best({t: reports[t].top1 for t in searches[task]})
            if chosen is None:
                total -= settings.seeds
            else:
                for trial in final_trials(task, chosen.lr, chosen.wd, settings.seed_list):
                    start(_job(settings, executor, configs, trial))
        if on_report:
            on_report(report, len(reports), total)

    def start(job: TrialJob) -> None:
        if trial_state(job.run_dir) == "finished":
            finish(TrialReport(job.trial, "skipped", read_outcome(job.run_dir)))
        else:
            executor.submit(job)

    for job in jobs.values():
        start(job)
    while executor.has_pending():
        finish(executor.next_done())
    tasks = [_task_result(task, settings, reports, best.get(task.name), configs[task.name]) for task in suite.tasks]
    order = {t.name: i for i, t in enumerate(suite.tasks)}
    trials = sorted(reports.values(), key=lambda r: (order[r.trial.task], r.trial.phase != "search", r.trial.lr,
                                                     r.trial.wd, r.trial.seed))
    result = BenchResult(record, suite, tasks, trials)
    write_results(result, out)
    return result
