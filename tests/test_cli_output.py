"""Machine-readable CLI output survives a narrow terminal: ``--emit code > file`` is Python and
``--json`` is JSON whatever COLUMNS says (rich would wrap both at the console width)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def utdsl_piped(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "20", "LINES": "10"}
    return subprocess.run([sys.executable, "-m", "utdsl", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_emit_code_is_python_at_any_width():
    done = utdsl_piped("compile", "lora", "--model", "vit_t16", "--emit", "code")
    assert done.returncode == 0, done.stderr
    ast.parse(done.stdout)  # the code alone: the plan table went to stderr
    compile(done.stdout, "<emitted>", "exec")
    assert "def forward(self" in done.stdout and "┃" not in done.stdout and "┃" in done.stderr
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) > 100  # long lines are kept whole, not wrapped at 20 columns
    calls = [line for line in lines if "parallel_lowrank" in line and "(" in line]
    assert calls and all(line.count("(") == line.count(")") for line in calls)


def test_json_is_json_at_any_width():
    done = utdsl_piped("compile", "lora", "--model", "vit_t16", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["insertions"][0]["site"] == "blocks.0.attn.qkv{q, v}"
    assert plan["insertions"][0]["args"]["init"] == "kaiming"
