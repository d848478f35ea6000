"""Issue 11, specs and the command line: strict, finite, bounded tuner arguments reported at the
argument; a rank wider than its site is an error; non-UTF-8 spec files are clean errors (a BOM is
fine); files that are not specs are never quoted; a huge name does not hang `utdsl check`;
`--debug` works after the subcommand; typer's exit codes reach the shell."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

ROW = "attn.qkv -> parallel lowrank({})\n"


@pytest.mark.parametrize("args, column, message", [
    ("r=true", 32, "bad value for 'r': Input should be a valid integer"),
    ('r="8"', 32, "bad value for 'r': Input should be a valid integer"),
    ("r=8.0", 32, "bad value for 'r': Input should be a valid integer"),
    ("alpha=1e400", 36, "bad value for 'alpha': Input should be a finite number"),
    ("alpha=1e308 * 10", 36, "bad value for 'alpha': Input should be a finite number"),
    ("r=1000000000000000000000000000000", 32,
     "bad value for 'r': 1000000000000000000000000000000 is too large (at most 2147483647)"),
    ("alpha=1e12", 36, "bad value for 'alpha': 1e+12 is too large (at most 1e+09)"),
    ("dropout=true", 38, "bad value for 'dropout': Input should be a valid number"),
])
def test_bad_argument_values_are_errors_at_the_argument(tmp_path, cli, args, column, message):
    spec = tmp_path / "bad.ut"
    spec.write_text(ROW.format(args))
    code, out, err = cli("check", str(spec))
    assert code == 2 and out == ""
    first = err.splitlines()[0]
    assert first == f"{spec}:1:{column}: error: {message}"
    assert "Traceback" not in err


def test_an_int_is_a_float_and_literal_strings_still_work(tmp_path, cli):
    spec = tmp_path / "ok.ut"
    spec.write_text('attn.qkv -> parallel lowrank(r=4, alpha=16, init="gaussian")\n'
                    "blocks.*.mlp -> parallel adapter(dim=8, scale=1, activation=gelu)\n")
    code, out, err = cli("check", str(spec))
    assert code == 0, err
    assert out.strip() == f"ok: {spec}: 2 rules, 0 train/freeze"


def test_rank_wider_than_the_site_is_an_error_at_the_rule(tmp_path, cli):
    spec = tmp_path / "wide.ut"
    spec.write_text("attn.qkv -> parallel lowrank(r=300)\n")
    code, _, err = cli("compile", str(spec), "--model", "vit_t16")
    assert code == 2
    assert err.splitlines()[0].startswith(f"{spec}:1:1: error: blocks.0.attn.qkv (and 11 more like it")
    assert "r=300 is larger than the site's width (192 -> 576); a rank of at most 192" in err


def test_utf8_bom_is_accepted(tmp_path, cli):
    spec = tmp_path / "bom.ut"
    spec.write_bytes(b"\xef\xbb\xbfspec bom\nattn.qkv -> parallel lowrank(r=8)\n")
    code, out, err = cli("check", str(spec))
    assert (code, out.strip()) == (0, "ok: bom: 1 rules, 0 train/freeze"), err


def test_non_utf8_spec_file_is_a_clean_error(tmp_path, cli):
    spec = tmp_path / "latin.ut"
    spec.write_bytes(b"spec latin\n# caf\xe9\n")
    code, _, err = cli("check", str(spec))
    assert code == 2
    assert err.splitlines()[0] == f"error: spec file '{spec}' is not UTF-8 text: byte 0xe9 at line 2 (offset 16)"
    user = tmp_path / "user.ut"
    user.write_text('use "latin.ut"\n')
    code, _, err = cli("check", str(user))
    assert code == 2 and "is not UTF-8 text: byte 0xe9" in err and "Traceback" not in err


def test_files_that_are_not_specs_are_never_quoted(tmp_path, cli):
    secret = tmp_path / "secrets.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    user = tmp_path / "user.ut"
    user.write_text(f'use "{secret}"\n')
    code, _, err = cli("check", str(user))
    assert code == 2 and "root:x" not in err
    assert err.splitlines()[0] == (f"{user}:1:5: error: '{secret}' is not a spec file ({secret}:1:5): "
                                   "unexpected ':'")
    code, _, err = cli("check", str(secret))
    assert code == 2 and "root:x" not in err and err.startswith(f"{secret}:1:5: error: unexpected ':'")


def test_huge_name_does_not_hang_check_on_a_terminal(tmp_path, cli, monkeypatch):
    from utdsl.cli import spec_cmds

    terminal = Console(force_terminal=True, width=80, file=io.StringIO())
    monkeypatch.setattr(spec_cmds, "console", terminal)
    spec = tmp_path / "huge.ut"
    spec.write_text(f"spec {'x' * 1_000_000}\nlet {'y' * 1_000_000} = 1\n")  # as in the issue
    start = time.perf_counter()
    code, _, err = cli("check", str(spec))
    assert code == 0, err
    assert time.perf_counter() - start < 10  # rich's wrapping took > 600 s on 1,000,000 characters
    line = terminal.file.getvalue().strip()
    assert line == f"ok: {'x' * 77}...: 0 rules, 0 train/freeze; {'y' * 77}...=1"


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path):
    from utdsl.cli import main
    from utdsl.errors import SpecError

    spec = tmp_path / "bad.ut"
    spec.write_text(ROW.format("r=true"))
    with pytest.raises(SpecError):
        main(["check", str(spec), "--debug"])
    with pytest.raises(SystemExit) as done:
        main(["check", str(spec)])
    assert done.value.code == 2


def test_typer_exit_codes_reach_the_shell(monkeypatch):
    import typer

    from utdsl.cli import app, main

    @app.command("exit-seven", hidden=True)
    def _seven() -> None:
        raise typer.Exit(7)

    try:
        with pytest.raises(SystemExit) as done:
            main(["exit-seven"])
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "exit-seven"]
    assert done.value.code == 7


@pytest.mark.parametrize("raised, message", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 1536000000000 bytes. Error code 12 (Cannot allocate memory)",
     "error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate 1536000000000 "
     "bytes. Error code 12 (Cannot allocate memory)"),
    (None, "error: out of memory: MemoryError"),
])
def test_an_allocation_the_machine_cannot_hold_is_a_clean_error(capsys, raised, message):
    """``utdsl compile --verify`` of ``adapter(dim=2000000000)`` builds 1.5 TB of tuners: torch's
    allocator error, not a traceback of C++ frames (simulated: a real one may meet the OOM killer)."""
    from utdsl.cli import app, main

    @app.command("allocate", hidden=True)
    def _allocate() -> None:
        raise RuntimeError(raised) if raised else MemoryError()

    try:
        with pytest.raises(SystemExit) as done:
            main(["allocate"])
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "allocate"]
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.splitlines() == [message, "  hint: check the sizes in the spec and the batch size (utdsl compile "
                                "shows the plan's parameter counts without allocating them); --debug shows "
                                "where it failed"]
