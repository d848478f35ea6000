"""Helpers of the bench tests: tiny fake VTAB-1k and FGVC trees, and bench settings that train a
one-block ViT-Ti at 32 px for one epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from utdsl.runtime.bench.plan import base_recipe
from utdsl.runtime.bench.run import BenchSettings
from utdsl.runtime.bench.suites import resolve_suite

FAST = {"epochs": 1, "input_size": 32, "batch_size": 8, "warmup_epochs": 0, "precision": "fp32"}
VTAB_SIZES = {"train800": 16, "val200": 8, "train800val200": 24, "test": 8}


def _image(path: Path, label: int, rng: np.random.RandomState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (rng.rand(8, 8, 3) * 60 + label * 50).clip(0, 255).astype("uint8")
    Image.fromarray(pixels).save(path)


def write_vtab(root: Path, tasks=("dtd", "eurosat"), classes: int = 3, broken: dict | None = None) -> Path:
    """NOAH's layout for ``tasks``: each split a list file of ``images/<split>_<i>.png <label>``
    (labels 0..classes-1). ``broken`` maps a task to a split whose first image is not an image."""
    rng = np.random.RandomState(0)
    for task in tasks:
        folder = root / task
        for split, count in VTAB_SIZES.items():
            lines = []
            for i in range(count):
                name = f"images/{split}_{i}.png"
                _image(folder / name, i % classes, rng)
                lines.append(f"{name} {i % classes}")
            (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
        if broken and task in broken:
            (folder / f"images/{broken[task]}_0.png").write_bytes(b"not an image")
    return root


def write_fgvc(root: Path, name: str = "cub", classes: int = 3) -> Path:
    """VPT's layout for one data set under ``root/name``: train/val/test JSON files, images in
    ``images/`` (CUB's image directory)."""
    rng = np.random.RandomState(1)
    folder = root / name
    for split, count in {"train": 12, "val": 6, "test": 6}.items():
        anno = {}
        for i in range(count):
            image = f"{10 + i % classes:03d}.class/{split}_{i}.png"
            _image(folder / "images" / image, i % classes, rng)
            anno[image] = 10 + i % classes
        (folder / f"{split}.json").write_text(json.dumps(anno))
    return root


def settings(out: Path, suite: str, data_root: Path | None, *, lrs=(1e-3, 5e-3), wds=(1e-4,), seeds: int = 1,
             **fields) -> BenchSettings:
    """Bench settings of the tiny model on ``suite``."""
    the_suite = resolve_suite(suite)
    return BenchSettings(spec="lora", suite=the_suite, out=out, recipe=base_recipe(the_suite, None, FAST),
                         model="vit_t16", model_kwargs={"depth": 1}, data_root=str(data_root) if data_root else None,
                         lrs=lrs, wds=wds, seeds=seeds, **fields)
