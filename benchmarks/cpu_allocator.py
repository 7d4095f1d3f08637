"""One CPU plan launched under allocator settings side by side: step time, and the largest rank's resident set.

    python benchmarks/cpu_allocator.py --plan plan.yaml --steps 5 --rounds 2
    python benchmarks/cpu_allocator.py --plan plan.yaml --variants base,thp --rounds 4 --json out.json

Each round runs ``meshplan launch PLAN --steps N`` once per variant, the variants in turn, so that a drift of
the machine's speed within the run reaches every variant alike. A variant adds environment variables to the
ranks' (``meshplan launch`` passes its environment on):

* ``base``: none (glibc malloc's defaults: a block of 32 MiB or more is always its own mapping, returned to
  the kernel when freed, so a step's large fresh tensors are faulted in anew every step);
* ``thp``: ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's CPU allocator asks for transparent huge pages for tensors of
  2 MiB and more (the faults come per 2 MiB);
* ``retain``: ``MALLOC_MMAP_THRESHOLD_`` 4 GiB and ``MALLOC_TRIM_THRESHOLD_`` 16 GiB, glibc keeps freed
  blocks in its heap for the next allocation (what jemalloc or tcmalloc do by default);
* ``thp+retain``: both.

Per variant it prints the median over rounds of each run's median step time (steps 2 to N: the first builds
and warms up) and of the largest resident set of any process of the run (``ru_maxrss`` of the launch's
descendants, read in a wrapper process per run). Compare variants only within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

import run_info

RETAIN = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}
VARIANTS = {"base": {}, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}, "retain": RETAIN,
            "thp+retain": {"THP_MEM_ALLOC_ENABLE": "1", **RETAIN}}
# runs ``meshplan launch`` with the given arguments and prints the largest resident set of its descendants (KiB)
WRAPPER = ("import resource, subprocess, sys\n"
           "code = subprocess.run([sys.executable, '-m', 'meshplan.launcher', *sys.argv[1:]],\n"
           "                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
           "sys.stderr.write(code.stderr[-2000:] if code.returncode else '')\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
           "sys.exit(code.returncode)\n")


def launch(plan: Path, steps: int, env: dict[str, str], metrics: Path) -> tuple[float, float]:
    """(median step seconds over steps 2..N, largest resident set in GiB) of one ``meshplan launch``."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(plan), "--steps", str(steps),
                           "--metrics-out", str(metrics)], env={**os.environ, **env}, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"cpu_allocator: the launch failed (exit {done.returncode}):\n{done.stderr}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return statistics.median(r["step_time_s"] for r in records[1:]), int(done.stdout.split()[-1]) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, required=True, help="a plan for CPU ranks (localhost:N)")
    parser.add_argument("--steps", type=int, default=5, help="steps per launch (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="launches per variant, the variants in turn")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the table, with command, date and machine, here")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if any(n not in VARIANTS for n in names):
        parser.error(f"--variants: give some of {', '.join(VARIANTS)}, comma-separated")
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 and --rounds at least 1")
    if not args.plan.is_file():
        parser.error(f"--plan: no such file {args.plan}")
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in names:
                runs[name].append(launch(args.plan, args.steps, VARIANTS[name], Path(tmp) / f"{name}.jsonl"))
                print(f"round {round_ + 1} {name}: {runs[name][-1][0]:.2f} s/step, "
                      f"{runs[name][-1][1]:.2f} GiB", file=sys.stderr)
    base = statistics.median(s for s, _ in runs[names[0]])
    rows = [[name, " ".join(f"{v}={x}" for v, x in VARIANTS[name].items()) or "-",
             f"{statistics.median(s for s, _ in runs[name]):.2f}",
             f"{statistics.median(s for s, _ in runs[name]) / base:.2f}",
             f"{statistics.median(r for _, r in runs[name]):.2f}"] for name in names]
    headers = ["variant", "environment", "step s (median)", f"/ {names[0]}", "largest resident set GiB"]
    print(tabulate(rows, headers=headers))
    if args.json:
        command = "python benchmarks/cpu_allocator.py " + " ".join(argv if argv is not None else sys.argv[1:])
        record = run_info.wrap(command, None)
        record.pop("result")
        record.update(title="CPU ranks under allocator settings",
                      tables=[{"caption": f"{args.plan.name}, {args.rounds} launches of {args.steps} steps each",
                               "headers": headers, "rows": rows}])
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
