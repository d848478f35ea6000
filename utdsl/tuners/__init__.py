"""The tuner registry: one small module per tuner; a new tuner is a new module with
``@register`` on its class and an import below."""

from __future__ import annotations

from .base import SiteInfo, Tuner, TunerArgs

__all__ = ["SiteInfo", "Tuner", "TunerArgs", "register", "get", "names", "REGISTRY"]

REGISTRY: dict[str, type[Tuner]] = {}


def register(cls: type[Tuner]) -> type[Tuner]:
    """Class decorator adding a tuner to the registry under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"tuner {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Tuner] | None:
    return REGISTRY.get(name)


def names() -> list[str]:
    return sorted(REGISTRY)


from . import adapter, affine, kv, lowrank, tokens  # noqa: E402,F401  (registration side effect)
from . import boft, dora, fact, hadamard, lokr, loha, lora, oft, vera  # noqa: E402,F401  (weight space)
