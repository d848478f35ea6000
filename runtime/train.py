"""The training loop: ``fit`` trains any model whose trainable parameters require grad, ``train``
builds a run (spec + model + data + recipe) and fits it (``utdsl train``).

Per optimizer step: ``grad_accum`` forward/backward passes (DDP gradient sync only on the last),
optional gradient clipping, the learning rate of the step (:func:`~.optim.lr_at`), one optimizer
step. bf16 autocast on CUDA (``precision="auto"``). After each epoch: evaluation (top-1/top-5) on
the evaluation split, a metrics line, ``last`` and (on a better top-1) ``best`` tuner checkpoints
and the resume state, all written by rank 0.

Determinism: the data order is a function of (seed, epoch), each sample's augmentation of
(seed, epoch, index), and the random state of each forward pass (dropout, drop-path) is re-seeded
from (seed, rank, epoch, batch). A run resumed from any saved state therefore ends with bitwise
the same weights as an uninterrupted run (on CPU; on CUDA as far as its kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from utdsl.errors import CheckpointError, DataError

from .budget import check_tuner_memory
from .compiled import compile_model
from .config import RunConfig, build_data, build_model, cache_data, checkpoint_metadata
from .data.cached import make_loader
from .data.scan import scan_images, warn_if_one_class
from .features import RunFeatures, profile, summary_row
from .loggers import check_backends, open_loggers
from .profiling import SavedActivations, reset_peak_memory
from .provenance import config_digest, verify_weights
from .distributed import DistContext, EpochSampler, all_reduce_sum, barrier, mix_seed
from .evaluate import EvalResult, autocast_for, evaluate
from .guard import DIVERGED_HINT, Interrupted, NonFiniteError, StopRequest, first_nonfinite, step_flags
from .optim import build_optimizer, lr_at, schedule_info, set_lr
from .recipes import Recipe
from .rundir import RunDir, TrainState

__all__ = ["FitResult", "fit", "train", "progress_enabled"]


@dataclass
class FitResult:
    """How ``fit`` ended: the loop state, the last evaluation, and whether it stopped early."""

    state: TrainState
    last_eval: EvalResult | None
    stopped: bool = False


def progress_enabled(requested: bool | None = None) -> bool:
    """Progress bars on request, else only on an interactive terminal outside CI."""
    if requested is not None:
        return requested
    return sys.stderr.isatty() and not os.environ.get("CI")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _batches(n: int, recipe: Recipe, ctx: DistContext) -> int:
    per_rank = len(EpochSampler(n, world_size=ctx.world_size, rank=ctx.rank, shuffle=False))
    return math.ceil(per_rank / recipe.batch_size)


def _wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from .distributed import watch_ddp

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return watch_ddp(DistributedDataParallel(model, device_ids=ids))  # a wait for a stalled peer is reported


def fit(model: nn.Module, train_set: Dataset, eval_set: Dataset | None, recipe: Recipe, run: RunDir, *,
        ctx: DistContext | None = None, resume: bool = False, num_workers: int = 0,
        progress: bool | None = None, checkpoint_every: int = 0, metadata: Mapping[str, str] | None = None,
        stop_after_steps: int | None = None, log_to: Sequence[str] = (), compiled: bool = False) -> FitResult:
    """Train ``model``'s trainable parameters on ``train_set`` with ``recipe``, writing to ``run``.

    ``resume`` continues from ``run``'s saved state (parameters, optimizer, position); the metrics
    lines written after that state are dropped first. ``checkpoint_every`` also saves the state every
    N optimizer steps inside an epoch. ``stop_after_steps`` stops after that many optimizer steps in
    all, as if killed (nothing more is saved); tests use it. ``metadata`` goes into the tuner
    checkpoints, with ``run.epoch``/``run.step``/``run.top1`` added.

    A step whose loss or gradient is inf or NaN stops the run with :class:`NonFiniteError`
    (``recipe.nonfinite="error"``) or is skipped (``"skip"``: no update, counted in the epoch's
    ``skipped_steps``); an evaluation with a non-finite loss never becomes ``best``. The first
    SIGINT stops at the next step boundary: the resume state is saved there and
    :class:`Interrupted` is raised.

    The recipe's features (:mod:`.features`): channels-last, mixup/CutMix, an EMA of the trained
    parameters (evaluated and saved instead of them; epoch rows say ``eval_params``), layer-wise
    lr decay (:mod:`.optim`). Rows go to ``metrics.jsonl``, ``RUN/tensorboard`` and the optional
    backends of ``log_to`` (:mod:`.loggers`). ``compiled`` runs the training and evaluation
    forward through torch.compile (:mod:`.compiled`); checkpoints are the same. A session that trained ends with a ``summary`` row:
    parameters, FLOPs of one forward at batch 1, peak memory (and its source), bytes saved for
    backward by one batch, training and evaluation images/s.
    """
    ctx = ctx or DistContext()
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise DataError("the training split is empty")
    model.to(ctx.device)
    features = RunFeatures(model, recipe)
    optimizer = build_optimizer(model, recipe)
    n_batches = _batches(len(train_set), recipe, ctx)
    steps_per_epoch = math.ceil(n_batches / recipe.grad_accum)
    schedule = schedule_info(recipe, steps_per_epoch)
    state = TrainState(schedule=schedule)
    if resume:
        loaded = run.load_state(model, optimizer, features.ema)
        if loaded is not None:
            if loaded.schedule != schedule:
                raise CheckpointError(f"{run.state_path}: saved for schedule {loaded.schedule}, "
                                      f"this run has {schedule}", hint="resume with the same recipe and data")
            state = loaded
        if ctx.is_main:
            run.truncate_metrics(state)
    costs = profile(model, train_set, recipe.seed) if ctx.is_main else {}
    reset_peak_memory(ctx.device)
    logger = open_loggers(run, log_to, purge_step=state.step + 1 if resume else None,
                          config=run.read_config() if run.exists() else None) if ctx.is_main else None
    net = compile_model(_wrap(model, ctx), compiled)     # the forward only: saving reads ``model``
    eval_net = compile_model(model, compiled) if ctx.distributed else net
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    last_eval: EvalResult | None = None
    if not ctx.is_main:  # the saved sums are totals over ranks: rank 0 carries them on
        state.epoch_loss_sum, state.epoch_samples, state.log_loss_sum, state.log_samples = 0.0, 0, 0.0, 0
    loss_sum = torch.tensor(state.epoch_loss_sum, dtype=torch.float64, device=ctx.device)
    log_loss = torch.tensor(state.log_loss_sum, dtype=torch.float64, device=ctx.device)
    log_samples, log_time = state.log_samples, time.perf_counter()
    step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)  # the step's loss, for the guard
    skipped = 0
    session_seen, session_time, activation_bytes = 0, 0.0, None

    def save_state() -> None:  # collective: every rank calls it at the same step
        sums = all_reduce_sum([loss_sum.item(), state.epoch_samples, log_loss.item(), log_samples], ctx)
        if ctx.is_main:
            run.save_state(model, optimizer, dataclasses.replace(
                state, epoch_loss_sum=sums[0], epoch_samples=int(sums[1]), log_loss_sum=sums[2],
                log_samples=int(sums[3])), extra=features.ema)
    with StopRequest() as stop, _progress(ctx.is_main and progress_enabled(progress)) as bars, \
            (logger or contextlib.nullcontext()):
        epochs_bar = bars.add_task("epochs", total=recipe.epochs, completed=state.epoch, info="")
        steps_bar = bars.add_task("steps", total=n_batches, completed=state.batch, info="")
        for epoch in range(state.epoch, recipe.epochs):
            bars.reset(steps_bar, total=n_batches, completed=state.batch, description=f"epoch {epoch + 1}")
            sampler = EpochSampler(len(train_set), seed=recipe.seed, epoch=epoch, rank=ctx.rank,
                                   world_size=ctx.world_size, start=state.batch * recipe.batch_size)
            loader = make_loader(train_set, sampler, batch_size=recipe.batch_size, seed=recipe.seed,
                                 num_workers=num_workers, device=ctx.device, rank=ctx.rank)
            epoch_start, seen = time.perf_counter(), 0
            net.train()
            for images, targets in loader:
                index = state.batch
                group_start = index - index % recipe.grad_accum
                group = min(recipe.grad_accum, n_batches - group_start)
                syncs = index - group_start == group - 1
                images = images.to(ctx.device, non_blocking=True)
                targets = torch.as_tensor(targets).to(ctx.device, non_blocking=True)
                torch.manual_seed(mix_seed(recipe.seed, ctx.rank, epoch, index))
                batch = features.batch(images, targets, ctx.rank, epoch, index)
                no_sync = net.no_sync() if ctx.distributed and not syncs else contextlib.nullcontext()
                measuring = activation_bytes is None and not compiled  # saved-tensor hooks would break graphs
                measure = SavedActivations(model) if measuring else contextlib.nullcontext()
                with no_sync:
                    with autocast_for(ctx.device, recipe.precision), measure:
                        logits = net(batch.images)
                    loss = criterion(logits.float(), batch.loss_targets(logits.shape[1]))
                    (loss / group).backward()
                if measuring:
                    activation_bytes = measure.bytes
                batch_loss = loss.detach().double() * len(targets)
                step_loss += batch_loss
                loss_sum += batch_loss
                log_loss += batch_loss
                state.epoch_samples += len(targets)
                log_samples += len(targets)
                seen += len(targets)
                state.batch += 1
                bars.advance(steps_bar)
                if not syncs:
                    continue
                lr = lr_at(state.step, recipe, steps_per_epoch)
                set_lr(optimizer, lr)
                nonfinite, stopping = step_flags(step_loss, model, stop, ctx)
                step_loss.zero_()
                if nonfinite and recipe.nonfinite == "error":
                    raise _diverged(model, loss, state.step, epoch, run)
                if nonfinite:
                    skipped += 1
                else:
                    if recipe.clip_grad:
                        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.clip_grad)
                    optimizer.step()
                    features.stepped()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if state.step % recipe.log_every == 0:
                    total_loss, samples = all_reduce_sum([log_loss.item(), log_samples], ctx)
                    now = time.perf_counter()
                    row = {"kind": "step", "step": state.step, "epoch": epoch, "loss": total_loss / max(samples, 1),
                           "lr": lr, "throughput": samples / max(now - log_time, 1e-9)}
                    bars.update(steps_bar, info=f"loss {row['loss']:.4f} lr {lr:.2e}")
                    if logger is not None:
                        logger.log(row)
                    log_loss.zero_()
                    log_samples, log_time = 0, now
                if checkpoint_every and state.step % checkpoint_every == 0 and state.batch < n_batches:
                    save_state()
                if stop_after_steps is not None and state.step >= stop_after_steps:
                    return FitResult(state, last_eval, stopped=True)
                if stopping:
                    save_state()
                    raise Interrupted(f"interrupted at step {state.step} (epoch {epoch + 1}); "
                                      f"resume with utdsl train --resume {run.path}")
            epoch_time = time.perf_counter() - epoch_start
            session_seen, session_time = session_seen + seen, session_time + epoch_time
            total_loss, samples, seen_all, elapsed = all_reduce_sum(
                [loss_sum.item(), state.epoch_samples, seen, epoch_time], ctx)
            row: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": state.step,
                                   "loss": total_loss / max(samples, 1),
                                   "lr": lr_at(state.step - 1, recipe, steps_per_epoch),
                                   "throughput": seen_all / max(elapsed / ctx.world_size, 1e-9)}
            if eval_set is not None and ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
                with features.evaluated():
                    last_eval = evaluate(eval_net, eval_set, batch_size=recipe.batch_size, ctx=ctx,
                                         precision=recipe.precision, num_workers=num_workers,
                                         channels_last=recipe.channels_last)
                row.update(top1=last_eval.top1, top5=last_eval.top5, eval_loss=last_eval.loss,
                           eval_throughput=last_eval.throughput, eval_params=features.evaluated_params)
                if not math.isfinite(last_eval.loss) and recipe.nonfinite == "error":
                    raise NonFiniteError(f"epoch {epoch + 1}: the evaluation loss is {last_eval.loss} (the model's "
                                         f"outputs are not finite); nothing of this epoch was saved",
                                         hint=DIVERGED_HINT)
            if skipped:
                row["skipped_steps"], skipped = skipped, 0
            state.epoch, state.batch, state.epoch_samples = epoch + 1, 0, 0
            loss_sum.zero_()
            improved = (last_eval is not None and "top1" in row and math.isfinite(last_eval.loss)
                        and (state.best_top1 is None or last_eval.top1 > state.best_top1))
            if improved:
                state.best_top1, state.best_epoch = last_eval.top1, epoch
            if logger is not None:  # metrics first: a resume drops lines newer than the state it finds
                logger.log(row)
                meta = dict(metadata or {})
                meta.update({"run.epoch": str(epoch), "run.step": str(state.step), "run.top1": str(row.get("top1", "")),
                             "run.params": features.evaluated_params})
                with features.evaluated():
                    run.save_tuners(model, "last", meta)
                    if improved:
                        run.save_tuners(model, "best", meta)
            save_state()
            bars.advance(epochs_bar)
            bars.update(epochs_bar, info=f"top1 {row['top1']:.2f}" if "top1" in row else "")
        seen_all, elapsed = all_reduce_sum([session_seen, session_time], ctx)
        if logger is not None and seen_all:
            logger.log(summary_row(state.step, state.epoch, costs, ctx.device, samples=seen_all,
                                   train_seconds=elapsed / ctx.world_size, activation_bytes=activation_bytes,
                                   eval_throughput=last_eval.throughput if last_eval else None,
                                   evaluated_params=features.evaluated_params))
    barrier(ctx)
    return FitResult(state, last_eval)


def _diverged(model: nn.Module, loss: torch.Tensor, step: int, epoch: int, run: RunDir) -> NonFiniteError:
    """The error of a step whose loss or gradients are not finite, naming the first culprit."""
    if not bool(torch.isfinite(loss.detach()).all()):
        what = f"the loss is {loss.item()}"
    else:
        name = first_nonfinite((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
        what = f"the gradient of '{name}' is not finite" if name else "a gradient is not finite"
    kept = ("the checkpoints hold the last finite epoch" if run.checkpoint("last").is_file()
            else "no checkpoint was written")
    return NonFiniteError(f"training diverged at step {step + 1} (epoch {epoch + 1}): {what}; the run stopped "
                          f"and {kept}", hint=DIVERGED_HINT)


def train(config: RunConfig | None, run_dir: str | os.PathLike, *, resume: bool = False,
          ctx: DistContext | None = None, num_workers: int = 0, progress: bool | None = None,
          checkpoint_every: int = 0, stop_after_steps: int | None = None,
          echo: Callable[[str], Any] | None = None, bad_images: str = "error",
          accept_changed_weights: bool = False, yes: bool = False, log_to: Sequence[str] = (),
          compiled: bool = False) -> FitResult:
    """Run ``utdsl train``: write ``config`` to a new run directory, build the compiled model and
    the data sets, and :func:`fit`. With ``resume``, the configuration is the run directory's own
    (``config`` must be None or equal to it) and training continues where its state left off.
    ``echo`` receives warnings meant for the user (a random backbone).

    Before the first epoch: the run directory must be writable; image files are scanned
    (``bad_images``: ``"error"`` lists unreadable ones, ``"skip"`` leaves them out); a new run's
    tuners must fit the memory bound of :mod:`.budget` unless ``yes``; a resume needs the same
    ``--weights`` file (``accept_changed_weights`` accepts another) and an unedited config.json,
    and removes temporary files a killed write left. ``log_to`` names optional logging backends
    (``wandb``, ``mlflow``), checked before anything is built. With the recipe's ``data_cache``
    the scanned splits are decoded once into uint8 caches (:func:`~.config.cache_data`)."""
    ctx = ctx or DistContext()
    check_backends(log_to)
    run = RunDir(run_dir)
    if resume:
        saved = RunConfig.model_validate(run.read_config())
        if config is not None and config != saved:
            raise CheckpointError(f"'{run.path}' was started with another configuration",
                                  hint="resume with --resume RUN alone; the run's config.json is used")
        if saved.world_size != ctx.world_size:
            raise CheckpointError(f"'{run.path}' ran on {saved.world_size} process(es), this is {ctx.world_size}",
                                  hint="an exact resume needs the same number of processes")
        config = saved
        verify_weights(config, accept_changed=accept_changed_weights, echo=echo)
        if ctx.is_main:
            run.clean_stale()
    else:
        if config is None:
            raise ValueError("train() needs a config unless resuming")
        if run.exists():
            raise CheckpointError(f"run directory '{run.path}' already holds a run",
                                  hint="continue it with --resume, or choose another --out")
        config = config.model_copy(update={"world_size": ctx.world_size})
        check_tuner_memory(config, yes)
    if ctx.is_main:
        run.check_writable()
    recipe = config.recipe
    model = build_model(config, echo=echo)  # a spec that does not fit the model fails before any file
    quiet = echo if ctx.is_main else None
    train_set = scan_images(build_data(config, recipe.train_split, train=True), bad_images, quiet)
    warn_if_one_class(train_set, quiet)
    eval_set = (scan_images(build_data(config, recipe.eval_split, train=False), bad_images, quiet)
                if recipe.eval_split else None)
    if recipe.data_cache != "off":
        train_set = cache_data(config, train_set, train=True, mode=recipe.data_cache, device=ctx.device)
        if eval_set is not None:
            eval_set = cache_data(config, eval_set, train=False, mode=recipe.data_cache, device=ctx.device)
    if not resume:
        barrier(ctx)  # every rank has checked the directory before rank 0 creates it
        if ctx.is_main:
            run.write_config(config.model_dump(mode="json"))
    run.identity = config_digest(run.read_config()) if ctx.is_main else None
    return fit(model, train_set, eval_set, recipe, run, ctx=ctx, resume=resume, num_workers=num_workers,
               progress=progress, checkpoint_every=checkpoint_every, metadata=checkpoint_metadata(config),
               stop_after_steps=stop_after_steps, log_to=log_to, compiled=compiled)
