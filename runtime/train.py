"""``utdsl train``: :func:`train` builds a run (spec + model + data + recipe) in a run directory
and fits it with :func:`~.fit.fit`, the training loop.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from utdsl.errors import CheckpointError

from .budget import check_tuner_memory
from .config import RunConfig, build_data, build_model, cache_data, checkpoint_metadata
from .data.scan import scan_images, warn_if_one_class
from .distributed import DistContext, barrier
from .fit import FitResult, fit, progress_enabled
from .loggers import check_backends
from .provenance import config_digest, verify_weights
from .rundir import RunDir

__all__ = ["FitResult", "fit", "train", "progress_enabled"]


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
    if recipe.decode == "device" and ctx.device.type == "cpu" and quiet is not None:
        quiet("decode=device on the CPU decodes in the training process, one image at a time, which "
              "is slower than the loader workers (decode=workers); it is meant for a GPU")
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
