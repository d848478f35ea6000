"""``utdsl plot RUN``: loss and accuracy curves of a run, from its metrics.jsonl, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path

from utdsl.errors import CheckpointError

from .rundir import RunDir, atomic_write

__all__ = ["plot_run"]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw training loss (per logged step and per epoch), evaluation loss, and top-1/top-5
    accuracy per epoch side by side; write ``out`` (default ``RUN/curves.png``) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = RunDir(run_dir)
    if not run.metrics_path.is_file():
        raise CheckpointError(f"'{run.path}' has no metrics.jsonl to plot",
                              hint="give the directory `utdsl train` wrote (its --out)")
    rows = run.read_metrics()
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    if not steps and not epochs:
        raise CheckpointError(f"'{run.metrics_path}' holds no metrics yet")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6,
                     label="train (logged steps)")
    if epochs:
        ax_loss.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", label="train (epoch)")
        evals = [r for r in epochs if "eval_loss" in r]
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "s-", label="eval")
            for key in ("top1", "top5"):
                ax_acc.plot([r["epoch"] + 1 for r in evals], [r[key] for r in evals], "o-", label=key)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="evaluation accuracy", ylim=(0, 100))
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    name = run.read_config().get("spec_name", run.path.name) if run.config_path.is_file() else run.path.name
    fig.suptitle(f"{name} ({run.path.name})")
    target = Path(out) if out is not None else run.path / "curves.png"
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return target
