"""A bench's results: per-task top-1 over seeds, the suite's means, and the tables written.

Per task: the mean and sample standard deviation (n - 1) of the final runs' test top-1 over
seeds. Suite means, as papers report them: the flat mean of the tasks, each group's mean, and the
mean of the group means (VTAB-1k's "average" in VPT, NOAH and FacT). Their standard deviation is
over seeds: the mean is taken per seed index first (every task's seed-i run), then the mean and
standard deviation of those. Only tasks whose every final run succeeded enter the means; with
tasks missing, the means say over how many, and published rows are averaged over the same tasks.

Written to the bench directory, atomically: ``results.json`` (everything), ``results.csv`` (a row
a task, then the means), ``trials.csv`` (a row a trial) and ``results.md`` (the tables).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from utdsl.files import atomic_write

from .plan import format_number
from .published import PublishedRow, published_rows
from .suites import Suite
from .trials import TrialReport

__all__ = ["TaskResult", "BenchResult", "mean_std", "summarize", "published_means", "write_results",
           "markdown", "format_top1"]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class TaskResult:
    """One task: the chosen setting, its validation top-1, the final runs' test top-1 by seed
    (None for a failed run) and what the final runs cost (means over seeds)."""

    task: str
    group: str | None
    seeds: list[int]
    lr: float | None = None
    wd: float | None = None
    val_top1: float | None = None
    test_top1: list[float | None] = field(default_factory=list)
    trainable_params: float | None = None
    flops: float | None = None
    peak_memory_mb: float | None = None
    images_per_s: float | None = None

    @property
    def complete(self) -> bool:
        return len(self.test_top1) == len(self.seeds) and all(v is not None for v in self.test_top1)

    @property
    def mean(self) -> float | None:
        return mean_std([v for v in self.test_top1 if v is not None])[0]

    @property
    def std(self) -> float | None:
        return mean_std([v for v in self.test_top1 if v is not None])[1]


def _stat(rows: list[list[float]]) -> dict[str, Any]:
    """{mean, std} over seeds of per-seed means of ``rows`` (tasks x seeds)."""
    if not rows:
        return {"mean": None, "std": None, "tasks": 0}
    per_seed = [statistics.fmean(column) for column in zip(*rows)]
    mean, std = mean_std(per_seed)
    return {"mean": mean, "std": std, "tasks": len(rows)}


def summarize(tasks: Sequence[TaskResult], suite: Suite) -> dict[str, Any]:
    """The suite's means over the complete tasks (see the module docstring)."""
    done = [t for t in tasks if t.complete]
    values = {t.task: [float(v) for v in t.test_top1] for t in done}
    groups = {}
    for group in suite.groups:
        members = [t.name for t in suite.tasks if t.group == group]
        stat = _stat([values[name] for name in members if name in values])
        groups[group] = dict(stat, of=len(members))
    summary: dict[str, Any] = {"tasks": [t.task for t in done], "of": len(suite.tasks),
                               "complete": len(done) == len(suite.tasks), "groups": groups,
                               "mean_tasks": _stat(list(values.values()))}
    if groups:
        present = [g for g in suite.groups if groups[g]["tasks"]]
        if present:
            per_seed = [statistics.fmean(statistics.fmean(values[t.task][i] for t in done if t.group == g)
                                         for g in present) for i in range(len(done[0].seeds))]
            mean, std = mean_std(per_seed)
        else:
            mean, std = None, None
        summary["mean_groups"] = {"mean": mean, "std": std, "groups": len(present)}
    return summary


def published_means(row: PublishedRow, suite: Suite, tasks: Iterable[str]) -> dict[str, Any]:
    """A published row's means over ``tasks`` (the tasks the bench completed), as :func:`summarize`
    computes the bench's own; None where the row lacks a task."""
    names = list(tasks)
    if not names or any(name not in row.top1 for name in names):
        return {"groups": {g: None for g in suite.groups}, "mean_tasks": None, "mean_groups": None}
    groups = {}
    for group in suite.groups:
        members = [n for n in names if suite.task(n).group == group]
        groups[group] = statistics.fmean(row.top1[n] for n in members) if members else None
    present = [v for v in groups.values() if v is not None]
    return {"groups": groups, "mean_tasks": statistics.fmean(row.top1[n] for n in names),
            "mean_groups": statistics.fmean(present) if present else None}


@dataclass
class BenchResult:
    """Everything a bench produced: its settings, per-task results, means, published rows and
    every trial's report."""

    settings: dict[str, Any]
    suite: Suite
    tasks: list[TaskResult]
    trials: list[TrialReport]

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.tasks, self.suite)

    @property
    def failed(self) -> list[TrialReport]:
        return [r for r in self.trials if r.status == "failed"]

    @property
    def published(self) -> list[tuple[PublishedRow, dict[str, Any]]]:
        names = self.summary["tasks"]
        return [(row, published_means(row, self.suite, names)) for row in published_rows(self.suite.family)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.settings,
            "tasks": [dict(asdict(t), mean=t.mean, std=t.std, complete=t.complete) for t in self.tasks],
            "summary": self.summary,
            "published": [{"method": row.method, "paper": row.source.paper, "table": row.source.table,
                           "url": row.source.url, "read_at": row.source.read_at, "params_m": row.params_m,
                           "reported_mean": row.reported_mean, "top1": row.top1, **means}
                          for row, means in self.published],
            "trials": [{"task": r.trial.task, "phase": r.trial.phase, "lr": r.trial.lr, "wd": r.trial.wd,
                        "seed": r.trial.seed, "dir": r.trial.key, "status": r.status, "resumed": r.resumed,
                        "top1": r.metrics.get("top1"), "error": r.error} for r in self.trials],
            "failed_trials": len(self.failed),
        }


def format_top1(mean: float | None, std: float | None = None, mark: str = "") -> str:
    """``70.12``, ``70.12 ± 0.31`` or ``-``."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + mark


def _count(value: float | None, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]], right: int = 1) -> str:
    align = ["---"] * right + ["---:"] * (len(header) - right)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _protocol(result: BenchResult) -> str:
    s, suite = result.settings, result.suite
    lrs = ", ".join(format_number(v) for v in s["lrs"])
    wds = ", ".join(format_number(v) for v in s["wds"])
    recipe = s["recipe"]
    return (f"Protocol: lr {{{lrs}}} x weight decay {{{wds}}} searched on `{suite.search[0]}`, evaluated on "
            f"`{suite.search[1]}` (last epoch); the best setting (ties: smaller lr, then smaller weight decay) "
            f"retrained on `{suite.final[0]}` and tested on `{suite.final[1]}`, {len(s['seeds'])} seed(s) "
            f"({', '.join(map(str, s['seeds']))}). Recipe `{recipe['name']}`: {recipe['optimizer']}, "
            f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, {recipe['input_size']} px.")


def markdown(result: BenchResult) -> str:
    """``results.md``: the top-1 table with published rows, the per-task costs, the failures."""
    s, suite, summary = result.settings, result.suite, result.summary
    names = [t.name for t in suite.tasks]
    groups = list(suite.groups)
    header = ["method", *names, *groups, *(["mean (groups)"] if groups else []), "mean (tasks)"]
    by_task = {t.task: t for t in result.tasks}
    mark = "" if summary["complete"] else "*"
    ours = [f"**{s['spec_name']} (this bench)**"]
    ours += [format_top1(by_task[n].mean, by_task[n].std, "" if by_task[n].complete else "†") if n in by_task
             else "-" for n in names]
    ours += [format_top1(summary["groups"][g]["mean"], summary["groups"][g]["std"], mark) for g in groups]
    if groups:
        ours.append(format_top1(summary["mean_groups"]["mean"], summary["mean_groups"]["std"], mark))
    ours.append(format_top1(summary["mean_tasks"]["mean"], summary["mean_tasks"]["std"], mark))
    rows = [ours]
    cited: dict[str, int] = {}
    for row, means in result.published:
        number = cited.setdefault(row.source.id, len(cited) + 1)
        line = [f"{row.method} [{number}]"] + [format_top1(row.top1.get(n)) for n in names]
        line += [format_top1(means["groups"][g]) for g in groups]
        if groups:
            line.append(format_top1(means["mean_groups"]))
        line.append(format_top1(means["mean_tasks"]))
        rows.append(line)
    parts = [f"# utdsl bench: {s['spec_name']} on {s['model']}, {suite.title}", "", _protocol(result), "",
             "## Top-1 (%)", "", _md_table(header, rows)]
    notes = []
    if not summary["complete"]:
        notes.append(f"\\* over the {len(summary['tasks'])} of {summary['of']} tasks whose every final run "
                     "succeeded; published rows are averaged over the same tasks.")
    if any(t.test_top1 and not t.complete for t in result.tasks):
        notes.append("† some final runs of this task failed; the value is over the others.")
    if result.published:
        notes.append("Published rows (their per-task numbers as printed; means recomputed over the tasks above):")
        seen = {}
        for row, _ in result.published:
            seen.setdefault(row.source.id, row.source)
        for source in seen.values():
            notes.append(f"[{cited[source.id]}] {source.paper}, {source.table}, {source.url}"
                         + (f" (read at {source.read_at})" if source.read_at else "")
                         + (f"; {source.note}" if source.note else "") + ".")
    if notes:
        parts += [""] + [note + "  " for note in notes]
    cost_header = ["task", "lr", "weight decay", "val top-1", "test top-1", "trainable", "GFLOPs", "peak MiB",
                   "images/s"]
    cost_rows = [[t.task, "-" if t.lr is None else format_number(t.lr), "-" if t.wd is None else format_number(t.wd),
                  format_top1(t.val_top1), format_top1(t.mean, t.std), _count(t.trainable_params, 1, 0),
                  _count(t.flops, 1e9, 2), _count(t.peak_memory_mb, 1, 0), _count(t.images_per_s, 1, 1)]
                 for t in result.tasks]
    parts += ["", "## Per task", "", _md_table(cost_header, cost_rows)]
    if result.failed:
        failed = [[r.trial.key, (r.error or "").splitlines()[0].replace("|", "\\|")] for r in result.failed]
        parts += ["", f"## Failed trials ({len(failed)})", "", _md_table(["trial", "error"], failed, right=2)]
    return "\n".join(parts) + "\n"


def _csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def results_csv(result: BenchResult) -> str:
    header = ["task", "group", "complete", "lr", "weight_decay", "val_top1", "test_top1_mean", "test_top1_std",
              "seeds", "test_top1_by_seed", "trainable_params", "flops", "peak_memory_mb", "images_per_s"]
    rows = [[t.task, t.group, t.complete, t.lr, t.wd, t.val_top1, t.mean, t.std, len(t.seeds),
             ";".join("" if v is None else repr(v) for v in t.test_top1), t.trainable_params, t.flops,
             t.peak_memory_mb, t.images_per_s] for t in result.tasks]
    summary = result.summary
    means = [(f"mean:{g}", summary["groups"][g]) for g in result.suite.groups]
    if "mean_groups" in summary:
        means.append(("mean:groups", summary["mean_groups"]))
    means.append(("mean:tasks", summary["mean_tasks"]))
    seeds = len(result.settings["seeds"])
    rows += [[name, None, summary["complete"], None, None, None, stat["mean"], stat["std"], seeds,
              None, None, None, None, None] for name, stat in means]
    return _csv(header, rows)


def trials_csv(result: BenchResult) -> str:
    rows = [[r.trial.task, r.trial.phase, r.trial.lr, r.trial.wd, r.trial.seed, r.status, r.resumed,
             r.metrics.get("top1"), (r.error or "").splitlines()[0] if r.error else None, r.trial.key]
            for r in result.trials]
    return _csv(["task", "phase", "lr", "weight_decay", "seed", "status", "resumed", "top1", "error", "dir"], rows)


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_results(result: BenchResult, out: str | Path) -> list[Path]:
    """Write the four result files into the bench directory ``out``; return their paths."""
    out = Path(out)
    files = {"results.json": json.dumps(result.as_dict(), indent=2, sort_keys=True) + "\n",
             "results.csv": results_csv(result), "trials.csv": trials_csv(result), "results.md": markdown(result)}
    for name, text in files.items():
        _write(out / name, text)
    return [out / name for name in files]
