"""Training recipes: pydantic-validated TOML files with command-line overrides.

A recipe holds every hyper-parameter of a run (optimizer, schedule, batch, regularisation, seed,
input size). The library ships ``vpt_fgvc`` (VPT's FGVC protocol), ``noah_vtab`` (NOAH's VTAB-1k
protocol), ``cifar100`` and ``default`` in ``runtime/recipes/``; a path to a ``.toml`` or ``.json``
file works too. Unknown fields are errors (``extra="forbid"``), and so are overrides of unknown
fields, with the closest field names as a hint.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from utdsl.errors import Diagnostic, UtdslError, did_you_mean

__all__ = ["Recipe", "RecipeError", "RECIPE_DIR", "recipe_names", "load_recipe"]

RECIPE_DIR = Path(__file__).with_name("recipes")


class RecipeError(UtdslError):
    """A recipe file or a recipe override is invalid."""


class Recipe(BaseModel):
    """Every hyper-parameter of a training run. Learning rates are absolute (no batch scaling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="recipe name, recorded in the run's config")
    description: str = ""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="peak learning rate, reached after warm-up")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0, in epochs")
    warmup_lr: float = Field(0.0, ge=0, description="learning rate at step 0 of the warm-up")
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0, description="per-process batch of one forward pass")
    grad_accum: int = Field(1, gt=0, description="forward passes per optimizer step")
    weight_decay: float = Field(0.0, ge=0)
    decay_1d: bool = Field(False, description="also decay 1-d parameters (biases, norms, scales)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    clip_grad: float | None = Field(None, gt=0, description="max global gradient norm")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA")
    input_size: int = Field(224, gt=0, description="square input side in pixels")
    random_crop: bool = Field(True, description="RandomResizedCrop when training (if the data allow it)")
    hflip: bool = Field(True, description="random horizontal flip when training (if the data allow it)")
    crop_pct: float | None = Field(None, gt=0, description="eval resize = size / crop_pct (>= 1: resize "
                                   "straight to size); None: the model's")
    train_split: str = "train"
    eval_split: str = "test"
    eval_every: int = Field(1, gt=0, description="evaluate every N epochs (and after the last)")
    log_every: int = Field(10, gt=0, description="write a step line to metrics.jsonl every N steps")
    nonfinite: Literal["error", "skip"] = Field(
        "error", description="a non-finite loss or gradient: stop the run (error) or skip that optimizer step")
    dist_timeout: float = Field(600.0, gt=0, le=86400, description="seconds a DDP collective waits for a "
                                "stalled or lost process before the run stops with an error")
    # training features (each in its own module: ema, mixup, droppath, lr_decay, data/cached)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained parameters "
                                    "(evaluated and saved instead of them); None: off")
    mixup_alpha: float = Field(0.0, ge=0, description="Beta(a, a) of mixup; 0: off")
    cutmix_alpha: float = Field(0.0, ge=0, description="Beta(a, a) of CutMix; 0: off")
    mix_prob: float = Field(1.0, ge=0, le=1, description="share of batches mixed (mixup/CutMix on)")
    mix_switch_prob: float = Field(0.5, ge=0, le=1, description="CutMix rather than mixup, when both are on")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth of the backbone's blocks")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay factor; None: off")
    channels_last: bool = Field(False, description="model and batches in channels-last memory format")
    data_cache: Literal["off", "memory", "device"] = Field(
        "off", description="decode and resize images once, keep uint8 tensors (in memory or on the "
        "device) and augment batches on tensors")
    decode: Literal["workers", "device"] = Field(
        "workers", description="where training images are decoded: in the loader workers, or on the "
        "training device (nvjpeg on a GPU; the workers only read files and draw crops)")

    @model_validator(mode="after")
    def _lr_order(self) -> "Recipe":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


_OPTIONAL = ("clip_grad", "crop_pct", "ema_decay", "layer_decay")


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``runtime/recipes/``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def _read(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".json"):
        if name_or_path not in recipe_names():
            hint = did_you_mean(name_or_path, recipe_names()) or "recipes: " + ", ".join(recipe_names())
            raise RecipeError(f"unknown recipe '{name_or_path}'", hint=hint)
        path = RECIPE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise RecipeError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a table of fields")
    data.setdefault("name", path.stem)
    return data, str(path)


def _validation_error(error: ValidationError, where: str) -> RecipeError:
    diagnostics = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "recipe"
        hint = did_you_mean(field, Recipe.model_fields) if item["type"] == "extra_forbidden" else None
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        diagnostics.append(Diagnostic(f"{where}: {field}: {message}", hint=hint))
    return RecipeError(diagnostics=diagnostics)


def load_recipe(name_or_path: str | None = "default", overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load a shipped recipe by name (or a ``.toml``/``.json`` file) and apply ``overrides``.

    ``overrides`` maps field names to values; strings are converted by pydantic (``"0.01"`` for a
    float, ``"0.9,0.99"`` for ``betas``, ``"none"`` for an optional field). Every problem is a
    :class:`RecipeError` naming the field.
    """
    data, where = _read(name_or_path or "default")
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in Recipe.model_fields:
            raise RecipeError(f"unknown recipe field '{key}'", hint=did_you_mean(key, Recipe.model_fields))
        if isinstance(value, str) and key == "betas":
            value = [v.strip() for v in value.strip("()[]").split(",")]
        elif isinstance(value, str) and value.lower() in ("none", "null") and key in _OPTIONAL:
            value = None
        data[key] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error, where + (" (with overrides)" if overrides else "")) from None
