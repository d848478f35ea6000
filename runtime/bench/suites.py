"""The suites ``utdsl bench`` runs: their tasks, groups, protocol splits, recipe and default grid.

``vtab1k`` is the 19 VTAB-1k tasks in NOAH's layout, in the order papers print them, in three
groups (Natural 7, Specialized 4, Structured 8); ``fgvc`` the five FGVC data sets in VPT's layout;
``digits`` the bundled digits data set (no download). A comma-separated list of task names
(``dtd,eurosat`` or ``vtab:dtd,vtab:eurosat``) is a custom suite of one family, run under that
family's protocol. Recipes, splits and grids are data (``suites.toml``).

Data roots: a VTAB root holds one directory a task (``ROOT/dtd/train800.txt``); an FGVC root
holds one directory a data set, named as utdsl names them (``ROOT/cub/train.json``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from utdsl.errors import UtdslError, did_you_mean

__all__ = ["BenchError", "Task", "Suite", "VTAB_GROUPS", "FGVC_TASKS", "SUITES", "resolve_suite", "data_root_of"]


class BenchError(UtdslError):
    """A bench that cannot run as asked: an unknown suite or task, a missing data root, a bench
    directory made with other settings."""


#: VTAB-1k groups and their tasks, in the order of the papers' tables (NOAH's directory names)
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "Natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "Specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "Structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
#: FGVC data sets, in the order of VPT's tables
FGVC_TASKS: tuple[str, ...] = ("cub", "nabirds", "flowers", "dogs", "cars")


@dataclass(frozen=True)
class Task:
    """One task of a suite: its name, the data-set spec training reads, its group (or None)."""

    name: str
    data: str
    group: str | None = None


@dataclass(frozen=True)
class Suite:
    """A benchmark: tasks, the splits of each phase, the recipe and the default grid.

    ``family`` names the protocol (``vtab1k``, ``fgvc``, ``digits``); ``name`` is the suite asked
    for (the family, or ``custom`` for a task list). ``search`` and ``final`` are (train split,
    evaluation split) pairs."""

    name: str
    family: str
    title: str
    tasks: tuple[Task, ...]
    recipe: str
    search: tuple[str, str]
    final: tuple[str, str]
    lrs: tuple[float, ...]
    wds: tuple[float, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups of the suite's tasks, in order, each once."""
        return tuple(dict.fromkeys(t.group for t in self.tasks if t.group))

    @property
    def needs_root(self) -> bool:
        return self.family != "digits"

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)


@lru_cache(maxsize=1)
def _settings() -> dict:
    return tomllib.loads(Path(__file__).with_name("suites.toml").read_text(encoding="utf-8"))


def _family_tasks(family: str) -> tuple[Task, ...]:
    if family == "vtab1k":
        return tuple(Task(name, f"vtab:{name}", group) for group, names in VTAB_GROUPS.items() for name in names)
    if family == "fgvc":
        return tuple(Task(name, f"fgvc:{name}") for name in FGVC_TASKS)
    return (Task("digits", "digits"),)


def _suite(family: str, tasks: tuple[Task, ...], name: str) -> Suite:
    values = _settings()[family]
    return Suite(name=name, family=family, title=values["title"], tasks=tasks, recipe=values["recipe"],
                 search=tuple(values["search"]), final=tuple(values["final"]),
                 lrs=tuple(float(v) for v in values["lr"]), wds=tuple(float(v) for v in values["wd"]))


#: the named suites
SUITES: tuple[str, ...] = ("vtab1k", "fgvc", "digits")


def _lookup(item: str) -> tuple[str, Task]:
    """(family, task) of one entry of a task list: ``vtab:dtd``, ``fgvc:cub``, or a bare name."""
    known = {family: {t.name: t for t in _family_tasks(family)} for family in SUITES}
    prefixes = {"vtab": "vtab1k", "fgvc": "fgvc"}
    prefix, _, bare = item.rpartition(":")
    if prefix and prefix not in prefixes:
        raise BenchError(f"unknown task '{item}'", hint="tasks are vtab:<task> or fgvc:<name>")
    families = [prefixes[prefix]] if prefix else [f for f in SUITES if bare in known[f]]
    for family in families:
        if bare in known[family]:
            return family, known[family][bare]
    everything = [n for f in SUITES for n in known[f]] + list(SUITES)
    raise BenchError(f"unknown suite or task '{item}'",
                     hint=did_you_mean(bare, everything) or "suites: vtab1k, fgvc, digits, or a task list")


def resolve_suite(text: str) -> Suite:
    """The suite named by ``--suite``: ``vtab1k``, ``fgvc``, ``digits`` or a comma-separated list
    of tasks of one family (each once)."""
    name = text.strip().lower()
    if name in SUITES:
        return _suite(name, _family_tasks(name), name)
    items = [item.strip() for item in name.split(",") if item.strip()]
    if not items:
        raise BenchError("--suite is empty", hint="suites: vtab1k, fgvc, digits, or a task list")
    found = [_lookup(item) for item in items]
    families = sorted({family for family, _ in found})
    if len(families) > 1:
        raise BenchError(f"the task list mixes suites ({', '.join(families)}); their protocols differ",
                         hint="run one bench a suite")
    tasks = [task for _, task in found]
    repeated = sorted({t.name for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise BenchError(f"task '{repeated[0]}' is listed twice in --suite")
    order = [t.name for t in _family_tasks(families[0])]
    return _suite(families[0], tuple(sorted(tasks, key=lambda t: order.index(t.name))), "custom")


def data_root_of(suite: Suite, task: Task, root: str | None) -> str | None:
    """The data root the task's data set reads: VTAB's root holds every task, FGVC's one
    directory a data set, digits has none. Absolute, so that workers elsewhere find it."""
    if suite.family == "digits":
        return None
    if not root:
        layout = ("ROOT/<task>/train800.txt ... (NOAH's VTAB-1k layout)" if suite.family == "vtab1k"
                  else "ROOT/<name>/train.json ... (VPT's FGVC layout, one directory a data set)")
        raise BenchError(f"suite '{suite.name}' needs --data-root: expected {layout}")
    base = Path(root).expanduser().resolve()
    if suite.family != "fgvc":
        return str(base)
    if len(suite.tasks) == 1 and not (base / task.name).is_dir() and (base / "train.json").is_file():
        return str(base)  # one data set, given as its own directory
    return str(base / task.name)
