"""The ``utdsl`` command line: thin typer commands over the library, one error boundary.

Commands live in small modules, each exposing ``register(app)``. Every :class:`UtdslError` and
pydantic ``ValidationError`` is printed without a traceback and exits with code 2; ``--debug``
re-raises instead.
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script (and ``python -m utdsl``)."""
    _register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
    except (UtdslError, ValidationError) as error:
        if debug:
            raise
        print(str(error), file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as error:  # click usage errors arrive as ClickException subclasses
        import click

        if isinstance(error, click.ClickException) and not debug:
            error.show()
            sys.exit(2)
        raise
