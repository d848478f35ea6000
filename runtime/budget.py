"""A bound on the memory a spec's tuners take, checked before anything is allocated.

A typo such as ``length=3000000`` or ``dim=10**8`` would otherwise allocate gigabytes (or crash
the allocator) while building the model. :func:`check_tuner_memory` compiles the spec on the meta
device (no memory), counts the plan's tuner parameters and refuses a plan whose training state
(parameters, gradients and two AdamW moments: 16 bytes a parameter in fp32) exceeds
:data:`TUNER_BYTES_LIMIT`, unless the user confirmed with ``--yes``.
"""

from __future__ import annotations

import torch

from utdsl.errors import ModelError

__all__ = ["TUNER_BYTES_LIMIT", "BYTES_PER_PARAM", "tuner_parameters", "check_tuner_memory", "refuse_large_tuners"]

TUNER_BYTES_LIMIT = 4 * 2**30
BYTES_PER_PARAM = 16


def tuner_parameters(config) -> int:
    """Tuner parameters of the run's plan, from a compile on the meta device."""
    import utdsl
    from .config import model_kwargs, spec_of
    from .models import create_model

    base = create_model(config.model, device="meta", num_classes=config.num_classes, **model_kwargs(config))
    size = config.recipe.input_size
    example = torch.zeros(2, 3, size, size, device="meta")
    tuned = utdsl.compile(spec_of(config), base, example, inplace=True, model_name=config.model)
    return int(tuned.meta["utdsl"].plan.tuner_params)


def check_tuner_memory(config, yes: bool = False, limit: int = TUNER_BYTES_LIMIT) -> int:
    """The tuner parameter count; a :class:`ModelError` when their training state would exceed
    ``limit`` bytes and ``yes`` is false."""
    params = tuner_parameters(config)
    refuse_large_tuners(params, yes, BYTES_PER_PARAM, "to train (weights, gradients, optimizer state)", limit)
    return params


def refuse_large_tuners(params: int, yes: bool, bytes_per_param: int, purpose: str,
                        limit: int = TUNER_BYTES_LIMIT) -> None:
    """A :class:`ModelError` when ``params`` tuner parameters at ``bytes_per_param`` exceed
    ``limit`` bytes and the user did not confirm with ``yes``."""
    need = params * bytes_per_param
    if need > limit and not yes:
        raise ModelError(f"the spec's tuners have {params:,} parameters: about {need / 2**30:.1f} GiB {purpose}, "
                         f"above the {limit / 2**30:.0f} GiB bound",
                         hint="check the tuner sizes in the spec (utdsl compile shows the plan); "
                              "pass --yes to go ahead anyway")
