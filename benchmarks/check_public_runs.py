"""The planner's predicted peak memory against ``meshplan check`` for the published runs' configurations.

    python benchmarks/check_public_runs.py [--runs ../shared/benchmarks/public-runs.yaml] [--json out.json]

Every run of ``benchmarks/fidelity.py`` (Megatron-Core weak scaling, torchtitan Llama 3.1) is planned with its
published configuration pinned for meshplan's engine (what ``check`` builds; an fp8 run trains in bf16 and
async TP is off, as meshplan's runtime runs them), then checked: the first rank of the first and last pipeline
rank built by meshplan's runtime over a fake process group of the run's world size, on fake tensors, one
training step.
The table gives, per checked rank, the measured and predicted allocated peak (GiB, before the planner's
allocator margin) and (predicted - measured) / measured. Target: within 5%, never below by more than 2%.
Results: docs/results.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import load_cases, parse_runs_arguments  # noqa: E402
from meshplan.launcher.check import check_plan, parse_ranks  # noqa: E402
from meshplan.engines import MESHPLAN  # noqa: E402
from meshplan.planner.search import search  # noqa: E402
from meshplan.spec import TrainSpec  # noqa: E402

GIB = 2**30


def meshplan_train(train: TrainSpec) -> TrainSpec:
    """The run's batch in a precision meshplan's runtime trains in (bf16 for an fp8 run)."""
    if train.precision in MESHPLAN.precisions:
        return train
    return dataclasses.replace(train, precision="bf16")


def meshplan_pins(case) -> dict:
    """The run's pins, less the values meshplan's engine does not run (each dropped to what it runs). Async TP
    runs on compiled blocks only, and the published runs pin ``compile: false``: they are checked without it
    (``check`` builds blocks eagerly either way)."""
    pins = {k: v for k, v in {**case.fixes, **case.env}.items() if MESHPLAN.refusal(k, v) is None}
    if pins.get("tp_overlap") and not pins.get("compile"):
        pins["tp_overlap"] = False
    return pins


def run(path: Path) -> list[dict]:
    rows = []
    for case in load_cases(path):
        plan = search(case.model, case.cluster, meshplan_train(case.train), meshplan_pins(case), top=1,
                      engine=MESHPLAN).plans[0]
        firsts = parse_ranks(None, plan)
        ranks = sorted({firsts[0], firsts[-1]})
        start = time.perf_counter()
        try:
            result = check_plan(plan, ranks)
        except Exception as error:   # report and go on: one run the runtime cannot build is a finding
            print(f"{case.name}: check failed: {error}", file=sys.stderr)
            rows.append({"run": case.name, "error": str(error)})
            continue
        seconds = time.perf_counter() - start
        for r in result.ranks:
            measured, predicted = r.measured["peak"], r.predicted.get("peak", 0.0)
            rows.append({"run": case.name, "rank": r.rank, "pp": r.coords["pp"],
                         "degrees": f"dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}"
                                    + (f" ep{plan.ep}" if plan.ep > 1 else "") + f" z{plan.zero} mb{plan.micro_batch}",
                         "measured_gib": measured / GIB, "predicted_gib": predicted / GIB,
                         "error": (predicted - measured) / measured, "seconds": seconds / len(result.ranks),
                         "measured": {k: v / GIB for k, v in r.measured.items()},
                         "predicted": {k: v / GIB for k, v in r.predicted.items()}})
            print(f"{case.name:45s} rank {r.rank:6d} (pp {r.coords['pp']:2d})  measured {measured / GIB:7.2f}  "
                  f"predicted {predicted / GIB:7.2f}  {rows[-1]['error'] * 100:+6.1f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_runs_arguments(__doc__.splitlines()[0], argv)
    if args is None:
        return 2
    rows = run(args.runs)
    ok = [r for r in rows if "error" in r and isinstance(r["error"], float)]
    summary = ""
    if ok:
        errors = sorted(abs(r["error"]) for r in ok)
        summary = (f"{len(ok)} ranks: median |error| {errors[len(errors) // 2] * 100:.1f}%, worst "
                   f"{errors[-1] * 100:.1f}%, within 5%: {sum(e <= 0.05 for e in errors)}, predicted below "
                   f"measured by more than 2%: {sum(r['error'] < -0.02 for r in ok)}")
        print("\n" + summary)
    if args.json:
        args.json.write_text(json.dumps(results_document(rows, summary), indent=2))
    return 0


def results_document(rows: list[dict], summary: str) -> dict:
    """The --json file docs/results.md is built from (scripts/gen_results.py): the table, with the command,
    date and machine (run_info.wrap) and the per-rank records."""
    from run_info import wrap

    table = [[r["run"], f"{r['rank']} ({r['pp']})", r["degrees"], f"{r['measured_gib']:.2f}",
              f"{r['predicted_gib']:.2f}", f"{r['error']:+.1%}"] for r in rows if isinstance(r.get("error"), float)]
    table += [[r["run"], "-", "-", "-", "-", f"check failed: {r['error']}"] for r in rows
              if not isinstance(r.get("error"), float)]
    document = wrap("python benchmarks/check_public_runs.py", None)
    document.pop("result", None)
    return {"title": "Planned peak memory against `meshplan check`, published runs' configurations", **document,
            "tables": [{"caption": "First rank of the first and last pipeline rank, each run planned for "
                                   "meshplan's engine; allocated GiB, the planner before its margin",
                        "headers": ["run", "rank (pp)", "degrees", "measured GiB", "predicted GiB",
                                    "predicted - measured"], "rows": table}],
            "notes": [summary + "."] if summary else [], "ranks": rows}


if __name__ == "__main__":
    sys.exit(main())
