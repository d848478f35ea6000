"""The uint8 loading path of image files: decode with ``torchvision.io``, crop, resize and flip uint8
tensors, move uint8 batches, convert and normalise them where the model runs.

:class:`TensorPipeline` is the tensor twin of :func:`~.transforms.build_transforms`: the same
geometry (random-resized crop of ``scale``/``ratio`` and a flip, or the evaluation resize and
center crop), the same random draws in the same order (torchvision's ``RandomResizedCrop`` and
``RandomHorizontalFlip`` on a given generator), the same decoder (libjpeg-turbo) and an
antialiased resize of the same kernel on uint8 (``F.interpolate(antialias=True)``: on a photograph
whose crop is shrunk, within 1 of PIL's 0-255 values; where a small crop is enlarged, within a
few, a mean under 0.3), so its images are those of the PIL pipeline up to that rounding.

Per image the work is a file read, a libjpeg-turbo decode, a crop (a row copy: the decoder's
output is height x width x RGB), one antialiased resize on channels-last uint8 and a flip; a
sample leaves the pipeline as a contiguous ``(H, W, 3)`` array, so a batch is a plain memory copy
of its samples and crosses to the GPU as uint8, a quarter of the float bytes, to be turned into
NCHW float32 there. On CUB-sized files (500x375) the decode is about two thirds of a sample's CPU
time and the resize a sixth. Decoding at a reduced DCT scale (``PIL.Image.draft``) is not used: it
keeps the output from being enlarged only where the crop is at least twice the output on each
side, which a 500x375 image never is at 224 px, and where it applies (1024x683 and 1600x1067
photographs at half scale) it saved 10-15% while moving pixels by up to ~25 levels, libjpeg's
Huffman decoding, which no scale skips, being most of the time. Where the loader's CPUs cannot keep
up, :mod:`.device_decode` moves the decode to the GPU, with the geometry :meth:`TensorPipeline.plan`
draws here.

Loading (:func:`uint8_loader`): each sample draws from its own generator seeded with
``mix_seed(seed, epoch, index)``, the seed :class:`~utdsl.runtime.distributed.SeededDataset` gives
torch's global generator, so a sample's augmentation is the one the PIL pipeline would draw, and a
resumed run draws what the uninterrupted one drew; no global random state is saved or restored.
:class:`DeviceBatches` moves each uint8 batch to the device and normalises it there (``x / 255``,
``- mean``, ``/ std``, as ToTensor and Normalize do).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# torchvision 0.29 warns at every decode that its codecs will move to torchcodec; they are what
# this path is built on, at the pinned version, so the warning says nothing to a user
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

__all__ = ["Geometry", "TensorPipeline", "DeviceBatches", "uint8_loader"]


class Geometry(NamedTuple):
    """What :class:`TensorPipeline` does to one image: cut ``crop`` (top, left, height, width;
    None: the whole image), resize to ``resize`` (height, width), cut ``center`` from that, flip."""

    crop: tuple[int, int, int, int] | None
    resize: tuple[int, int]
    center: tuple[int, int, int, int] | None
    flip: bool


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
        """``source`` (encoded bytes as a uint8 tensor, or a PIL image) decoded and augmented:
        uint8 ``(3, H, W)``, a view of a contiguous ``(H, W, 3)`` array (:meth:`hwc`)."""
        return self.hwc(source, generator).permute(2, 0, 1)

    def hwc(self, source: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`uint8` as the contiguous ``(H, W, 3)`` array it is computed in."""
        image = decode(source)                      # (H, W, 3) rows
        out = self.apply(image, self.plan(*image.shape[:2], generator))
        return out if out.is_contiguous() else out.contiguous()

    def plan(self, height: int, width: int, generator: torch.Generator | None = None) -> Geometry:
        """The geometry of an image of ``height`` x ``width``, its random draws (the crop box, then
        the flip) from ``generator`` (None: torch's global one) in the PIL pipeline's order."""
        crop = center = None
        if self.random_crop:
            crop, resize = crop_params(height, width, self.scale, self.ratio, generator), self.size
        elif self.crop_pct >= 1.0:
            resize = self.size
        else:
            resize = self._center_resize(height, width)
            out_h, out_w = self.size
            top, left = int(round((resize[0] - out_h) / 2.0)), int(round((resize[1] - out_w) / 2.0))
            center = (top, left, out_h, out_w)
        flip = self.hflip and torch.rand(1, generator=generator).item() < 0.5   # RandomHorizontalFlip's draw
        return Geometry(crop, tuple(resize), center, flip)

    def apply(self, image: torch.Tensor, geometry: Geometry, resize=None) -> torch.Tensor:
        """``(H, W, 3)`` rows cut, resized (by ``resize(image, size)``, default the uint8 one) and
        flipped as ``geometry`` says."""
        if geometry.crop is not None:
            top, left, h, w = geometry.crop
            image = image[top:top + h, left:left + w]
        image = (resize or self._resize)(image, geometry.resize)
        if geometry.center is not None:
            top, left, h, w = geometry.center
            image = image[top:top + h, left:left + w]
        return image.flip(1) if geometry.flip else image

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` of any layout on any device -> contiguous float32 normalised
        there, as ToTensor and Normalize compute it."""
        constants = self._constants.get(images.device)
        if constants is None:
            constants = self._constants[images.device] = tuple(
                torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        mean, std = constants
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        torch.div(images, 255, out=out)             # the layout change rides on the first pass
        return out.sub_(mean).div_(std)

    def _center_resize(self, height: int, width: int) -> tuple[int, int]:
        """The evaluation resize: the shorter side to ``size / crop_pct``, as ``T.Resize(int)``."""
        out_h, out_w = self.size
        if out_h != out_w:
            return math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        short = math.floor(out_h / self.crop_pct)
        return (short, int(short * width / height)) if height <= width else (int(short * height / width), short)

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(h, w, 3)`` uint8 (rows of any stride) -> ``(H, W, 3)``, contiguous unless unchanged."""
        if tuple(image.shape[:2]) == tuple(size):
            return image
        # channels-last uint8 is what the AVX2 antialiased kernels read: a contiguous (1, h, w, 3)
        batch = image.contiguous().unsqueeze(0).permute(0, 3, 1, 2)
        if self.mode == "nearest":
            out = F.interpolate(batch, size=size, mode="nearest")
        else:
            out = F.interpolate(batch, size=size, mode=self.mode, antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0)              # channels-last in, channels-last out


def decode(source: Any) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` RGB of encoded bytes (``torchvision.io``: libjpeg-turbo for JPEG, which
    writes rows of RGB pixels; formats it does not read go through PIL) or of a PIL image."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if isinstance(source, torch.Tensor):
        try:
            if source.numpy()[:2].tobytes() == b"\xff\xd8":      # a JPEG: no format sniffing
                image = decode_jpeg(source, mode=ImageReadMode.RGB)
            else:
                image = decode_image(source, mode=ImageReadMode.RGB)
            return image.permute(1, 2, 0)
        except RuntimeError:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(source.numpy().tobytes())) as image:
                source = image.convert("RGB")
    import numpy as np

    return torch.from_numpy(np.array(source.convert("RGB") if source.mode != "RGB" else source))


@functools.lru_cache(maxsize=8)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    log_ratio = torch.log(torch.tensor(ratio))     # float32, as torchvision computes it
    return float(log_ratio[0]), float(log_ratio[1])


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, the same draws in the same order, from
    ``generator`` (None: torch's global one): (top, left, height, width)."""
    area = height * width
    low, high = _log_ratio(tuple(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(low, high, generator=generator).item())
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


class SeededItems(Dataset):
    """:meth:`item` of ``dataset`` by ``(epoch, index)``, each from a generator of its own seeded
    with ``mix_seed(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        from ..distributed import mix_seed

        epoch, index = key
        return self.item(index, torch.Generator().manual_seed(mix_seed(self.seed, epoch, index)))

    def item(self, index: int, generator: torch.Generator):
        raise NotImplementedError


class _Uint8Items(SeededItems):
    """``dataset.uint8_item`` as a contiguous ``(H, W, 3)`` array: a batch of them is one memory
    copy a sample (a channels-last view is ~10x slower to stack)."""

    def item(self, index: int, generator: torch.Generator):
        image, label = self.dataset.uint8_item(index, generator)
        return image.permute(1, 2, 0).contiguous(), label    # (3, H, W) view -> its (H, W, 3) rows


class DeviceBatches:
    """A loader of uint8 ``(B, H, W, 3)`` batches yielding them moved to ``device`` and
    normalised there into float32 ``(B, 3, H, W)``."""

    def __init__(self, loader: DataLoader, pipeline: TensorPipeline, device: torch.device | None):
        self.loader, self.pipeline, self.device = loader, pipeline, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            images = images.permute(0, 3, 1, 2)      # a view; the copy to device keeps the rows
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
