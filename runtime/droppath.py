"""Stochastic depth (recipe field ``drop_path_rate``): passed to ``timm.create_model`` as
``drop_path_rate``, which timm spreads linearly over the blocks (0 at the first, the rate at the
last). The backbone's DropPath layers act in train mode only, frozen backbone included."""

from __future__ import annotations

from typing import Any

from utdsl.errors import ModelError

__all__ = ["drop_path_kwargs"]


def drop_path_kwargs(model: str, rate: float, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"drop_path_rate": rate}`` for ``create_model`` (empty for rate 0); a ModelError when the
    model takes no such argument."""
    if not rate:
        return {}
    from .models import create_model

    try:
        create_model(model, device="meta", drop_path_rate=rate, **(model_kwargs or {}))
    except TypeError as error:
        raise ModelError(f"model '{model}' takes no drop_path_rate ({error})",
                         hint="set the recipe's drop_path_rate to 0 for this model") from None
    return {"drop_path_rate": rate}
