"""Exporting a tuned model for tools that know nothing of utdsl.

:func:`export_merged` folds every tuner into the backbone (:func:`utdsl.merge`) and writes the
backbone's own state dict: a plain timm checkpoint, loaded by
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path, num_classes=N),
num_classes=N)`` (``num_classes`` in the overlay too, or timm drops the head). A tuner that does not
fold (an adapter with a nonlinearity, prompts, prefixes) is a :class:`ModelError` naming it: never a
silently different model.

:func:`export_peft` writes PEFT's LoRA adapter layout (``adapter_config.json`` and
``adapter_model.safetensors``, keys ``base_model.model.<path>.lora_A.weight``) for the LoRA family:
``parallel lowrank`` on a linear, ``weight lora`` and ``weight dora`` (``use_dora``). Chunks of a
fused weight (``attn.qkv{q, v}``), which peft cannot target, become one full-width LoRA on the
linear: the chunks' A stacked, B block-structured with zero rows for the untuned chunks, rank the
sum of the chunks' ranks and ``alpha_pattern`` keeping the scaling (DoRA: the magnitude of an
untuned row is its norm, which leaves it as it is). Base parameters that train become
``modules_to_save`` (their whole modules). ``peft.PeftModel.from_pretrained(base, DIR)`` then gives
the tuned model's outputs (within float rounding: 1e-6 on a ViT).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .checkpoint import running_statistics
from .errors import ModelError, listing
from .files import atomic_write
from .merge import merge
from .placements.base import FULL, has_module
from .placements.weight import FUNCTIONALIZED
from .verify import compiled_info

__all__ = ["export_merged", "export_peft", "PEFT_PREFIX", "PEFT_CONFIG", "PEFT_WEIGHTS"]

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: (placement, tuner) pairs a PEFT LoRA adapter holds
_LORA_FAMILY = {("parallel", "lowrank"), ("weight", "lora"), ("weight", "dora")}


def _describe(insertion) -> str:
    chunks = str(insertion.chunks) if insertion.chunks else ""
    return f"{insertion.site}{chunks} ({insertion.placement} {insertion.tuner}, line {insertion.rule_line})"


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    plain = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        plain[key] = tensor
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def export_merged(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Merge ``model`` (compiled by ``utdsl.compile``) and write the backbone's state dict, with
    every tuner folded in, to ``path`` as safetensors (atomically); return the path.

    The keys are the backbone's own (``blocks.0.attn.qkv.weight``), so the file loads into the
    plain model the spec was compiled into. Raises :class:`ModelError` naming the insertions that
    would stay in the graph when some tuner cannot be merged."""
    info = compiled_info(model)
    merged = merge(model)
    left = [_describe(i) for i in info.plan.insertions if has_module(merged, i.module_name)]
    if left:
        raise ModelError(f"cannot export a merged model: {len(left)} insertion(s) cannot be folded into "
                         f"the weights and would stay in the graph: {listing(left)}",
                         hint="merge folds lowrank, affine and weight tuners; keep the tuners with "
                              "utdsl.save_tuners, or pickle the whole model with torch.save")
    added = merged.meta.get("utdsl_merge_added", [])
    if added:
        raise ModelError(f"cannot export a merged model: folding a shift adds parameters the base model "
                         f"does not have ({listing(added)}), which a plain model cannot load",
                         hint="a shift folds into an op without a bias only by adding one; use "
                              "affine(shift=false) there, or keep the tuners with utdsl.save_tuners")
    prefix = info.plan_namespace + "."
    state = {k: v for k, v in merged.state_dict().items() if not k.startswith(prefix)}
    meta = {"format": "pt", "utdsl.model": info.model_name, "utdsl.spec": info.spec.name or ""}
    meta.update(metadata or {})
    _save_safetensors(state, path, meta)
    return Path(path)


def _module_called(gm: nn.Module, site: str) -> bool:
    """Whether the graph calls ``site`` as a module (or its leaf call was functionalized by the
    weight placement), so that peft's wrapper of that module would see every use."""
    return any((n.op == "call_module" and n.target == site) or n.meta.get(FUNCTIONALIZED) == site
               for n in gm.graph.nodes)


def _site_lora(gm: nn.Module, insertions: list) -> dict:
    """One full-width LoRA (A, B, scaling, dora magnitude or None) for the insertions on one linear."""
    site = insertions[0].site
    linear = gm.get_submodule(site)
    where = listing([_describe(i) for i in insertions])
    if not isinstance(linear, nn.Linear):
        raise ModelError(f"cannot export {where} as PEFT LoRA: only nn.Linear sites are exported, "
                         f"'{site}' is not one")
    if not _module_called(gm, site):
        raise ModelError(f"cannot export {where} as PEFT LoRA: the model uses the weight of '{site}' "
                         "functionally (F.linear(x, weight)), which peft's LoRA layer does not see")
    dora = [i for i in insertions if i.tuner == "dora"]
    if dora and len(insertions) > 1:
        raise ModelError(f"cannot export {where} as PEFT LoRA: DoRA stacked with another tuner on one "
                         "linear has no single peft layer")
    weight = linear.weight.detach()
    parts = []  # (row slice, A, B, scaling)
    for insertion in insertions:
        joint = gm.get_submodule(insertion.module_name)
        if joint.chunk_indices is None:
            labelled = [(slice(0, weight.shape[0]), joint.units[FULL])]
        else:
            size = weight.shape[0] // joint.chunk_count
            labelled = [(slice(i * size, (i + 1) * size), unit)
                        for i, unit in zip(joint.chunk_indices, joint.units.values())]
        for rows, unit in labelled:
            if insertion.tuner == "lowrank":
                parts.append((rows, unit.down.weight.detach(), unit.up.weight.detach(), unit.scaling))
            else:
                parts.append((rows, unit.lora_A.detach(), unit.lora_B.detach(), unit.scaling, unit))
    rank = sum(p[1].shape[0] for p in parts)
    scalings = {p[3] for p in parts}
    uniform = len(scalings) == 1
    A = torch.cat([p[1] for p in parts])
    B = weight.new_zeros(weight.shape[0], rank)
    column = 0
    for part in parts:
        rows, a, b, scaling = part[:4]
        B[rows, column:column + a.shape[0]] = b if uniform else b * scaling
        column += a.shape[0]
    magnitude = None
    if dora:
        # an untuned row keeps m = ||W_row||, so m / ||W_row + 0|| = 1 leaves it as it is
        magnitude = torch.linalg.norm(weight, dim=1)
        for part in parts:
            magnitude[part[0]] = part[4].magnitude.detach()
    return {"A": A, "B": B, "rank": rank, "alpha": (next(iter(scalings)) if uniform else 1.0) * rank,
            "magnitude": magnitude}


def _dropout(unit: nn.Module) -> float:
    dropout = getattr(unit, "dropout", None)
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _modules_to_save(gm: nn.Module, trained: list[str], targets: set[str]) -> list[str]:
    """The modules holding the base parameters that train; each must be peft-addressable: a
    submodule, not a LoRA target, whose name no other module's name ends with (peft matches
    ``modules_to_save`` with ``str.endswith``)."""
    names = [n for n, _ in gm.named_modules() if n]
    owners = sorted({name.rpartition(".")[0] for name in trained})
    if "" in owners:
        loose = [n for n in trained if "." not in n]
        raise ModelError(f"cannot export as PEFT LoRA: trained parameter(s) {listing(loose)} belong to no "
                         "submodule, and peft's modules_to_save holds whole modules")
    for owner in owners:
        if owner in targets:
            raise ModelError(f"cannot export as PEFT LoRA: '{owner}' both has LoRA and trains its own "
                             "parameters; peft's modules_to_save cannot wrap a LoRA target")
        clash = [n for n in names if n.endswith(owner) and n != owner]
        if clash:
            raise ModelError(f"cannot export as PEFT LoRA: peft's modules_to_save entry '{owner}' would "
                             f"also match {listing(clash)} (it matches by name suffix)")
    return owners


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s LoRA-family tuners as a PEFT LoRA adapter directory (``adapter_config.json``
    and ``adapter_model.safetensors``); return the directory. Raises :class:`ModelError` naming what
    a PEFT LoRA adapter cannot hold (other tuners, non-linear sites, LoRA and DoRA mixed, ...)."""
    info = compiled_info(model)
    other = [_describe(i) for i in info.plan.insertions if (i.placement, i.tuner) not in _LORA_FAMILY]
    if other:
        raise ModelError(f"cannot export as PEFT LoRA: {len(other)} insertion(s) are not LoRA or DoRA: "
                         f"{listing(other)}",
                         hint="PEFT LoRA holds parallel lowrank on linears, weight lora and weight dora; "
                              "export --merged writes a plain timm state dict instead")
    if not info.plan.insertions:
        raise ModelError("cannot export as PEFT LoRA: the spec inserts no tuner")
    kinds = {i.tuner == "dora" for i in info.plan.insertions}
    if len(kinds) > 1:
        raise ModelError("cannot export as PEFT LoRA: the spec mixes DoRA and LoRA sites, and peft's "
                         "use_dora applies to every target")
    by_site: dict[str, list] = {}
    for insertion in info.plan.insertions:
        by_site.setdefault(insertion.site, []).append(insertion)
    sites = {site: _site_lora(model, insertions) for site, insertions in by_site.items()}
    to_save = _modules_to_save(model, list(info.plan.trained), set(sites))
    norms = dict.fromkeys(name.rpartition(".")[0] for name in running_statistics(model))
    to_save += [owner for owner in norms if owner and owner not in to_save]   # batch norm statistics
    rank, alpha = Counter((s["rank"], s["alpha"]) for s in sites.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for site, lora in sites.items():
        tensors[f"{PEFT_PREFIX}{site}.lora_A.weight"] = lora["A"]
        tensors[f"{PEFT_PREFIX}{site}.lora_B.weight"] = lora["B"]
        if lora["magnitude"] is not None:
            tensors[f"{PEFT_PREFIX}{site}.lora_magnitude_vector"] = lora["magnitude"]
    for owner in to_save:
        for key, value in model.get_submodule(owner).state_dict().items():
            tensors[f"{PEFT_PREFIX}{owner}.{key}"] = value
    dropouts = {_dropout(u) for i in info.plan.insertions for u in model.get_submodule(i.module_name).units.values()}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": info.model_name,
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(sites),
        "rank_pattern": {re.escape(s): v["rank"] for s, v in sites.items() if v["rank"] != rank},
        "alpha_pattern": {re.escape(s): v["alpha"] for s, v in sites.items() if v["alpha"] != alpha},
        "use_dora": kinds == {True}, "use_rslora": False, "modules_to_save": to_save or None,
        "lora_dropout": dropouts.pop() if len(dropouts) == 1 else 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, directory / PEFT_WEIGHTS, {"format": "pt"})
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return directory
