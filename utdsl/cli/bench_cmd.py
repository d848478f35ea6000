"""``utdsl bench``: a spec on a standard suite under the standard protocol, on Ray.

A thin command over :mod:`utdsl.runtime.bench`: it parses the options, starts the executor (Ray
on this machine, a running cluster with ``--address``, or ``--inline``), prints a line a trial and
the result tables, and exits 1 when a trial failed (2 for a user error, as every command).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "bench_cmd"]


def _floats(text: Optional[str], option: str) -> tuple[float, ...]:
    from utdsl.runtime.bench.suites import BenchError

    if not text:
        return ()
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise BenchError(f"{option} takes comma-separated numbers, e.g. {option} 1e-3,5e-3; got '{text}'") from None


def _literal(text: str):
    """A JSON value (``6``, ``0.1``, ``true``) or else the text itself (a --model-arg value)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def bench_cmd(
    spec: str = typer.Argument(..., help="Spec file or library name."),
    suite: str = typer.Option(..., "--suite", help="vtab1k, fgvc, digits, or tasks: dtd,eurosat / fgvc:cub."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="VTAB-1k root (a directory a task) or FGVC "
                                            "root (a directory a data set)."),
    model: str = typer.Option("vit_b16", "--model", "-m", help="Backbone: alias or timm name."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights file."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download timm's pretrained weights."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe (default: the suite's)."),
    override: list[str] = typer.Option([], "--override", "-o", help="Recipe field: -o label_smoothing=0.1."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Recipe epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Recipe batch_size."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Recipe input_size."),
    seed: Optional[int] = typer.Option(None, "--seed", help="First seed (default: the recipe's)."),
    lr: Optional[str] = typer.Option(None, "--lr", help="Learning rates to search: 1e-3,5e-3 (default: the suite's)."),
    wd: Optional[str] = typer.Option(None, "--wd", help="Weight decays to search: 1e-4,1e-2 (default: the suite's)."),
    seeds: int = typer.Option(1, "--seeds", help="Final runs a task (seeds); mean and std over them."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Spec let binding: --set r=16."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm.create_model argument: --model-arg depth=6."),
    out: Optional[Path] = typer.Option(None, "--out", "-O", help="Bench directory (default: bench/SPEC-MODEL-SUITE)."),
    address: Optional[str] = typer.Option(None, "--address", help="A running Ray cluster (default: start Ray here)."),
    inline: bool = typer.Option(False, "--inline", help="No Ray: run the trials one by one in this process."),
    device: str = typer.Option("auto", "--device", help="auto (GPUs when the cluster has them), cpu or cuda."),
    cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", help="CPUs a trial reserves (fractions allowed)."),
    retries: int = typer.Option(2, "--retries", help="Retries of a trial that crashes."),
    num_workers: int = typer.Option(0, "--num-workers", help="Data loader processes a trial."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Go ahead without asking (e.g. tuners of unusual size)."),
) -> None:
    """Run SPEC on a suite: lr x wd search on val, best setting retrained and tested, over seeds;
    writes BENCH/results.{md,csv,json} with published rows beside yours. Resumable: rerun it."""
    from utdsl.cli import console, err_console
    from utdsl.runtime.bench.plan import base_recipe
    from utdsl.runtime.bench.report import means_table, task_table, trial_line
    from utdsl.runtime.bench.run import BenchSettings, run_bench
    from utdsl.runtime.bench.suites import BenchError, resolve_suite
    from utdsl.runtime.guard import Interrupted
    from utdsl.values import parse_assignments
    the_suite = resolve_suite(suite)
    if device not in ("auto", "cpu", "cuda"):
        raise BenchError(f"--device takes auto, cpu or cuda, not '{device}'")
    if retries < 0:
        raise BenchError("--retries cannot be negative")
    values = dict(epochs=epochs, batch_size=batch_size, input_size=input_size, seed=seed)
    overrides = {**parse_assignments(override), **{k: v for k, v in values.items() if v is not None}}
    for field in ("lr", "weight_decay"):
        if field in overrides:
            raise BenchError(f"the bench searches {field}; give the values with --{'lr' if field == 'lr' else 'wd'}")
    model_kwargs = {k: _literal(v) for k, v in parse_assignments(model_arg, "--model-arg").items()}
    suite_name = the_suite.name if the_suite.name != "custom" else "tasks"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(spec).stem}-{model}-{suite_name}")
    settings = BenchSettings(spec=spec, suite=the_suite, out=out or Path("bench") / name,
                             recipe=base_recipe(the_suite, recipe, overrides), model=model, data_root=data_root,
                             lrs=_floats(lr, "--lr"), wds=_floats(wd, "--wd"), seeds=seeds,
                             spec_overrides=parse_assignments(set_, "--set"), model_kwargs=model_kwargs,
                             weights=weights, pretrained=pretrained, num_workers=num_workers, yes=yes)
    if not weights and not pretrained:
        err_console.print("warning: the backbone has random weights (no --weights FILE, no --pretrained): results "
                          "will be far below published numbers", markup=False, soft_wrap=True)
    if inline:
        from utdsl.runtime.bench.execute import InlineExecutor

        executor = InlineExecutor(device=device, retries=retries)
    else:
        err_console.print("starting Ray..." if address is None else f"connecting to Ray at {address}...",
                          markup=False)
        from utdsl.runtime.bench.execute import RayExecutor

        executor = RayExecutor(address=address, device=device, cpus_per_trial=cpus_per_trial, retries=retries)

    def say(text: str) -> None:
        err_console.print(text, markup=False, soft_wrap=True, highlight=False)

    try:
        result = run_bench(
            settings, executor,
            on_plan=lambda record: say(f"bench {settings.out}: {len(record['tasks'])} task(s), grid "
                                       f"{len(settings.lrs)} lr x {len(settings.wds)} wd, {settings.seeds} seed(s); "
                                       f"{record['executor']}"),
            on_report=lambda report, done, total: say(trial_line(report, done, total)))
    except (Interrupted, KeyboardInterrupt):
        raise Interrupted(f"bench interrupted; run the same command again to continue it ({settings.out}: "
                          "finished trials are kept, interrupted ones resume)") from None
    finally:
        executor.close()
    if not console.is_terminal:  # piped or logged: no column cut to 80 characters
        from rich.console import Console

        console = Console(width=160)
    console.print(task_table(result))
    console.print(means_table(result))
    console.print(f"wrote {settings.out}/results.md, results.csv, results.json, trials.csv", highlight=False,
                  soft_wrap=True)
    if result.failed:
        err_console.print(f"{len(result.failed)} trial(s) failed (listed in {settings.out}/results.md); rerun the "
                          "same command to retry them", markup=False, soft_wrap=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app`` (once)."""
    if getattr(app, "_utdsl_bench_cmd", False):
        return
    app._utdsl_bench_cmd = True  # type: ignore[attr-defined]
    app.command("bench")(bench_cmd)
