"""FGVC data sets in the layout VPT ships them: split JSON files mapping image path -> class id.

Layout (``ROOT`` is one data set's directory)::

    ROOT/train.json  ROOT/val.json  ROOT/test.json   {"relative/image.jpg": class_id, ...}
    ROOT/<image dir>/relative/image.jpg

The image directory depends on the data set, as in VPT's loaders: ``images/`` for CUB and
NABirds, ``Images/`` for Stanford Dogs, ``ROOT`` itself for Oxford Flowers and Stanford Cars.
Splits: ``train``, ``val``, ``test`` (the files) and ``trainval`` (train.json and val.json together:
the training set of a final run once val has chosen the hyper-parameters, as ``utdsl bench`` does).
Class ids are mapped to contiguous labels by sorting the ids found in every split file present,
so a split missing a class still labels the others the same way. Class names are the images'
parent directories when each class has exactly one (as in CUB); otherwise unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from utdsl.errors import DataError

from .base import DatasetInfo, ImageListDataset, check_split, inside_root, layout_error, require_root

__all__ = ["FGVC", "SPLITS", "build_fgvc"]

#: name -> (image directory relative to ROOT, number of classes of the full data set)
FGVC: dict[str, tuple[str, int]] = {
    "cub": ("images", 200),
    "nabirds": ("images", 555),
    "flowers": ("", 102),
    "dogs": ("Images", 120),
    "cars": ("", 196),
}
SPLITS = ("train", "val", "test", "trainval")
FILES = ("train", "val", "test")
LAYOUT = "VPT FGVC layout"


def _read_split(spec: str, root: Path, split: str) -> dict[str, int]:
    path = root / f"{split}.json"
    if not path.is_file():
        raise layout_error(spec, root, f"ROOT/{split}.json mapping image path -> class id", LAYOUT,
                           hint="ROOT is the data set's own directory, with the split files VPT "
                                "prepares (train.json, val.json, test.json)")
    try:
        anno = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"data set '{spec}': '{path}' is not valid JSON: {error}") from None
    if not isinstance(anno, dict):
        raise DataError(f"data set '{spec}': '{path}' must hold a JSON object mapping image path -> "
                        f"class id, not {type(anno).__name__}")
    for image, class_id in anno.items():
        if not isinstance(class_id, int) or isinstance(class_id, bool):
            raise DataError(f"data set '{spec}': '{path}' maps '{image}' to {class_id!r}; "
                            "class ids must be integers")
    if not anno:
        raise DataError(f"data set '{spec}': '{path}' lists no images")
    return anno


def _class_names(anno: dict[str, int], ids: list[int]) -> tuple[str, ...] | None:
    parents: dict[int, set[str]] = {}
    for image, class_id in anno.items():
        parents.setdefault(class_id, set()).add(Path(image).parent.name)
    names = [next(iter(parents[i])) if len(parents.get(i, ())) == 1 else "" for i in ids]
    if "" in names or len(set(names)) != len(names):
        return None
    return tuple(names)


def build_fgvc(name: str, root: str | Path | None, split: str, transform: Callable | None) -> ImageListDataset:
    """FGVC data set ``name`` (a key of :data:`FGVC`) at ``root``, one of :data:`SPLITS`."""
    spec = f"fgvc:{name}"
    check_split(spec, split, SPLITS)
    root = require_root(spec, root, "ROOT/train.json mapping image path -> class id", LAYOUT)
    image_dir_name, _ = FGVC[name]
    anno = ({**_read_split(spec, root, "train"), **_read_split(spec, root, "val")} if split == "trainval"
            else _read_split(spec, root, split))
    every = dict(anno)
    for other in FILES:
        if other != split and (root / f"{other}.json").is_file():
            every.update(_read_split(spec, root, other))
    ids = sorted(set(every.values()))
    label_of = {class_id: label for label, class_id in enumerate(ids)}
    image_dir = root / image_dir_name
    if not image_dir.is_dir():
        raise layout_error(spec, root, f"ROOT/{image_dir_name}/ holding the images listed in the JSON "
                           "files", LAYOUT)
    where = "train.json/val.json" if split == "trainval" else f"{split}.json"
    samples = [(inside_root(spec, image_dir, image, where), label_of[class_id])
               for image, class_id in anno.items()]
    first = samples[0][0]
    if not Path(first).is_file():
        raise DataError(f"data set '{spec}': image '{next(iter(anno))}' listed in {where} is not "
                        f"at '{first}'",
                        hint=f"image paths in the JSON files are relative to "
                             f"{'ROOT/' + image_dir_name if image_dir_name else 'ROOT'}")
    info = DatasetInfo(spec=spec, split=split, num_classes=len(ids), num_samples=len(samples),
                       source=str(image_dir), layout=LAYOUT, class_names=_class_names(every, ids))
    return ImageListDataset(samples, transform, info)
