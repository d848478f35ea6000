"""Data sets and transforms: ``build_dataset(spec, root, split, transform)`` for every format
(digits, CIFAR-100, ImageFolder, VPT's FGVC, NOAH's VTAB-1k), ``build_transforms`` for images."""

from .base import DatasetInfo
from .registry import DATASETS, build_dataset, describe, list_datasets, needs_root
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, build_transforms, model_data_config,
                         transforms_for_model)

__all__ = ["DATASETS", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD", "build_dataset",
           "build_transforms", "describe", "list_datasets", "model_data_config", "needs_root",
           "transforms_for_model"]
