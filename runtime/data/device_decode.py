"""Decoding on the training device (recipe ``decode = "device"``): the loader workers read each
file, its size from the JPEG header and draw its geometry; the training process decodes a batch's
JPEGs where the model runs, in one ``torchvision.io.decode_jpeg`` call (nvjpeg on a GPU), then
crops, resizes, flips and normalises them there.

A worker's work per image is then a file read, a header parse and the random draws, so the CPUs
stop being the bound that JPEG decoding makes them (a 500x375 file takes 1.3-1.7 ms to decode on one
core). The draws are those of the workers' pipeline (:meth:`~.loading.TensorPipeline.plan`, from
the sample's own generator), so a sample's crop and flip do not depend on where it is decoded, and
a resumed run draws what the uninterrupted one drew.

The resize runs on float32 in the two passes the uint8 kernel makes (along the width, then the
height), rounding and clamping to 0-255 after each as it does, since a GPU has no antialiased uint8
resize: on the CPU its images are within 2 of the workers' pipeline's 0-255 values. A GPU's decoder
(nvjpeg) may differ from libjpeg-turbo by a step or two. Files that are not JPEGs, or JPEGs that are
not RGB or grey (CMYK), are decoded and transformed in the worker, as the workers' pipeline does.
"""

from __future__ import annotations

import io
import re
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from utdsl.errors import DataError

from .loading import Geometry, SeededItems, TensorPipeline

__all__ = ["EncodedSample", "DeviceDecodedBatches", "device_decode_loader", "encode_sample"]

#: JPEG modes the device decoder reads (PIL's names): RGB and grey; CMYK is decoded in the worker
_DEVICE_MODES = ("RGB", "L")


class EncodedSample(NamedTuple):
    """One image as a worker hands it over: ``data`` is the file's bytes (uint8, 1-D) to decode with
    ``geometry`` to apply, or (``geometry`` None) the finished uint8 ``(H, W, 3)`` image; ``name``
    the file, for errors."""

    data: torch.Tensor
    geometry: Geometry | None
    name: str = ""


def encode_sample(pipeline: TensorPipeline, data: torch.Tensor, generator: torch.Generator | None,
                  name: str = "") -> EncodedSample:
    """``data`` (a file's bytes) as :class:`EncodedSample`: a JPEG the device reads keeps its bytes
    and gets its geometry from its header's size; anything else is transformed here."""
    size = _jpeg_size(data)
    if size is None:
        image = pipeline.hwc(data, generator)
        return EncodedSample(image, None, name)
    width, height = size
    return EncodedSample(data, pipeline.plan(height, width, generator), name)


def _jpeg_size(data: torch.Tensor) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder reads, from its header; None for other files."""
    from PIL import Image, UnidentifiedImageError

    raw = data.numpy()
    if raw[:2].tobytes() != b"\xff\xd8":
        return None
    try:
        with Image.open(io.BytesIO(raw.tobytes())) as image:
            return image.size if image.format == "JPEG" and image.mode in _DEVICE_MODES else None
    except (UnidentifiedImageError, OSError):
        return None     # the worker's decode reports it, with the file's name


class _EncodedItems(SeededItems):
    """``dataset.encoded_item`` from the sample's generator (the workers' pipeline's seed)."""

    def item(self, index: int, generator: torch.Generator):
        return self.dataset.encoded_item(index, generator)


def _collate(items: list[tuple[EncodedSample, Any]]) -> tuple[list[EncodedSample], torch.Tensor]:
    return [sample for sample, _ in items], torch.tensor([label for _, label in items])


class DeviceDecodedBatches:
    """A loader of lists of :class:`EncodedSample` yielding them decoded, transformed and
    normalised on ``device`` as float32 ``(B, 3, H, W)``."""

    def __init__(self, loader: DataLoader, pipeline: TensorPipeline, device: torch.device | None):
        self.loader, self.pipeline = loader, pipeline
        self.device = device if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for samples, targets in self.loader:
            yield self.batch(samples), targets

    def batch(self, samples: list[EncodedSample]) -> torch.Tensor:
        """``samples`` as one normalised float32 ``(B, 3, H, W)`` batch on the device."""
        decoded = iter(self._decode([sample for sample in samples if sample.geometry is not None]))
        out = torch.empty((len(samples), 3, *self.pipeline.size), dtype=torch.float32, device=self.device)
        for slot, sample in zip(out, samples):
            if sample.geometry is None:
                slot.copy_(sample.data.to(self.device, non_blocking=True).permute(2, 0, 1))
            else:
                image = self.pipeline.apply(next(decoded).permute(1, 2, 0), sample.geometry, self._resize)
                slot.copy_(image.permute(2, 0, 1))
        return self.pipeline.normalize(out)

    def _decode(self, jpegs: list[EncodedSample]) -> list[torch.Tensor]:
        """The JPEGs decoded on the device in one call; a file it cannot decode is a DataError
        naming it (found by decoding them one at a time)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not jpegs:
            return []
        try:
            return decode_jpeg([sample.data for sample in jpegs], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            for sample in jpegs:
                try:
                    decode_jpeg([sample.data], mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError as own:
                    raise DataError(f"cannot decode image '{sample.name}' on {self.device}: "
                                    f"{_reason(own)}", hint="decode=workers reads it with the CPU's decoder"
                                    ) from None
            raise DataError(f"cannot decode a batch of images on {self.device}: {_reason(error)}") from None

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(h, w, 3)`` rows (of any stride) -> ``(H, W, 3)`` float32 holding 0-255 integers: the
        uint8 antialiased resize in float32 (a GPU has no uint8 one), along the width, then the
        height, each pass rounded and clamped to 0-255 as the uint8 kernel's are (bicubic overshoots)."""
        batch = image.permute(2, 0, 1).unsqueeze(0).float()
        mode = self.pipeline.mode
        for pass_size in ((batch.shape[2], size[1]), tuple(size)):
            if tuple(batch.shape[2:]) == pass_size:
                continue
            if mode == "nearest":
                batch = F.interpolate(batch, size=pass_size, mode="nearest")
            else:
                batch = F.interpolate(batch, size=pass_size, mode=mode, antialias=True, align_corners=False)
                batch = batch.round_().clamp_(0, 255)
        return batch[0].permute(1, 2, 0)


def _reason(error: RuntimeError) -> str:
    """The decoder's own words of an error, without the function, source file and line that
    torchvision puts before them (``decode_jpeg, .../decode_jpeg.cpp:171, Image is ...``)."""
    return re.sub(r"^.*?\.(?:cpp|cu|h):\d+, ", "", str(error)).strip()


def device_decode_loader(dataset: Dataset, sampler, *, batch_size: int, seed: int, num_workers: int,
                         device: torch.device | None, worker_init_fn=None) -> DeviceDecodedBatches:
    """Batches of ``dataset`` (one whose items load through :class:`~.loading.TensorPipeline`) in
    ``sampler``'s ``(epoch, index)`` order: file bytes and geometries from the workers, decoded and
    transformed on ``device``."""
    loader = DataLoader(_EncodedItems(dataset, seed), batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, collate_fn=_collate, worker_init_fn=worker_init_fn)
    return DeviceDecodedBatches(loader, dataset.transform, device)
