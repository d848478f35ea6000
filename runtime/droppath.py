"""Stochastic depth (recipe field ``drop_path_rate``).

timm builds it into a model at creation: ``create_model(..., drop_path_rate=r)`` gives each block
a ``DropPath`` whose rate rises linearly from 0 (first block) to ``r`` (last). The compiled model
gets it because ``build_model`` passes the rate when it creates the backbone, and ``utdsl.compile``
traces the train graph (where DropPath draws a per-sample mask) apart from the eval graph (where
it is the identity), frozen backbone included. The masks come from torch's global generator,
which the training loop seeds per batch.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from utdsl.errors import ModelError

__all__ = ["drop_path_kwargs", "drop_path_rates"]


def drop_path_rates(model: nn.Module) -> list[float]:
    """The rates of ``model``'s DropPath modules (timm's, found by class name), in module order."""
    return [float(getattr(m, "drop_prob", 0.0)) for m in model.modules() if type(m).__name__ == "DropPath"]


def drop_path_kwargs(model: str, rate: float, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"drop_path_rate": rate}`` for ``create_model`` (empty for rate 0). A ModelError when the
    model takes no such argument, when it takes it and builds no DropPath from it, or when
    ``model_kwargs`` (``--model-arg``) sets another rate."""
    kwargs = dict(model_kwargs or {})
    if not rate:
        return {}
    if "drop_path_rate" in kwargs:
        if float(kwargs["drop_path_rate"]) == float(rate):
            return {}
        raise ModelError(f"the drop-path rate is set twice: --model-arg drop_path_rate={kwargs['drop_path_rate']} "
                         f"and the recipe's drop_path_rate={rate}", hint="set it once, with --drop-path")
    from .models import create_model

    try:
        probe = create_model(model, device="meta", drop_path_rate=rate, **kwargs)
    except TypeError as error:
        raise ModelError(f"model '{model}' takes no drop_path_rate ({error})",
                         hint="set the recipe's drop_path_rate to 0 for this model") from None
    if not any(drop_path_rates(probe)):
        raise ModelError(f"model '{model}' accepts drop_path_rate but builds no stochastic depth from it "
                         "(timm rates rise from 0 at the first block to drop_path_rate at the last: a model of "
                         "one block gets 0)", hint="set the recipe's drop_path_rate to 0 for this model")
    return {"drop_path_rate": rate}
