"""On the machine it runs on, with 4 CPU ranks: the planner's top-8 layouts for a small model (8 layers,
hidden 256, seq 256) against their measured step times: Spearman >= 0.8 and the first choice within 15% of
the fastest.

    python benchmarks/validate_cpu.py [--cluster cluster.yaml] [--budget 120s] [--top 8] [--steps 14] \
                                      [--repeats 8] [--update [--rounds 2]] [--out-dir DIR]

Without ``--cluster`` it first profiles the machine (``meshplan profile --cluster localhost:4``) with the
model's shapes. Then ``meshplan validate`` launches each layout once a round for ``--repeats`` rounds and prints
the table: a layout's time is the mean of its runs' medians (14 steps, the median of the 13 after the first),
each run divided by its round's level, which cancels what the machine did to the whole round (a shared
machine drifts by tens of percent over a half-hour validate run); each validation's last line says how many
pairs of layouts the runs resolve at two standard errors. More rounds narrow each layout's standard error
(8 rounds of 8 layouts take about 35 minutes on 2 cores). ``--rounds 2`` is the calibration loop a user runs:
round 1 predicts from the profile and (``--update``) calibrates the file; round 2 plans again from the
calibrated file and measures its top layouts, which that calibration never saw. The load average is printed
before and after: the machine is shared, re-run when it is high.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL_MODEL = ("name: small\nlayers: 8\nhidden: 256\nheads: 8\nkv_heads: 4\nvocab: 2048\nmlp: swiglu\n"
               "norm: rmsnorm\nposition: rope\n")
SPEARMAN_TARGET = 0.8
FIRST_CHOICE_TARGET = 1.15


def meshplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshplan.cli", *args], text=True, stdout=subprocess.PIPE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", default=None, help="a profiled cluster file (default: profile now)")
    p.add_argument("--budget", default="120s")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--update", action="store_true", help="calibrate the cluster file and check the new choice")
    p.add_argument("--rounds", type=int, default=1,
                   help="validate again on the file the previous round calibrated (needs --update)")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args()
    if a.rounds > 1 and not a.update:
        p.error("--rounds above 1 needs --update (a later round predicts from the calibrated file)")
    work = Path(a.out_dir or tempfile.mkdtemp(prefix="meshplan-validate-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "small.yaml"
    model.write_text(SMALL_MODEL)
    print(f"load average {os.getloadavg()[0]:.2f} at start ({os.cpu_count()} cores); work dir {work}", flush=True)
    cluster = Path(a.cluster) if a.cluster else work / "cluster.yaml"
    if a.cluster is None:
        proc = meshplan("profile", "--cluster", "localhost:4", "--model", str(model), "--seq-len", "256",
                        "--budget", a.budget, "--out", str(cluster))
        if proc.returncode:
            return proc.returncode
    verdicts = []
    for round_ in range(1, a.rounds + 1):
        # round 1 predicts from the profile; each later one from the file the round before calibrated
        report = work / ("validate.json" if round_ == 1 else f"validate.round{round_}.json")
        args = ["validate", "--model", str(model), "--cluster", str(cluster), "--global-batch", str(a.global_batch),
                "--seq-len", "256", "--top", str(a.top), "--steps", str(a.steps), "--repeats", str(a.repeats),
                "--work-dir", str(work / ("runs" if round_ == 1 else f"runs.round{round_}")), "--json", str(report)]
        if a.update:
            args.append("--update")
        if a.rounds > 1:
            print(f"== round {round_} of {a.rounds}: "
                  + ("predictions from the profile" if round_ == 1 else "predictions from the calibrated file"),
                  flush=True)
        proc = meshplan(*args)
        print(proc.stdout, flush=True)
        if proc.returncode:
            return proc.returncode
        s = json.loads(report.read_text())["summary"]
        verdicts.append((round_, s["spearman"], s.get("first_over_fastest", float("inf")),
                         s.get("resolved_pairs"), s.get("resolved_agree"), s.get("pairs"), s.get("spearman_ceiling")))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for round_, rho, ratio, resolved, agree, pairs, ceiling in verdicts:
        label = f"round {round_}: " if a.rounds > 1 else ""
        print(f"{label}Spearman {rho:.2f} (target >= {SPEARMAN_TARGET}): "
              f"{'met' if rho >= SPEARMAN_TARGET else 'NOT met'}; first choice / fastest measured {ratio:.3f} "
              f"(target <= {FIRST_CHOICE_TARGET}): {'met' if ratio <= FIRST_CHOICE_TARGET else 'NOT met'}"
              + (f"; pairs resolved by the runs {resolved} of {pairs}, ordered as measured {agree}"
                 if resolved is not None else "")
              + (f"; a planner knowing the true times would score about {ceiling:.2f} against these runs"
                 if ceiling is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
