"""``meshplan report`` and ``meshplan export``: torch-free, and matplotlib is imported only when a report
is drawn. ``meshplan.cli`` calls :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import InputError, MeshplanError


def _fail(error: MeshplanError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def _load_plan(path: Path, what: str):
    from meshplan.plan import Plan

    try:
        return Plan.load(path)
    except InputError as exc:
        if exc.field == "plan":          # missing file / bad YAML: name the argument the user typed
            raise InputError(what, exc.problem, exc.fix) from None
        raise


def register(app: typer.Typer) -> None:
    """Add the ``report`` and ``export`` commands to ``app``."""

    @app.command("report")
    def report(
        plan: Path = typer.Argument(..., help="Plan file written by `meshplan plan --out`."),
        out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for README.md, report.html and pictures."),
        compare: Optional[Path] = typer.Option(None, "--compare", help="An older plan: say what changed, by how much."),
        metrics: Optional[Path] = typer.Option(None, "--metrics",
                                               help="Metrics JSON lines from a launch: measured next to predicted."),
        fmt: str = typer.Option("png", "--format", help="Picture format: png or svg."),
        html: bool = typer.Option(True, "--html/--no-html", help="Also write report.html."),
    ) -> None:
        """Write a Markdown (+ HTML) report with pictures: inputs, plan, alternatives, memory, time, schedule."""
        try:
            from meshplan import report as rep

            new = _load_plan(plan, "plan")
            old = _load_plan(compare, "--compare") if compare is not None else None
            rows = rep.load_metrics(metrics) if metrics is not None else None
            files = rep.write_report(new, out, compare=old, metrics=rows, html_page=html, fmt=fmt.lower(),
                                     plan_path=str(plan), compare_path=str(compare) if compare else None)
        except MeshplanError as error:
            _fail(error)
            return
        if old is not None:
            for line in rep.compare_summary(new, old):
                typer.echo(line)
        typer.echo(f"wrote {files.markdown}" + (f", {files.html}" if files.html else "") + " and "
                   + ", ".join(p.name for p in files.pictures.values()))

    @app.command("export")
    def export(
        plan: Path = typer.Argument(..., help="Plan file written by `meshplan plan --out`."),
        to: str = typer.Option(..., "--to", help="megatron (Megatron-LM arguments), torchtitan (torchtitan 0.3 "
                               "arguments), torchtitan-toml (torchtitan 0.2 job file), deepspeed or json."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
        torchtitan_config: Optional[str] = typer.Option(
            None, "--torchtitan-config", metavar="MODULE:FUNCTION",
            help="torchtitan config function that builds the model (for a model that is not a torchtitan preset)."),
    ) -> None:
        """Print the plan in an engine's own terms; what the target cannot express goes to stderr.

        megatron and torchtitan need a plan priced for that engine (`meshplan plan --engine ...`)."""
        try:
            from meshplan.export import TARGETS, export_plan

            if to.lower().strip() not in TARGETS:
                raise InputError("--to", f"unknown export target {to!r}", f"choose one of: {', '.join(TARGETS)}")
            text, warnings = export_plan(_load_plan(plan, "plan"), to, source=str(plan),
                                         torchtitan_config=torchtitan_config)
            if out is not None:
                try:
                    out.write_text(text)
                except OSError as exc:
                    raise InputError("--out", f"cannot write {out}: {exc.strerror}", "give a writable path") from None
        except MeshplanError as error:
            _fail(error)
            return
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
        if out is None:
            typer.echo(text, nl=False)
        else:
            typer.echo(f"wrote {out}", err=True)
