"""The trials of a bench: the lr x weight-decay search of each task, the choice of the best
setting, and the final runs of that setting over seeds.

Each trial is one ordinary run directory, ``BENCH/<task>/<phase>-lr<lr>-wd<wd>-seed<seed>/``:

- ``search``: one run per grid point (seed: the recipe's), trained on the suite's search split
  (VTAB-1k ``train800``) and evaluated on its validation split (``val200``) after every
  ``eval_every`` epochs;
- ``final``: the chosen setting, trained on the suite's final split (``train800val200``) once per
  seed (the recipe's seed + 0, 1, ... ``seeds - 1``) and evaluated on ``test`` once, after the
  last epoch (the test split is never looked at before).

Choice: the highest validation top-1 *of the last epoch* (the final run keeps its last epoch too);
ties go to the smaller learning rate (VPT's ``tune_vtab.py`` rule, "for stability"), then to the
smaller weight decay. Failed search trials take no part; a task whose search trials all failed
has no final runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..recipes import Recipe, load_recipe
from .suites import Suite

__all__ = ["Trial", "search_trials", "final_trials", "select_best", "trial_recipe", "base_recipe", "format_number"]


def format_number(value: float) -> str:
    """A learning rate or weight decay as directory names and tables show it (``0.001``, ``1e-05``,
    ``0``)."""
    return format(float(value), "g")


@dataclass(frozen=True)
class Trial:
    """One run of a bench: a task, a phase (``search`` or ``final``), a setting and a seed."""

    task: str
    phase: str
    lr: float
    wd: float
    seed: int

    @property
    def name(self) -> str:
        """The run directory's name inside the task's directory."""
        return f"{self.phase}-lr{format_number(self.lr)}-wd{format_number(self.wd)}-seed{self.seed}"

    @property
    def key(self) -> str:
        """``task/name``: unique in a bench."""
        return f"{self.task}/{self.name}"

    def path(self, bench_dir: str | Path) -> Path:
        return Path(bench_dir) / self.task / self.name


def search_trials(task: str, lrs: Iterable[float], wds: Iterable[float], seed: int) -> list[Trial]:
    """The grid of ``task``: every (lr, wd) pair, lr-major, in the order given."""
    wds = list(wds)
    return [Trial(task, "search", float(lr), float(wd), seed) for lr in lrs for wd in wds]


def final_trials(task: str, lr: float, wd: float, seeds: Iterable[int]) -> list[Trial]:
    """The final runs of the chosen setting, one a seed."""
    return [Trial(task, "final", float(lr), float(wd), int(seed)) for seed in seeds]


def select_best(scores: Mapping[Trial, float | None]) -> Trial | None:
    """The search trial with the highest validation top-1 (None: failed, ignored); ties go to the
    smaller lr, then the smaller weight decay. None when no trial has a score."""
    scored = [(trial, score) for trial, score in scores.items() if score is not None]
    if not scored:
        return None
    return min(scored, key=lambda item: (-item[1], item[0].lr, item[0].wd))[0]


def trial_recipe(base: Recipe, trial: Trial, suite: Suite) -> Recipe:
    """``base`` with the trial's lr, weight decay, seed and the phase's splits; a final run
    evaluates once, after its last epoch."""
    train_split, eval_split = suite.search if trial.phase == "search" else suite.final
    fields = dict(base.model_dump(), lr=trial.lr, weight_decay=trial.wd, seed=trial.seed,
                  train_split=train_split, eval_split=eval_split)
    if trial.phase == "final":
        fields["eval_every"] = base.epochs
    return Recipe.model_validate(fields)


def base_recipe(suite: Suite, recipe: str | None, overrides: Mapping[str, object]) -> Recipe:
    """The recipe every trial starts from: ``recipe`` (default: the suite's) with ``overrides``."""
    return load_recipe(recipe or suite.recipe, overrides)
