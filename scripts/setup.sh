#!/usr/bin/env bash
# Create .venv and install utdsl with its dev extra. Idempotent: skips the install when the venv
# already holds this pyproject.toml's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.utdsl-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch and torchvision are pinned in pyproject.toml; the exact pins keep pip from fetching CUDA wheels.
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
echo "$want" > "$stamp"
