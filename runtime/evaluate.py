"""Evaluation: loss, top-1 and top-5 accuracy of a model on a data set, across ranks.

:func:`evaluate` is what the training loop calls after an epoch; :func:`evaluate_checkpoint`
(``utdsl eval``) rebuilds the compiled model a checkpoint was trained with, loads it and evaluates.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .distributed import DistContext, EpochSampler, all_reduce_sum

__all__ = ["EvalResult", "evaluate", "autocast_for", "topk_correct", "evaluate_checkpoint"]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss, top-1/top-5 accuracy in percent, sample count and images per second."""

    loss: float
    top1: float
    top5: float
    samples: int
    throughput: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``, or ``"auto"`` on CUDA; otherwise nothing."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their target among the k highest logits, for each k (k capped at the
    number of classes, so top-5 of a 3-class problem is 100%). A row holding inf or NaN counts as
    wrong: ``topk`` of all-NaN logits picks a fixed class, which an imbalanced split rewards."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets.unsqueeze(1)) & torch.isfinite(logits).all(dim=1, keepdim=True)
    return [int(hits[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 64, ctx: DistContext | None = None,
             precision: str = "auto", num_workers: int = 0, label_smoothing: float = 0.0,
             channels_last: bool = False) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (in eval mode, restored afterwards). Under DDP each rank
    takes every world-size-th sample, each sample counts once, and the result is the same on all.
    A cached split (:mod:`.data.cached`) is read through its own loader; ``channels_last`` puts
    4-d batches in that memory format (the model's is the caller's business)."""
    from .data.cached import make_loader
    from .features import to_memory_format

    ctx = ctx or DistContext()
    sampler = EpochSampler(len(dataset), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=False)
    loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=num_workers, device=ctx.device,
                         rank=ctx.rank)
    criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, samples
    start = time.perf_counter()
    try:
        for images, targets in loader:
            images = to_memory_format(images.to(ctx.device, non_blocking=True), channels_last)
            targets = torch.as_tensor(targets).to(ctx.device, non_blocking=True)
            with autocast_for(ctx.device, precision):
                logits = model(images)
            logits = logits.float()
            top1, top5 = topk_correct(logits, targets)
            totals += torch.tensor([criterion(logits, targets).item(), top1, top5, len(targets)],
                                   dtype=torch.float64, device=ctx.device)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    loss, top1, top5, samples = all_reduce_sum(totals.tolist(), ctx)
    elapsed = max(all_reduce_sum([elapsed], ctx)[0] / ctx.world_size, 1e-9)
    n = max(samples, 1.0)
    return EvalResult(loss / n, 100.0 * top1 / n, 100.0 * top5 / n, int(samples), samples / elapsed)


def evaluate_checkpoint(checkpoint: str | Path, *, data: str | None = None, data_root: str | None = None,
                        split: str | None = None, batch_size: int | None = None, device: str | None = None,
                        num_workers: int = 0, ctx: DistContext | None = None, accept_changed_weights: bool = False,
                        echo=None, channels_last: bool | None = None,
                        data_cache: str = "off", compiled: bool = False) -> tuple[EvalResult, dict]:
    """Evaluate a checkpoint written by ``utdsl train`` (a ``.safetensors`` file or a run directory,
    whose best checkpoint is used, else its last). ``data``/``data_root``/``split`` default to the
    run's. The run's ``--weights`` file must be the one it trained with (see
    :func:`~.provenance.verify_weights`). ``channels_last`` defaults to the run's recipe;
    ``data_cache`` (``off``, ``memory``, ``device``) caches the split first. A checkpoint of a run
    with an EMA holds the EMA's values (what the run evaluated); the description's ``params`` says
    which (``ema`` or ``raw``). ``compiled`` runs the forward through torch.compile
    (:mod:`.compiled`). Returns the result and a description of what was evaluated."""
    from . import config as run_config
    from .distributed import _pick_device
    from .provenance import verify_weights

    path, config = run_config.locate_checkpoint(checkpoint)
    verify_weights(config, accept_changed=accept_changed_weights, echo=echo)
    if data is not None:
        config = config.model_copy(update={"data": data, "data_root": data_root})
    elif data_root is not None:
        config = config.model_copy(update={"data_root": data_root})
    split = split or config.recipe.eval_split
    ctx = ctx or DistContext(device=_pick_device(device, 0))
    dataset = run_config.build_data(config, split, train=False)
    if channels_last is None:
        channels_last = config.recipe.channels_last
    classes = run_config.num_classes_of(dataset)
    if classes != config.num_classes:
        from utdsl.errors import DataError

        raise DataError(f"data set '{config.data}' has {classes} classes; the checkpoint's head has "
                        f"{config.num_classes}", hint="evaluate on the data set the run was trained on")
    model = run_config.build_model(config, run_config.spec_of(config), echo=lambda text: None)
    import utdsl

    from utdsl.checkpoint import read_metadata

    utdsl.load_tuners(model, path)
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dataset = run_config.cache_data(config, dataset, train=False, mode=data_cache, device=ctx.device)
    params = read_metadata(path).get("run.params") or ("ema" if config.recipe.ema_decay else "raw")
    from .compiled import compile_model

    result = evaluate(compile_model(model, compiled), dataset, batch_size=batch_size or config.recipe.batch_size,
                      ctx=ctx,
                      precision=config.recipe.precision, num_workers=num_workers, channels_last=channels_last)
    return result, {"checkpoint": str(path), "model": config.model, "spec": config.spec_name,
                    "data": config.data, "split": split, "params": params, "channels_last": channels_last}
