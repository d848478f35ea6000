"""The uint8 loading path of image files: decode with ``torchvision.io``, crop, resize and flip uint8
tensors, move uint8 batches, convert and normalise them where the model runs.

:class:`TensorPipeline` is the tensor twin of :func:`~.transforms.build_transforms`: the same
geometry (random-resized crop of ``scale``/``ratio`` and a flip, or the evaluation resize and
center crop), the same random draws in the same order (torchvision's ``RandomResizedCrop`` and
``RandomHorizontalFlip`` on a given generator), the same decoder (libjpeg-turbo) and an
antialiased resize of the same kernel on uint8 (``F.interpolate(antialias=True)``: on photographs
within 1 of PIL's 0-255 values; on random noise, where a small crop is enlarged, within a few, a
mean under 0.3), so its images are those of the PIL pipeline up to that rounding. Per image it
costs about half the PIL pipeline (no float image on the CPU; the uint8 resize is vectorised), and
a batch crosses to the GPU as uint8, a quarter of the bytes.

Loading (:func:`uint8_loader`): each sample draws from its own generator seeded with
``mix_seed(seed, epoch, index)``, the seed :class:`~utdsl.runtime.distributed.SeededDataset` gives
torch's global generator, so a sample's augmentation is the one the PIL pipeline would draw, and a
resumed run draws what the uninterrupted one drew; no global random state is saved or restored.
:class:`DeviceBatches` moves each uint8 batch to the device and normalises it there (``x / 255``,
``- mean``, ``/ std``, as ToTensor and Normalize do).

:func:`default_workers`: loader processes by default, the cores this process may run on shared by
the processes of its node.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# torchvision 0.29 warns at every decode that its codecs will move to torchcodec; they are what
# this path is built on, at the pinned version, so the warning says nothing to a user
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

__all__ = ["TensorPipeline", "DeviceBatches", "uint8_loader", "default_workers"]

# torchvision 0.29 announces that torchcodec will take over image decoding; until it does, the
# notice would come with every image
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def default_workers() -> int:
    """Loader processes per training process: the cores this process may use (its CPU affinity)
    divided among the processes of its node (``LOCAL_WORLD_SIZE``, as torchrun sets it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity
        cores = os.cpu_count() or 1
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // processes)


class TensorPipeline:
    """Image file bytes (or a PIL image) -> uint8 ``(3, H, W)`` tensor, augmented as the PIL
    pipeline of :func:`~.transforms.build_transforms` with the same arguments; called as a
    transform it returns the normalised float image, as that pipeline does."""

    def __init__(self, size: tuple[int, int], train: bool, mean: Sequence[float], std: Sequence[float], *,
                 random_crop: bool = True, hflip: bool = True, crop_pct: float = 0.875,
                 interpolation: str = "bicubic", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.train = size, train
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_crop, self.hflip = train and random_crop, train and hflip
        self.crop_pct, self.scale, self.ratio = crop_pct, scale, ratio
        self.mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}[interpolation]
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:     # to loader workers: the per-device constants stay here
        return {**self.__dict__, "_constants": {}}

    def __repr__(self) -> str:
        return (f"TensorPipeline(size={self.size}, random_crop={self.random_crop}, hflip={self.hflip}, "
                f"crop_pct={self.crop_pct}, {self.mode}, mean={self.mean}, std={self.std})")

    def __call__(self, source: Any) -> torch.Tensor:
        """The normalised float32 image (torch's global generator draws the augmentation)."""
        return self.normalize(self.uint8(source).unsqueeze(0))[0]

    def uint8(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """``source`` (encoded bytes as a uint8 tensor, or a PIL image) decoded and augmented."""
        image = decode(source)
        height, width = image.shape[-2:]
        if self.random_crop:
            top, left, h, w = crop_params(height, width, self.scale, self.ratio, generator)
            out = self._resize(image[:, top:top + h, left:left + w], self.size)
        elif self.crop_pct >= 1.0:
            out = self._resize(image, self.size)
        else:
            out = self._center(image, height, width)
        if self.hflip and torch.rand(1, generator=generator) < 0.5:
            out = out.flip(-1)
        return out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` on any device -> float32 normalised there, as ToTensor and
        Normalize compute it."""
        constants = self._constants.get(images.device)
        if constants is None:
            constants = self._constants[images.device] = tuple(
                torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        mean, std = constants
        return images.div(255).sub_(mean).div_(std)

    def _center(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Resize (the shorter side to ``size / crop_pct``, as ``T.Resize(int)``) and center-crop."""
        out_h, out_w = self.size
        if out_h == out_w:
            short = math.floor(out_h / self.crop_pct)
            if height <= width:
                target = (short, int(short * width / height))
            else:
                target = (int(short * height / width), short)
        else:
            target = (math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct))
        resized = self._resize(image, target)
        top = int(round((resized.shape[-2] - out_h) / 2.0))
        left = int(round((resized.shape[-1] - out_w) / 2.0))
        return resized[:, top:top + out_h, left:left + out_w]

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        batch = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # the fast uint8 kernels
        if self.mode == "nearest":
            return F.interpolate(batch, size=size, mode="nearest")[0]
        return F.interpolate(batch, size=size, mode=self.mode, antialias=True, align_corners=False)[0]


def decode(source: Any) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB of encoded bytes (``torchvision.io.decode_image``; formats it does
    not read go through PIL) or of a PIL image."""
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(source, torch.Tensor):
        try:
            return decode_image(source, mode=ImageReadMode.RGB)
        except RuntimeError:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(source.numpy().tobytes())) as image:
                source = image.convert("RGB")
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(source.convert("RGB") if source.mode != "RGB" else source)


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, the same draws in the same order, from
    ``generator`` (None: torch's global one): (top, left, height, width)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Uint8Items(Dataset):
    """``dataset.uint8_item(index, generator)`` by ``(epoch, index)``, each from a generator of
    its own seeded with ``mix_seed(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        from ..distributed import mix_seed

        epoch, index = key
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        return self.dataset.uint8_item(index, generator)


class DeviceBatches:
    """A loader of uint8 batches yielding them moved to ``device`` and normalised there."""

    def __init__(self, loader: DataLoader, pipeline: TensorPipeline, device: torch.device | None):
        self.loader, self.pipeline, self.device = loader, pipeline, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
            yield self.pipeline.normalize(images), targets


def uses_uint8(dataset: Dataset) -> bool:
    """Whether ``dataset`` loads through :class:`TensorPipeline` (``uint8_item``)."""
    return isinstance(getattr(dataset, "transform", None), TensorPipeline) and hasattr(dataset, "uint8_item")


def uint8_loader(dataset: Dataset, sampler, *, batch_size: int, seed: int, num_workers: int,
                 device: torch.device | None, worker_init_fn=None) -> DeviceBatches:
    """Batches of ``dataset`` (a :func:`uses_uint8` one) in ``sampler``'s ``(epoch, index)``
    order: uint8 in the workers, pinned for a GPU, normalised on ``device``."""
    loader = DataLoader(_Uint8Items(dataset, seed), batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, pin_memory=device is not None and device.type == "cuda",
                        worker_init_fn=worker_init_fn)
    return DeviceBatches(loader, dataset.transform, device)
