"""The uint8 loading path (:mod:`utdsl.runtime.data.loading`): the same images as the PIL pipeline
within rounding (within one 0-255 step on a photograph), the same crop boxes and draws, seeded
per sample without touching global state, batches laid out as rows of pixels and normalised where
the model runs; the default worker count (affinity, cgroup quota, processes of the node)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from utdsl.errors import DataError
from utdsl.runtime.data import build_dataset, build_transforms
from utdsl.runtime.data.cached import make_loader
from utdsl.runtime.data.loading import DeviceBatches, TensorPipeline, crop_params
from utdsl.runtime.data.workers import cpu_quota, default_workers
from utdsl.runtime.distributed import EpochSampler, SeededDataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: one 0-255 step of rounding, normalised
STEP = 1.0 / 255 / min(STD) + 1e-6


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ImageFolder tree of 12 JPEGs of assorted sizes (and one PNG) in 3 classes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(12):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.{'png' if i == 5 else 'jpg'}", quality=90)
    return root


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """An ImageFolder tree of one photograph (matplotlib's Grace Hopper, 512x600)."""
    from matplotlib import cbook

    root = tmp_path_factory.mktemp("photo")
    (root / "train" / "a").mkdir(parents=True)
    shutil.copy(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), root / "train" / "a" / "x.jpg")
    return root


def _pair(tree, train: bool, size: int = 32, **options):
    pil = build_dataset("folder", tree, "train", build_transforms(size, train, MEAN, STD, **options))
    fast = build_dataset("folder", tree, "train", build_transforms(size, train, MEAN, STD, tensor=True, **options))
    assert isinstance(fast.transform, TensorPipeline)
    return pil, fast


@pytest.mark.parametrize("train, options", [
    (True, {}),                                           # random-resized crop and flip
    (True, dict(random_crop=False, hflip=True, crop_pct=1.0)),
    (False, {}),                                          # resize to 36, center crop 32
    (False, dict(crop_pct=1.0)),
])
def test_same_images_as_the_pil_pipeline(tree, train, options):
    pil, fast = _pair(tree, train, **options)
    seeded_pil, seeded_fast = SeededDataset(pil, 3), SeededDataset(fast, 3)
    for index in range(len(pil)):
        a, label_a = seeded_pil[(1, index)]
        b, label_b = seeded_fast[(1, index)]
        assert label_a == label_b and a.shape == b.shape == (3, 32, 32)
        # the resize kernels round differently: 1 step of 0-255 on a photo; on random noise a few
        # where a small crop is enlarged, a mean under half a step
        difference = (a - b).abs()
        assert difference.max() <= 8 * STEP and difference.mean() <= 0.5 * STEP, index


@pytest.mark.parametrize("train, options", [(True, {}), (False, {}), (False, dict(crop_pct=1.0))])
def test_a_photograph_is_within_one_step_of_the_pil_pipeline(photo, train, options):
    pil, fast = _pair(photo, train, 64, **options)
    seeded_pil, seeded_fast = SeededDataset(pil, 0), SeededDataset(fast, 0)
    for epoch in range(12 if train else 1):
        a, b = seeded_pil[(epoch, 0)][0], seeded_fast[(epoch, 0)][0]
        assert (a - b).abs().max() <= STEP, epoch


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (40, 90), (8, 200), (200, 8), (1, 1)])
def test_crop_boxes_are_torchvisions(height, width):
    """The boxes of RandomResizedCrop.get_params, seed for seed: the PIL pipeline's crop regions
    (narrow images take its fallback center crop)."""
    image = torch.empty(3, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        got = crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
        assert got == tuple(want), seed


def test_a_seed_gives_one_image(tree):
    _, fast = _pair(tree, True)
    again = [torch.equal(fast.uint8_item(i, torch.Generator().manual_seed(7))[0],
                         fast.uint8_item(i, torch.Generator().manual_seed(7))[0]) for i in range(len(fast))]
    other = [torch.equal(fast.uint8_item(i, torch.Generator().manual_seed(7))[0],
                         fast.uint8_item(i, torch.Generator().manual_seed(8))[0]) for i in range(len(fast))]
    assert all(again) and not all(other)


def test_images_and_batches_are_rows_of_pixels(tree):
    """An item is a (3, H, W) view of (H, W, 3) rows, a raw batch (B, H, W, 3) uint8, and the
    normalised batch plain contiguous float32 (B, 3, H, W)."""
    _, fast = _pair(tree, True)
    image, _ = fast.uint8_item(0, torch.Generator().manual_seed(0))
    assert image.shape == (3, 32, 32) and image.permute(1, 2, 0).is_contiguous()
    loader = make_loader(fast, EpochSampler(len(fast), seed=0, epoch=0), batch_size=4, device=torch.device("cpu"))
    raw, _ = next(iter(loader.loader))
    assert raw.dtype == torch.uint8 and raw.shape == (4, 32, 32, 3) and raw.is_contiguous()
    images, _ = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and images.is_contiguous()


def test_loader_batches_are_the_seeded_items(tree):
    _, fast = _pair(tree, True)
    sampler = EpochSampler(len(fast), seed=0, epoch=2)
    loader = make_loader(fast, sampler, batch_size=5, seed=9, device=torch.device("cpu"))
    assert isinstance(loader, DeviceBatches) and len(loader) == 3
    seeded = SeededDataset(fast, 9)
    keys = list(sampler)
    got = torch.cat([images for images, _ in loader])
    want = torch.stack([seeded[key][0] for key in keys])
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_loader_workers_draw_what_the_main_process_draws(tree):
    _, fast = _pair(tree, True)
    batches = []
    for workers in (0, 2):
        loader = make_loader(fast, EpochSampler(len(fast), seed=0, epoch=0), batch_size=4, seed=1,
                             num_workers=workers, device=torch.device("cpu"))
        batches.append(torch.cat([images for images, _ in loader]))
    assert torch.equal(*batches)


def test_no_global_random_state_is_touched(tree):
    _, fast = _pair(tree, True)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    fast.uint8_item(0, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)


def test_unreadable_image_is_a_data_error(tree, tmp_path):
    bad = tmp_path / "bad"
    (bad / "train" / "c").mkdir(parents=True)
    (bad / "train" / "c" / "x.jpg").write_bytes(b"not a jpeg")
    data = build_dataset("folder", bad, "train", build_transforms(32, True, tensor=True))
    with pytest.raises(DataError, match="cannot read image"):
        data.uint8_item(0, torch.Generator())


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr("utdsl.runtime.data.workers.cpu_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 1
    monkeypatch.setattr("utdsl.runtime.data.workers.cpu_quota", lambda: 2.5)   # a container's --cpus 2.5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 3


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "250000 100000\n"}, 2.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota_of_the_cgroup(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(str(tmp_path)) == quota
