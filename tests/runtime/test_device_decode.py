"""Decoding on the training device (recipe ``decode = "device"``, :mod:`utdsl.runtime.data.device_decode`),
run here with the CPU as the device: the same code a GPU runs, torchvision's decoder on the CPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from utdsl.errors import DataError
from utdsl.runtime.data import build_dataset, build_transforms
from utdsl.runtime.data.cached import make_loader
from utdsl.runtime.data.device_decode import DeviceDecodedBatches
from utdsl.runtime.distributed import EpochSampler

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: one 0-255 step, normalised
STEP = 1.0 / 255 / min(STD) + 1e-6
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of 14 images of assorted sizes in 3 classes: RGB JPEGs, a grey JPEG, a
    CMYK JPEG and a PNG (the last two decoded in the worker)."""
    root = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    for i in range(14):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image = {3: image.convert("L"), 7: image.convert("CMYK")}.get(i, image)
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:02d}.{'png' if i == 5 else 'jpg'}", quality=90)
    return root


def _data(root, **options):
    return build_dataset("folder", root, "train", build_transforms(32, True, MEAN, STD, tensor=True, **options))


def _epoch(data, decode: str, workers: int = 0, epoch: int = 1, device: torch.device = CPU):
    """One epoch's (images, labels), both on the CPU."""
    loader = make_loader(data, EpochSampler(len(data), seed=0, epoch=epoch), batch_size=5, seed=3,
                         num_workers=workers, device=device, decode=decode)
    images, labels = zip(*loader)
    return torch.cat(images).cpu(), torch.cat([torch.as_tensor(label) for label in labels])


@pytest.mark.parametrize("options", [
    {},                                                   # random-resized crop and flip
    dict(random_crop=False, crop_pct=1.0),                # resize to 32, flip
    dict(random_crop=False),                              # resize to 36, center crop 32, flip
])
def test_the_images_of_the_workers_pipeline_within_a_step(tree, options):
    data = _data(tree, **options)
    (workers, labels), (device, device_labels) = _epoch(data, "workers"), _epoch(data, "device")
    assert workers.shape == device.shape == (14, 3, 32, 32) and device.dtype == torch.float32
    assert torch.equal(labels, device_labels)
    difference = (workers - device).abs()
    # the float resize in two rounded passes against the uint8 kernel's fixed-point weights
    assert difference.max() <= 2 * STEP and difference.mean() <= 0.02 * STEP


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nvjpeg)")
def test_a_gpu_decodes_the_images_of_the_workers_pipeline(tmp_path):
    """nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a few steps where they differ,
    on a photograph (random noise would magnify them)."""
    from matplotlib import cbook

    root = tmp_path
    (root / "train" / "a").mkdir(parents=True)
    shutil.copy(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), root / "train" / "a" / "x.jpg")
    data = build_dataset("folder", root, "train", build_transforms(64, True, MEAN, STD, tensor=True))
    for epoch in range(8):
        workers = _epoch(data, "workers", epoch=epoch)[0]
        gpu = _epoch(data, "device", epoch=epoch, device=torch.device("cuda"))[0]
        difference = (workers - gpu).abs()
        assert difference.max() <= 8 * STEP and difference.mean() <= 0.5 * STEP, epoch


def test_crops_and_flips_are_drawn_as_the_workers_pipeline_draws_them(tree):
    """With nearest resampling the two paths compute the same pixels: equal batches mean equal
    boxes and flips, sample for sample, on every epoch."""
    data = _data(tree, interpolation="nearest")
    for epoch in range(3):
        assert torch.equal(_epoch(data, "workers", epoch=epoch)[0], _epoch(data, "device", epoch=epoch)[0])


def test_loader_processes_hand_over_what_the_main_process_computes(tree):
    data = _data(tree)
    assert torch.equal(_epoch(data, "device", workers=0)[0], _epoch(data, "device", workers=2)[0])


def test_jpegs_travel_encoded_and_other_files_finished(tree):
    data = _data(tree)
    loader = make_loader(data, EpochSampler(len(data), seed=0, epoch=0), batch_size=14, device=CPU, decode="device")
    assert isinstance(loader, DeviceDecodedBatches)
    samples, _ = next(iter(loader.loader))
    kinds = {sample.name.rsplit("/", 1)[-1]: (sample.geometry is None, tuple(sample.data.shape)) for sample in samples}
    assert kinds["05.png"] == (True, (32, 32, 3)) and kinds["07.jpg"] == (True, (32, 32, 3))   # PNG, CMYK
    encoded = [name for name, (finished, _) in kinds.items() if not finished]
    assert sorted(encoded) == [f"{i:02d}.jpg" for i in range(14) if i not in (5, 7)]
    assert all(len(kinds[name][1]) == 1 for name in encoded)   # the file's bytes


def test_a_file_the_device_cannot_decode_is_named(tree, tmp_path):
    root = tmp_path / "bad"
    (root / "train" / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "train" / "c" / name)
    whole = (root / "train" / "c" / "b.jpg").read_bytes()
    (root / "train" / "c" / "b.jpg").write_bytes(whole[:len(whole) // 2])     # a valid header, cut short
    with pytest.raises(DataError, match=r"cannot decode image '.*b\.jpg' on cpu: Image is incomplete or truncated"):
        _epoch(_data(root), "device")


def test_train_decodes_on_the_device_from_the_command_line(tree, cli, tmp_path):
    out = tmp_path / "run"
    code, out_text, err = cli("train", "bitfit", "--model", "vit_tiny_patch16_224", "--model-arg", "depth=1",
                       "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--model-arg", "patch_size=8",
                       "--input-size", "32", "--data", "folder", "--data-root", str(tree), "-o", "eval_split=",
                       "--epochs", "1", "--batch-size", "7", "--decode", "device", "--num-workers", "0",
                       "--no-progress", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    assert "decode=device on the CPU decodes in the training process" in out_text + err
    assert json.loads((out / "config.json").read_text())["recipe"]["decode"] == "device"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "epoch"] == [2]
    code, _, err = cli("train", "bitfit", "--data", "digits", "--decode", "gpu", "--device", "cpu")
    assert code == 2 and "decode: Input should be 'workers' or 'device'" in err
