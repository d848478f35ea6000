"""The resolved configuration of a run, and building its model and data from it.

A :class:`RunConfig` is what ``RUN/config.json`` holds and what every tuner checkpoint written by
``utdsl train`` carries in its metadata (``run.config``), so a checkpoint alone is enough to
rebuild the exact compiled model: the spec *text* (not just its path) and its ``let`` overrides,
the model, the number of classes and the recipe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from utdsl.errors import CheckpointError

from .recipes import Recipe

__all__ = ["RunConfig", "resolve_config", "spec_of", "model_kwargs", "build_model", "build_data", "cache_data",
           "num_classes_of", "locate_checkpoint", "checkpoint_metadata"]


class RunConfig(BaseModel):
    """Everything that determines a run's result (devices and worker counts do not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str
    spec_name: str
    spec_text: str
    spec_path: str
    spec_overrides: dict[str, str] = {}
    model: str
    model_kwargs: dict[str, Any] = {}
    weights: str | None = None
    weights_sha256: str | None = None
    pretrained: bool = False
    data: str = "digits"
    data_root: str | None = None
    num_classes: int
    recipe: Recipe
    world_size: int = 1
    utdsl_version: str = ""


def resolve_config(*, spec: str, model: str, data: str, data_root: str | None, recipe: Recipe,
                   spec_overrides: dict[str, str] | None = None, weights: str | None = None,
                   pretrained: bool = False, world_size: int = 1,
                   model_kwargs: dict[str, Any] | None = None) -> RunConfig:
    """Load and check the spec, read the training split's class count, and fill a RunConfig."""
    import utdsl

    from .provenance import weights_identity

    checked = utdsl.load_spec(spec, spec_overrides or None)
    probe = _dataset(data, data_root, recipe.train_split, None)
    weights, weights_sha256 = weights_identity(weights) if weights else (None, None)
    return RunConfig(spec=str(spec), spec_name=checked.name or Path(str(spec)).stem,
                     spec_text=checked.source.text, spec_path=checked.source.path,
                     spec_overrides=dict(spec_overrides or {}), model=model,
                     model_kwargs=dict(model_kwargs or {}), weights=weights, weights_sha256=weights_sha256,
                     pretrained=pretrained, data=data, data_root=data_root,
                     num_classes=num_classes_of(probe), recipe=recipe, world_size=world_size,
                     utdsl_version=utdsl.__version__)


def spec_of(config: RunConfig):
    """The checked spec of a run, from the text it recorded (a later edit of the file is ignored)."""
    from utdsl.check import check
    import utdsl

    return check(utdsl.parse_spec(config.spec_text, config.spec_path), config.spec_overrides or None)


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """Arguments of ``create_model``: the run's ``model_kwargs``, plus ``img_size`` when the recipe's
    input size differs from the model's default and the model takes one (ViTs do). A model without
    ``img_size`` (a CNN) is built as it is, after a check that it runs at the recipe's size."""
    from .models import create_model, default_input_size

    kwargs = dict(config.model_kwargs)
    size = config.recipe.input_size
    if "img_size" in kwargs or tuple(default_input_size(create_model(config.model, device="meta", **kwargs))[-2:]) == (size, size):
        return kwargs
    try:
        create_model(config.model, device="meta", img_size=size, **kwargs)
    except TypeError:  # no img_size: a CNN, which takes any size its strides and pools allow
        _check_takes_size(config.model, kwargs, size)
        return kwargs
    return {**kwargs, "img_size": size}


def _check_takes_size(name: str, kwargs: dict[str, Any], size: int) -> None:
    """A forward on the meta device (no compute) at ``size``; a ModelError if the model rejects it."""
    from utdsl.errors import ModelError
    from .models import create_model, default_input_size

    model = create_model(name, device="meta", **kwargs).eval()
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    except Exception as error:  # noqa: BLE001 - the model's own checks, or a map pooled below 1x1
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"model '{name}' takes no img_size and does not run at {size}x{size}: {cause}",
                         hint=f"its default input is {default_input_size(model)}; pick an --input-size "
                              "it accepts") from None


def build_model(config: RunConfig, spec=None, *, echo=None) -> nn.Module:
    """Create the backbone with ``num_classes`` outputs (and its weights) and compile the spec.

    The global torch generator is seeded with the recipe's seed first: the new head, the tuners and
    (without weights) the whole backbone are initialised the same way by ``train`` and ``eval``.
    The recipe's ``drop_path_rate`` is passed to timm (:mod:`.droppath`); it acts in train mode only.
    ``echo`` receives the warning for a random backbone (default: ``warnings.warn``)."""
    import utdsl
    from .models import create_model
    from .weights import warn_if_random

    from .droppath import drop_path_kwargs

    kwargs: dict[str, Any] = {"num_classes": config.num_classes, **model_kwargs(config)}
    kwargs.update(drop_path_kwargs(config.model, config.recipe.drop_path_rate, kwargs))
    if config.weights:
        kwargs["weights"] = config.weights
    if config.pretrained:
        kwargs["pretrained"] = True
    torch.manual_seed(config.recipe.seed)
    base = create_model(config.model, **kwargs)
    warn_if_random(base, echo)
    size = config.recipe.input_size
    example = torch.zeros(2, 3, size, size)
    return utdsl.compile(spec if spec is not None else spec_of(config), base, example,
                         inplace=True, model_name=config.model)


def num_classes_of(dataset) -> int:
    """Number of classes of a data set built by ``build_dataset``."""
    from .data import describe

    return int(describe(dataset).num_classes)


def _dataset(data: str, root: str | None, split: str, transform):
    from .data import build_dataset

    return build_dataset(data, root, split, transform)


def _transform_options(config: RunConfig, train: bool, augment: bool) -> dict[str, Any]:
    """Size, normalisation, geometry and augmentation of the run's images (``augment``: whether the
    data set allows random crops and flips)."""
    from .data import model_data_config
    from .models import create_model

    data_cfg = model_data_config(create_model(config.model, device="meta", **model_kwargs(config)))
    recipe = config.recipe
    augment = train and augment
    return dict(mean=data_cfg["mean"], std=data_cfg["std"], random_crop=augment and recipe.random_crop,
                hflip=augment and recipe.hflip, crop_pct=recipe.crop_pct or data_cfg["crop_pct"],
                interpolation=data_cfg["interpolation"])


def build_data(config: RunConfig, split: str, *, train: bool):
    """The ``split`` of the run's data set, normalised as the model expects, at the recipe's input
    size; training augmentation as the recipe says where the data set allows it (``info.augment``)."""
    from .data import build_transforms, describe

    augment = train and describe(_dataset(config.data, config.data_root, split, None)).augment
    options = _transform_options(config, train, augment)
    dataset = _dataset(config.data, config.data_root, split, build_transforms(config.recipe.input_size, train,
                                                                             **options))
    if train and hasattr(dataset, "uint8_item"):   # image files: the uint8 path (runtime.data.loading)
        dataset.transform = build_transforms(config.recipe.input_size, train, tensor=True, **options)
    return dataset


def cache_data(config: RunConfig, dataset, *, train: bool, mode: str, device: torch.device | None = None):
    """``dataset`` (built by :func:`build_data`, scanned) held as a uint8 cache (``mode``
    ``"memory"``, or ``"device"``: on ``device``) with the same geometry, augmentation and
    normalisation (:mod:`.data.cached`); ``"off"`` returns it as it is."""
    if mode == "off":
        return dataset
    from .data.cached import cache_dataset

    options = _transform_options(config, train, dataset.info.augment)
    return cache_dataset(dataset, size=config.recipe.input_size, train=train,
                         device=device if mode == "device" else None, **options)


def checkpoint_metadata(config: RunConfig, **extra: Any) -> dict[str, str]:
    """Metadata of a run's tuner checkpoints: the config as JSON plus ``extra`` as strings."""
    meta = {"run.config": config.model_dump_json()}
    meta.update({f"run.{k}": json.dumps(v) for k, v in extra.items()})
    return meta


def locate_checkpoint(target: str | os.PathLike) -> tuple[Path, RunConfig]:
    """The checkpoint file and run config of ``target``: a run directory (its best checkpoint, else
    its last) or a ``.safetensors`` written by ``utdsl train``."""
    from utdsl.checkpoint import read_metadata

    path = Path(target)
    if path.is_dir():
        for kind in ("best", "last"):
            if (path / "checkpoints" / f"{kind}.safetensors").is_file():
                path = path / "checkpoints" / f"{kind}.safetensors"
                break
        else:
            raise CheckpointError(f"run directory '{target}' has no checkpoint yet")
    meta = read_metadata(path)
    if "run.config" not in meta:
        raise CheckpointError(f"'{path}' was not written by `utdsl train` (no run configuration in it)",
                              hint="load it with utdsl.load_tuners into the model compiled from its spec")
    try:
        return path, RunConfig.model_validate_json(meta["run.config"])
    except ValidationError as error:
        raise CheckpointError(f"'{path}': its run configuration is invalid: {error}") from None
