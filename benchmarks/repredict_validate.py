"""Re-predict the layouts a `meshplan validate` run measured, with another cluster file (a fresh profile, a
calibrated file), without launching anything: how well would that cost model have ranked those runs?

    python benchmarks/repredict_validate.py REPORT.json CLUSTER.yaml [--undo-calibration]

REPORT.json is `meshplan validate --json` output (its plan files must still exist: they are in the run's
--work-dir); its measured times are re-derived from the saved runs by validate's current estimator. Prints each layout's new prediction and breakdown next to the measured time, and the Spearman rank
correlation of the new predictions against the measured times.

``--undo-calibration`` first divides out every calibration ``meshplan validate --update`` applied to CLUSTER
(``profiler/validate.py: undo_calibration``): a validation's round-2 file re-predicts as its uncalibrated
profile, so a cost-model change is judged on the profile alone, not on a calibration fitted to the old model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import yaml
from tabulate import tabulate

from meshplan.plan import Plan
from meshplan.planner.replay import replay
from meshplan.profiler.fit import spearman
from meshplan.spec import load_cluster, load_structured_file


def remeasure(runs: list[dict]) -> None:
    """The runs' measured times by `meshplan validate`'s current estimator (blocked by round,
    ``profiler/validate.py: block_rounds``) from their saved per-run times, so reports written before it
    compare alike."""
    from types import SimpleNamespace

    from meshplan.profiler.validate import Run, block_rounds

    ran = [r for r in runs if r.get("repeats_s")]
    records = []
    for r in ran:
        record = Run(r["index"], SimpleNamespace(), r["plan"], r["predicted_s"], r["predicted_gib"])
        record.repeats_s = list(r["repeats_s"])
        records.append(record)
    block_rounds(records)
    for r, record in zip(ran, records):
        r["measured_s"] = record.measured_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="`meshplan validate --json` output")
    p.add_argument("cluster", help="the cluster file to predict with")
    p.add_argument("--undo-calibration", action="store_true",
                   help="divide out the calibrations `validate --update` applied to CLUSTER first")
    a = p.parse_args()
    report = json.load(open(a.report))
    cluster = load_cluster(a.cluster)
    if a.undo_calibration:
        from meshplan.profiler.validate import undo_calibration

        undone = undo_calibration(load_structured_file(a.cluster, "cluster"), cluster)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "profile_undone.yaml"
            path.write_text(yaml.safe_dump(undone, sort_keys=False))
            cluster = load_cluster(str(path))
        print(f"predicting from {a.cluster} with its calibrations divided out")
    remeasure(report["runs"])
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
    print(tabulate(rows, headers=["layout", "pred s (then)", "pred s (now)", "meas s", "now: breakdown s"]))
    print(f"Spearman of the new predictions against measured: {spearman(predicted, measured):.2f} "
          f"({len(rows)} layouts; then: {report['summary'].get('spearman', float('nan')):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
