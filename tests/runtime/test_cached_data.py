"""The cached data mode (``data_cache``): images decoded and resized once into uint8 tensors,
batches made on tensors; equal to the PIL pipeline where no random crop is drawn."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import utdsl
from trainkit import fast_recipe, trainable
from utdsl.errors import DataError
from utdsl.runtime.data import build_dataset, build_transforms
from utdsl.runtime.data import cached as cached_mod
from utdsl.runtime.data.cached import CachedLoader, cache_dataset
from utdsl.runtime.distributed import EpochSampler, SeededDataset
from utdsl.runtime.rundir import RunDir
from utdsl.runtime.train import fit

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def vtab(tmp_path_factory):
    """A VTAB-1k task of 10 JPEG and PNG images of assorted shapes."""
    root = tmp_path_factory.mktemp("vtab")
    task = root / "cifar" / "images"
    task.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(10):
        height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        name = f"{i}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(task / name)
        lines.append(f"images/{name} {i % 4}")
    for split in ("train800val200", "train800", "val200", "test"):
        (root / "cifar" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _pair(root, *, train, size=16, **options):
    plain = build_dataset("vtab:cifar", root, "test", build_transforms(size, train, MEAN, STD, **options))
    return plain, cache_dataset(plain, size=size, train=train, mean=MEAN, std=STD, **options)


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_evaluation_batches_equal_the_pil_pipeline(vtab, crop_pct):
    plain, cached = _pair(vtab, train=False, crop_pct=crop_pct)
    assert cached.images.dtype == torch.uint8 and tuple(cached.images.shape) == (10, 3, 16, 16)
    images, targets = cached.batch(range(10))
    expected = torch.stack([plain[i][0] for i in range(10)])
    assert torch.equal(images, expected) and targets.tolist() == [i % 4 for i in range(10)]
    assert torch.equal(cached[3][0], plain[3][0]) and cached[3][1] == 3


def test_training_flips_equal_pil_flips(vtab):
    plain, cached = _pair(vtab, train=True, random_crop=False, hflip=True, crop_pct=1.0)
    unflipped = torch.stack([build_dataset("vtab:cifar", vtab, "test", build_transforms(
        16, False, MEAN, STD, crop_pct=1.0))[i][0] for i in range(10)])
    images, _ = cached.batch(range(10), torch.Generator().manual_seed(4))
    flips = torch.rand(10, generator=torch.Generator().manual_seed(4)) < 0.5
    assert 0 < int(flips.sum()) < 10
    assert torch.equal(images, torch.where(flips.view(-1, 1, 1, 1), unflipped.flip(-1), unflipped))
    # the PIL pipeline's own flip of a sample is the same tensor
    seeded = SeededDataset(plain, seed=0)
    for index in range(10):
        image = seeded[(0, index)][0]
        assert torch.equal(image, unflipped[index]) or torch.equal(image, unflipped[index].flip(-1))


def test_random_resized_crops_follow_the_sampling_rules(vtab):
    _, cached = _pair(vtab, train=True, random_crop=True, hflip=True, crop_pct=0.875)
    assert tuple(cached.images.shape[-2:]) == (18, 18)  # floor(16 / 0.875)
    boxes = cached._crop_boxes(500, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 18) & (left + w <= 18) & (h >= 1) & (w >= 1)).all())
    area = (h * w) / 18 ** 2
    assert 0.05 < float(area.min()) and float(area.max()) <= 1.0 and 0.4 < float(area.mean()) < 0.7
    a, _ = cached.batch([1, 2, 3], torch.Generator().manual_seed(9))
    b, _ = cached.batch([1, 2, 3], torch.Generator().manual_seed(9))
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b)
    # a box covering the whole cache is the cache resampled to the output size
    whole = cached._resized_crops(cached.images[:1].float(), torch.tensor([[0.0, 0.0, 18.0, 18.0]]))
    expected = torch.nn.functional.interpolate(cached.images[:1].float(), size=16, mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-3)
    # a flip drawn with a crop mirrors the sampling grid: the flipped crop
    source = cached.images[:1].float()
    box = torch.tensor([[2.0, 3.0, 11.0, 9.0, 1.0], [2.0, 3.0, 11.0, 9.0, -1.0]])
    crops = cached._resized_crops(source.expand(2, -1, -1, -1), box)
    torch.testing.assert_close(crops[1], crops[0].flip(-1), rtol=0, atol=1e-4)
    boxes = cached.gather(range(10), torch.Generator().manual_seed(2))[1]
    assert boxes.shape == (10, 5) and set(boxes[:, 4].tolist()) == {-1.0, 1.0}


def test_the_loader_resumes_mid_epoch_with_the_same_batches(vtab):
    _, cached = _pair(vtab, train=True, random_crop=True, hflip=True, crop_pct=0.875)
    full = list(CachedLoader(cached, EpochSampler(10, seed=3, epoch=2), batch_size=4, seed=5))
    tail = list(CachedLoader(cached, EpochSampler(10, seed=3, epoch=2, start=4), batch_size=4, seed=5))
    assert len(full) == 3 and len(tail) == 2
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(full[1:], tail))


def _micro_vit():
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=32,
                             num_heads=2, num_classes=4)
    return utdsl.compile("lora", base, torch.zeros(2, 3, 16, 16), inplace=True)


def test_training_on_the_cache_equals_training_on_files(vtab, tmp_path):
    plain, cached = _pair(vtab, train=True, random_crop=False, hflip=False, crop_pct=1.0)
    models = {}
    for name, data in (("files", plain), ("cache", cached)):
        models[name] = _micro_vit()
        fit(models[name], data, data, fast_recipe(epochs=2, batch_size=4), RunDir(tmp_path / name))
    a, b = trainable(models["files"]), trainable(models["cache"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in r.items() if "throughput" not in k and "memory" not in k}
             for r in RunDir(tmp_path / name).read_metrics()] for name in ("files", "cache")]
    assert rows[0] == rows[1]


def test_a_cache_too_large_or_of_no_image_data_is_refused(vtab, monkeypatch):
    plain = build_dataset("vtab:cifar", vtab, "test", None)
    monkeypatch.setattr(cached_mod, "_available_bytes", lambda device: 2 * 10 * 3 * 16 * 16 - 2)
    with pytest.raises(DataError, match=r"caching 10 images at 16x16 takes 0.0 GiB, more than half"):
        cache_dataset(plain, size=16, train=False, mean=MEAN, std=STD)
    with pytest.raises(DataError, match="a TensorDataset cannot be cached"):
        cache_dataset(torch.utils.data.TensorDataset(torch.zeros(2, 3)), size=16, train=False, mean=MEAN, std=STD)
