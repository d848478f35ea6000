"""What every data set format shares: :class:`DatasetInfo`, two dataset classes (images listed by
path, images held in an array) and the layout errors that name what a root should hold.

Every data set built here yields ``(image, label)`` with ``label`` an ``int`` in
``range(info.num_classes)``, exposes ``targets`` (the labels in order) and ``info``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utdsl.errors import DataError, did_you_mean

__all__ = ["DatasetInfo", "ImageListDataset", "ArrayDataset", "layout_error", "listing",
           "require_root", "check_split", "inside_root"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a built data set is: its spec, split, classes, size and where it was read from.

    ``augment`` says whether random-resized-crop and flip augmentation suit the data (not for
    8x8 digits, whose orientation and extent carry the label).
    """

    spec: str
    split: str
    num_classes: int
    num_samples: int
    source: str
    layout: str
    class_names: tuple[str, ...] | None = None
    augment: bool = True

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (f"{self.spec} [{self.split}]: {self.num_samples} images, {self.num_classes} classes "
                f"from {self.source}")


def _check_labels(labels: Sequence[int], num_classes: int, spec: str) -> None:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise DataError(f"data set '{spec}': label {bad[0]} is outside range(0, {num_classes})")


class ImageListDataset(Dataset):
    """Images read from files: ``samples`` is a list of ``(path, label)``; loaded as RGB."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None, info: DatasetInfo):
        _check_labels([label for _, label in samples], info.num_classes, info.spec)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform
        self.info = info

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        if _tensor_pipeline(self.transform):        # the uint8 path decodes the file's bytes itself
            image, label = self.uint8_item(index)
            return self.transform.normalize(image.unsqueeze(0))[0], label
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError:
            raise self._missing(path) from None
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"data set '{self.info.spec}': cannot read image '{path}': {error}") from None
        return (self.transform(image) if self.transform else image), label

    def uint8_item(self, index: int, generator=None):
        """The image as uint8 ``(3, H, W)``, augmented by the transform (a
        :class:`~.loading.TensorPipeline`) from ``generator`` (None: torch's global one), and
        its label."""
        return self._from_bytes(index, lambda data, _: self.transform.uint8(data, generator))

    def encoded_item(self, index: int, generator=None):
        """The image as the device decoder takes it (:func:`~.device_decode.encode_sample`: the
        file's bytes and its geometry drawn from ``generator``), and its label."""
        from .device_decode import encode_sample

        return self._from_bytes(index, lambda data, path: encode_sample(self.transform, data, generator, path))

    def _from_bytes(self, index: int, convert: Callable):
        """``convert(file bytes, path)`` of image ``index`` and its label; a file that cannot be
        read or decoded is a DataError naming it."""
        path = self.samples[index][0]
        try:
            return convert(self._bytes(index), path), self.targets[index]
        except (RuntimeError, UnidentifiedImageError, OSError) as error:
            raise DataError(f"data set '{self.info.spec}': cannot read image '{path}': {error}") from None

    def _bytes(self, index: int):
        """The file's bytes as a uint8 tensor whose memory torch allocated (``torchvision.io.read_file``'s
        tensors hang a DataLoader that sends them between processes)."""
        path = self.samples[index][0]
        try:
            with open(path, "rb", buffering=0) as file:
                data = torch.empty(os.fstat(file.fileno()).st_size, dtype=torch.uint8)
                view, done = memoryview(data.numpy()), 0
                while done < len(view):
                    count = file.readinto(view[done:])
                    if not count:
                        raise OSError("the file got shorter while it was read")
                    done += count
        except FileNotFoundError:
            raise self._missing(path) from None
        return data

    def _missing(self, path: str) -> DataError:
        return DataError(f"data set '{self.info.spec}': image '{path}' does not exist",
                         hint=f"image paths are resolved under {self.info.source}")


def _tensor_pipeline(transform) -> bool:
    from .loading import TensorPipeline

    return isinstance(transform, TensorPipeline)


class ArrayDataset(Dataset):
    """Images held in memory: ``images`` is uint8 ``(N, H, W, 3)``; served as PIL RGB images."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None,
                 info: DatasetInfo):
        _check_labels(labels, info.num_classes, info.spec)
        self.images = images
        self.targets = [int(label) for label in labels]
        self.transform = transform
        self.info = info

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def listing(path: Path, limit: int = 8) -> str:
    """What ``path`` holds, for an error message: sorted names (directories end in ``/``)."""
    if not path.exists():
        return f"no such directory '{path}'"
    if not path.is_dir():
        return f"'{path}' is a file, not a directory"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return f"an empty directory '{path}'"
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def layout_error(spec: str, root: Path, expected: str, layout: str, hint: str | None = None) -> DataError:
    """The error for a root not laid out as ``layout``: what was expected, what is there."""
    return DataError(f"data set '{spec}' at '{root}': expected {expected} ({layout}); "
                     f"found: {listing(root)}", hint=hint)


def require_root(spec: str, root: str | Path | None, expected: str, layout: str) -> Path:
    """``root`` as a Path, or the error for a data set that needs one and got none."""
    if root is None or str(root) == "":
        raise DataError(f"data set '{spec}' needs a data root: expected {expected} ({layout})",
                        hint="pass --data-root DIR")
    return Path(root).expanduser()


def inside_root(spec: str, root: Path, relative: str, where: str) -> str:
    """``root / relative`` as a string, or a DataError when ``relative`` is absolute or leaves
    ``root`` (``../``): a split file may only name images under its data set's directory."""
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise DataError(f"data set '{spec}': {where}: image path '{relative}' leaves the data root",
                        hint=f"image paths are relative to {root} and stay inside it")
    return str(root / relative)


def check_split(spec: str, split: str, allowed: Sequence[str]) -> None:
    """Raise for a split the format does not have."""
    if split not in allowed:
        raise DataError(f"data set '{spec}' has no split '{split}'; its splits: {', '.join(allowed)}",
                        hint=did_you_mean(split, allowed))
