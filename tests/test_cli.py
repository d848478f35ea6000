"""The command line: output of check/inspect/compile/list, exit code 2 without traceback on errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_check_reports_rules_and_bindings(cli):
    code, out, _ = cli("check", "lora", "--set", "r=16")
    assert code == 0
    assert out.strip() == "ok: lora: 1 rules, 1 train/freeze; r=16, alpha=8, dropout=0.0"


def test_compile_prints_the_plan_and_the_trainable_share(cli):
    code, out, _ = cli("compile", "lora", "--model", "vit_b16")
    assert code == 0
    assert "attn.qkv{q, v}" in out and "blocks.*.attn.qkv" in out
    assert "tuner params 294,912 + trained base params 16,797,267" in out  # IN-21k head: 768 x 21,843 + 21,843


def test_compile_json_is_machine_readable(cli):
    code, out, _ = cli("compile", "adapter", "--model", "vit_b16", "--json", "--num-classes", "10")
    assert code == 0
    plan = json.loads(out)
    assert plan["tuner_params"] == 156_768
    assert plan["trained_base_params"] == 7_690
    assert len(plan["insertions"]) == 12 and plan["insertions"][0]["site"] == "blocks.0.mlp"


def test_compile_emit_code_prints_the_forward(cli):
    code, out, _ = cli("compile", "lora", "--model", "vit_t16", "--emit", "code")
    assert code == 0 and "def forward(self" in out and "parallel_lowrank" in out


def test_inspect_lists_module_patterns(cli):
    code, out, _ = cli("inspect", "--model", "vit_t16", "--select", "attn.qkv | mlp.fc1")
    assert code == 0
    assert "blocks.*.attn.qkv" in out and "blocks.*.mlp.fc1" in out and "Linear" in out
    assert "blocks.*.norm1" not in out


def test_spec_errors_exit_2_with_location_and_no_traceback(cli, tmp_path):
    spec = tmp_path / "bad.ut"
    spec.write_text("spec bad\nattn.qvk -> parallel lowrank(r=8)\n")
    code, out, err = cli("compile", str(spec), "--model", "vit_t16")
    assert code == 2
    assert err.startswith(f"{spec}:2:1: error: selector 'attn.qvk' matches no module of the model")
    assert "Traceback" not in err


def test_unknown_model_exits_2_with_a_hint(cli):
    code, _, err = cli("compile", "lora", "--model", "vit_b61")
    assert code == 2
    assert "unknown model 'vit_b61'" in err and "did you mean 'vit_b16'" in err


def test_debug_shows_the_traceback(tmp_path):
    spec = tmp_path / "bad.ut"
    spec.write_text("attn.qkv -> parallel lowrank(r=0)\n")
    quiet = subprocess.run([sys.executable, "-m", "utdsl", "check", str(spec)], capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-m", "utdsl", "--debug", "check", str(spec)], capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert f"{spec}:1:" in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_list_shows_every_library_spec_with_its_parameters(cli):
    code, out, _ = cli("list")
    assert code == 0
    assert "lora" in out and "294,912" in out and "156,768" in out


def test_compile_counts_shared_tuner_state_once(cli):
    code, out, _ = cli("compile", "fact_tt", "--model", "vit_b16", "--json", "--num-classes", "10")
    assert code == 0
    plan = json.loads(out)
    assert plan["shared_params"] == 2 * 768 * 8          # FacT's U and V, once for all 48 sites
    assert plan["tuner_params"] == 21_504 and len(plan["insertions"]) == 12 * 4   # qkv{q, k, v}, proj, fc1, fc2


@pytest.mark.parametrize("argv, message", [
    (("compile", "lora", "--bogus"), "No such option: --bogus"),
    (("compile",), "Missing argument"),
    (("frobnicate",), "No such command 'frobnicate'"),
])
def test_usage_errors_exit_2_without_a_traceback(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2
    assert message in err and "Traceback" not in err + out
