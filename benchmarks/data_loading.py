"""Training-pipeline images/s per core: utdsl's FGVC loader (uint8 path and PIL path) against a plain
torchvision ``ImageFolder`` with the same transforms, on a generated JPEG tree, in one process.

    .venv/bin/python benchmarks/data_loading.py                       # 256 images, 224 px, 7 rounds
    .venv/bin/python benchmarks/data_loading.py --images 512 --workers 2 --json data_loading.json

The tree is CUB-like: ``--images`` JPEGs of 500x375 and 375x500 (quality 90, smooth colour fields
with noise, so decoding does real work) in 20 class directories under ``ROOT/images``, with VPT's
``train.json``; ``ImageFolder`` reads the same files. Each variant reads every image once a round
(batches of 32 in the training sampler's order, training augmentation: random-resized crop to
224 px, bicubic, and a flip):

- ``imagefolder``: ``torchvision.datasets.ImageFolder`` with utdsl's PIL training transform
  (``build_transforms``: crop, flip, ToTensor, Normalize) and a plain ``DataLoader``;
- ``fgvc_pil``: utdsl's FGVC data set with that transform through the training loader
  (``make_loader``: per-sample seeds, :class:`~utdsl.runtime.distributed.SeededDataset`);
- ``fgvc_uint8``: the FGVC data set with its training pipeline (:mod:`utdsl.runtime.data.loading`:
  decode by torchvision, uint8 crop and resize) through the training loader, yielding uint8 batches:
  a GPU run's loader work, the normalisation then being the GPU's;
- ``fgvc_uint8_cpu``: the same, normalised to float32 on the CPU (what training on the CPU gets).

Rounds run the variants one after another in a rotated order; the figure is images per second of
process CPU time with ``num_workers=0`` and one torch thread, i.e. per core, which other processes
on a shared host disturb far less than wall time: the median and the min-max of ``--rounds``.
``--workers N`` also times one wall-clock epoch of each with N loader processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 900  # images/s per core of the FGVC training pipeline (issue 12)


def make_tree(root: Path, n: int, classes: int = 20, seed: int = 0) -> Path:
    """``n`` CUB-like JPEGs under ``root/images/<class>/`` and ``root/train.json``; returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    anno = {}
    for i in range(n):
        height, width = (375, 500) if i % 3 else (500, 375)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y) % 256], -1)
        pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        name = f"{i % classes:03d}.class/{i:05d}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name, quality=90)
        anno[name] = i % classes
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(anno))
    return root


def loaders(root: Path, size: int, batch: int, workers: int) -> dict:
    """Each variant as a function running one epoch and returning the number of images."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from utdsl.runtime.data import build_dataset, build_transforms
    from utdsl.runtime.data.cached import make_loader
    from utdsl.runtime.distributed import EpochSampler

    pil = build_transforms(size, train=True)
    folder = ImageFolder(str(root / "images"), transform=pil)
    fgvc_pil = build_dataset("fgvc:cub", root, "train", pil)
    fgvc_uint8 = build_dataset("fgvc:cub", root, "train", build_transforms(size, train=True, tensor=True))
    counter = {"epoch": 0}

    def sampler(n):
        counter["epoch"] += 1
        return EpochSampler(n, seed=0, epoch=counter["epoch"])

    def run(loader) -> int:
        count = 0
        for images, _ in loader:
            count += len(images)
        return count

    def folder_epoch():
        order = [index for _, index in sampler(len(folder))]
        return run(DataLoader(folder, batch_size=batch, sampler=order, num_workers=workers))

    def uint8_epoch():
        loader = make_loader(fgvc_uint8, sampler(len(fgvc_uint8)), batch_size=batch, num_workers=workers)
        return run(loader.loader)   # the uint8 batches, before normalisation

    return {
        "imagefolder": folder_epoch,
        "fgvc_pil": lambda: run(make_loader(fgvc_pil, sampler(len(fgvc_pil)), batch_size=batch, num_workers=workers)),
        "fgvc_uint8": uint8_epoch,
        "fgvc_uint8_cpu": lambda: run(make_loader(fgvc_uint8, sampler(len(fgvc_uint8)), batch_size=batch,
                                                  num_workers=workers, device=torch.device("cpu"))),
    }


def measure(args) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp), args.images)
        fns = loaders(root, args.size, args.batch_size, 0)
        for fn in fns.values():      # warm up: page cache, imports, allocator
            fn()
        rates: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start = time.process_time()
                count = fns[name]()
                rates[name].append(count / (time.process_time() - start))
        rows = {name: {"median": statistics.median(v), "min": min(v), "max": max(v),
                       "vs_imagefolder": statistics.median([a / b for a, b in zip(v, rates["imagefolder"])])}
                for name, v in rates.items()}
        if args.workers:
            for name, fn in loaders(root, args.size, args.batch_size, args.workers).items():
                fn()
                start = time.perf_counter()
                count = fn()
                rows[name]["wall_images_per_s"] = count / (time.perf_counter() - start)
    return {"args": vars(args), "rows": rows}


def report(result: dict) -> str:
    args, rows = result["args"], result["rows"]
    wall = f"| {args['workers']} workers, wall img/s " if args["workers"] else ""
    lines = [f"{args['images']} JPEGs (500x375), {args['size']} px random-resized crop + flip, batch "
             f"{args['batch_size']}; images per second of process CPU time (one core), median (min-max) of "
             f"{args['rounds']} interleaved rounds", "",
             f"| pipeline | img/s per core | vs ImageFolder {wall}|",
             "|---|---:|---:|" + ("---:|" if wall else "")]
    for name, row in rows.items():
        extra = f"| {row['wall_images_per_s']:.0f} " if "wall_images_per_s" in row else ""
        lines.append(f"| {name} | {row['median']:.0f} ({row['min']:.0f}-{row['max']:.0f}) "
                     f"| {row['vs_imagefolder']:.2f}x {extra}|")
    best = rows["fgvc_uint8"]["median"]
    lines.append(f"\nFGVC training pipeline (uint8): {best:.0f} img/s per core, target >= {TARGET}: "
                 f"{'PASS' if best >= TARGET else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=0, help="also time a wall-clock epoch with N workers")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
