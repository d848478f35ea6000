"""Training-pipeline images/s per core: utdsl's FGVC loader (uint8, device-decode and PIL paths) against a
plain torchvision ``ImageFolder`` with the same transforms, on a generated JPEG tree, in one process.

    .venv/bin/python benchmarks/data_loading.py                       # 256 images, 224 px, 7 rounds
    .venv/bin/python benchmarks/data_loading.py --images 512 --workers 2 --json data_loading.json
    .venv/bin/python benchmarks/data_loading.py --kind photos          # views of real photographs
    .venv/bin/python benchmarks/data_loading.py --device cuda          # decode=device by nvjpeg

The tree is CUB-like: ``--images`` JPEGs of 500x375 and 375x500 (``--quality`` 90) in 20 class
directories under ``ROOT/images``, with VPT's ``train.json``; ``ImageFolder`` reads the same files.
``--kind`` says what the pixels are:

- ``noise`` (the default): smooth colour fields with Gaussian noise (sigma 12 in each channel),
  ~80 kB, 3.4 bits a pixel at quality 90;
- ``photos``: views of the natural photographs that come with scikit-learn and matplotlib (China,
  a flower, Grace Hopper), shrunk by a random factor (never enlarged), cropped, flipped at random:
  ~54 kB, 2.3 bits a pixel at quality 90; ~77 kB, 3.3 at 95.

The noise is somewhat the harder to decode: ~1.75 ms an image against ~1.2 for the photos at
quality 90 and ~1.55 at 95, where they match its file size (its chroma noise makes many small
coefficients). It stays the default as the pessimistic figure, a real data set's files being
possibly larger than these photos' (CUB's average is ~90 kB, estimated from the size of its
archive, not measured here); the report gives the tree's size and bits a pixel, ``decode_only``
what decoding alone costs.

Each variant reads every image once a round (batches of 32 in the training sampler's order,
training augmentation: random-resized crop to 224 px, bicubic, and a flip):

- ``imagefolder``: ``torchvision.datasets.ImageFolder`` with utdsl's PIL training transform
  (``build_transforms``: crop, flip, ToTensor, Normalize) and a plain ``DataLoader``;
- ``fgvc_pil``: utdsl's FGVC data set with that transform through the training loader
  (``make_loader``: per-sample seeds, :class:`~utdsl.runtime.distributed.SeededDataset`);
- ``fgvc_uint8``: the FGVC data set with its training pipeline (:mod:`utdsl.runtime.data.loading`:
  decode by torchvision, uint8 crop and resize) through the training loader, yielding uint8 batches:
  a GPU run's loader work, the normalisation then being the GPU's;
- ``fgvc_uint8_cpu``: the same, normalised to float32 on the CPU (what training on the CPU gets);
- ``fgvc_device_workers``: the loader's work with ``decode = "device"`` (read each file, its size
  from the JPEG header, draw the crop and flip), what the CPU does per image when a GPU decodes;
- ``fgvc_device_on_cpu``: that whole path with the CPU as the device (the decode, a float resize
  in the training process): what it costs where no GPU takes the decode;
- ``decode_only``: reading and decoding each file (``torchvision.io``) and nothing else, the bound
  on any pipeline that decodes every image at full scale.

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


def _photos() -> list:
    """The natural photographs that ship with the project's dependencies (scikit-learn's two
    sample images, matplotlib's portrait of Grace Hopper), as RGB PIL images."""
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photos.append(image.convert("RGB"))
    return photos


def _photo_pixels(photo, width: int, height: int, rng):
    """A ``width`` x ``height`` view of ``photo``: turned where only that spares enlarging it,
    shrunk by a random factor (never enlarged), cropped at random, flipped half the time."""
    from PIL import Image

    def covers(w: int, h: int) -> bool:
        return w >= width and h >= height

    if not covers(*photo.size) and covers(photo.height, photo.width):
        photo = photo.transpose(Image.Transpose.ROTATE_90)
    fit = max(width / photo.width, height / photo.height)
    scale = fit * rng.uniform(1.0, max(1.0, min(1.0 / fit, 1.15)))
    size = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
    image = photo.resize(size, Image.Resampling.LANCZOS, reducing_gap=None)
    x, y = int(rng.integers(0, size[0] - width + 1)), int(rng.integers(0, size[1] - height + 1))
    image = image.crop((x, y, x + width, y + height))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def make_tree(root: Path, n: int, classes: int = 20, seed: int = 0, kind: str = "noise",
              quality: int = 90) -> Path:
    """``n`` CUB-like JPEGs under ``root/images/<class>/`` and ``root/train.json``; returns root.
    ``kind``: ``noise`` (colour fields with Gaussian noise) or ``photos`` (views of real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos() if kind == "photos" else None
    anno = {}
    for i in range(n):
        height, width = (375, 500) if i % 3 else (500, 375)
        if photos is not None:
            image = _photo_pixels(photos[i % len(photos)], width, height, rng)
        else:
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, (x + y) % 256], -1)
            image = Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))
        name = f"{i % classes:03d}.class/{i:05d}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / name, quality=quality)
        anno[name] = i % classes
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(anno))
    return root


def loaders(root: Path, size: int, batch: int, workers: int, device: str = "cpu") -> dict:
    """Each variant as a function running one epoch and returning the number of images
    (``decode_only`` only without ``workers``)."""
    import torch
    from torchvision.io import decode_jpeg, read_file
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
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return count

    def folder_epoch():
        order = [index for _, index in sampler(len(folder))]
        return run(DataLoader(folder, batch_size=batch, sampler=order, num_workers=workers))

    def uint8_epoch():
        loader = make_loader(fgvc_uint8, sampler(len(fgvc_uint8)), batch_size=batch, num_workers=workers)
        return run(loader.loader)   # the uint8 batches, before normalisation

    def decode_epoch():
        for path, _ in fgvc_uint8.samples:
            decode_jpeg(read_file(path))
        return len(fgvc_uint8)

    def device_loader():
        return make_loader(fgvc_uint8, sampler(len(fgvc_uint8)), batch_size=batch, num_workers=workers,
                           device=torch.device(device), decode="device")

    return {
        "imagefolder": folder_epoch,
        "fgvc_pil": lambda: run(make_loader(fgvc_pil, sampler(len(fgvc_pil)), batch_size=batch, num_workers=workers)),
        "fgvc_uint8": uint8_epoch,
        "fgvc_uint8_cpu": lambda: run(make_loader(fgvc_uint8, sampler(len(fgvc_uint8)), batch_size=batch,
                                                  num_workers=workers, device=torch.device("cpu"))),
        "fgvc_device_workers": lambda: run(device_loader().loader),   # file bytes, sizes and draws
        f"fgvc_device_on_{torch.device(device).type}": lambda: run(device_loader()),
        **({} if workers else {"decode_only": decode_epoch}),
    }


def tree_stats(root: Path) -> dict:
    """Mean file size (kB) and bits a pixel of the tree's JPEGs."""
    from PIL import Image

    files = sorted((root / "images").rglob("*.jpg"))
    size = sum(f.stat().st_size for f in files)
    pixels = 0
    for f in files:
        with Image.open(f) as image:
            pixels += image.width * image.height
    return {"files": len(files), "mean_kb": size / len(files) / 1e3, "bits_per_pixel": 8 * size / pixels}


def measure(args) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp), args.images, kind=args.kind, quality=args.quality)
        stats = tree_stats(root)
        fns = loaders(root, args.size, args.batch_size, 0, args.device)
        for fn in fns.values():      # warm up: page cache, imports, allocator
            fn()
        rates: dict[str, list[float]] = {name: [] for name in fns}
        walls: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start, wall = time.process_time(), time.perf_counter()
                count = fns[name]()
                rates[name].append(count / (time.process_time() - start))
                walls[name].append(count / (time.perf_counter() - wall))
        rows = {name: {"median": statistics.median(v), "min": min(v), "max": max(v),
                       "vs_imagefolder": statistics.median([a / b for a, b in zip(v, rates["imagefolder"])]),
                       "wall_median": statistics.median(walls[name])}
                for name, v in rates.items()}
        if args.workers:
            for name, fn in loaders(root, args.size, args.batch_size, args.workers, args.device).items():
                fn()
                start = time.perf_counter()
                count = fn()
                rows[name]["wall_images_per_s"] = count / (time.perf_counter() - start)
    return {"args": vars(args), "tree": stats, "rows": rows}


def report(result: dict) -> str:
    args, rows = result["args"], result["rows"]
    wall = f"| {args['workers']} workers, wall img/s " if args["workers"] else ""
    tree = result["tree"]
    lines = [f"{args['images']} JPEGs (500x375, {args['kind']}, quality {args['quality']}: {tree['mean_kb']:.0f} kB, "
             f"{tree['bits_per_pixel']:.2f} bits a pixel), {args['size']} px random-resized crop + flip, batch "
             f"{args['batch_size']}; images per second of process CPU time (one core), median (min-max) of "
             f"{args['rounds']} interleaved rounds", "",
             f"| pipeline | img/s per core | vs ImageFolder {wall}|",
             "|---|---:|---:|" + ("---:|" if wall else "")]
    for name, row in rows.items():
        extra = f"| {row['wall_images_per_s']:.0f} " if "wall_images_per_s" in row else "| - " if wall else ""
        lines.append(f"| {name} | {row['median']:.0f} ({row['min']:.0f}-{row['max']:.0f}) "
                     f"| {row['vs_imagefolder']:.2f}x {extra}|")
    lines.append("")
    for name, what in (("fgvc_uint8", "decoded by the workers"), ("fgvc_device_workers", "decoded on a GPU")):
        rate = rows[name]["median"]
        lines.append(f"FGVC training pipeline, {what}: {rate:.0f} img/s per core of loader work, target >= "
                     f"{TARGET}: {'PASS' if rate >= TARGET else 'FAIL'}")
    if args["device"] != "cpu":
        gpu = rows["fgvc_device_on_cuda"]
        lines.append(f"On the GPU (decode, crop, resize, normalise) in the training process: {gpu['median']:.0f} img/s "
                     f"per core of that process's CPU time, {gpu['wall_median']:.0f} img/s of wall time "
                     f"(median, one process, no loader workers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kind", choices=("noise", "photos"), default="noise",
                        help="the tree's pixels: colour fields with noise, or views of real photos")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the tree")
    parser.add_argument("--device", default="cpu", help="where decode=device decodes: cpu, cuda (nvjpeg)")
    parser.add_argument("--workers", type=int, default=0, help="also time a wall-clock epoch with N workers")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
