"""Cached data mode (recipe field ``data_cache``): decode and resize every image once, keep the
split as one uint8 tensor ``(N, 3, S, S)`` in memory (``memory``) or on the training device
(``device``), and build batches on tensors, so small data sets (VTAB-1k's 1,000 images) are not
fed by PIL decoding.

What is cached is the deterministic part of the PIL pipeline of :func:`~.transforms.build_transforms`:
for evaluation and for training without random crops, exactly its resize (and center crop), so a
cached batch equals the uncached pipeline's images (same PIL resize, then the same ``/255`` and
normalisation). With random-resized crops the cache holds the image resized (shorter side) and
center-cropped to ``S = floor(size / crop_pct)`` (``size`` when ``crop_pct >= 1``); the crops
(torchvision's scale and ratio sampling) are cut from it and resized with bilinear
``grid_sample`` (no antialiasing), a flip being a mirrored sampling grid. Without crops, flips
are row copies of the uint8 batch (equal to PIL's flip).

Randomness: a batch's crops and flips come from a generator seeded with ``(seed, rank, epoch,
first index of the batch)`` (:class:`CachedLoader`), so a resumed run draws what the uninterrupted
one drew; one item read through ``__getitem__`` uses torch's global generator, which
:class:`~utdsl.runtime.distributed.SeededDataset` seeds per sample.

A cache that would take more than half of the memory available where it is to live (the host's
``MemAvailable``, or the GPU's free memory) is refused with a :class:`DataError` before any image
is decoded.
"""

from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from utdsl.errors import DataError

from .base import DatasetInfo

__all__ = ["CachedDataset", "CachedLoader", "build_cached", "cache_dataset", "cache_images", "make_loader"]


def _geometry(size: int, train: bool, random_crop: bool, crop_pct: float, interpolation: str) -> tuple[T.Compose, int]:
    """The PIL steps applied once, and the cached side S."""
    mode = InterpolationMode(interpolation)
    if train and random_crop:
        side = size if crop_pct >= 1.0 else math.floor(size / crop_pct)
        return T.Compose([T.Resize(side, interpolation=mode), T.CenterCrop(side)]), side
    if crop_pct >= 1.0:
        return T.Compose([T.Resize((size, size), interpolation=mode)]), size
    return T.Compose([T.Resize(math.floor(size / crop_pct), interpolation=mode), T.CenterCrop(size)]), size


def cache_images(dataset: Dataset, geometry, workers: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every image of ``dataset`` (items ``(PIL image, label)``) through ``geometry``, stacked as
    uint8 ``(N, 3, S, S)``, with the labels. Decoding runs on a thread pool (PIL releases the GIL)."""
    def load(index: int) -> tuple[np.ndarray, int]:
        image, label = dataset[index]
        return np.asarray(geometry(image.convert("RGB")), dtype=np.uint8), int(label)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        items = list(pool.map(load, range(len(dataset))))  # type: ignore[arg-type]
    images = torch.from_numpy(np.stack([pixels for pixels, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, [label for _, label in items]


class CachedDataset(Dataset):
    """A split held as uint8 tensors; items and batches are normalised float tensors.

    ``images`` is ``(N, 3, S, S)`` uint8; ``size`` the output side; ``train`` turns on
    ``random_crop`` (random-resized crop of ``scale``/``ratio``) and ``hflip``.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], info: DatasetInfo, *, size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool = False, random_crop: bool = False,
                 hflip: bool = False, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), on_device: bool = False):
        self.images = images
        self.targets = [int(t) for t in targets]
        self._targets = torch.tensor(self.targets, dtype=torch.long)
        self.info = info
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.random_crop = train and random_crop
        self.hflip = train and hflip
        self.scale, self.ratio = scale, ratio
        self.on_device = on_device

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> "CachedDataset":
        """Move the cache (and the normalisation constants) to ``device``; returns self."""
        self.images = self.images.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __getitem__(self, index: int):
        images, _ = self.batch([index])
        return images[0].cpu(), self.targets[index]

    # batches -------------------------------------------------------------------------------
    def _crop_boxes(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(n, 4)`` boxes ``(top, left, height, width)`` sampled as RandomResizedCrop does
        (10 tries a sample, then the central crop of the clamped ratio)."""
        side, tries = self.images.shape[-1], 10
        area = side * side
        target = area * torch.empty(n, tries).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                   generator=generator)
        aspect = torch.exp(log_ratio)
        width = torch.sqrt(target * aspect).round()
        height = torch.sqrt(target / aspect).round()
        ok = (width > 0) & (width <= side) & (height > 0) & (height <= side)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        h = torch.where(first >= 0, height[rows, first.clamp(min=0)], torch.tensor(float(side)))
        w = torch.where(first >= 0, width[rows, first.clamp(min=0)], torch.tensor(float(side)))
        top = torch.floor(torch.rand(n, generator=generator) * (side - h + 1))
        left = torch.floor(torch.rand(n, generator=generator) * (side - w + 1))
        return torch.stack([top, left, h, w], 1)

    def _resized_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        side = images.shape[-1]
        top, left, h, w = (boxes[:, i].to(images.device) for i in range(4))
        mirror = boxes[:, 4].to(images.device) if boxes.shape[1] > 4 else torch.ones_like(w)
        theta = torch.zeros(len(images), 2, 3, device=images.device)
        theta[:, 0, 0] = mirror * w / side  # -1: the crop flipped left-right, as a flip after the crop
        theta[:, 0, 2] = (2 * left + w) / side - 1
        theta[:, 1, 1] = h / side
        theta[:, 1, 2] = (2 * top + h) / side - 1
        grid = F.affine_grid(theta, [len(images), 3, self.size, self.size], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def gather(self, indices: Sequence[int], generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The uint8 images of ``indices`` and, with random crops, the boxes drawn for them
        (``(n, 5)``: top, left, height, width, and -1 where the crop is to be flipped, else 1);
        without random crops the images come flipped where drawn and the boxes are None. This is
        the part of a batch done where the cache lives."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        # index_select copies whole rows (advanced indexing is ~20x slower on a uint8 CPU tensor)
        images = torch.index_select(self.images, 0, index.to(self.images.device))
        flips = torch.rand(len(index), generator=generator) < 0.5 if self.hflip else None
        if self.random_crop:  # a flip of the crop is a mirrored sampling grid: nothing to move here
            boxes = self._crop_boxes(len(index), generator)
            mirror = 1.0 - 2.0 * flips.float() if flips is not None else torch.ones(len(index))
            return images, torch.cat([boxes, mirror[:, None]], 1)
        if flips is not None and bool(flips.any()):
            rows = flips.nonzero().flatten().to(images.device)
            images.index_copy_(0, rows, images.index_select(0, rows).flip(-1))
        return images, None

    def finish(self, images: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """uint8 images (on any device) -> cropped, normalised float32 images on that device. The
        steps are ToTensor's and Normalize's (``x / 255``, ``- mean``, ``/ std``, each rounded to
        float32), so the values are bitwise theirs."""
        images = images.div(255)  # uint8 -> float32 and the division in one pass
        if boxes is not None:
            images = self._resized_crops(images, boxes)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.sub_(mean).div_(std)

    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (normalised float32, ``(B, 3, size, size)``) and labels of ``indices``, augmented
        as the split says, drawing from ``generator`` (else torch's global one). The uint8 batch
        moves to ``device`` (default: the cache's) before it is converted, cropped and normalised."""
        images, boxes = self.gather(indices, generator)
        if device is not None:
            images = images.to(device, non_blocking=True)
        targets = self._targets[torch.as_tensor(list(indices), dtype=torch.long)].to(images.device)
        return self.finish(images, boxes), targets


class CachedLoader:
    """Batches of a :class:`CachedDataset` in the order of ``sampler`` (``(epoch, index)`` pairs,
    as :class:`~utdsl.runtime.distributed.EpochSampler` yields them); each batch's randomness is
    seeded from ``(seed, epoch, its first index)``."""

    def __init__(self, dataset: CachedDataset, sampler, batch_size: int, seed: int = 0,
                 device: torch.device | None = None, rank: int = 0):
        self.dataset, self.sampler, self.batch_size, self.seed = dataset, sampler, batch_size, seed
        self.device, self.rank = device, rank
        if dataset.on_device and device is not None and dataset.images.device != device:
            dataset.to(device)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from ..distributed import mix_seed

        keys = list(self.sampler)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            epoch, first = chunk[0]
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, first))
            yield self.dataset.batch([index for _, index in chunk], generator, self.device)


def make_loader(dataset: Dataset, sampler, *, batch_size: int, seed: int = 0, num_workers: int = 0,
                device: torch.device | None = None, rank: int = 0, decode: str = "workers"):
    """The loader the training loop and evaluation iterate: a :class:`CachedLoader` for a cached
    split, the uint8 loader of :mod:`.loading` for image files read through its pipeline (with
    ``decode="device"``, :mod:`.device_decode`'s: decoded on ``device``), else a ``DataLoader``
    over ``SeededDataset(dataset, seed)`` with ``sampler`` (its worker processes ignore SIGINT:
    the loop handles Ctrl-C)."""
    if isinstance(dataset, CachedDataset):
        return CachedLoader(dataset, sampler, batch_size, seed, device, rank)
    from ..distributed import SeededDataset
    from ..guard import ignore_sigint
    from .loading import uint8_loader, uses_uint8

    worker_init_fn = ignore_sigint if num_workers else None
    if uses_uint8(dataset):
        if decode == "device":
            from .device_decode import device_decode_loader

            return device_decode_loader(dataset, sampler, batch_size=batch_size, seed=seed, num_workers=num_workers,
                                        device=device, worker_init_fn=worker_init_fn)
        return uint8_loader(dataset, sampler, batch_size=batch_size, seed=seed, num_workers=num_workers,
                            device=device, worker_init_fn=worker_init_fn)

    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=device is not None and device.type == "cuda",
                      worker_init_fn=worker_init_fn)


def _available_bytes(device: torch.device | None) -> int | None:
    """Free memory where a cache would live: the GPU's, else the host's ``MemAvailable``."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_room(count: int, side: int, where: torch.device | None, what: str) -> None:
    need = count * 3 * side * side
    free = _available_bytes(where)
    if free is not None and need > free // 2:
        place = f"{where}" if where is not None and where.type == "cuda" else "host memory"
        raise DataError(f"{what}: caching {count} images at {side}x{side} takes {need / 2**30:.1f} GiB, more than "
                        f"half of the {free / 2**30:.1f} GiB free in {place}",
                        hint="use data_cache=memory (host) for a GPU, or data_cache=off for a split this large")


def cache_dataset(dataset: Dataset, *, size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                  random_crop: bool = False, hflip: bool = False, crop_pct: float = 1.0,
                  interpolation: str = "bicubic", device: torch.device | None = None,
                  workers: int | None = None) -> CachedDataset:
    """``dataset`` (an image data set of this package, its ``transform`` ignored) decoded and
    resized once into a :class:`CachedDataset` with the augmentation and normalisation given.
    With ``device`` the cache lives there (``data_cache = "device"``)."""
    if not hasattr(dataset, "transform") or not hasattr(dataset, "info"):
        raise DataError(f"a {type(dataset).__name__} cannot be cached (data_cache needs an image data set)",
                        hint="use data_cache=off")
    raw = copy.copy(dataset)
    raw.transform = None
    geometry, side = _geometry(size, train, random_crop, crop_pct, interpolation)
    _check_room(len(raw), side, device, f"data set '{dataset.info.spec}' [{dataset.info.split}]")
    images, targets = cache_images(raw, geometry, workers)
    cached = CachedDataset(images, targets, dataset.info, size=size, mean=mean, std=std, train=train,
                           random_crop=random_crop, hflip=hflip, on_device=device is not None)
    return cached.to(device) if device is not None else cached


def build_cached(spec: str, root, split: str, *, size: int, train: bool, mean: Sequence[float],
                 std: Sequence[float], random_crop: bool = False, hflip: bool = False, crop_pct: float = 1.0,
                 interpolation: str = "bicubic", device: torch.device | None = None,
                 workers: int | None = None) -> CachedDataset:
    """The split ``split`` of data set ``spec`` (see :func:`~.registry.build_dataset`), decoded
    and resized once into a :class:`CachedDataset` (see :func:`cache_dataset`)."""
    from .registry import build_dataset

    return cache_dataset(build_dataset(spec, root, split, None), size=size, train=train, mean=mean, std=std,
                         random_crop=random_crop, hflip=hflip, crop_pct=crop_pct, interpolation=interpolation,
                         device=device, workers=workers)
