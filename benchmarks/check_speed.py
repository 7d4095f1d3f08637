"""How long planning's partition ILP and `meshplan check` take on this machine, and what a check process holds.

    python benchmarks/check_speed.py [--json benchmarks/results/check_speed.json]

Three measurements, each printed as a table:

1. The partition + recompute ILP (planner/recompute.py ``_solve_partition``): every CBC solve of a search for
   Llama 3 405B on dgx-h100:64 at tp 8 (global batch 512, seq 8192), the search whose 126 blocks over 8
   pipeline ranks sized the formulation.
2. `meshplan check` of the first and the last pipeline rank of Llama 3 405B on dgx-h100:2048 (tp 8, pp 16,
   dp 128, the plan scripts/check_wheel.sh checks): one rank after the other in this process, then side by
   side in two check processes (launcher/check_worker.py); each rank's own seconds and its block passes (blocks
   x virtual stages x micro-batches), whose ratio sizes ``check.PARALLEL_MIN_BLOCK_PASSES``.
3. A check process's start-up (an interpreter importing the runtime, as ``check_worker`` does) and the
   largest resident set of the side-by-side check processes, which sizes ``check.CHECK_PROCESS_BYTES``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_info  # noqa: E402

from meshplan.launcher.check import check_plan  # noqa: E402
from meshplan.planner.search import parse_fixes, search  # noqa: E402
from meshplan.spec import TrainSpec, load_cluster, load_model  # noqa: E402

COMMAND = "python benchmarks/check_speed.py"


def ilp_solves() -> dict:
    """The wall time of every CBC solve in one search of Llama 3 405B on dgx-h100:64 at tp 8."""
    import pulp

    from meshplan.planner import recompute

    recompute._solve_partition.cache_clear()
    times: list[float] = []
    solve = pulp.LpProblem.solve

    def timed(problem, *args, **kwargs):
        start = time.perf_counter()
        try:
            return solve(problem, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    pulp.LpProblem.solve = timed
    try:
        start = time.perf_counter()
        result = search(load_model("llama3-405b"), load_cluster("dgx-h100:64"), TrainSpec(512, 8192, "bf16"),
                        parse_fixes(["tp=8"]), top=1)
        total = time.perf_counter() - start
    finally:
        pulp.LpProblem.solve = solve
    plan = result.plans[0]
    return {"solves": len(times), "max_s": max(times, default=0.0), "sum_s": sum(times), "search_s": total,
            "plan": f"dp{plan.dp} tp{plan.tp} pp{plan.pp} v{plan.virtual_stages} m{plan.num_microbatches}"}


def block_passes(plan) -> int:
    blocks = max(stop - start for start, stop in (s.layers for s in plan.stages))
    return blocks * (plan.virtual_stages if plan.pp > 1 else 1) * plan.num_microbatches


def check_times() -> dict:
    """Ranks 0 and last of the 405B plan checked in this process, then side by side in two processes."""
    plan = search(load_model("llama3-405b"), load_cluster("dgx-h100:2048"), TrainSpec(2048, 8192, "bf16"),
                  parse_fixes(["tp=8", "pp=16", "dp=128"]), top=1).plans[0]
    ranks = [0, plan.world_size - 1]
    out = {"passes": block_passes(plan), "ranks": ranks}
    for name, workers in (("in_process", 1), ("side_by_side", 2)):
        start = time.perf_counter()
        result = check_plan(plan, ranks, workers=workers)
        out[name] = {"wall_s": time.perf_counter() - start, "rank_s": [r.seconds for r in result.ranks]}
    out["child_max_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30
    return out


def process_start_s(repeats: int = 3) -> float:
    """The fastest of ``repeats`` starts of an interpreter importing what a check process imports."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import meshplan.launcher.check_worker, meshplan.launcher.runtime.train"],
                       check=True)
        best = min(best, time.perf_counter() - start)
    return best


def tables(ilp: dict, check: dict, start_s: float) -> list[dict]:
    per_pass = [s / check["passes"] for s in check["in_process"]["rank_s"]]
    return [
        {"caption": "The partition ILP in one search (llama3-405b, dgx-h100:64, tp 8, batch 512, seq 8192)",
         "headers": ["CBC solves", "slowest solve s", "all solves s", "whole search s", "first plan"],
         "rows": [[ilp["solves"], f"{ilp['max_s']:.2f}", f"{ilp['sum_s']:.2f}", f"{ilp['search_s']:.1f}",
                   ilp["plan"]]]},
        {"caption": f"`meshplan check` of ranks {check['ranks'][0]} and {check['ranks'][1]} (llama3-405b, "
                    "dgx-h100:2048, tp 8, pp 16, dp 128)",
         "headers": ["how", "wall s", "each rank's s", "block passes per rank", "s per block pass"],
         "rows": [["one after the other, in-process", f"{check['in_process']['wall_s']:.1f}",
                   " / ".join(f"{s:.1f}" for s in check["in_process"]["rank_s"]), check["passes"],
                   " / ".join(f"{s:.2f}" for s in per_pass)],
                  ["side by side, 2 check processes", f"{check['side_by_side']['wall_s']:.1f}",
                   " / ".join(f"{s:.1f}" for s in check["side_by_side"]["rank_s"]), check["passes"], ""]]},
        {"caption": "A check process",
         "headers": ["start-up s (imports)", "largest resident set GiB"],
         "rows": [[f"{start_s:.1f}", f"{check['child_max_rss_gib']:.2f}"]]},
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the tables, with command, date and machine, here")
    args = parser.parse_args(argv)
    ilp = ilp_solves()
    check = check_times()
    result = tables(ilp, check, process_start_s())
    for table in result:
        print(table["caption"])
        print(tabulate(table["rows"], headers=table["headers"]))
        print()
    if args.json:
        record = run_info.wrap(COMMAND, None)
        record.pop("result")
        record.update(title="Planning and check speed", tables=result,
                      notes=["Side by side is the default for a rank whose step runs its blocks at least "
                             "`check.PARALLEL_MIN_BLOCK_PASSES` times; the wall time counts the check processes' "
                             "start-up."])
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
