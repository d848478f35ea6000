"""``utdsl export``: a trained run as a plain timm state dict (``--merged``) or a PEFT LoRA adapter
(``--format peft``), rebuilt from the checkpoint's own configuration as ``utdsl eval`` does."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["register", "export_cmd"]


def load_run_model(target: Path):
    """(tuned model, run config, checkpoint path) of a run directory or a ``utdsl train`` checkpoint."""
    import utdsl
    from utdsl.runtime import config as run_config

    path, config = run_config.locate_checkpoint(target)
    model = run_config.build_model(config, run_config.spec_of(config), echo=lambda text: None)
    utdsl.load_tuners(model, path)
    return model.eval(), config, path


def export_cmd(
    checkpoint: Path = typer.Argument(..., help="A run directory or a checkpoint written by utdsl train."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write (--merged) or directory (--format peft)."),
    merged: bool = typer.Option(False, "--merged", help="Fold every tuner into the weights: a plain timm state dict."),
    format_: str = typer.Option("timm", "--format", "-f", help="timm (merged state dict) or peft (LoRA adapter)."),
) -> None:
    """Export a trained model: merged into a timm state dict, or as a PEFT LoRA adapter directory."""
    import utdsl
    from utdsl.errors import UtdslError
    from utdsl.runtime.config import model_kwargs
    from utdsl.runtime.models import resolve_name

    if format_ not in ("timm", "peft"):
        raise UtdslError(f"unknown export format '{format_}'", hint="use --merged (timm) or --format peft")
    if format_ == "peft" and merged:
        raise UtdslError("a PEFT adapter keeps the tuners apart from the weights; drop --merged or --format peft")
    if format_ == "timm" and not merged:
        raise UtdslError("a timm state dict has the tuners folded into the weights: pass --merged",
                         hint="or --format peft for a PEFT LoRA adapter")
    from utdsl.cli import console

    model, config, path = load_run_model(checkpoint)
    name = resolve_name(config.model)
    kwargs = {"num_classes": config.num_classes, **model_kwargs(config)}
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if format_ == "timm":
        utdsl.export_merged(model, out, metadata={"utdsl.create_model": json.dumps({"model_name": name, **kwargs})})
        loader = (f"timm.create_model({name!r}, pretrained=True, "
                  f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={config.num_classes}){extra})")
    else:
        utdsl.export_peft(model, out)
        base = (f"the weights of {config.weights}" if config.weights else "timm's pretrained weights"
                if config.pretrained else f"the run's random backbone (seed {config.recipe.seed}; --merged keeps it)")
        loader = (f"peft.PeftModel.from_pretrained(timm.create_model({name!r}{extra}), {str(out)!r}) "
                  f"with {base} loaded into the timm model")
    console.print(f"wrote {out} from {path}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"load with: {loader}", highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``export`` to ``app`` (once)."""
    if getattr(app, "_utdsl_export_cmd", False):
        return
    app._utdsl_export_cmd = True  # type: ignore[attr-defined]
    app.command("export")(export_cmd)
