"""The ``utdsl`` command line: thin typer commands over the library, one error boundary.

Commands live in small modules, each exposing ``register(app)``. Every :class:`UtdslError` and
pydantic ``ValidationError`` is printed without a traceback and exits with code 2; ``--debug``
re-raises instead.
"""

from __future__ import annotations

import re
import sys

import typer
from pydantic import ValidationError
from rich.console import Console

from ..errors import UtdslError

__all__ = ["app", "main", "console", "err_console"]

app = typer.Typer(
    name="utdsl",
    help="Declarative parameter-efficient transfer learning: compile .ut specs into timm backbones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    from . import spec_cmds

    spec_cmds.register(app)
    try:
        from . import run_cmds
    except ImportError:  # pragma: no cover - the runtime commands are optional during development
        return
    run_cmds.register(app)
    from . import export_cmd

    export_cmd.register(app)
    from . import bench_cmd

    bench_cmd.register(app)


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted before or after the subcommand, not after ``--``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return [a for a in argv[:end] if a != "--debug"] + argv[end:], debug


def _is_click_exception(error: BaseException) -> bool:
    """A usage error (unknown option, missing argument...): a ``ClickException`` of click or of the
    copy of click that newer typer releases carry as ``typer._click``."""
    return any(cls.__name__ == "ClickException" for cls in type(error).__mro__) and hasattr(error, "show")


def _out_of_memory(error: BaseException) -> str | None:
    """The message of an allocation the machine cannot hold (a tuner of absurd size built for real,
    a batch too large for the GPU), without torch's C++ frames; None for any other error."""
    torch = sys.modules.get("torch")
    text = str(error).strip()
    if not (isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError))
            or "can't allocate memory" in text):
        return None
    line = re.sub(r"^\[enforce fail at [^\]]*\] [^.]*\. ", "", text.splitlines()[0] if text else "")
    return (f"error: out of memory: {line or type(error).__name__}\n"
            "  hint: check the sizes in the spec and the batch size (utdsl compile shows the plan's parameter "
            "counts without allocating them); --debug shows where it failed")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script (and ``python -m utdsl``).

    Exit codes: 0 done, 2 a user error (a :class:`UtdslError`, a validation or usage error; the
    message without a traceback), 130 interrupted (Ctrl-C); ``--debug`` anywhere on the command
    line shows tracebacks instead."""
    _register_commands()
    args, debug = _split_debug(list(argv if argv is not None else sys.argv[1:]))
    _state["debug"] = debug
    try:
        code = app(args=args, standalone_mode=False)
    except (UtdslError, ValidationError) as error:
        if debug:
            raise
        print(str(error), file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if _is_click_exception(error) and not debug:
            error.show()
            sys.exit(2)
        if _out_of_memory(error) and not debug:
            print(_out_of_memory(error), file=sys.stderr)
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # typer returns (not raises) the code of an Exit
        sys.exit(code)
