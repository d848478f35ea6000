"""Where a run's metrics go: one small interface, several backends.

Every run writes ``metrics.jsonl`` (the record the runtime reads back) and TensorBoard event
files under ``RUN/tensorboard/``. Weights & Biases and MLflow are added on request
(``utdsl train --log-to wandb,mlflow``) when their packages are installed; asking for one that
is not installed is a :class:`LoggerError`.

A row is the dict the training loop writes: ``kind`` (``step``, ``epoch``, ``profile``,
``summary``) and numbers. Backends other than JSON lines receive the numeric fields as scalars
named ``KIND/FIELD`` (``epoch/top1``, ``step/loss``) at the row's optimizer ``step``.
"""

from __future__ import annotations

import importlib.util
import numbers
import sys
from typing import Any, Iterable, Mapping, Protocol, Sequence

from utdsl.errors import UtdslError, did_you_mean

from .rundir import RunDir

__all__ = ["Logger", "LoggerError", "MetricsLogger", "BACKENDS", "open_loggers", "scalars"]

#: optional backends -> the package each needs
BACKENDS: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}


class LoggerError(UtdslError):
    """An unknown logging backend, or one whose package is not installed."""


class Logger(Protocol):
    """One backend: ``log`` a row, ``close`` at the end of the run."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of ``row`` as ``KIND/FIELD`` -> value (``step`` and ``kind`` left out)."""
    kind = str(row.get("kind", "run"))
    return {f"{kind}/{key}": float(value) for key, value in row.items()
            if key not in ("kind", "step") and isinstance(value, numbers.Real) and not isinstance(value, bool)}


class JsonlLogger:
    """``metrics.jsonl`` through the run directory (one JSON object a line)."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.append_metrics(row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """TensorBoard event files in ``RUN/tensorboard``. ``purge_step`` (a resume) drops events the
    interrupted run wrote after that step, as ``metrics.jsonl`` is truncated."""

    def __init__(self, run: RunDir, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"), purge_step=purge_step)

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("step", 0))
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run named after the run directory (``WANDB_*`` variables apply)."""

    def __init__(self, run: RunDir, config: Mapping[str, Any] | None):
        import wandb

        self.wandb = wandb
        self.handle = wandb.init(name=run.path.name, dir=str(run.path), config=dict(config or {}),
                                 resume="allow", id=_run_id(run))

    def log(self, row: Mapping[str, Any]) -> None:
        self.handle.log(scalars(row), step=int(row.get("step", 0)))

    def close(self) -> None:
        self.handle.finish()


class MlflowLogger:
    """An MLflow run named after the run directory (``MLFLOW_TRACKING_URI`` applies)."""

    def __init__(self, run: RunDir, config: Mapping[str, Any] | None):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run.path.name)
        flat = {k: v for k, v in _flatten(config or {}).items() if k != "spec_text"}
        if flat:
            mlflow.log_params(flat)

    def log(self, row: Mapping[str, Any]) -> None:
        values = {k.replace("/", "."): v for k, v in scalars(row).items()}
        self.mlflow.log_metrics(values, step=int(row.get("step", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``config`` as ``a.b`` -> scalar (lists as text, long text cut to 250 characters)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            value = value if isinstance(value, (int, float, bool)) else str(value)[:250]
            flat[f"{prefix}{key}"] = value
    return flat


def _run_id(run: RunDir) -> str:
    import hashlib

    return hashlib.sha1(str(run.path.resolve()).encode()).hexdigest()[:16]


class MetricsLogger:
    """Every backend of a run behind one ``log``/``close``; also a context manager."""

    def __init__(self, loggers: Iterable[Logger]):
        self.loggers = list(loggers)

    def log(self, row: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _installed(package: str) -> bool:
    if package in sys.modules:  # imported already (find_spec raises for a module without __spec__)
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_backends(names: Sequence[str]) -> list[str]:
    """Validate ``names`` (``wandb``, ``mlflow``; ``jsonl``/``tensorboard`` are always on and
    accepted) and return the optional ones, in order, without repeats."""
    chosen: list[str] = []
    for name in names:
        name = name.strip().lower()
        if not name or name in ("jsonl", "tensorboard") or name in chosen:
            continue
        if name not in BACKENDS:
            raise LoggerError(f"unknown logging backend '{name}'",
                              hint=did_you_mean(name, BACKENDS) or "backends: " + ", ".join(BACKENDS))
        if not _installed(BACKENDS[name]):
            raise LoggerError(f"logging backend '{name}' needs the '{BACKENDS[name]}' package",
                              hint=f"pip install {BACKENDS[name]}")
        chosen.append(name)
    return chosen


def open_loggers(run: RunDir, backends: Sequence[str] = (), *, purge_step: int | None = None,
                 config: Mapping[str, Any] | None = None, tensorboard: bool = True) -> MetricsLogger:
    """The loggers of ``run``: JSON lines, TensorBoard (unless ``tensorboard=False``) and the
    optional ``backends``. ``config`` is recorded by backends that keep parameters."""
    loggers: list[Logger] = [JsonlLogger(run)]
    extra = check_backends(backends)
    if tensorboard:
        loggers.append(TensorBoardLogger(run, purge_step))
    for name in extra:
        loggers.append(WandbLogger(run, config) if name == "wandb" else MlflowLogger(run, config))
    return MetricsLogger(loggers)
