"""``utdsl train``, ``utdsl eval`` and ``utdsl plot``: thin commands over :mod:`utdsl.runtime`.

``train`` also runs under ``torchrun --nproc-per-node N -m utdsl train ...`` (DDP: nccl on GPU,
gloo on CPU); rank 0 prints and writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def _workers(requested: Optional[int]) -> int:
    """``--num-workers``, by default the cores this process may use shared by its node's processes."""
    if requested is not None:
        return requested
    from utdsl.runtime.data.workers import default_workers

    return default_workers()


def _default_out(spec_name: str, model: str, data: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec_name}-{model}-{data}")
    path, n = Path("runs") / stem, 1
    while (path / "config.json").exists():
        n += 1
        path = Path("runs") / f"{stem}-{n}"
    return path


def train_cmd(
    spec: Optional[str] = typer.Argument(None, help="Spec file or library name (omit with --resume)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Backbone: alias or timm name (default: vit_b16)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set, e.g. digits, fgvc:cub (default: digits)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Directory of the data set."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe name or .toml/.json file (default: default)."),
    override: list[str] = typer.Option([], "--override", "-o", help="Recipe field: -o lr=0.01 (repeatable)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Spec let binding: --set r=16 (repeatable)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Recipe lr."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Recipe epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Recipe batch_size (per process)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Recipe seed."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Recipe weight_decay."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Recipe optimizer: adamw or sgd."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Recipe warmup_epochs."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Recipe grad_accum."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Recipe label_smoothing."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Recipe precision: auto, fp32, bf16."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Recipe input_size."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="Recipe ema_decay: keep an EMA of the "
                                              "trained parameters (evaluated and saved), e.g. 0.999."),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="Recipe mixup_alpha (Beta(a, a)), e.g. 0.8."),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="Recipe cutmix_alpha (Beta(a, a)), e.g. 1.0."),
    drop_path: Optional[float] = typer.Option(None, "--drop-path", help="Recipe drop_path_rate: the backbone's "
                                              "stochastic depth, e.g. 0.1."),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay", help="Recipe layer_decay: layer-wise lr "
                                                "decay factor, e.g. 0.65."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Recipe channels_last (for CNNs)."),
    data_cache: Optional[str] = typer.Option(None, "--data-cache", help="Recipe data_cache: off, memory or "
                                             "device (decode and resize images once, augment on tensors)."),
    decode: Optional[str] = typer.Option(None, "--decode", help="Recipe decode: where training JPEGs are "
                                         "decoded, workers or device (nvjpeg on a GPU)."),
    log_to: Optional[str] = typer.Option(None, "--log-to", help="Also log to these backends: wandb, mlflow "
                                         "(comma-separated; metrics.jsonl and TensorBoard always)."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="timm.create_model argument: --model-arg depth=6."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights file."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download timm's pretrained weights."),
    out: Optional[Path] = typer.Option(None, "--out", "-O", help="Run directory (default: runs/SPEC-MODEL-DATA)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data loader processes per rank "
                                              "(default: the cores available to each process)."),
    compile_: bool = typer.Option(False, "--compile", help="Run the forward through torch.compile (the first "
                                  "step compiles; checkpoints are the same)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also save resume state every N steps."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bars (default: on a TTY)."),
    bad_images: str = typer.Option("error", "--bad-images", help="Unreadable images: 'error' (listed before "
                                   "training) or 'skip' (left out, with a warning)."),
    accept_changed_weights: bool = typer.Option(False, "--accept-changed-weights", help="Resume although the "
                                                "--weights file differs from the one the run started with."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Go ahead without asking (e.g. tuners of unusual size)."),
) -> None:
    """Train SPEC on a backbone and data set; writes a run directory (config, metrics, checkpoints)."""
    from utdsl.runtime.config import resolve_config
    from utdsl.runtime.distributed import broadcast_str, init_distributed, peer_errors, shutdown
    from utdsl.runtime.guard import Interrupted
    from utdsl.runtime.rundir import RunDir
    from utdsl.runtime.recipes import RecipeError, load_recipe
    from utdsl.values import parse_assignments, parse_model_args
    from utdsl.runtime.train import train

    values = dict(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                  optimizer=optimizer, warmup_epochs=warmup_epochs, grad_accum=grad_accum,
                  label_smoothing=label_smoothing, precision=precision, input_size=input_size,
                  ema_decay=ema_decay, mixup_alpha=mixup, cutmix_alpha=cutmix, drop_path_rate=drop_path,
                  layer_decay=layer_decay, channels_last=channels_last, data_cache=data_cache,
                  decode=decode)
    overrides = {**parse_assignments(override), **{k: v for k, v in values.items() if v is not None}}
    lets = parse_assignments(set_, "--set")
    model_kwargs = parse_model_args(model_arg)
    if resume is not None:
        given = [name for name, value in [
            ("SPEC", spec), ("--model", model), ("--data", data), ("--data-root", data_root), ("--recipe", recipe),
            ("--set", lets), ("--model-arg", model_kwargs), ("recipe overrides", overrides),
            ("--weights", weights), ("--pretrained", pretrained), ("--out", out)] if value]
        if given:
            raise RecipeError(f"--resume continues a run with its own configuration; drop {', '.join(given)}")
    elif spec is None:
        raise RecipeError("give a SPEC to train, or --resume RUN")
    if bad_images not in ("error", "skip"):
        raise RecipeError(f"--bad-images takes 'error' or 'skip', not '{bad_images}'")
    the_recipe = load_recipe(recipe or "default", overrides) if resume is None else None
    timeout = the_recipe.dist_timeout if the_recipe else RunDir(resume).read_config().get("recipe", {}).get("dist_timeout")
    ctx = init_distributed(device, timeout=timeout)
    run_dir = resume
    try:
        with peer_errors(ctx, lambda: str(run_dir) if run_dir is not None and RunDir(run_dir).exists() else None):
            config = None
            if resume is None:
                config = resolve_config(spec=spec, model=model or "vit_b16", data=data or "digits",
                                        data_root=data_root, recipe=the_recipe,
                                        spec_overrides=lets, weights=weights, pretrained=pretrained,
                                        world_size=ctx.world_size, model_kwargs=model_kwargs)
                chosen = str(out or _default_out(config.spec_name, config.model, config.data)) if ctx.is_main else ""
                run_dir = Path(broadcast_str(chosen, ctx))
            from utdsl.cli import err_console

            echo = ((lambda text: err_console.print(f"warning: {text}", markup=False, soft_wrap=True))
                    if ctx.is_main else (lambda text: None))
            result = train(config, run_dir, resume=resume is not None, ctx=ctx, num_workers=_workers(num_workers),
                           progress=progress, checkpoint_every=checkpoint_every, echo=echo,
                           bad_images=bad_images, accept_changed_weights=accept_changed_weights, yes=yes,
                           log_to=[name for name in (log_to or "").split(",") if name.strip()], compiled=compile_)
        if ctx.is_main:
            from utdsl.cli import console

            state = result.state
            best = f"{state.best_top1:.2f}% (epoch {state.best_epoch + 1})" if state.best_top1 is not None else "-"
            last = f"{result.last_eval.top1:.2f}%" if result.last_eval else "-"
            console.print(f"run [bold]{run_dir}[/]: {state.epoch} epochs, {state.step} steps; "
                          f"top-1 last {last}, best {best}", highlight=False, soft_wrap=True)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop started
        if run_dir is not None and RunDir(run_dir).exists():
            raise Interrupted(f"interrupted; resume with utdsl train --resume {run_dir}") from None
        raise
    finally:
        shutdown(ctx)


def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A run directory or a checkpoint written by utdsl train."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the run's)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Directory of the data set (default: the run's)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split (default: the recipe's eval_split)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the recipe's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data loader processes (default: "
                                              "the cores available)."),
    compile_: bool = typer.Option(False, "--compile", help="Run the forward through torch.compile."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    accept_changed_weights: bool = typer.Option(False, "--accept-changed-weights", help="Evaluate although the "
                                                "run's --weights file changed since it trained."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Memory format of model and batches (default: the run's)."),
    data_cache: str = typer.Option("off", "--data-cache", help="off, memory or device: decode and resize the "
                                   "split once before evaluating."),
) -> None:
    """Evaluate a checkpoint (top-1, top-5, loss) on a data set split."""
    from utdsl.cli import err_console
    from utdsl.runtime.distributed import init_distributed, shutdown
    from utdsl.runtime.evaluate import evaluate_checkpoint

    if data_cache not in ("off", "memory", "device"):
        from utdsl.runtime.recipes import RecipeError

        raise RecipeError(f"--data-cache takes off, memory or device, not '{data_cache}'")
    from utdsl.runtime.config import locate_checkpoint

    # the run's dist_timeout bounds every wait of a distributed evaluation, as it bounded training
    ctx = init_distributed(device, timeout=locate_checkpoint(checkpoint)[1].recipe.dist_timeout)
    try:
        result, what = evaluate_checkpoint(
            checkpoint, data=data, data_root=data_root, split=split, batch_size=batch_size,
            num_workers=_workers(num_workers), ctx=ctx, accept_changed_weights=accept_changed_weights,
            echo=lambda text: err_console.print(f"warning: {text}", markup=False, soft_wrap=True),
            channels_last=channels_last, data_cache=data_cache, compiled=compile_)
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return
    from utdsl.cli import console

    if as_json:
        console.print_json(json.dumps({**what, **result.as_dict()}))
        return
    from rich.table import Table

    params = " (EMA of the parameters)" if what["params"] == "ema" else ""
    console.print(f"{what['spec']} on {what['model']}: {what['data']} [{what['split']}]{params}", highlight=False,
                  soft_wrap=True, markup=False)
    table = Table()
    for column in ("samples", "top-1 %", "top-5 %", "loss", "img/s"):
        table.add_column(column, justify="right")
    table.add_row(str(result.samples), f"{result.top1:.2f}", f"{result.top5:.2f}", f"{result.loss:.4f}",
                  f"{result.throughput:.1f}")
    console.print(table)
    console.print(f"checkpoint: {what['checkpoint']}", highlight=False)


def plot_cmd(
    run: Path = typer.Argument(..., help="Run directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-O", help="PNG to write (default: RUN/curves.png)."),
) -> None:
    """Draw a run's loss and accuracy curves to a PNG."""
    from utdsl.cli import console
    from utdsl.runtime.plot import plot_run

    console.print(f"wrote {plot_run(run, out)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``train``, ``eval`` and ``plot`` to ``app`` (once)."""
    if getattr(app, "_utdsl_run_cmds", False):
        return
    app._utdsl_run_cmds = True  # type: ignore[attr-defined]
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.command("plot")(plot_cmd)
