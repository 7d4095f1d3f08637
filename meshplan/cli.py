"""The ``meshplan`` command line (typer). Every user error becomes one line and an exit code:
0 ok, 2 bad input, 3 nothing fits. Sub-commands owned by other stages register themselves
through small torch-free modules so ``meshplan plan`` never imports torch."""

from __future__ import annotations

import sys

import typer

from meshplan.errors import MeshplanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, predict and launch parallel training of transformer models.")


def fail(error: MeshplanError) -> None:
    """Print one line to stderr and exit with the error's code."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def _register_subcommands() -> None:
    from meshplan import plan_cli, report_cli

    plan_cli.register(app)
    report_cli.register(app)
    try:  # the launcher stage registers `launch` when present
        from meshplan.launcher import cli as launcher_cli
    except ImportError:
        launcher_cli = None
    if launcher_cli is not None:
        launcher_cli.register(app)
        from meshplan.launcher import check_cli
        check_cli.register(app)
    try:  # the profiler stage registers `profile` and `validate` when present
        from meshplan.profiler import cli as profiler_cli
    except ImportError:
        profiler_cli = None
    if profiler_cli is not None:
        profiler_cli.register(app)
        from meshplan import validate_cli   # launches plans and reads profiles: after `profile`
        validate_cli.register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except MeshplanError as error:  # a safety net: commands catch their own errors first
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
