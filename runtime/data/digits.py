"""scikit-learn's bundled handwritten digits: the data set that needs no download and no root.

1,797 grey 8x8 images of the digits 0-9, served as 8x8 RGB images (the grey value in all three
channels, scaled 0-16 -> 0-255); the transform upscales them to the model's input size. The
split is fixed: a permutation of seed 0 gives 1,257 train, 180 val and 360 test images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from .base import ArrayDataset, DatasetInfo, check_split

__all__ = ["SPLITS", "build_digits"]

SPLITS = ("train", "val", "test")
_BOUNDS = {"train": (0, 1257), "val": (1257, 1437), "test": (1437, 1797)}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    order = np.random.RandomState(0).permutation(len(images))  # legacy RNG: stable across numpy
    return images[order], bunch.target[order]


def build_digits(root: str | Path | None, split: str, transform: Callable | None) -> ArrayDataset:
    """The digits split ``split``; ``root`` is ignored (the data ship with scikit-learn)."""
    check_split("digits", split, SPLITS)
    images, labels = _digits()
    start, stop = _BOUNDS[split]
    info = DatasetInfo(spec="digits", split=split, num_classes=10, num_samples=stop - start,
                       source="sklearn.datasets.load_digits", layout="bundled with scikit-learn",
                       class_names=tuple(str(d) for d in range(10)), augment=False)
    return ArrayDataset(images[start:stop], labels[start:stop].tolist(), transform, info)
