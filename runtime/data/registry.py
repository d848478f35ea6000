"""Data sets by spec string: the one entry point the runtime and the CLI call.

Spec strings (case-insensitive)::

    digits                      scikit-learn's 8x8 digits; no download, no root (the default)
    cifar100                    ROOT/cifar-100-python/{train,test,meta}
    folder                      ROOT/train/<class>/<image>, ROOT/val/ or ROOT/test/
    fgvc:cub|nabirds|flowers|dogs|cars     VPT's split JSON files
    vtab:<task>                 NOAH's VTAB-1k split lists, e.g. vtab:caltech101

Unknown names are a :class:`DataError` naming the closest known ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from utdsl.errors import DataError, did_you_mean

from .base import DatasetInfo
from .cifar import build_cifar100
from .digits import build_digits
from .fgvc import FGVC, build_fgvc
from .folder import build_folder
from .vtab import VTAB, build_vtab

__all__ = ["DATASETS", "build_dataset", "describe", "list_datasets", "needs_root"]

_PLAIN: dict[str, tuple[Callable, str]] = {
    "digits": (build_digits, "scikit-learn's 8x8 handwritten digits, bundled (no download, no root)"),
    "cifar100": (build_cifar100, "CIFAR-100, torchvision's cifar-100-python files"),
    "folder": (build_folder, "class directories: ROOT/train/<class>/<image>, ROOT/val or ROOT/test"),
}
_FGVC_TITLES = {"cub": "CUB-200-2011", "nabirds": "NABirds", "flowers": "Oxford Flowers-102",
                "dogs": "Stanford Dogs", "cars": "Stanford Cars"}

#: every accepted spec -> one line describing it
DATASETS: dict[str, str] = {
    **{name: text for name, (_, text) in _PLAIN.items()},
    **{f"fgvc:{name}": f"{_FGVC_TITLES[name]}, VPT's FGVC split JSON files" for name in FGVC},
    **{f"vtab:{task}": f"VTAB-1k {task} ({classes} classes), NOAH's split lists"
       for task, classes in VTAB.items()},
}


def list_datasets() -> list[tuple[str, str]]:
    """``(spec, description)`` of every data set, in the order ``utdsl`` lists them."""
    return list(DATASETS.items())


def _canonical(spec: str) -> str:
    name = spec.strip().lower()
    if name not in DATASETS:
        family = name.split(":", 1)[0]
        candidates = [s for s in DATASETS if s.startswith(family + ":")] if ":" in name else DATASETS
        hint = did_you_mean(name, candidates) or did_you_mean(name, DATASETS)
        raise DataError(f"unknown data set '{spec}'",
                        hint=hint or "known data sets: digits, cifar100, folder, fgvc:<name>, vtab:<task>")
    return name


def needs_root(spec: str) -> bool:
    """Whether ``spec`` reads files from a data root (every data set but ``digits``)."""
    return _canonical(spec) != "digits"


def build_dataset(spec: str, root: str | Path | None, split: str, transform: Callable | None) -> Dataset:
    """The data set ``spec`` (see the module docstring) at ``root``, split ``split``.

    Splits are ``train``, ``val`` and ``test`` for every data set, plus ``train800``, ``val200``
    and ``train800val200`` for VTAB and ``trainval`` for FGVC. Items are ``(transform(image), label)``
    with a PIL RGB image
    and an ``int`` label; the data set has ``targets`` and ``info`` (a :class:`DatasetInfo`).
    A missing or misarranged root is a :class:`DataError` naming the expected layout and what
    the root holds.
    """
    name = _canonical(spec)
    if name in _PLAIN:
        return _PLAIN[name][0](root, split, transform)
    family, member = name.split(":", 1)
    builder = build_fgvc if family == "fgvc" else build_vtab
    return builder(member, root, split, transform)


def describe(dataset: Dataset) -> DatasetInfo:
    """The :class:`DatasetInfo` of a data set built by :func:`build_dataset` (or a Subset of one)."""
    while not hasattr(dataset, "info") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    info = getattr(dataset, "info", None)
    if not isinstance(info, DatasetInfo):
        raise DataError(f"{type(dataset).__name__} was not built by utdsl's build_dataset")
    return info
