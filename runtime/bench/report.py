"""What ``utdsl bench`` shows on the terminal: a line a finished trial while it runs, then the
per-task table and the means beside the published rows (rich tables; the Markdown file has the
full per-task comparison)."""

from __future__ import annotations

from typing import Any

from .plan import format_number
from .results import BenchResult, _count, format_top1
from .trials import TrialReport

__all__ = ["trial_line", "task_table", "means_table"]


def trial_line(report: TrialReport, done: int, total: int) -> str:
    """``[3/12] dtd/search-lr0.001-wd0.0001-seed0: val top-1 45.00 (12.3 s)`` and the like."""
    what = "val" if report.trial.phase == "search" else "test"
    if report.status == "failed":
        first = (report.error or "").splitlines()[0] if report.error else "failed"
        text = f"FAILED: {first}"
    else:
        top1 = report.metrics.get("top1")
        text = f"{what} top-1 {top1:.2f}" if isinstance(top1, (int, float)) else "no evaluation"
        if report.status == "skipped":
            text += " (finished before, skipped)"
        else:
            text += f" ({report.seconds:.1f} s{', resumed' if report.resumed else ''})"
    return f"[{done}/{total}] {report.trial.key}: {text}"


def task_table(result: BenchResult) -> Any:
    from rich.table import Table

    table = Table(title=f"{result.settings['spec_name']} on {result.settings['model']}, {result.suite.title}")
    for column, justify in (("task", "left"), ("group", "left"), ("lr", "right"), ("wd", "right"),
                            ("val top-1", "right"), ("test top-1", "right"), ("trainable", "right"),
                            ("GFLOPs", "right"), ("peak MiB", "right"), ("img/s", "right")):
        table.add_column(column, justify=justify)
    for t in result.tasks:
        table.add_row(t.task, t.group or "-", "-" if t.lr is None else format_number(t.lr),
                      "-" if t.wd is None else format_number(t.wd), format_top1(t.val_top1),
                      format_top1(t.mean, t.std) if t.complete else "[red]failed[/]" if not t.test_top1
                      else format_top1(t.mean, t.std, " †"),
                      _count(t.trainable_params, 1, 0), _count(t.flops, 1e9, 2), _count(t.peak_memory_mb, 1, 0),
                      _count(t.images_per_s, 1, 1))
    return table


def means_table(result: BenchResult) -> Any:
    from rich.table import Table

    summary, groups = result.summary, list(result.suite.groups)
    note = "" if summary["complete"] else f" (over {len(summary['tasks'])} of {summary['of']} tasks)"
    table = Table(title=f"mean top-1 %{note}")
    table.add_column("method")
    table.add_column("params (M)", justify="right")
    for name in [*groups, *(["mean (groups)"] if groups else []), "mean (tasks)"]:
        table.add_column(name, justify="right")
    trainable = [t.trainable_params for t in result.tasks if t.trainable_params is not None]
    ours = [f"[bold]{result.settings['spec_name']} (this bench)[/]",
            _count(sum(trainable) / len(trainable), 1e6, 3) if trainable else "-"]
    ours += [format_top1(summary["groups"][g]["mean"], summary["groups"][g]["std"]) for g in groups]
    if groups:
        ours.append(format_top1(summary["mean_groups"]["mean"], summary["mean_groups"]["std"]))
    ours.append(format_top1(summary["mean_tasks"]["mean"], summary["mean_tasks"]["std"]))
    table.add_row(*ours)
    for row, means in result.published:
        line = [row.method, "-" if row.params_m is None else f"{row.params_m:g}"]
        line += [format_top1(means["groups"][g]) for g in groups]
        if groups:
            line.append(format_top1(means["mean_groups"]))
        line.append(format_top1(means["mean_tasks"]))
        table.add_row(*line)
    return table
