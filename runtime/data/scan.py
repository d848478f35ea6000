"""A fast check of a data set's image files before training, and the ``--bad-images`` policy.

:func:`scan_images` opens every listed file of an image-list data set in a thread pool and reads
only what tells a usable image from a bad one: that it exists, that PIL recognises its header, and
its integrity where the format makes that cheap (PNG chunk checksums via ``verify()``, the JPEG
end-of-image marker). ``policy="error"`` raises one :class:`DataError` listing the bad files;
``"skip"`` returns the data set without them. In-memory data sets have nothing to scan.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

from PIL import Image

from utdsl.errors import DataError

__all__ = ["check_image", "scan_images", "warn_if_one_class"]

SHOWN = 10


def check_image(path: str) -> str | None:
    """Why ``path`` is not a readable image, or None when it looks fine."""
    try:
        with open(path, "rb") as handle:
            with Image.open(handle) as image:
                kind = image.format
                if kind == "PNG":
                    image.verify()
            if kind == "JPEG":
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 64))
                if b"\xff\xd9" not in handle.read():
                    return "truncated JPEG (no end-of-image marker)"
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "a directory"
    except Exception as error:  # noqa: BLE001 - PIL raises assorted types for damaged files
        text = str(error).strip().splitlines()
        return text[0] if text else type(error).__name__
    return None


def scan_images(dataset: Any, policy: str = "error", echo: Callable[[str], Any] | None = None,
                workers: int = 16) -> Any:
    """``dataset`` checked by :func:`check_image` (see the module docstring for ``policy``)."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return dataset
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(check_image, [path for path, _ in samples]))
    bad = [(samples[i][0], why) for i, why in enumerate(reasons) if why is not None]
    if not bad:
        return dataset
    info = dataset.info
    shown = "\n".join(f"    {path}: {why}" for path, why in bad[:SHOWN])
    more = f"\n    ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    what = f"data set '{info.spec}' [{info.split}]: {len(bad)} of {len(samples)} images cannot be read"
    if policy != "skip":
        raise DataError(f"{what}:\n{shown}{more}", hint="fix or remove them, or leave them out with --bad-images skip")
    if len(bad) == len(samples):
        raise DataError(f"{what}: all of them", hint="check --data-root")
    if echo is not None:
        echo(f"{what}; leaving them out (--bad-images skip):\n{shown}{more}")
    keep = [sample for sample, why in zip(samples, reasons) if why is None]
    return type(dataset)(keep, dataset.transform, replace(info, num_samples=len(keep)))


def warn_if_one_class(dataset: Any, echo: Callable[[str], Any] | None) -> None:
    """Warn when every training label is the same: the run can only learn a constant."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) and len(set(targets)) == 1 and echo is not None:
        info = getattr(dataset, "info", None)
        name = f"data set '{info.spec}' [{info.split}]" if info else "the training split"
        echo(f"{name} holds a single class ({targets[0]}): there is nothing to tell apart")
