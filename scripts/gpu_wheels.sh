#!/usr/bin/env bash
# Fetch, here, the wheels that the GPU machine's Python 3.12 image lacks (the `device` tool's
# machines reach no network), into .whl/ (git-ignored); scripts/gpu_check.sh installs them there.
# The device tool carries .whl when a run names it in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    lark==1.3.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 setuptools==80.9.0 wheel==0.45.1
ls .whl
