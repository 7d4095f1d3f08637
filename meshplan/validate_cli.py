"""``meshplan validate``, registered by :func:`register`: torch-free at import time, the work is
``meshplan/validate.py``'s (imported when the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import MeshplanError


def register(app: typer.Typer) -> None:
    app.command("validate", help="Launch the top plans for a few steps: predicted vs measured, and calibrate.")(
        validate)


def validate(
    model: Optional[str] = typer.Option(None, "--model", help="preset, model YAML or config.json"),
    cluster: str = typer.Option(..., "--cluster", help="cluster YAML (from `meshplan profile`) or localhost:N"),
    global_batch: int = typer.Option(16, "--global-batch", help="sequences per step"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per sequence"),
    precision: Optional[str] = typer.Option(None, "--precision", help="default fp32 on CPU, bf16 on GPU"),
    top: int = typer.Option(6, "--top", help="how many of the planner's best layouts to launch"),
    steps: int = typer.Option(8, "--steps", help="optimizer steps per plan (the first is warm-up)"),
    fix: list[str] = typer.Option([], "--fix", help="KEY=VALUE pins, as for `meshplan plan`"),
    update: bool = typer.Option(False, "--update", help="write the calibration into the cluster file"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="where plans and metrics go (default: temp)"),
    out_json: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
    repeats: int = typer.Option(1, "--repeats", help="run every plan once a round for this many rounds; report "
                                "each plan's mean over its runs with each round's drift divided out, its "
                                "standard error, and which pairs of layouts the runs resolve"),
) -> None:
    from meshplan import validate as validate_mod

    try:
        code = validate_mod.run_validate(model, cluster, global_batch, seq_len, precision, top, steps, fix, update,
                                         work_dir, out_json, repeats)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)
    if code:
        raise typer.Exit(code)
