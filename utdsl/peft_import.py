"""Reading a PEFT LoRA adapter of a timm model into the equivalent utdsl model.

:func:`load_peft` reads ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``,
``modules_to_save``), finds the targets with peft's own matching rules (a list: the name or a
``.name`` suffix; a string: a full regex match; patterns: ``(.*\\.)?(key)$``, the first key that
matches), writes the spec (``^blocks.0.attn.qkv | ... -> weight lora(r=8, alpha=16)``, or ``dora``,
one rule per (r, alpha); ``train ^head`` for each module to save), compiles it into the model and
copies the tensors of ``adapter_model.safetensors``. The result gives peft's ``PeftModel`` outputs
(within float rounding). ``lora_dropout`` has no weight-space form and is dropped, with a warning:
it changes training, not evaluation. What the weight placement cannot express (``bias`` other than
``"none"``, ``fan_in_fan_out``, non-linear targets, layer selection, pickled ``.bin`` weights) is
a :class:`CheckpointError` saying so.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .export import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS
from .placements.base import FULL
from .verify import compiled_info

__all__ = ["load_peft", "peft_spec"]

#: config fields that change the model in ways a weight lora/dora cannot express: (field, harmless value)
_UNSUPPORTED = [("fan_in_fan_out", False), ("lora_bias", False), ("layers_to_transform", None),
                ("layers_pattern", None), ("target_parameters", None), ("trainable_token_indices", None),
                ("alora_invocation_tokens", None), ("layer_replication", None)]


def _matches(targets, name: str) -> bool:
    """peft's ``check_target_module_exists`` for a list of names or a regex string."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern(patterns: dict, name: str, default):
    """peft's ``get_pattern_key``: the value of the first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(directory: Path) -> dict:
    path = directory / PEFT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{directory}' has no {PEFT_CONFIG}: not a PEFT adapter directory") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"'{path}' is not valid JSON: {error}") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"'{path}' is a {config.get('peft_type')} adapter; only LORA adapters load")
    problems = [f"{key}={config[key]!r}" for key, harmless in _UNSUPPORTED if config.get(key) not in (harmless, None, [], {})]
    if config.get("bias", "none") != "none":
        problems.insert(0, f"bias={config['bias']!r}")
    if problems:
        raise CheckpointError(f"'{path}': a weight lora/dora cannot express {', '.join(problems)}",
                              hint="only plain LoRA/DoRA on linear layers (bias='none') loads into utdsl")
    return config


def peft_spec(config: dict, model: nn.Module) -> tuple[str, dict[str, str], list[str]]:
    """The spec text equivalent to a PEFT LoRA ``config`` on ``model``, the targets (path -> rule
    tuner) and the modules to save. Raises :class:`CheckpointError` for a target that is not a linear."""
    modules = dict(model.named_modules())
    targets = [n for n in modules if n and _matches(config.get("target_modules"), n)
               and not _matches(config.get("exclude_modules"), n)]
    if not targets:
        raise CheckpointError(f"the adapter's target_modules {config.get('target_modules')!r} match no "
                              "module of the model")
    bad = [f"{n} ({type(modules[n]).__name__})" for n in targets if not isinstance(modules[n], nn.Linear)]
    if bad:
        raise CheckpointError(f"PEFT targets that are not nn.Linear cannot load: {', '.join(bad[:5])}",
                              hint="conv and embedding LoRA layouts are not read")
    tuner = "dora" if config.get("use_dora") else "lora"
    groups: dict[tuple[int, float], list[str]] = {}
    for name in targets:
        r = int(_pattern(config.get("rank_pattern") or {}, name, config.get("r", 8)))
        alpha = float(_pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        if config.get("use_rslora"):
            alpha = alpha * r / math.sqrt(r)  # scaling alpha / sqrt(r) as utdsl's alpha / r
        groups.setdefault((r, alpha), []).append(name)
    lines = ['spec peft "a PEFT LoRA adapter, read by utdsl.load_peft"']
    for (r, alpha), names in groups.items():
        lines.append(" | ".join(f"^{n}" for n in names) + f" -> weight {tuner}(r={r}, alpha={alpha!r})")
    saved = [n for n in modules if n and any(n.endswith(t) for t in config.get("modules_to_save") or [])
             and any(True for _ in modules[n].parameters(recurse=True))]
    saved = [n for n in saved if not any(n.startswith(s + ".") for s in saved)]  # outermost only
    lines += [f"train ^{n}" for n in saved]
    return "\n".join(lines) + "\n", {n: tuner for n in targets}, saved


def load_peft(model: nn.Module, directory: str | os.PathLike, example_input: torch.Tensor | None = None):
    """Compile the utdsl equivalent of the PEFT LoRA adapter in ``directory`` into ``model`` (a
    copy; ``model`` is left as it is) and load its tensors; returns the tuned ``GraphModule``."""
    import utdsl
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = _read_config(directory)
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        found = [p.name for p in directory.glob("adapter_model.*")]
        raise CheckpointError(f"'{directory}' has no {PEFT_WEIGHTS}" + (f" (found {', '.join(found)})" if found else ""),
                              hint="only safetensors are read (no pickle); re-save it with "
                                   "save_pretrained(..., safe_serialization=True)")
    if config.get("lora_dropout"):
        warnings.warn(f"lora_dropout={config['lora_dropout']} is dropped: a weight lora has no input "
                      "dropout (evaluation is unchanged; training differs)", stacklevel=2)
    text, targets, saved = peft_spec(config, model)
    tuned = utdsl.compile(text, model, example_input)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read '{weights}': {error}") from None
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    joints = {i.site: tuned.get_submodule(i.module_name).units[FULL] for i in compiled_info(tuned).plan.insertions}
    destinations: dict[str, torch.Tensor] = {}
    for site, unit in joints.items():
        destinations[f"{site}.lora_A.weight"] = unit.lora_A
        destinations[f"{site}.lora_B.weight"] = unit.lora_B
        if targets[site] == "dora":
            destinations[f"{site}.lora_magnitude_vector"] = unit.magnitude
    own = dict(tuned.state_dict(keep_vars=True))
    for owner in saved:
        destinations.update({k: own[k] for k in own if k.startswith(owner + ".")})
    aliases = {f"{k}.weight": k for k in destinations if k.endswith(".lora_magnitude_vector")}  # older peft
    state = {aliases.get(k, k): v for k, v in state.items()}
    missing = [k for k in destinations if k not in state and not any(k.startswith(s + ".") for s in saved)]
    unknown = [k for k in state if k not in destinations]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(unknown[:3])}"] if unknown else [])
        raise CheckpointError(f"'{weights}' does not fit its adapter config on this model: {'; '.join(parts)}")
    with torch.no_grad():
        for key, value in state.items():
            target = destinations[key]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"'{weights}': {key} has shape {tuple(value.shape)}, the model's "
                                      f"has {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
    return tuned
