"""Re-predict the layouts a `meshplan validate` run measured, with another cluster file (a fresh profile, a
calibrated file), without launching anything: how well would that cost model have ranked those runs?

    python benchmarks/repredict_validate.py REPORT.json CLUSTER.yaml [--undo-calibration]
    python benchmarks/repredict_validate.py --matrix --reports A.json B.json ... --clusters X.yaml Y.yaml ...

REPORT.json is `meshplan validate --json` output (its plan files must still exist: they are in the run's
--work-dir); its measured times are re-derived from the saved runs by validate's current estimator. Prints each
layout's new prediction and breakdown next to the measured time, and the Spearman rank correlation of the new
predictions against the measured times.

``--matrix`` re-predicts every report from every cluster file and prints one table of Spearman correlations
(rows: reports, columns: cluster files; ``own`` is the cluster file in the report's own directory) with each
column's mean, and per report the Spearman a planner knowing the true times would score against its runs'
noise (``ceiling``, ``meshplan/validate.py: spearman_ceiling``): a cost-model change judged over many validations and profiles at once. In this mode every cluster file has its calibrations divided out.

``--undo-calibration`` first divides out every calibration ``meshplan validate --update`` applied to CLUSTER
(``meshplan/validate.py: undo_calibration``): a validation's round-2 file re-predicts as its uncalibrated
profile, so a cost-model change is judged on the profile alone, not on a calibration fitted to the old model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from tabulate import tabulate

from meshplan.plan import Plan
from meshplan.planner.replay import replay
from meshplan.profiler.fit import spearman
from meshplan.spec import load_cluster, load_structured_file


def remeasure(runs: list[dict]) -> list:
    """The runs' measured times by `meshplan validate`'s current estimator (blocked by round,
    ``meshplan/validate.py: block_rounds``) from their saved per-run times, so reports written before it
    compare alike. Returns the rebuilt ``validate.Run`` records (for their standard errors)."""
    from types import SimpleNamespace

    from meshplan.validate import Run, block_rounds

    ran = [r for r in runs if r.get("repeats_s")]
    records = []
    for r in ran:
        record = Run(r["index"], SimpleNamespace(), r["plan"], r["predicted_s"], r["predicted_gib"])
        record.repeats_s = list(r["repeats_s"])
        records.append(record)
    block_rounds(records)
    for r, record in zip(ran, records):
        r["measured_s"] = record.measured_s
    return records


def load_uncalibrated(path: str):
    """The cluster file at ``path`` with every calibration `validate --update` applied divided out."""
    from meshplan.validate import undo_calibration

    undone = undo_calibration(load_structured_file(path, "cluster"), load_cluster(path))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile_undone.yaml"
        out.write_text(yaml.safe_dump(undone, sort_keys=False))
        return load_cluster(str(out))


def repredict(report: dict, cluster) -> tuple[list[list], list[float], list[float]]:
    """``(rows, predicted, measured)`` of the report's measured runs re-predicted on ``cluster``."""
    rows, predicted, measured = [], [], []
    for run in report["runs"]:
        if run.get("measured_s") is None:
            continue
        plan = dataclasses.replace(Plan.load(run["plan"]), cluster=cluster)
        ev = replay(plan)
        predicted.append(ev.iteration_s)
        measured.append(run["measured_s"])
        parts = ", ".join(f"{k} {v:.3f}" for k, v in ev.time_breakdown.items() if v)
        rows.append([run["layout"], f"{run['predicted_s']:.3f}", f"{ev.iteration_s:.3f}", f"{run['measured_s']:.3f}",
                     parts])
    return rows, predicted, measured


def matrix(reports: list[str], clusters: list[str]) -> int:
    loaded = {path: load_uncalibrated(path) for path in clusters}
    names = ["own"] + [Path(c).parent.name or c for c in clusters]
    from meshplan.validate import spearman_ceiling

    table, columns, ceilings = [], [[] for _ in names], []
    for path in reports:
        report = json.load(open(path))
        ceiling = spearman_ceiling(remeasure(report["runs"]))
        ceilings.append(ceiling)
        own = Path(path).parent / "cluster.yaml"
        row = [f"{Path(path).parent.name}/{Path(path).name}", "-" if ceiling is None else f"{ceiling:.2f}"]
        for i, cluster in enumerate([load_uncalibrated(str(own)) if own.exists() else None]
                                    + [loaded[c] for c in clusters]):
            if cluster is None:
                row.append("-")
                continue
            _, predicted, measured = repredict(report, cluster)
            rho = spearman(predicted, measured)
            columns[i].append(rho)
            row.append(f"{rho:.2f}")
        table.append(row)
    known = [c for c in ceilings if c is not None]
    table.append(["mean", f"{statistics.fmean(known):.3f}" if known else "-"]
                 + [f"{statistics.fmean(c):.3f}" if c else "-" for c in columns])
    print(tabulate(table, headers=["report", "ceiling"] + names))
    print("ceiling: the Spearman a planner that knew every layout's true time would score against those runs "
          "(meshplan/validate.py: spearman_ceiling)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", help="`meshplan validate --json` output")
    p.add_argument("cluster", nargs="?", help="the cluster file to predict with")
    p.add_argument("--undo-calibration", action="store_true",
                   help="divide out the calibrations `validate --update` applied to CLUSTER first")
    p.add_argument("--matrix", action="store_true", help="every --reports against every --clusters")
    p.add_argument("--reports", nargs="+", default=[], help="with --matrix: validate reports")
    p.add_argument("--clusters", nargs="+", default=[], help="with --matrix: cluster files")
    a = p.parse_args()
    if a.matrix:
        if not a.reports:
            p.error("--matrix needs --reports REPORT.json ... (and --clusters CLUSTER.yaml ...)")
        return matrix(a.reports, a.clusters)
    if not (a.report and a.cluster):
        p.error("give REPORT.json CLUSTER.yaml, or --matrix --reports ... --clusters ...")
    report = json.load(open(a.report))
    if a.undo_calibration:
        cluster = load_uncalibrated(a.cluster)
        print(f"predicting from {a.cluster} with its calibrations divided out")
    else:
        cluster = load_cluster(a.cluster)
    remeasure(report["runs"])
    rows, predicted, measured = repredict(report, cluster)
    print(tabulate(rows, headers=["layout", "pred s (then)", "pred s (now)", "meas s", "now: breakdown s"]))
    print(f"Spearman of the new predictions against measured: {spearman(predicted, measured):.2f} "
          f"({len(rows)} layouts; then: {report['summary'].get('spearman', float('nan')):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
