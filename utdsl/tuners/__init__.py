"""The tuner registry: one small module per tuner; a new tuner is a new module with
``@register`` on its class and an import below. Tuners from other packages come through
:func:`register_tuner` or, loaded lazily on first use, the ``utdsl.tuners`` entry-point group
(:mod:`utdsl.tuners.plugins`)."""

from __future__ import annotations

from .base import SiteInfo, Tuner, TunerArgs

__all__ = ["SiteInfo", "Tuner", "TunerArgs", "register", "register_tuner", "get", "names", "REGISTRY"]

REGISTRY: dict[str, type[Tuner]] = {}


def register(cls: type[Tuner]) -> type[Tuner]:
    """Class decorator adding a tuner to the registry under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"tuner {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Tuner] | None:
    """The tuner ``name``: registered, else loaded from an installed ``utdsl.tuners`` entry point;
    None when neither knows it."""
    found = REGISTRY.get(name)
    if found is None and isinstance(name, str):
        found = plugins.load_entry_point(name)
    return found


def names() -> list[str]:
    """Every tuner name a spec may use: registered ones and installed entry points (not loaded)."""
    return sorted(set(REGISTRY) | set(plugins.entry_point_names()))


from . import plugins  # noqa: E402
from .plugins import register_tuner  # noqa: E402
from . import adapter, affine, kv, lowrank, tokens  # noqa: E402,F401  (registration side effect)
from . import conv_adapter, mona  # noqa: E402,F401  (token grid)
from . import boft, dora, fact, hadamard, lokr, loha, lora, oft, vera  # noqa: E402,F401  (weight space)
from . import res_adapter  # noqa: E402,F401  (side chains)
