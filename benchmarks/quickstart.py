"""The README quickstart as a newcomer runs it: plan on ``localhost:4`` with an empty cache (the first plan measures
this machine), launch the plan, then plan again (the cached measurement, no re-measurement) and launch again;
``--profiles N`` repeats all of it N times, each from an empty cache (a new measurement). Prints predicted
against measured step time per launch and how long each plan took.

    python benchmarks/quickstart.py [--profiles 2] [--steps 10] [--launches 3] [--global-batch 8] [--seq-len 64]
                                    [--json benchmarks/results/quickstart.json]

Each launch's measured step time is the run summary's median over its steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import wrap  # noqa: E402



def plan_args(global_batch: int, seq_len: int) -> list[str]:
    """The README quickstart's `meshplan plan` arguments."""
    return ["--model", "tiny-llama", "--cluster", "localhost:4", "--global-batch", str(global_batch), "--seq-len",
            str(seq_len), "--precision", "fp32"]


def meshplan(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "meshplan.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"meshplan {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done, time.perf_counter() - begin


def launch(plan: Path, steps: int, cwd: Path, env: dict) -> dict:
    metrics = cwd / f"{plan.stem}-{time.time_ns()}.jsonl"
    meshplan(["launch", str(plan), "--steps", str(steps), "--metrics-out", str(metrics)], cwd, env)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = sorted(r["step_time_s"] for r in records[1:])
    return {"steps": len(records), "measured_s": steady[len(steady) // 2]}


def run(steps: int, launches: int, global_batch: int, seq_len: int) -> dict:
    from meshplan.plan import Plan

    work = Path(tempfile.mkdtemp(prefix="meshplan-quickstart-"))
    env = {**os.environ, "MESHPLAN_CACHE_DIR": str(work / "cache")}
    env.pop("MESHPLAN_NO_PROFILE", None)
    rows = []
    for attempt in ("first plan (empty cache)", "second plan (cached)"):
        plan_path = work / f"quickstart-{len(rows)}.yaml"
        done, seconds = meshplan(["plan", *plan_args(global_batch, seq_len), "--out", str(plan_path)], work, env)
        plan = Plan.load(plan_path)
        measured = [launch(plan_path, steps, work, env)["measured_s"] for _ in range(launches)]
        rows.append({"plan": attempt, "plan_s": seconds, "measured_profile": "measuring this machine" in done.stderr,
                     "cached": "using this machine's measurement cached" in done.stderr,
                     "layout": " ".join(f"{k}{v}" for k, v in plan.fields_for_fix().items()
                                        if k in ("dp", "tp", "pp", "cp", "micro_batch")),
                     "schedule": plan.schedule if plan.pp > 1 else "-",
                     "predicted_s": plan.predicted.iteration_s, "measured_s": measured})
    return {"steps": steps, "launches": launches, "plan_args": plan_args(global_batch, seq_len), "rows": rows}


def table(results: list[dict]) -> dict:
    """The results page's table: one row per launch, for every profile."""
    rows = []
    for profile, result in enumerate(results, 1):
        for row in result["rows"]:
            for i, measured in enumerate(row["measured_s"], 1):
                rows.append([profile, row["plan"], f"{row['plan_s']:.0f}", row["layout"], row["schedule"], i,
                             f"{row['predicted_s'] * 1e3:.1f}", f"{measured * 1e3:.1f}",
                             f"{measured / row['predicted_s']:.2f}"])
    first = results[0]
    return {"caption": f"`meshplan plan {' '.join(first['plan_args'])}`, then `meshplan launch --steps "
                       f"{first['steps']}` ({first['launches']} launches per plan)",
            "headers": ["profile", "plan", "plan took (s)", "layout", "schedule", "launch", "predicted ms/step",
                        "measured ms/step", "measured/predicted"],
            "rows": rows}


def summary(results: list[dict]) -> str:
    ratios = [m / row["predicted_s"] for r in results for row in r["rows"] for m in row["measured_s"]]
    return (f"Measured/predicted {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} launches from "
            f"{len(results)} measurements of the machine.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profiles", type=int, default=2, help="repeats, each from an empty cache")
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the result (with command, date, machine) here")
    args = parser.parse_args(argv)
    results = [run(args.steps, args.launches, args.global_batch, args.seq_len) for _ in range(args.profiles)]
    shown = table(results)
    print(tabulate(shown["rows"], headers=shown["headers"]))
    print(summary(results))
    if args.json:
        command = "python benchmarks/quickstart.py " + " ".join(
            f"--{name.replace('_', '-')} {getattr(args, name)}" for name in ("profiles", "steps", "launches",
                                                                             "global_batch", "seq_len"))
        notes = ["The first plan measures the machine (a quick profile cached in the user cache directory); the "
                 "second reads the cache and measures nothing. Measured: the median step after the first.",
                 summary(results)]
        args.json.write_text(json.dumps({**wrap(command, results), "tables": [shown], "notes": notes}, indent=1)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
