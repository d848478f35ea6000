"""CIFAR-100 in torchvision's python format, read without trusting the pickles.

Layout: ``ROOT/cifar-100-python/{train,test,meta}`` (``ROOT`` may also be the
``cifar-100-python`` directory itself). The files are Python pickles of dicts of numpy arrays and
lists; they are read with an unpickler that only rebuilds numpy arrays, so a tampered file cannot
run code. (torchvision's reader would unpickle anything, and checks the files' md5 sums.)

Splits: ``train`` (50,000 images), ``test`` (10,000); CIFAR-100 has no validation split, and
``val`` reads ``test``, as PETL papers report it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from utdsl.errors import DataError

from .base import ArrayDataset, DatasetInfo, check_split, layout_error, require_root

__all__ = ["SPLITS", "build_cifar100", "read_pickle"]

SPLITS = ("train", "val", "test")
LAYOUT = "torchvision CIFAR-100 python layout"
EXPECTED = "ROOT/cifar-100-python/ holding train, test and meta"

# numpy's own constructors: what a pickled ndarray needs, and nothing that can run code
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")
        return super().find_class(module, name)


def read_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays, dicts, lists and scalars (latin1 strings)."""
    with open(path, "rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()


def _load(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        content = read_pickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataError(f"data set 'cifar100': '{path}' is not a CIFAR-100 python pickle: {error}") from None
    missing = [key for key in keys if not isinstance(content, dict) or key not in content]
    if missing:
        raise DataError(f"data set 'cifar100': '{path}' lacks {', '.join(missing)}",
                        hint="expected the files of cifar-100-python.tar.gz")
    return content


def _labels(raw: Any, path: Path) -> list[int]:
    """The fine labels as ints; anything but a sequence of integers is a DataError."""
    try:
        values = list(raw)
    except TypeError:
        raise DataError(f"data set 'cifar100': '{path}': fine_labels is a {type(raw).__name__}, "
                        "not a list of integers") from None
    for index, label in enumerate(values):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise DataError(f"data set 'cifar100': '{path}': fine_labels[{index}] is {label!r}, not an integer",
                            hint="the file is damaged; unpack cifar-100-python.tar.gz again")
    return [int(label) for label in values]


def build_cifar100(root: str | Path | None, split: str, transform: Callable | None) -> ArrayDataset:
    """CIFAR-100 at ``root``; images are 32x32 RGB, labels the 100 fine classes."""
    spec = "cifar100"
    check_split(spec, split, SPLITS)
    root = require_root(spec, root, EXPECTED, LAYOUT)
    base = root / "cifar-100-python"
    if not base.is_dir() and (root / "meta").is_file():
        base = root
    file_name = "train" if split == "train" else "test"
    for name in (file_name, "meta"):
        if not (base / name).is_file():
            raise layout_error(spec, base if base.is_dir() else root, EXPECTED, LAYOUT,
                               hint="unpack cifar-100-python.tar.gz into ROOT")
    names = tuple(str(n) for n in _load(base / "meta", ("fine_label_names",))["fine_label_names"])
    batch = _load(base / file_name, ("data", "fine_labels"))
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = _labels(batch["fine_labels"], base / file_name)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise DataError(f"data set 'cifar100': '{base / file_name}' holds data of shape {data.shape} "
                        f"for {len(labels)} labels; expected ({len(labels)}, 3072)")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    info = DatasetInfo(spec=spec, split=split, num_classes=len(names), num_samples=len(labels),
                       source=str(base / file_name), layout=LAYOUT, class_names=names)
    return ArrayDataset(images, labels, transform, info)
