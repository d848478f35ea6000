"""Where a run's inputs came from, so that ``--resume`` and ``utdsl eval`` rebuild the same model.

``config.json`` records a ``--weights`` file by absolute path and SHA-256 of its content; before
a resume or an evaluation the file is hashed again, and a missing or changed file is an error
(``--accept-changed-weights`` turns a change into a loud warning). The resume state records a
digest of the run configuration, so an edit of ``config.json`` that changes the rebuilt model is
refused instead of resuming into another model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from utdsl.errors import CheckpointError, ModelError

__all__ = ["file_sha256", "weights_identity", "verify_weights", "config_digest"]

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(weights: str | Path) -> tuple[str, str]:
    """``(absolute path, sha256)`` of a ``--weights`` argument (a file, or a hub snapshot
    directory, whose weights file is hashed)."""
    from .weights import _resolve_path

    given = Path(weights).expanduser().resolve()
    return str(given), file_sha256(_resolve_path(given))


def verify_weights(config, *, accept_changed: bool = False, echo: Callable[[str], Any] | None = None) -> None:
    """Check that the run's ``--weights`` file is still the one it started with.

    A missing file is a :class:`ModelError`; another content a :class:`CheckpointError` unless
    ``accept_changed`` (then ``echo`` gets a warning). Runs recorded before hashes were kept
    (no ``weights_sha256``) pass with a warning."""
    if not config.weights:
        return
    from .weights import _resolve_path

    path = Path(config.weights)
    if not path.exists():
        raise ModelError(f"the run's weights file '{path}' no longer exists",
                         hint="restore it at that path; a run is rebuilt from the backbone it trained on")
    now = file_sha256(_resolve_path(path))
    if config.weights_sha256 is None:
        if echo:
            echo(f"the run recorded no hash of its weights file '{path}'; cannot tell whether it changed")
        return
    if now == config.weights_sha256:
        return
    message = (f"the weights file '{path}' changed since the run started (sha256 {config.weights_sha256[:12]}... "
               f"recorded, {now[:12]}... now)")
    if not accept_changed:
        raise CheckpointError(message + "; the rebuilt backbone would not be the one the tuners were trained on",
                              hint="restore the original file, or pass --accept-changed-weights to use this one")
    if echo:
        echo(message + "; using it anyway (--accept-changed-weights)")


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of a run configuration as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
