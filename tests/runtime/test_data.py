"""Data sets: each format on a tiny tree built in tmp_path; lengths, labels, classes and the
exact errors for wrong roots."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms as T

from utdsl.errors import DataError
from utdsl.runtime.data import (DATASETS, DatasetInfo, build_dataset, build_transforms, describe,
                                list_datasets, model_data_config, needs_root, transforms_for_model)


def image(path, value: int = 0, size: int = 8) -> None:
    """A small solid image; the suffix picks PNG or JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(path)


def error_of(call, *args) -> tuple[str, str | None]:
    with pytest.raises(DataError) as info:
        call(*args)
    diagnostic = info.value.diagnostics[0]
    return diagnostic.message, diagnostic.hint


# ----------------------------------------------------------------------------- digits

def test_digits_splits_are_fixed_and_disjoint():
    sets = {split: build_dataset("digits", None, split, None) for split in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {"train": 1257, "val": 180, "test": 360}
    again = build_dataset("digits", None, "test", None)
    assert again.targets == sets["test"].targets
    assert sorted(set(sets["train"].targets)) == list(range(10))
    info = describe(sets["train"])
    assert info == DatasetInfo(spec="digits", split="train", num_classes=10, num_samples=1257,
                               source="sklearn.datasets.load_digits", layout="bundled with scikit-learn",
                               class_names=tuple("0123456789"), augment=False)
    picture, label = sets["val"][0]
    assert (picture.size, picture.mode, label) == ((8, 8), "RGB", sets["val"].targets[0])
    pixels = np.asarray(picture)
    assert pixels.max() <= 255 and (pixels[..., 0] == pixels[..., 2]).all()


def test_digits_upscaled_by_the_transform():
    data = build_dataset("digits", None, "train", build_transforms((3, 32, 32), train=False))
    tensor, label = data[5]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and isinstance(label, int)


# ----------------------------------------------------------------------------- CIFAR-100

def write_cifar(base, train_labels, test_labels, protocol=2):
    base.mkdir(parents=True)
    names = [f"class{i}" for i in range(100)]
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, f, protocol=protocol)
    for name, labels in (("train", train_labels), ("test", test_labels)):
        data = np.arange(len(labels) * 3072, dtype=np.int64).reshape(len(labels), 3072) % 251
        with open(base / name, "wb") as f:
            pickle.dump({"data": data.astype(np.uint8), "fine_labels": labels,
                         "coarse_labels": [0] * len(labels), "filenames": ["x.png"] * len(labels),
                         "batch_label": name}, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_reads_the_python_pickles(tmp_path, protocol):
    write_cifar(tmp_path / "cifar-100-python", [3, 1, 99, 0, 3, 1], [7, 8, 9], protocol)
    train = build_dataset("cifar100", tmp_path, "train", None)
    test = build_dataset("cifar100", tmp_path, "test", None)
    assert (len(train), len(test)) == (6, 3)
    assert train.targets == [3, 1, 99, 0, 3, 1] and test.targets == [7, 8, 9]
    info = describe(train)
    assert (info.num_classes, info.class_names[:2], info.class_names[-1]) == (100, ("class0", "class1"), "class99")
    assert info.source == str(tmp_path / "cifar-100-python" / "train")
    picture, label = train[1]
    data = (np.arange(6 * 3072).reshape(6, 3072) % 251).astype(np.uint8)
    assert picture.size == (32, 32) and label == 1
    assert picture.getpixel((0, 0)) == (data[1, 0], data[1, 1024], data[1, 2048])
    assert picture.getpixel((1, 0)) == (data[1, 1], data[1, 1025], data[1, 2049])
    assert build_dataset("cifar100", tmp_path, "val", None).targets == [7, 8, 9]  # no val split: test


def test_cifar100_root_may_be_the_python_directory(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", [0, 1], [2])
    assert len(build_dataset("cifar100", tmp_path / "cifar-100-python", "train", None)) == 2


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar100_refuses_pickles_that_run_code(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", [0], [0])
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": _Evil(), "fine_labels": [0]}, f, protocol=2)
    message, _ = error_of(build_dataset, "cifar100", tmp_path, "train", None)
    assert message == (f"data set 'cifar100': '{tmp_path}/cifar-100-python/train' is not a CIFAR-100 "
                       "python pickle: refusing to load 'posix.getcwd'")


def test_cifar100_wrong_roots(tmp_path):
    message, hint = error_of(build_dataset, "cifar100", tmp_path, "train", None)
    assert message == (f"data set 'cifar100' at '{tmp_path}': expected ROOT/cifar-100-python/ holding "
                       f"train, test and meta (torchvision CIFAR-100 python layout); found: an empty "
                       f"directory '{tmp_path}'")
    assert hint == "unpack cifar-100-python.tar.gz into ROOT"
    message, hint = error_of(build_dataset, "cifar100", None, "train", None)
    assert message == ("data set 'cifar100' needs a data root: expected ROOT/cifar-100-python/ holding "
                       "train, test and meta (torchvision CIFAR-100 python layout)")
    assert hint == "pass --data-root DIR"
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"")
    message, _ = error_of(build_dataset, "cifar100", tmp_path, "test", None)
    assert message.endswith("found: meta")


# ----------------------------------------------------------------------------- FGVC (VPT)

FGVC_IMAGE_DIRS = {"cub": "images", "nabirds": "images", "dogs": "Images", "flowers": "", "cars": ""}


def write_fgvc(root, image_dir: str, splits: dict[str, dict[str, int]]):
    root.mkdir(parents=True, exist_ok=True)
    for split, anno in splits.items():
        (root / f"{split}.json").write_text(json.dumps(anno))
        for index, path in enumerate(anno):
            image(root / image_dir / path, value=10 * index)


CUB_SPLITS = {
    "train": {"001.Albatross/a1.jpg": 1, "002.Auklet/b1.png": 2, "003.Blackbird/c1.jpg": 3,
              "001.Albatross/a2.jpg": 1},
    "val": {"003.Blackbird/c2.jpg": 3, "001.Albatross/a3.jpg": 1},
    "test": {"002.Auklet/b2.jpg": 2, "003.Blackbird/c3.png": 3, "001.Albatross/a4.jpg": 1},
}


@pytest.mark.parametrize("name", sorted(FGVC_IMAGE_DIRS))
def test_fgvc_reads_vpt_json_splits(tmp_path, name):
    write_fgvc(tmp_path, FGVC_IMAGE_DIRS[name], CUB_SPLITS)
    data = {split: build_dataset(f"fgvc:{name}", tmp_path, split, None) for split in CUB_SPLITS}
    assert {s: len(d) for s, d in data.items()} == {"train": 4, "val": 2, "test": 3}
    # class ids 1, 2, 3 become labels 0, 1, 2 in every split, even val which lacks class 2
    assert data["train"].targets == [0, 1, 2, 0]
    assert data["val"].targets == [2, 0]
    assert data["test"].targets == [1, 2, 0]
    info = describe(data["val"])
    assert (info.spec, info.num_classes, info.num_samples) == (f"fgvc:{name}", 3, 2)
    assert info.class_names == ("001.Albatross", "002.Auklet", "003.Blackbird")
    assert info.source == str(tmp_path / FGVC_IMAGE_DIRS[name]) if FGVC_IMAGE_DIRS[name] else str(tmp_path)
    picture, label = data["test"][2]
    assert (picture.size, label) == ((8, 8), 0)


def test_fgvc_class_names_unknown_when_folders_do_not_name_classes(tmp_path):
    write_fgvc(tmp_path, "", {"train": {"jpg/1.jpg": 0, "jpg/2.jpg": 1}})
    assert describe(build_dataset("fgvc:flowers", tmp_path, "train", None)).class_names is None


def test_fgvc_wrong_roots(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "images").mkdir()
    message, hint = error_of(build_dataset, "fgvc:cub", tmp_path, "train", None)
    assert message == (f"data set 'fgvc:cub' at '{tmp_path}': expected ROOT/train.json mapping image path "
                       "-> class id (VPT FGVC layout); found: images/, readme.txt")
    assert hint == ("ROOT is the data set's own directory, with the split files VPT prepares "
                    "(train.json, val.json, test.json)")
    missing = tmp_path / "nowhere"
    message, _ = error_of(build_dataset, "fgvc:nabirds", missing, "test", None)
    assert message == (f"data set 'fgvc:nabirds' at '{missing}': expected ROOT/test.json mapping image "
                       f"path -> class id (VPT FGVC layout); found: no such directory '{missing}'")


def test_fgvc_image_directory_and_image_paths_checked(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"a/1.jpg": 0}))
    message, _ = error_of(build_dataset, "fgvc:dogs", tmp_path, "train", None)
    assert message == (f"data set 'fgvc:dogs' at '{tmp_path}': expected ROOT/Images/ holding the images "
                       "listed in the JSON files (VPT FGVC layout); found: train.json")
    (tmp_path / "Images").mkdir()
    message, hint = error_of(build_dataset, "fgvc:dogs", tmp_path, "train", None)
    assert message == (f"data set 'fgvc:dogs': image 'a/1.jpg' listed in train.json is not at "
                       f"'{tmp_path}/Images/a/1.jpg'")
    assert hint == "image paths in the JSON files are relative to ROOT/Images"


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "'{path}' must hold a JSON object mapping image path -> class id, not list"),
    ('{"a.jpg": "bird"}', "'{path}' maps 'a.jpg' to 'bird'; class ids must be integers"),
    ("{}", "'{path}' lists no images"),
    ("{oops", "'{path}' is not valid JSON: Expecting property name enclosed in double quotes: "
              "line 1 column 2 (char 1)"),
])
def test_fgvc_malformed_json(tmp_path, content, expected):
    (tmp_path / "train.json").write_text(content)
    message, _ = error_of(build_dataset, "fgvc:cars", tmp_path, "train", None)
    assert message == "data set 'fgvc:cars': " + expected.format(path=tmp_path / "train.json")


# ----------------------------------------------------------------------------- VTAB-1k (NOAH)

def write_vtab(root, task: str, lists: dict[str, list[tuple[str, int]]]):
    for name, rows in lists.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / f"{name}.txt").write_text("".join(f"{p} {label}\n" for p, label in rows))
        for index, (path, _) in enumerate(rows):
            image(root / task / path, value=index)


VTAB_LISTS = {
    "train800": [("images/a.jpg", 0), ("images/b.jpg", 101), ("images/c d.png", 5)],
    "val200": [("images/e.jpg", 3)],
    "train800val200": [("images/a.jpg", 0), ("images/b.jpg", 101), ("images/c d.png", 5),
                       ("images/e.jpg", 3)],
    "test": [("images/f.jpg", 7), ("images/g.jpg", 0)],
}


def test_vtab_reads_noah_split_lists(tmp_path):
    write_vtab(tmp_path, "caltech101", VTAB_LISTS)
    lengths = {split: len(build_dataset("vtab:caltech101", tmp_path, split, None))
               for split in ("train800", "val200", "train800val200", "test", "train", "val")}
    assert lengths == {"train800": 3, "val200": 1, "train800val200": 4, "test": 2, "train": 4, "val": 1}
    train = build_dataset("vtab:caltech101", tmp_path, "train", None)
    assert train.targets == [0, 101, 5, 3]
    assert train.samples[2][0] == str(tmp_path / "caltech101" / "images" / "c d.png")
    info = describe(train)
    assert (info.num_classes, info.class_names, info.split) == (102, None, "train")
    assert info.source == str(tmp_path / "caltech101" / "train800val200.txt")
    tensor, label = build_dataset("vtab:caltech101", tmp_path, "test",
                                  build_transforms(32, train=False, crop_pct=1.0))[0]
    assert (tensor.shape, label) == ((3, 32, 32), 7)
    # the task's own directory works as the root too
    assert len(build_dataset("vtab:caltech101", tmp_path / "caltech101", "test", None)) == 2


def test_vtab_wrong_roots_and_bad_lines(tmp_path):
    (tmp_path / "dtd").mkdir()
    message, hint = error_of(build_dataset, "vtab:caltech101", tmp_path, "train", None)
    assert message == (f"data set 'vtab:caltech101' at '{tmp_path}': expected ROOT/caltech101/"
                       "train800val200.txt of 'relative/image/path label' lines (NOAH VTAB-1k layout); "
                       "found: dtd/")
    assert hint == "ROOT is the vtab-1k directory holding one directory a task"
    (tmp_path / "dtd" / "test.txt").write_text("images/a.jpg 1\n\nimages/b.jpg\n")
    message, _ = error_of(build_dataset, "vtab:dtd", tmp_path, "test", None)
    assert message == (f"data set 'vtab:dtd': {tmp_path}/dtd/test.txt:3: expected 'relative/image/path "
                       "label' (an integer label), got 'images/b.jpg'")
    (tmp_path / "dtd" / "test.txt").write_text("images/a.jpg 47\n")
    message, _ = error_of(build_dataset, "vtab:dtd", tmp_path, "test", None)
    assert message == (f"data set 'vtab:dtd': {tmp_path}/dtd/test.txt:1: label 47 is outside "
                       "range(0, 47) for this task")
    (tmp_path / "dtd" / "test.txt").write_text("images/a.jpg 46\n")
    message, hint = error_of(build_dataset, "vtab:dtd", tmp_path, "test", None)
    assert message == (f"data set 'vtab:dtd': the first image of test.txt is not at "
                       f"'{tmp_path}/dtd/images/a.jpg'")
    assert hint == "image paths in the split files are relative to ROOT/dtd"
    message, hint = error_of(build_dataset, "vtab:dtd", tmp_path, "train80", None)
    assert message == ("data set 'vtab:dtd' has no split 'train80'; its splits: train800, val200, "
                       "train800val200, test, train, val")
    assert hint == "did you mean 'train800', 'train', 'train800val200'?"


# ----------------------------------------------------------------------------- ImageFolder

def test_folder_classes_from_train_and_val_falls_back_to_test(tmp_path):
    for name in ("cat/1.png", "cat/2.jpg", "dog/1.png", "emu/1.jpeg"):
        image(tmp_path / "train" / name)
    image(tmp_path / "test" / "dog" / "9.png")
    image(tmp_path / "test" / "emu" / "9.png")
    train = build_dataset("folder", tmp_path, "train", None)
    assert (len(train), train.targets) == (4, [0, 0, 1, 2])
    val = build_dataset("folder", tmp_path, "val", None)  # no ROOT/val: reads ROOT/test
    assert (len(val), val.targets) == (2, [1, 2])
    info = describe(val)
    assert (info.class_names, info.num_classes, info.source) == (("cat", "dog", "emu"), 3,
                                                                 str(tmp_path / "test"))
    picture, label = val[0]
    assert (picture.mode, label) == ("RGB", 1)


def test_folder_wrong_roots(tmp_path):
    (tmp_path / "images").mkdir()
    message, _ = error_of(build_dataset, "folder", tmp_path, "val", None)
    assert message == (f"data set 'folder' at '{tmp_path}': expected ROOT/train/<class>/<image> and "
                       "ROOT/val/ or ROOT/test/ alike (ImageFolder layout); found: images/")
    (tmp_path / "train").mkdir()
    message, _ = error_of(build_dataset, "folder", tmp_path, "train", None)
    assert message == (f"data set 'folder' at '{tmp_path / 'train'}': expected one directory a class, "
                       f"holding its images (ImageFolder layout); found: an empty directory "
                       f"'{tmp_path / 'train'}'")
    (tmp_path / "train" / "cat").mkdir()
    message, _ = error_of(build_dataset, "folder", tmp_path, "train", None)
    assert message == f"data set 'folder': no images under {tmp_path / 'train'}/<class>/"
    image(tmp_path / "train" / "cat" / "1.png")
    image(tmp_path / "val" / "cow" / "1.png")
    message, hint = error_of(build_dataset, "folder", tmp_path, "val", None)
    assert message == (f"data set 'folder': {tmp_path / 'val'} has class directories that "
                       f"{tmp_path / 'train'} lacks: cow")
    assert hint == "every class must have a directory under ROOT/train"


def test_missing_image_at_read_time_is_a_data_error(tmp_path):
    image(tmp_path / "train" / "cat" / "1.png")
    image(tmp_path / "train" / "cat" / "2.png")
    data = build_dataset("folder", tmp_path, "train", None)
    os.remove(tmp_path / "train" / "cat" / "2.png")
    message, hint = error_of(data.__getitem__, 1)
    assert message == f"data set 'folder': image '{tmp_path}/train/cat/2.png' does not exist"
    assert hint == f"image paths are resolved under {tmp_path / 'train'}"


# ----------------------------------------------------------------------------- registry

def test_registry_lists_every_spec():
    specs = [spec for spec, _ in list_datasets()]
    assert specs[:8] == ["digits", "cifar100", "folder", "fgvc:cub", "fgvc:nabirds", "fgvc:flowers",
                         "fgvc:dogs", "fgvc:cars"]
    assert len(specs) == len(DATASETS) == 27 and "vtab:caltech101" in specs and "vtab:smallnorb_ele" in specs
    assert (needs_root("digits"), needs_root("CIFAR100"), needs_root("vtab:dtd")) == (False, True, True)


@pytest.mark.parametrize("spec, hint", [
    ("cifar10", "did you mean 'cifar100', 'vtab:cifar'?"),
    ("fgvc:bird", "did you mean 'fgvc:nabirds', 'fgvc:cub', 'fgvc:dogs'?"),
    ("vtab:caltech", "did you mean 'vtab:caltech101', 'vtab:clevr_count', 'vtab:cifar'?"),
    ("Cub", "did you mean 'fgvc:cub'?"),
    ("xyz", "known data sets: digits, cifar100, folder, fgvc:<name>, vtab:<task>"),
])
def test_unknown_data_set_names_the_closest(spec, hint):
    message, got = error_of(build_dataset, spec, None, "train", None)
    assert (message, got) == (f"unknown data set '{spec}'", hint)


def test_spec_is_case_insensitive_and_split_checked():
    assert len(build_dataset(" Digits ", None, "val", None)) == 180
    message, hint = error_of(build_dataset, "digits", None, "valid", None)
    assert (message, hint) == ("data set 'digits' has no split 'valid'; its splits: train, val, test",
                               "did you mean 'val', 'train'?")


def test_describe_sees_through_subsets_and_rejects_others():
    data = build_dataset("digits", None, "test", None)
    assert describe(Subset(data, [0, 1])).num_samples == 360
    message, _ = error_of(describe, [1, 2])
    assert message == "list was not built by utdsl's build_dataset"


# ----------------------------------------------------------------------------- transforms

def _names(compose: T.Compose) -> list[str]:
    return [type(step).__name__ for step in compose.transforms]


def test_build_transforms_train_and_eval():
    evaluation = build_transforms(32, train=False)
    assert _names(evaluation) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[0].size == 36 and evaluation.transforms[1].size == (32, 32)
    assert evaluation.transforms[3].mean == (0.485, 0.456, 0.406)
    train = build_transforms((3, 32, 32), train=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert _names(train) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[3].std == (0.5, 0.5, 0.5)
    plain = build_transforms(32, train=True, random_crop=False, hflip=False, crop_pct=1.0)
    assert _names(plain) == ["Resize", "ToTensor", "Normalize"] and plain.transforms[0].size == (32, 32)
    tensor = train(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert tensor.shape == (3, 32, 32) and torch.allclose(tensor, torch.ones(3, 32, 32))


def test_transforms_follow_the_model_pretrained_cfg():
    from utdsl.runtime.models import create_model

    model = create_model("test_vit", img_size=32, num_classes=3, device="meta")
    assert model_data_config(model) == {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5),
                                        "std": (0.5, 0.5, 0.5), "crop_pct": 0.95,
                                        "interpolation": "bicubic"}
    evaluation = transforms_for_model(model, train=False)
    assert _names(evaluation) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[0].size == 33 and evaluation.transforms[3].mean == (0.5, 0.5, 0.5)
