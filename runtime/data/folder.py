"""Any image-classification data set as class directories (torchvision's ImageFolder layout)::

    ROOT/train/<class>/<image>   ROOT/val/<class>/<image>  (or ROOT/test/<class>/<image>)

Classes are the sorted directory names of ``ROOT/train`` for every split, so labels agree
between splits even when an evaluation split lacks a class. ``val`` reads ``ROOT/val`` or, when
there is none, ``ROOT/test``; ``test`` reads ``ROOT/test`` or else ``ROOT/val``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from utdsl.errors import DataError

from .base import DatasetInfo, ImageListDataset, check_split, layout_error, require_root

__all__ = ["SPLITS", "build_folder"]

SPLITS = ("train", "val", "test")
LAYOUT = "ImageFolder layout"
EXPECTED = "ROOT/train/<class>/<image> and ROOT/val/ or ROOT/test/ alike"
_FALLBACK = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}


def _classes(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.is_dir())


def build_folder(root: str | Path | None, split: str, transform: Callable | None) -> ImageListDataset:
    """Class-directory data set at ``root``, split ``train``, ``val`` or ``test``."""
    spec = "folder"
    check_split(spec, split, SPLITS)
    root = require_root(spec, root, EXPECTED, LAYOUT)
    split_dir = next((root / name for name in _FALLBACK[split] if (root / name).is_dir()), None)
    if split_dir is None:
        raise layout_error(spec, root, EXPECTED, LAYOUT)
    class_dir = root / "train" if (root / "train").is_dir() else split_dir
    classes = _classes(class_dir)
    if not classes:
        raise layout_error(spec, class_dir, "one directory a class, holding its images", LAYOUT)
    strays = sorted(set(_classes(split_dir)) - set(classes))
    if strays:
        raise DataError(f"data set 'folder': {split_dir} has class directories that {class_dir} lacks: "
                        f"{', '.join(strays)}", hint="every class must have a directory under ROOT/train")
    class_to_idx = {name: index for index, name in enumerate(classes)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"data set 'folder': no images under {split_dir}/<class>/",
                        hint="image files end in " + ", ".join(IMG_EXTENSIONS))
    info = DatasetInfo(spec=spec, split=split, num_classes=len(classes), num_samples=len(samples),
                       source=str(split_dir), layout=LAYOUT, class_names=tuple(classes))
    return ImageListDataset(list(samples), transform, info)
