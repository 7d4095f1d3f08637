"""``meshplan check plan.yaml``: build every rank asked for on this CPU (fake process group, fake tensors; ranks
of a large plan side by side in processes of their own, one per core), measure its memory, and set it beside
the planner's prediction. Torch is imported only when the
command runs, so registering it keeps ``meshplan plan`` torch-free.

Exit codes: 0 the plan builds and its measured peak fits the device; 2 the plan cannot be built (one line
naming the rank and the reason); 3 it builds but the measured peak does not fit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import MeshplanError
from meshplan.units import human_memory

GIB = 2**30


def register(app: typer.Typer) -> None:
    app.command("check", help="Build the plan for its ranks on this CPU (fake process group and tensors) and "
                              "measure memory against the prediction.")(check)


def check(
    plan: Path = typer.Argument(..., help="plan file written by `meshplan plan --out`"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="ranks to check: all, or a list such as 0,7,last "
                                        "or pp:3 (default: the first rank of each pipeline rank)"),
    output_format: str = typer.Option("table", "--format", help="table or json"),
    workers: Optional[int] = typer.Option(None, "--workers", help="ranks checked side by side, each in a process "
                                          "of its own (default: one per core for large plans, else 1)"),
) -> None:
    from meshplan.plan import Plan

    try:
        if output_format not in ("table", "json"):
            from meshplan.errors import InputError
            raise InputError("--format", f"unknown format {output_format!r}", "use table or json")
        if workers is not None and workers < 1:
            from meshplan.errors import InputError
            raise InputError("--workers", f"must be >= 1, got {workers}", "give a number of processes")
        loaded = Plan.load(plan)
        result = run_check(loaded, ranks, progress=output_format == "table", workers=workers)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)
    if output_format == "json":
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(format_table(result))
    if not result.fits():
        worst = result.worst
        typer.echo(f"error: rank {worst.rank} peaks at {human_memory(worst.measured['peak'] / GIB)} measured, more "
                   f"than the {human_memory(result.capacity_bytes / GIB)} a device offers (re-plan with more recompute, "
                   f"ZeRO or parallelism: meshplan plan --check)", err=True)
        raise typer.Exit(3)


def run_check(plan, ranks: str | None, progress: bool = True, workers: int | None = None):
    """Check the plan's ranks (``workers`` side by side: ``check.check_workers`` when None), with a progress
    line per rank on stderr."""
    from meshplan.launcher.check import check_plan, parse_ranks

    chosen = parse_ranks(ranks, plan)

    def report(done: int, total: int, rank_check) -> None:
        if progress:   # one line redrawn on a terminal, one line per rank in a log
            tty = sys.stderr.isatty()
            print(f"{chr(13) if tty else ''}checked rank {rank_check.rank} ({done}/{total}) in "
                  f"{rank_check.seconds:.1f}s", end="\n" if done == total or not tty else "", file=sys.stderr,
                  flush=True)

    return check_plan(plan, chosen, report, workers=workers)


def _unit(result) -> tuple[str, float]:
    """GiB, or MiB for plans whose worst rank peaks below 1 GiB (tiny CPU plans)."""
    return ("GiB", GIB) if result.worst.measured["peak"] >= GIB else ("MiB", 2**20)


def _pct(measured: float, predicted: float) -> str:
    if not measured:
        return "-"
    return f"{(predicted - measured) / measured * 100:+.1f}%"


def format_table(result) -> str:
    """Per rank: measured bytes by kind and the peak, the planner's peak, and the difference."""
    from tabulate import tabulate

    plan = result.plan
    unit, scale = _unit(result)

    def fmt(x: float) -> str:
        return f"{x / scale:.3f}"

    rows = []
    for r in result.ranks:
        m, p = r.measured, r.predicted
        rows.append([r.rank, r.coords.get("pp", 0), ",".join(map(str, r.stages)), fmt(m["parameters"]),
                     fmt(m["gradients"]), fmt(m["optimizer"]), f"{fmt(m['activations'])} ({r.in_flight:g}x)",
                     fmt(m["logits"]), fmt(m["peak"]), fmt(p.get("peak", 0.0)) if p else "-",
                     _pct(m["peak"], p.get("peak", 0.0)) if p else "-"])
    headers = ["rank", "pp", "stages", "params", "grads", "optim", "activations (in flight)", "logits",
               "peak", "predicted", "pred-meas"]
    worst = result.worst
    lines = [f"meshplan check: {plan.model.name}, dp={plan.dp} tp={plan.tp} pp={plan.pp} cp={plan.cp} "
             f"(world {plan.world_size}), {len(result.ranks)} rank(s) built and run on fake tensors; {unit}",
             tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True),
             f"worst rank {worst.rank}: measured peak {human_memory(worst.measured['peak'] / GIB)} (predicted "
             f"{human_memory(worst.predicted.get('peak', 0.0) / GIB)}), device offers "
             f"{human_memory(result.capacity_bytes / GIB)}: {'fits' if result.fits() else 'DOES NOT FIT'}"]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
