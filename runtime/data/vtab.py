"""VTAB-1k in the layout NOAH (and most PETL repositories) ship it: one directory a task, split
files of ``relative/image/path label`` lines.

Layout (``ROOT`` holds every task; a task's own directory is accepted as ``ROOT`` too)::

    ROOT/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
    ROOT/<task>/<relative/image/path>

Splits: ``train800``, ``val200``, ``train800val200``, ``test``; ``train`` reads
``train800val200`` and ``val`` reads ``val200`` (which ``train800val200`` contains: tune
hyperparameters on ``train800``/``val200``, report ``train800val200``/``test`` as VTAB does).
Labels are used as written; the number of classes is the task's, not the count seen in a split.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from utdsl.errors import DataError

from .base import DatasetInfo, ImageListDataset, check_split, inside_root, layout_error, require_root

__all__ = ["VTAB", "SPLITS", "build_vtab"]

#: task directory name -> number of classes
VTAB: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}
SPLITS = ("train800", "val200", "train800val200", "test", "train", "val")
ALIASES = {"train": "train800val200", "val": "val200"}
LAYOUT = "NOAH VTAB-1k layout"


def _read_list(spec: str, path: Path, task_dir: Path, num_classes: int) -> list[tuple[str, int]]:
    samples = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"data set '{spec}': {path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} "
                            f"at column {error.start + 1})") from None
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?[0-9]{1,9}", parts[1]):
            shown = line.strip() if len(line) <= 200 else line.strip()[:200] + "..."
            raise DataError(f"data set '{spec}': {path}:{number}: expected 'relative/image/path label' "
                            f"(an integer label), got {shown!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataError(f"data set '{spec}': {path}:{number}: label {label} is outside "
                            f"range(0, {num_classes}) for this task")
        samples.append((inside_root(spec, task_dir, parts[0].strip(), f"{path}:{number}"), label))
    if not samples:
        raise DataError(f"data set '{spec}': '{path}' lists no images")
    return samples


def build_vtab(task: str, root: str | Path | None, split: str, transform: Callable | None) -> ImageListDataset:
    """VTAB-1k task ``task`` (a key of :data:`VTAB`) at ``root``, one of :data:`SPLITS`."""
    spec = f"vtab:{task}"
    check_split(spec, split, SPLITS)
    file_name = ALIASES.get(split, split) + ".txt"
    expected = f"ROOT/{task}/{file_name} of 'relative/image/path label' lines"
    root = require_root(spec, root, expected, LAYOUT)
    task_dir = root / task
    if not task_dir.is_dir() and (root / file_name).is_file():
        task_dir = root  # ROOT is the task's own directory
    list_file = task_dir / file_name
    if not list_file.is_file():
        where = task_dir if task_dir.is_dir() else root
        raise layout_error(spec, where, expected, LAYOUT,
                           hint="ROOT is the vtab-1k directory holding one directory a task")
    num_classes = VTAB[task]
    samples = _read_list(spec, list_file, task_dir, num_classes)
    if not Path(samples[0][0]).is_file():
        raise DataError(f"data set '{spec}': the first image of {file_name} is not at '{samples[0][0]}'",
                        hint=f"image paths in the split files are relative to ROOT/{task}")
    info = DatasetInfo(spec=spec, split=split, num_classes=num_classes, num_samples=len(samples),
                       source=str(list_file), layout=LAYOUT)
    return ImageListDataset(samples, transform, info)
