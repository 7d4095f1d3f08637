"""``python -m meshplan.launcher PLAN ...``: the ``launch`` command on its own (same options as
``meshplan launch``)."""

import typer

from meshplan.launcher.cli import launch

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(launch)

if __name__ == "__main__":
    app()
