"""The training loop: :func:`fit` trains any model whose trainable parameters require grad.

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
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from utdsl.errors import CheckpointError, DataError

from .compiled import compile_model
from .data.cached import make_loader
from .distributed import DistContext, EpochSampler, all_reduce_sum, barrier, mix_seed
from .evaluate import EvalResult, autocast_for, evaluate
from .features import RunFeatures, profile, summary_row
from .guard import DIVERGED_HINT, Interrupted, NonFiniteError, StopRequest, first_nonfinite, step_flags
from .loggers import open_loggers
from .optim import build_optimizer, lr_at, schedule_info, set_lr
from .profiling import SavedActivations, reset_peak_memory
from .recipes import Recipe
from .rundir import RunDir, TrainState

__all__ = ["FitResult", "fit", "progress_enabled"]


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
    session = _Session(model, train_set, eval_set, recipe, run, ctx=ctx or DistContext(), resume=resume,
                       num_workers=num_workers, checkpoint_every=checkpoint_every, metadata=metadata,
                       stop_after_steps=stop_after_steps, log_to=log_to, compiled=compiled)
    return session.run(progress)


class _Session:
    """One call of :func:`fit`: what the loop carries from batch to batch, and a method a stage
    (a batch's forward and backward, an optimizer step, a step's log line, an epoch's end)."""

    def __init__(self, model: nn.Module, train_set: Dataset, eval_set: Dataset | None, recipe: Recipe,
                 run: RunDir, *, ctx: DistContext, resume: bool, num_workers: int, checkpoint_every: int,
                 metadata: Mapping[str, str] | None, stop_after_steps: int | None, log_to: Sequence[str],
                 compiled: bool):
        if len(train_set) == 0:  # type: ignore[arg-type]
            raise DataError("the training split is empty")
        self.model, self.train_set, self.eval_set, self.recipe = model, train_set, eval_set, recipe
        self.run_dir = run
        self.ctx, self.num_workers, self.compiled = ctx, num_workers, compiled
        self.checkpoint_every, self.metadata, self.stop_after_steps = checkpoint_every, metadata, stop_after_steps
        model.to(ctx.device)
        self.features = RunFeatures(model, recipe)
        self.optimizer = build_optimizer(model, recipe)
        self.n_batches = _batches(len(train_set), recipe, ctx)
        self.steps_per_epoch = math.ceil(self.n_batches / recipe.grad_accum)
        schedule = schedule_info(recipe, self.steps_per_epoch)
        self.state = state = TrainState(schedule=schedule)
        if resume:
            loaded = run.load_state(model, self.optimizer, self.features.ema)
            if loaded is not None:
                if loaded.schedule != schedule:
                    raise CheckpointError(f"{run.state_path}: saved for schedule {loaded.schedule}, "
                                          f"this run has {schedule}", hint="resume with the same recipe and data")
                self.state = state = loaded
            if ctx.is_main:
                run.truncate_metrics(state)
        self.costs = profile(model, train_set, recipe.seed) if ctx.is_main else {}
        reset_peak_memory(ctx.device)
        self.logger = open_loggers(run, log_to, purge_step=state.step + 1 if resume else None,
                                   config=run.read_config() if run.exists() else None) if ctx.is_main else None
        self.net = compile_model(_wrap(model, ctx), compiled)     # the forward only: saving reads ``model``
        self.eval_net = compile_model(model, compiled) if ctx.distributed else self.net
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.last_eval: EvalResult | None = None
        if not ctx.is_main:  # the saved sums are totals over ranks: rank 0 carries them on
            state.epoch_loss_sum, state.epoch_samples, state.log_loss_sum, state.log_samples = 0.0, 0, 0.0, 0
        self.loss_sum = torch.tensor(state.epoch_loss_sum, dtype=torch.float64, device=ctx.device)
        self.log_loss = torch.tensor(state.log_loss_sum, dtype=torch.float64, device=ctx.device)
        self.log_samples, self.log_time = state.log_samples, time.perf_counter()
        self.step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)  # the step's loss, for the guard
        self.skipped = 0
        self.session_seen, self.session_time, self.activation_bytes = 0, 0.0, None

    def run(self, progress: bool | None) -> FitResult:
        ctx, state = self.ctx, self.state
        with StopRequest() as self.stop, _progress(ctx.is_main and progress_enabled(progress)) as self.bars, \
                (self.logger or contextlib.nullcontext()):
            self.epochs_bar = self.bars.add_task("epochs", total=self.recipe.epochs, completed=state.epoch, info="")
            self.steps_bar = self.bars.add_task("steps", total=self.n_batches, completed=state.batch, info="")
            for epoch in range(state.epoch, self.recipe.epochs):
                stopped = self._epoch(epoch)
                if stopped is not None:
                    return stopped
            seen_all, elapsed = all_reduce_sum([self.session_seen, self.session_time], ctx)
            if self.logger is not None and seen_all:
                self.logger.log(summary_row(
                    state.step, state.epoch, self.costs, ctx.device, samples=seen_all,
                    train_seconds=elapsed / ctx.world_size, activation_bytes=self.activation_bytes,
                    eval_throughput=self.last_eval.throughput if self.last_eval else None,
                    evaluated_params=self.features.evaluated_params))
        barrier(ctx)
        return FitResult(state, self.last_eval)

    def save_state(self) -> None:
        """The resume state (collective: every rank calls it at the same step)."""
        sums = all_reduce_sum([self.loss_sum.item(), self.state.epoch_samples, self.log_loss.item(),
                               self.log_samples], self.ctx)
        if self.ctx.is_main:
            self.run_dir.save_state(self.model, self.optimizer, dataclasses.replace(
                self.state, epoch_loss_sum=sums[0], epoch_samples=int(sums[1]), log_loss_sum=sums[2],
                log_samples=int(sums[3])), extra=self.features.ema)

    def _epoch(self, epoch: int) -> FitResult | None:
        """One epoch from the state's position; a :class:`FitResult` when it stopped early."""
        recipe, ctx, state = self.recipe, self.ctx, self.state
        self.bars.reset(self.steps_bar, total=self.n_batches, completed=state.batch, description=f"epoch {epoch + 1}")
        sampler = EpochSampler(len(self.train_set), seed=recipe.seed, epoch=epoch, rank=ctx.rank,
                               world_size=ctx.world_size, start=state.batch * recipe.batch_size)
        loader = make_loader(self.train_set, sampler, batch_size=recipe.batch_size, seed=recipe.seed,
                             num_workers=self.num_workers, device=ctx.device, rank=ctx.rank,
                             decode=recipe.decode)
        epoch_start, seen = time.perf_counter(), 0
        self.net.train()
        for images, targets in loader:
            seen += len(targets)
            if self._forward_backward(epoch, images, targets):
                stopped = self._optimizer_step(epoch)
                if stopped is not None:
                    return stopped
        epoch_time = time.perf_counter() - epoch_start
        self.session_seen, self.session_time = self.session_seen + seen, self.session_time + epoch_time
        self._end_epoch(epoch, seen, epoch_time)
        return None

    def _forward_backward(self, epoch: int, images: torch.Tensor, targets) -> bool:
        """One batch's forward and backward (gradients accumulate); whether it ends a step."""
        recipe, ctx, state = self.recipe, self.ctx, self.state
        index = state.batch
        group_start = index - index % recipe.grad_accum
        group = min(recipe.grad_accum, self.n_batches - group_start)
        syncs = index - group_start == group - 1
        images = images.to(ctx.device, non_blocking=True)
        targets = torch.as_tensor(targets).to(ctx.device, non_blocking=True)
        torch.manual_seed(mix_seed(recipe.seed, ctx.rank, epoch, index))
        batch = self.features.batch(images, targets, ctx.rank, epoch, index)
        no_sync = self.net.no_sync() if ctx.distributed and not syncs else contextlib.nullcontext()
        measuring = self.activation_bytes is None and not self.compiled  # saved-tensor hooks would break graphs
        measure = SavedActivations(self.model) if measuring else contextlib.nullcontext()
        with no_sync:
            with autocast_for(ctx.device, recipe.precision), measure:
                logits = self.net(batch.images)
            loss = self.criterion(logits.float(), batch.loss_targets(logits.shape[1]))
            (loss / group).backward()
        if measuring:
            self.activation_bytes = measure.bytes
        self.last_loss = loss
        batch_loss = loss.detach().double() * len(targets)
        self.step_loss += batch_loss
        self.loss_sum += batch_loss
        self.log_loss += batch_loss
        state.epoch_samples += len(targets)
        self.log_samples += len(targets)
        state.batch += 1
        self.bars.advance(self.steps_bar)
        return syncs

    def _optimizer_step(self, epoch: int) -> FitResult | None:
        """The step's update (or its skip, or the divergence error), its log line and saves; a
        :class:`FitResult` when the run stops here (``stop_after_steps``)."""
        recipe, state, model = self.recipe, self.state, self.model
        lr = lr_at(state.step, recipe, self.steps_per_epoch)
        set_lr(self.optimizer, lr)
        nonfinite, stopping = step_flags(self.step_loss, model, self.stop, self.ctx)
        self.step_loss.zero_()
        if nonfinite and recipe.nonfinite == "error":
            raise _diverged(model, self.last_loss, state.step, epoch, self.run_dir)
        if nonfinite:
            self.skipped += 1
        else:
            if recipe.clip_grad:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.clip_grad)
            self.optimizer.step()
            self.features.stepped()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if state.step % recipe.log_every == 0:
            self._log_step(epoch, lr)
        if self.checkpoint_every and state.step % self.checkpoint_every == 0 and state.batch < self.n_batches:
            self.save_state()
        if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
            return FitResult(state, self.last_eval, stopped=True)
        if stopping:
            self.save_state()
            raise Interrupted(f"interrupted at step {state.step} (epoch {epoch + 1}); "
                              f"resume with utdsl train --resume {self.run_dir.path}")
        return None

    def _log_step(self, epoch: int, lr: float) -> None:
        total_loss, samples = all_reduce_sum([self.log_loss.item(), self.log_samples], self.ctx)
        now = time.perf_counter()
        row = {"kind": "step", "step": self.state.step, "epoch": epoch, "loss": total_loss / max(samples, 1),
               "lr": lr, "throughput": samples / max(now - self.log_time, 1e-9)}
        self.bars.update(self.steps_bar, info=f"loss {row['loss']:.4f} lr {lr:.2e}")
        if self.logger is not None:
            self.logger.log(row)
        self.log_loss.zero_()
        self.log_samples, self.log_time = 0, now

    def _end_epoch(self, epoch: int, seen: int, epoch_time: float) -> None:
        """The epoch's row (with its evaluation when due), its checkpoints and the resume state."""
        recipe, ctx, state = self.recipe, self.ctx, self.state
        total_loss, samples, seen_all, elapsed = all_reduce_sum(
            [self.loss_sum.item(), state.epoch_samples, seen, epoch_time], ctx)
        row: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": state.step,
                               "loss": total_loss / max(samples, 1),
                               "lr": lr_at(state.step - 1, recipe, self.steps_per_epoch),
                               "throughput": seen_all / max(elapsed / ctx.world_size, 1e-9)}
        if self.eval_set is not None and ((epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs):
            self._evaluate(epoch, row)
        if self.skipped:
            row["skipped_steps"], self.skipped = self.skipped, 0
        state.epoch, state.batch, state.epoch_samples = epoch + 1, 0, 0
        self.loss_sum.zero_()
        last = self.last_eval
        improved = (last is not None and "top1" in row and math.isfinite(last.loss)
                    and (state.best_top1 is None or last.top1 > state.best_top1))
        if improved:
            state.best_top1, state.best_epoch = last.top1, epoch
        if self.logger is not None:  # metrics first: a resume drops lines newer than the state it finds
            self.logger.log(row)
            self._save_checkpoints(epoch, row, improved)
        self.save_state()
        self.bars.advance(self.epochs_bar)
        self.bars.update(self.epochs_bar, info=f"top1 {row['top1']:.2f}" if "top1" in row else "")

    def _evaluate(self, epoch: int, row: dict[str, Any]) -> None:
        """Evaluate into ``row``; a non-finite evaluation loss stops the run (``nonfinite="error"``)."""
        recipe = self.recipe
        with self.features.evaluated():
            self.last_eval = evaluate(self.eval_net, self.eval_set, batch_size=recipe.batch_size, ctx=self.ctx,
                                      precision=recipe.precision, num_workers=self.num_workers,
                                      channels_last=recipe.channels_last)
        last = self.last_eval
        row.update(top1=last.top1, top5=last.top5, eval_loss=last.loss, eval_throughput=last.throughput,
                   eval_params=self.features.evaluated_params)
        if not math.isfinite(last.loss) and recipe.nonfinite == "error":
            raise NonFiniteError(f"epoch {epoch + 1}: the evaluation loss is {last.loss} (the model's "
                                 f"outputs are not finite); nothing of this epoch was saved", hint=DIVERGED_HINT)

    def _save_checkpoints(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        """``last``, and ``best`` when the evaluation improved (rank 0)."""
        meta = dict(self.metadata or {})
        meta.update({"run.epoch": str(epoch), "run.step": str(self.state.step), "run.top1": str(row.get("top1", "")),
                     "run.params": self.features.evaluated_params})
        with self.features.evaluated():
            self.run_dir.save_tuners(self.model, "last", meta)
            if improved:
                self.run_dir.save_tuners(self.model, "best", meta)


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
