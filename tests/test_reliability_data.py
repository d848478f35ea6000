"""Issue 11, data and run files: unreadable images are listed before training (or skipped),
worker errors come without the worker's traceback, split files cannot leave the data root,
malformed CIFAR labels and VTAB lines are clean errors, a one-class data set warns, damaged
metrics lines are skipped, stale temporary files go on resume, files follow the umask."""

from __future__ import annotations

import json
import os
import pickle
import stat

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from utdsl.errors import DataError

MICRO = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
         "--model-arg", "num_heads=2", "--model-arg", "patch_size=8", "--input-size", "16",
         "--num-workers", "0", "--no-progress", "--batch-size", "4", "--epochs", "1"]


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder root: classes a and b, 4 train and 2 test images each."""
    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate("ab"):
            for i in range(count):
                _png(root / split / name / f"{i}.png", 40 + 150 * label + i)
    return root


def _spoil(root):
    (root / "train" / "a" / "1.png").write_bytes(b"not an image at all")
    good = (root / "train" / "b" / "2.png").read_bytes()
    (root / "train" / "b" / "2.png").write_bytes(good[: len(good) // 2])
    return [root / "train" / "a" / "1.png", root / "train" / "b" / "2.png"]


def test_bad_images_are_listed_before_training(tmp_path, folder, cli):
    bad = _spoil(folder)
    out = tmp_path / "run"
    code, _, err = cli("train", "lora", *MICRO, "--data", "folder", "--data-root", str(folder), "--out", str(out))
    assert code == 2 and "Traceback" not in err
    assert "error: data set 'folder' [train]: 2 of 8 images cannot be read:" in err
    assert f"    {bad[0]}: cannot identify image file" in err
    assert f"    {bad[1]}: " in err
    assert "--bad-images skip" in err and not (out / "metrics.jsonl").exists()


def test_bad_images_skip_trains_on_the_rest(tmp_path, folder, cli):
    bad = _spoil(folder)
    out = tmp_path / "run"
    code, out_text, err = cli("train", "lora", *MICRO, "--data", "folder", "--data-root", str(folder),
                              "--bad-images", "skip", "--out", str(out))
    assert code == 0, err
    assert "2 of 8 images cannot be read; leaving them out (--bad-images skip)" in err
    assert str(bad[0]) in err
    assert "1 epochs, 2 steps" in out_text  # 6 images left, batches of 4


def test_missing_image_in_a_worker_is_reported_without_the_worker_traceback(tmp_path):
    from utdsl.runtime.data.base import DatasetInfo, ImageListDataset

    info = DatasetInfo("folder", "train", 2, 1, str(tmp_path), "test")
    dataset = ImageListDataset([(str(tmp_path / "gone.png"), 0)], None, info)
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(dataset, num_workers=1, collate_fn=lambda batch: batch)))
    text = str(caught.value)
    assert text == (f"error: data set 'folder': image '{tmp_path / 'gone.png'}' does not exist\n"
                    f"  hint: image paths are resolved under {tmp_path}")


def test_one_class_data_set_warns(tmp_path, folder, cli):
    import shutil

    for split in ("train", "test"):
        shutil.rmtree(folder / split / "b")
    code, _, err = cli("train", "lora", *MICRO, "--data", "folder", "--data-root", str(folder),
                       "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "warning: data set 'folder' [train] holds a single class (0): there is nothing to tell apart" in err


def test_fgvc_paths_leaving_the_root_are_errors(tmp_path):
    from utdsl.runtime.data import build_dataset

    root = tmp_path / "cub"
    _png(root / "images" / "x" / "0.png", 10)
    (root / "train.json").write_text(json.dumps({"x/0.png": 1, "../../../etc/passwd": 2}))
    with pytest.raises(DataError, match=r"train.json: image path '../../../etc/passwd' leaves the data root"):
        build_dataset("fgvc:cub", root, "train", None)
    (root / "train.json").write_text(json.dumps({"/etc/hostname": 1}))
    with pytest.raises(DataError, match=r"image path '/etc/hostname' leaves the data root"):
        build_dataset("fgvc:cub", root, "train", None)


@pytest.mark.parametrize("line, message", [
    (b"images/1.png \xc2\xb2", "expected 'relative/image/path label' (an integer label), got 'images/1.png \u00b2'"),
    (b"images/1.png 1e3", "expected 'relative/image/path label' (an integer label), got 'images/1.png 1e3'"),
    (b"images/\xff.png 1", "not UTF-8 text (byte 0xff at column 8)"),
    (b"../../x.png 1", "image path '../../x.png' leaves the data root"),
])
def test_malformed_vtab_lines_are_errors_with_their_line(tmp_path, line, message):
    from utdsl.runtime.data import build_dataset

    task = tmp_path / "vtab" / "dtd"
    _png(task / "images" / "0.png", 1)
    (task / "train800.txt").write_bytes(b"images/0.png 0\n" + line + b"\n")
    with pytest.raises(DataError) as caught:
        build_dataset("vtab:dtd", tmp_path / "vtab", "train800", None)
    assert str(caught.value) == f"error: data set 'vtab:dtd': {task / 'train800.txt'}:2: {message}" \
        or str(caught.value).startswith(f"error: data set 'vtab:dtd': {task / 'train800.txt'}:2: {message}")


@pytest.mark.parametrize("labels, message", [
    (["x", 1], "fine_labels[0] is 'x', not an integer"),
    ([0, None], "fine_labels[1] is None, not an integer"),
    (7, "fine_labels is a int, not a list of integers"),
])
def test_malformed_cifar_labels_are_errors(tmp_path, labels, message):
    from utdsl.runtime.data import build_dataset

    base = tmp_path / "cifar-100-python"
    base.mkdir()
    with open(base / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, handle)
    with open(base / "train", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3072), dtype=np.uint8), "fine_labels": labels}, handle)
    with pytest.raises(DataError) as caught:
        build_dataset("cifar100", tmp_path, "train", None)
    assert str(caught.value).startswith(f"error: data set 'cifar100': '{base / 'train'}': {message}")


@pytest.fixture
def run(tmp_path, folder, cli):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        code, _, err = cli("train", "lora", *MICRO, "--data", "folder", "--data-root", str(folder),
                           "--out", str(out))
    finally:
        os.umask(previous)
    assert code == 0, err
    return out


def test_run_files_and_checkpoints_follow_the_umask(run):
    for path in (run / "config.json", run / "metrics.jsonl", run / "checkpoints" / "last.safetensors",
                 run / "checkpoints" / "best.safetensors", run / "checkpoints" / "state.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_non_utf8_metrics_lines_are_skipped_by_plot_and_resume(run, cli):
    with open(run / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"kind": "step", "step": 1, "loss": \xff}\n\xfe\xfe\n')
    code, out, err = cli("plot", str(run))
    assert code == 0, err
    assert (run / "curves.png").is_file()
    code, _, err = cli("train", "--resume", str(run), "--num-workers", "0", "--no-progress")
    assert code == 0, err
    assert b"\xff" not in (run / "metrics.jsonl").read_bytes()


def test_stale_temporary_files_are_removed_on_resume(run, cli):
    stale = [run / ".metrics.jsonl.abc123.tmp", run / "checkpoints" / ".state.safetensors.x1y2.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    code, _, err = cli("train", "--resume", str(run), "--num-workers", "0", "--no-progress")
    assert code == 0, err
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.safetensors", "last.safetensors", "state.safetensors"]
