"""The family matrix (README "Backbones"): every family x placement cell works or is a clear
compile-time error with the reason below; a defect (another exception, a wrong output) fails.
``scripts/family_matrix.py`` prints the same matrix as the README table."""

from __future__ import annotations

import importlib.util

import pytest

from .families import COLUMNS, FAMILIES, run_cell

NO_TOKEN_SEQUENCE = "prompt needs a token sequence"
NO_ATTENTION = "prefix needs an attention inside the region"
EXPORTED = "prompt adds tokens, but this model was traced by torch.export"
GRID = "the tokens are reshaped to a fixed size (a spatial grid)"

#: family -> the cells that are errors, with a part of their message; every other cell works
ERRORS: dict[str, dict[str, str]] = {
    "vit": {}, "deit": {}, "eva02": {}, "beit": {}, "dinov2_reg": {}, "tv_vit": {},
    "swin": {"prompt": NO_TOKEN_SEQUENCE},
    "swinv2": {"prompt": NO_TOKEN_SEQUENCE},
    "maxvit": {"prompt": NO_TOKEN_SEQUENCE},
    "convnext": {"prompt": NO_TOKEN_SEQUENCE, "prefix": NO_ATTENTION},
    "resnet": {"prompt": NO_TOKEN_SEQUENCE, "prefix": NO_ATTENTION},
    "efficientnet": {"prompt": NO_TOKEN_SEQUENCE, "prefix": NO_ATTENTION},
    "tv_resnet": {"prompt": NO_TOKEN_SEQUENCE, "prefix": NO_ATTENTION},
    "mobilevit": {"prompt": EXPORTED},
    "levit": {"prefix": "the attention's keys have 16 channels a head and its values 32"},
    "pvt_v2": {"prompt": GRID},
    "hiera": {"prompt": GRID, "prefix": "the attention's values are not (batch, heads, tokens, head_dim)"},
    "hf_vit": {"prompt": EXPORTED},
    "hf_dinov2": {"prompt": EXPORTED},
    "hf_clip_vision": {"prompt": EXPORTED},
}

_SLOW = {"maxvit", "levit", "mobilevit", "hf_dinov2", "hf_clip_vision"}   # 6-35 s each on 2 cores


def _params():
    for name, family in FAMILIES.items():
        marks = [pytest.mark.slow] if name in _SLOW else []
        if family.extra != "timm" and importlib.util.find_spec(family.extra) is None:
            marks.append(pytest.mark.skip(reason=f"needs {family.extra}"))
        yield pytest.param(name, marks=marks, id=name)


def test_every_family_has_an_expectation():
    assert set(ERRORS) == set(FAMILIES)


@pytest.mark.parametrize("name", list(_params()))
def test_family_row(name):
    got = {column: run_cell(name, column) for column in COLUMNS}
    for column, outcome in got.items():
        expected = ERRORS[name].get(column)
        if expected is None:
            assert outcome.kind == "works", f"{name} x {column}: {outcome}"
        else:
            assert outcome.kind == "error" and expected in outcome.detail, f"{name} x {column}: {outcome}"
