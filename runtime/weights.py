"""Local weight files loaded into a backbone: safetensors, PyTorch state dicts and big_vision
``.npz``, with the classifier head dropped when its size differs.

Nothing here downloads or unpickles arbitrary objects: ``.pth``/``.pt``/``.bin`` go through
``torch.load(weights_only=True)``, ``.npz`` through numpy without pickle. Wrappers are unwrapped
(a ``state_dict``/``model``/``module`` entry; ``module.`` and ``_orig_mod.`` key prefixes) and the
model family's own timm ``checkpoint_filter_fn`` adapts the rest (patch embedding, position
embedding resized to the model's grid). Every parameter outside the head must come from the file
(``strict=True``, the default) so that a file of another architecture is an error, not a
half-random backbone.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from utdsl.errors import ModelError

__all__ = ["SUPPORTED", "LoadReport", "WeightsSource", "head_keys", "load_weights", "read_state_dict",
           "warn_if_random", "weights_source"]

SUPPORTED = (".safetensors", ".pth", ".pt", ".bin", ".npz")
_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadReport:
    """What :func:`load_weights` did: tensors ``loaded``, file keys ``skipped`` (key -> reason) and
    model keys left ``missing`` (at their initialization, e.g. a new head)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        text = f"loaded {len(self.loaded)} tensors from {self.path}"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{k} ({why})" for k, why in self.skipped.items())
        if self.missing:
            text += "; initialized anew: " + ", ".join(self.missing)
        return text


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from: ``random``, ``hub`` (timm's pretrained tag) or ``file``."""

    kind: str
    detail: str = ""
    report: LoadReport | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def describe(self) -> str:
        if self.kind == "hub":
            return f"pretrained weights of timm's '{self.detail}'"
        if self.kind == "file":
            return f"weights from {self.detail}"
        return "random initialization"


def weights_source(model: nn.Module) -> WeightsSource | None:
    """The :class:`WeightsSource` ``create_model`` recorded on ``model``, or None."""
    return getattr(model, "utdsl_weights", None)


def warn_if_random(source: WeightsSource | nn.Module | None,
                   echo: Callable[[str], Any] | None = None) -> str | None:
    """The warning for a backbone trained from random initialization, or None when it is not.

    ``source`` is a :class:`WeightsSource` or a model from ``create_model`` (a model without a
    recorded source is not warned about). The message goes to ``echo`` when given, else to
    :func:`warnings.warn`; it is also returned.
    """
    if isinstance(source, nn.Module):
        source = weights_source(source)
    if source is None or not source.is_random:
        return None
    message = ("the backbone has random weights (no --weights FILE, no --pretrained): a frozen "
               "random backbone learns little, and results will be far below published numbers")
    if echo is not None:
        echo(message)
    else:
        warnings.warn(message, UserWarning, stacklevel=2)
    return message


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier named by the model's pretrained cfg (default ``head``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]


def _resolve_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in _HUB_FILES if (path / name).is_file()]
        if not found:
            raise ModelError(f"weights path '{path}' is a directory without {' or '.join(_HUB_FILES)}",
                             hint="pass the weights file itself")
        path = found[0]
    if not path.is_file():
        raise ModelError(f"weights file '{path}' does not exist",
                         hint="pass a local " + ", ".join(SUPPORTED) + " file; nothing is downloaded")
    if path.suffix.lower() not in SUPPORTED:
        raise ModelError(f"unsupported weights format '{path.suffix or path.name}' ({path})",
                         hint="supported: " + ", ".join(SUPPORTED))
    return path


def _unwrap(content: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(content, Mapping):
        inner = next((content[k] for k in _WRAPPERS if isinstance(content.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in content.values()):
            break
        content = inner
    if not isinstance(content, Mapping):
        raise ModelError(f"'{path}' holds a {type(content).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"'{path}' holds no tensors", hint="expected a state dict: name -> tensor")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors``/``.pth``/``.pt``/``.bin`` file, unwrapped, on the CPU."""
    path = _resolve_path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raise ModelError(f"'{path}' is a numpy checkpoint", hint="load it with load_weights(model, path)")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(f"'{path}' holds Python objects besides tensors; refusing to unpickle them "
                         f"({str(error).splitlines()[0]})",
                         hint="re-save it as a plain state dict, ideally as .safetensors") from None
    except Exception as error:  # safetensors and torch raise assorted types for damaged files
        raise ModelError(f"cannot read weights file '{path}': {str(error).splitlines()[0]}") from None
    return _unwrap(content, path)


def _family_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # timm's per-family converter (pos-embed resize, old patch-embed layouts, CLIP/DINOv2 names)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except Exception:  # a file of another family: key matching below explains it better
        return state


def _check_device(model: nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise ModelError("cannot load weights into a model built on the meta device",
                         hint="build the model on 'cpu' or a GPU to load weights")


def _load_npz(model: nn.Module, path: Path) -> LoadReport:
    if not hasattr(model, "load_pretrained"):
        raise ModelError(f"{type(model).__name__} cannot load .npz weights",
                         hint="big_vision/augreg .npz files load into timm VisionTransformer models; "
                              "convert others to .safetensors")
    heads = head_keys(model)
    report = LoadReport(str(path))
    with np.load(path, allow_pickle=False) as archive:
        bias = next((k for k in archive.files if k.endswith("head/bias")), None)
        classes = archive[bias].shape[-1] if bias else None
    head = getattr(model, "head", None)
    if heads and isinstance(head, nn.Linear) and classes != head.out_features:
        why = (f"head: checkpoint has {classes} classes, model {head.out_features}" if classes
               else "no head in the checkpoint")
        report.missing = heads
        report.skipped = {"head/kernel": why, "head/bias": why} if classes else {}
    try:
        model.load_pretrained(str(path))
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"'{path}' is not a big_vision/augreg .npz checkpoint that fits "
                         f"{type(model).__name__}: {str(error).splitlines()[0]}") from None
    report.loaded = [k for k in model.state_dict() if k not in report.missing]
    return report


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Load the local weights file ``path`` into ``model`` in place and say what was loaded.

    Formats: ``.safetensors``, ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``), and
    big_vision/augreg ViT ``.npz`` (timm's loader). A directory holding ``model.safetensors`` or
    ``pytorch_model.bin`` (a hub snapshot) is accepted. Classifier-head tensors of another shape
    (another number of classes) are skipped, leaving the model's new head. With ``strict``, any
    other parameter the file lacks or shapes differently is a :class:`ModelError`; file keys the
    model lacks are skipped and reported.
    """
    path = _resolve_path(path)
    _check_device(model)
    if path.suffix.lower() == ".npz":
        return _load_npz(model, path)
    state = _family_filter(read_state_dict(path), model)
    own = model.state_dict()
    heads = set(head_keys(model))
    report, chosen, misfits = LoadReport(str(path)), {}, {}
    order = {key: index for index, key in enumerate(own)}  # report in the model's order
    for key in sorted(state, key=lambda k: (order.get(k, len(order)), k)):
        tensor = state[key]
        if key not in own:
            report.skipped[key] = "not in the model"
        elif tensor.shape != own[key].shape:
            why = f"file {tuple(tensor.shape)}, model {tuple(own[key].shape)}"
            if key in heads:
                report.skipped[key] = "head of another size: " + why
            else:
                misfits[key] = f"{key} ({why})"
                report.skipped[key] = "other shape: " + why
        else:
            chosen[key] = tensor
    if not chosen:
        raise ModelError(f"no tensor in '{path}' matches a parameter of {type(model).__name__}",
                         hint=f"the file has keys like {', '.join(sorted(state)[:3])}; "
                              f"the model has {', '.join(list(own)[:3])}")
    report.missing = [k for k in own if k not in chosen]
    lacking = [k for k in report.missing if k not in heads and k not in misfits]
    if strict and (misfits or lacking):
        parts = []
        if misfits:
            parts.append(f"{len(misfits)} tensors have other shapes: " + ", ".join(list(misfits.values())[:3]))
        if lacking:
            parts.append(f"{len(lacking)} parameters are not in the file: " + ", ".join(lacking[:3]))
        raise ModelError(f"'{path}' does not fit {type(model).__name__}: " + "; ".join(parts),
                         hint="weights of another architecture or size? check the model name "
                              "(load_weights(..., strict=False) loads only what fits)")
    model.load_state_dict(chosen, strict=False)
    report.loaded = [k for k in own if k in chosen]
    return report
