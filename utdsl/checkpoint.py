"""Tuner checkpoints: only what trains, as safetensors, written atomically.

The metadata holds the spec text, the model name, the utdsl version and a signature of the plan
(site, placement, tuner and validated arguments of each insertion); loading into another model or
spec, or into tuners built with other arguments (``alpha=8`` saved, ``alpha=16`` compiled), is a
:class:`CheckpointError` that says which, never silent garbage. Checkpoints written before the
arguments were recorded (three-field signatures) load where the sites match, unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .files import atomic_write
from .verify import compiled_info

__all__ = ["save_tuners", "load_tuners", "read_metadata", "FORMAT"]

FORMAT = "utdsl-tuners/1"


def plan_signature(model: nn.Module) -> str:
    """JSON list of ``[site, placement, tuner, args]``, one per insertion, args as validated."""
    return json.dumps(_signature(model))


def _signature(model: nn.Module) -> list[list[Any]]:
    return [[i.site + (str(i.chunks) if i.chunks else ""), i.placement, i.tuner,
             i.args.model_dump(mode="json")] for i in compiled_info(model).plan.insertions]


def _check_plan(path: str | os.PathLike, meta: dict[str, str], model: nn.Module) -> None:
    """CheckpointError unless the checkpoint's plan is the model's: same sites, placements and
    tuners, and (where the checkpoint records them) the same tuner arguments."""
    try:
        saved = json.loads(meta.get("plan", ""))
    except json.JSONDecodeError:
        saved = None
    ours = _signature(model)
    if (not isinstance(saved, list) or not all(isinstance(s, list) for s in saved)
            or [s[:3] for s in saved] != [o[:3] for o in ours]):
        raise CheckpointError(f"checkpoint '{path}' was written for another spec "
                              f"('{meta.get('spec_name') or meta.get('spec_path')}'): its tuners sit elsewhere",
                              hint="compile the spec stored in the checkpoint (utdsl eval does this)")
    differences = []
    for entry, (site, _, tuner, args), insertion in zip(saved, ours, compiled_info(model).plan.insertions):
        if len(entry) < 4 or not isinstance(entry[3], dict):  # an older checkpoint: no arguments
            continue
        fields = type(insertion.args).model_fields
        for name in sorted(set(entry[3]) | set(args)):
            # a field added since the checkpoint was written had its default then
            theirs = entry[3].get(name, fields[name].default if name in fields else _ABSENT)
            mine = args.get(name, _ABSENT)
            if theirs != mine:
                differences.append(f"{site} {tuner}: {name} is {_shown(theirs)} in the checkpoint, "
                                   f"{_shown(mine)} in this model")
    if differences:
        more = f"; and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise CheckpointError(f"checkpoint '{path}' was trained with other tuner arguments: "
                              f"{'; '.join(differences[:3])}{more}",
                              hint="compile the spec with the arguments stored in the checkpoint "
                                   "(--set NAME=VALUE), or retrain")


_ABSENT = object()


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


_TRACKING_NORMS = (nn.modules.batchnorm._NormBase,)


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that a training step changes though nothing trains them: the running mean,
    variance and batch count of every norm layer that tracks them (a CNN's batch norms update
    them in train mode). A checkpoint without them would evaluate with other statistics."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, _TRACKING_NORMS) and module.track_running_stats:
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    found[f"{path}.{name}" if path else name] = buffer
    return found


def tuner_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuners' persistent buffers (VeRA's shared random projections): saved with the tuners so
    a checkpoint does not depend on regenerating them."""
    namespace = compiled_info(model).plan_namespace + "."
    return {name: b for name, b in model.state_dict(keep_vars=True).items()
            if name.startswith(namespace) and not isinstance(b, nn.Parameter)}


def save_tuners(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save every parameter of ``model`` that requires grad (tuners and ``train``ed base
    parameters) and the norm layers' running statistics (:func:`running_statistics`), with the
    spec and model in the metadata. Returns the path written."""
    from . import __version__

    info = compiled_info(model)
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(running_statistics(model))
    tensors.update(tuner_buffers(model))
    meta = {
        "format": FORMAT,
        "utdsl_version": __version__,
        "spec": info.spec.source.text,
        "spec_path": info.spec.source.path,
        "spec_name": info.spec.name or "",
        "model": info.model_name,
        "plan": plan_signature(model),
        **(metadata or {}),
    }
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=meta))
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a tuner checkpoint (CheckpointError if missing or not one)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"'{path}' is not a safetensors file: {error}") from error
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a utdsl tuner checkpoint (no '{FORMAT}' format tag)")
    return meta


def load_tuners(model: nn.Module, path: str | os.PathLike, *, strict_model: bool = True) -> dict[str, str]:
    """Load a checkpoint written by :func:`save_tuners` into a compiled ``model``; return its
    metadata. The model name, the plan (tuner arguments included) and every key and shape must
    match."""
    meta = read_metadata(path)
    info = compiled_info(model)
    if strict_model and meta.get("model") != info.model_name:
        raise CheckpointError(f"checkpoint '{path}' was trained on model '{meta.get('model')}', "
                              f"this model is '{info.model_name}'")
    _check_plan(path, meta, model)
    tensors = load_file(str(path))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    statistics = running_statistics(model)
    if any(name in tensors for name in statistics):   # checkpoints written before them hold none
        params.update(statistics)
    params.update(tuner_buffers(model))
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint '{path}': tensor '{name}' holds inf or NaN values",
                                  hint="the checkpoint is damaged or comes from a diverged run")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise CheckpointError(f"checkpoint '{path}': '{name}' has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return meta
