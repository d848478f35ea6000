"""A run directory: the resolved configuration, metrics, checkpoints, and the state to resume.

```
RUN/
  config.json                  the resolved run configuration (spec text, model, data, recipe)
  metrics.jsonl                one JSON object a line: "kind" is "step", "epoch" or "summary"
  tensorboard/                 the same numbers as TensorBoard event files
  checkpoints/last.safetensors trainable tensors after the latest epoch (utdsl.save_tuners)
  checkpoints/best.safetensors the same at the best evaluated top-1
  checkpoints/state.safetensors everything a resume needs (below)
  curves.png                   written by `utdsl plot RUN`
```

Every file is written atomically (a temporary file in the same directory, fsync, ``os.replace``),
so a run killed at any moment leaves the previous complete version. The resume state is one
safetensors file, so its parts always agree: the trainable parameters (``param.NAME``), the norm
layers' running statistics (``buffer.NAME``, which train mode updates), the
optimizer's tensors (``optim.INDEX.KEY``), the EMA of the parameters when the recipe keeps one
(``ema.NAME``), and as JSON metadata the loop position (epoch, batch
within it, optimizer step), the best result so far and the optimizer's non-tensor values. The
learning rate is a function of the step and random numbers a function of (seed, rank, epoch,
batch), so the step is their whole state. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from utdsl.checkpoint import running_statistics
from utdsl.errors import CheckpointError
from utdsl.files import atomic_write

from .guard import require_finite

__all__ = ["RunDir", "TrainState", "atomic_write", "STATE_FORMAT"]

STATE_FORMAT = "utdsl-train-state/1"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@dataclass
class TrainState:
    """Where the loop stands; ``batch`` counts batches of ``epoch`` already trained on. The sums
    (loss and samples of the epoch so far and since the last metrics line) are over all ranks."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    log_loss_sum: float = 0.0
    log_samples: int = 0
    schedule: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """Paths and atomic readers/writers of one run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, identity: str | None = None):
        self.path = Path(path)
        #: digest of the run configuration, kept in the resume state and checked when it loads
        self.identity = identity
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.state_path = self.checkpoints / "state.safetensors"

    def checkpoint(self, kind: str) -> Path:
        """``checkpoints/{kind}.safetensors`` (``last`` or ``best``)."""
        return self.checkpoints / f"{kind}.safetensors"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def check_writable(self) -> None:
        """Raise :class:`CheckpointError` unless the run directory and ``checkpoints/`` can be
        written: probe files are created and removed (in the nearest existing ancestor when the
        directory does not exist yet), so a read-only place fails before the first epoch."""
        for directory in (self.path, self.checkpoints):
            probe_in = directory
            while not probe_in.exists() and probe_in != probe_in.parent:
                probe_in = probe_in.parent
            try:
                if not probe_in.is_dir():
                    raise NotADirectoryError(f"'{probe_in}' is not a directory")
                fd, name = tempfile.mkstemp(prefix=".utdsl-probe.", suffix=".tmp", dir=probe_in)
                os.close(fd)
                os.unlink(name)
            except OSError as error:
                raise CheckpointError(f"cannot write the run directory '{directory}': "
                                      f"{error.strerror or error}" + (f" ('{probe_in}')" if probe_in != directory else ""),
                                      hint="choose another --out, or make it writable") from None

    def clean_stale(self) -> list[Path]:
        """Remove temporary files left by writes a kill interrupted (``.NAME.*.tmp``); return them."""
        removed = []
        for directory in (self.path, self.checkpoints):
            if directory.is_dir():
                for stale in directory.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        stale.unlink()
                        removed.append(stale)
        return removed

    # configuration and metrics ---------------------------------------------------------------
    def write_config(self, config: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise CheckpointError(f"'{self.path}' is not a run directory (no config.json)")
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.config_path}: not a JSON run configuration ({error})") from None

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete metrics line (a line cut by a kill is skipped)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for raw in self.metrics_path.read_bytes().splitlines():
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # cut by a kill, or damaged: not a metrics line
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, state: TrainState) -> None:
        """Drop lines written after ``state`` was saved (a resume writes them again)."""
        def kept(row: dict[str, Any]) -> bool:
            if row.get("kind") == "epoch":
                return row.get("epoch", 0) < state.epoch
            return row.get("step", 0) <= state.step
        rows = [r for r in self.read_metrics() if kept(r)]
        _write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    # checkpoints -----------------------------------------------------------------------------
    def save_tuners(self, model: nn.Module, kind: str, metadata: Mapping[str, str] | None = None) -> Path:
        """Write ``model``'s trainable tensors to ``checkpoints/{kind}.safetensors`` atomically."""
        import utdsl

        path = self.checkpoint(kind)
        require_finite({n: p for n, p in model.named_parameters() if p.requires_grad}, str(path))
        utdsl.save_tuners(model, path, dict(metadata or {}))  # atomic itself
        return path

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                   extra: Any = None) -> None:
        """Write the resume state (trainable parameters, optimizer, loop position) atomically.
        ``extra`` (the run's :class:`~.ema.ParameterEMA`) adds its ``state_tensors()``."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        tensors = {f"param.{n}": p.detach().cpu().clone().contiguous()
                   for n, p in model.named_parameters() if p.requires_grad}
        tensors.update({f"buffer.{n}": b.detach().cpu().clone().contiguous()
                        for n, b in running_statistics(model).items()})
        plain: dict[str, dict[str, Any]] = {}
        for index, values in optimizer.state_dict()["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().clone().contiguous()
                else:
                    plain.setdefault(str(index), {})[key] = value
        meta = {"format": STATE_FORMAT, "loop": json.dumps(asdict(state)),
                "params": json.dumps(names), "optimizer": json.dumps(plain)}
        if extra is not None:
            extra_tensors, extra_meta = extra.state_tensors()
            tensors.update(extra_tensors)
            meta.update(extra_meta)
        require_finite(tensors, str(self.state_path))
        if self.identity:
            meta["config"] = self.identity
        atomic_write(self.state_path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any = None) -> TrainState | None:
        """Restore parameters and optimizer from the resume state; None when there is none yet.
        ``extra`` (see :meth:`save_state`) is restored by its ``load_state_tensors``."""
        if not self.state_path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.state_path), "pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(self.state_path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{self.state_path}: unreadable resume state ({error})") from None
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{self.state_path}: not a utdsl resume state")
        if self.identity and meta.get("config") and meta["config"] != self.identity:
            raise CheckpointError(f"{self.config_path} was edited after the resume state was saved; the model "
                                  "it describes is not the one the state was trained on",
                                  hint="restore the run's config.json (its checkpoints carry a copy in their "
                                       "metadata, 'run.config')")
        require_finite(tensors, str(self.state_path), loading=True)
        params = dict(model.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad]
        if json.loads(meta["params"]) != names:
            raise CheckpointError(f"{self.state_path}: its trainable parameters differ from the model's",
                                  hint="resume with the spec, model and data set the run started with")
        with torch.no_grad():
            for name in names:
                saved = tensors[f"param.{name}"]
                if saved.shape != params[name].shape:
                    raise CheckpointError(f"{self.state_path}: '{name}' has shape {tuple(saved.shape)}, "
                                          f"the model's is {tuple(params[name].shape)}")
                params[name].copy_(saved)
            for name, buffer in running_statistics(model).items():
                if f"buffer.{name}" in tensors:
                    buffer.copy_(tensors[f"buffer.{name}"])
        groups: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                groups.setdefault(int(index), {})[name] = value
        for index, values in json.loads(meta["optimizer"]).items():
            groups.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": groups, "param_groups": optimizer.state_dict()["param_groups"]})
        if extra is not None:
            extra.load_state_tensors(tensors, meta, str(self.state_path))
        return TrainState(**json.loads(meta["loop"]))
