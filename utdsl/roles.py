"""Roles: modules a selector names by what they do rather than by path (``@classifier``).

A role is looked up on the model itself, so one spec fits backbones that name the module
differently: the classifier is ``head`` in a timm ViT, ``fc`` in a ResNet, ``classifier`` in an
EfficientNet or a Hugging Face ViT, ``heads.head`` in torchvision's ViT. A role the model does not
have (a headless ``num_classes=0`` model has no classifier) matches nothing.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["ROLES", "role_paths", "classifier_paths"]

#: names tried, rooted, when a model has no ``get_classifier()``
_CLASSIFIER_NAMES = ("head", "fc", "classifier", "heads", "last_linear")


def classifier_paths(model: nn.Module) -> tuple[str, ...]:
    """Paths of the modules timm's ``get_classifier()`` returns (a tuple for distilled models),
    else of the first top-level ``head``/``fc``/``classifier``/``heads``/``last_linear``; only
    modules holding parameters count (an ``nn.Identity`` head is no classifier)."""
    paths = {id(module): name for name, module in model.named_modules() if name}
    getter = getattr(model, "get_classifier", None)
    found: list[nn.Module] = []
    if callable(getter):
        try:
            got = getter()
        except Exception:  # a get_classifier that needs arguments or state: fall back to names
            got = None
        found = [m for m in (got if isinstance(got, (tuple, list)) else (got,)) if isinstance(m, nn.Module)]
    if not found:
        found = [getattr(model, name) for name in _CLASSIFIER_NAMES
                 if isinstance(getattr(model, name, None), nn.Module)][:1]
    return tuple(paths[id(m)] for m in found
                 if id(m) in paths and any(True for _ in m.parameters()))


#: role name -> function(model) -> the paths of the modules playing it
ROLES: dict[str, Callable[[nn.Module], tuple[str, ...]]] = {
    "classifier": classifier_paths,
}


def role_paths(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every role's module paths in ``model`` (empty where the model has no such module)."""
    return {name: find(model) for name, find in ROLES.items()}
