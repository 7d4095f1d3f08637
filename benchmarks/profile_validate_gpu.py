"""Profile one GPU, then launch the planner's best single-GPU layouts and check each one's
predicted peak memory against ``torch.cuda.max_memory_allocated`` (within 10%) and predicted step time against
the measured one (within 15%). One command, sized for a lent H100/H200 (about 8-10 minutes with the defaults):

    python benchmarks/profile_validate_gpu.py --out-dir bench-gpu/ [--model llama3.2-1b] [--seq-len 2048] \
        [--global-batch 8] [--budget 150s] [--micro-batches 1,2,4,8] [--top 4] [--steps 12] [--repeats 2]

It runs, in order, the two commands a user runs (their output is kept in ``--out-dir``):

    meshplan profile --cluster localhost:1 --model M --seq-len S --budget B --micro-batches 1,2,..,G --out DIR/cluster.yaml
    meshplan validate --model M --cluster DIR/cluster.yaml --global-batch G --seq-len S --top K --steps N \
        --repeats R --json DIR/validate.json --work-dir DIR/runs

and prints one row per layout: predicted and measured step time and peak memory, their ratios, and whether
each is within its tolerance. The numbers are what the runs measure. Without CUDA the script refuses, unless
``--allow-cpu`` (a smoke run of the same flow on one CPU process: its memory is the peak resident set, which
the tolerance does not apply to, and the verdict line says so).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MEMORY_TOLERANCE = 0.10   # predicted peak memory against max_memory_allocated
TIME_TOLERANCE = 0.15


def meshplan(*args: str) -> int:
    print("$ meshplan " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "meshplan.cli", *args]).returncode


def verdicts(runs: list[dict]) -> tuple[list[list], dict]:
    """Rows for the table, and the counts of layouts within each tolerance (memory only where it is
    ``max_memory_allocated``)."""
    rows, counts = [], {"measured": 0, "time_ok": 0, "memory_checked": 0, "memory_ok": 0}
    for r in runs:
        if r.get("measured_s") is None:
            rows.append([r["index"], r["layout"], f"{r['predicted_s']:.3f}", "failed", "-", "-",
                         f"{r['predicted_gib']:.2f}", "-", "-", "-"])
            continue
        counts["measured"] += 1
        t_ratio = r["measured_s"] / r["predicted_s"]
        t_ok = abs(t_ratio - 1) <= TIME_TOLERANCE
        counts["time_ok"] += t_ok
        m_ratio = m_ok = None
        if r.get("measured_gib") is not None and r["predicted_gib"]:
            m_ratio = r["measured_gib"] / r["predicted_gib"]
            if r.get("memory_kind") == "max_memory_allocated":
                m_ok = abs(m_ratio - 1) <= MEMORY_TOLERANCE
                counts["memory_checked"] += 1
                counts["memory_ok"] += m_ok
        rows.append([r["index"], r["layout"], f"{r['predicted_s']:.3f}", f"{r['measured_s']:.3f}",
                     f"{t_ratio:.2f}", "yes" if t_ok else "NO", f"{r['predicted_gib']:.2f}",
                     f"{r['measured_gib']:.2f}" if r.get("measured_gib") is not None else "n/a",
                     f"{m_ratio:.2f}" if m_ratio is not None else "-",
                     "-" if m_ok is None else "yes" if m_ok else "NO"])
    return rows, counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("bench-gpu"))
    p.add_argument("--model", default="llama3.2-1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--budget", default="150s", help="the profile's wall-clock budget")
    p.add_argument("--micro-batches", default=None, help="micro-batch sizes the profile times (default: powers "
                   "of two up to the global batch, every micro-batch a single-GPU layout can use)")
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cluster", default=None, help="an existing profile of this GPU (skips `meshplan profile`)")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-run the flow without a GPU (no verdict)")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not a.allow_cpu:
        print("error: no CUDA device: this benchmark checks GPU memory and time; run it on a GPU machine "
              "(or give --allow-cpu for a smoke run of the flow)", file=sys.stderr)
        return 2
    a.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke run)"
    print(f"device: {device}; torch {torch.__version__}; out dir {a.out_dir}", flush=True)
    begin = time.time()
    cluster = a.cluster or str(a.out_dir / "cluster.yaml")
    if a.cluster is None:
        mbs = a.micro_batches or ",".join(str(2 ** i) for i in range(a.global_batch.bit_length()))
        code = meshplan("profile", "--cluster", "localhost:1", "--model", a.model, "--seq-len", str(a.seq_len),
                        "--budget", a.budget, "--micro-batches", mbs, "--out", cluster, "--keep-raw", str(a.out_dir / "profile.raw.json"))
        if code:
            return code
        print(f"profiled in {time.time() - begin:.0f}s", flush=True)
    report = a.out_dir / "validate.json"
    code = meshplan("validate", "--model", a.model, "--cluster", cluster, "--global-batch", str(a.global_batch),
                    "--seq-len", str(a.seq_len), "--top", str(a.top), "--steps", str(a.steps),
                    "--repeats", str(a.repeats), "--json", str(report), "--work-dir", str(a.out_dir / "runs"))
    if code:
        return code
    from tabulate import tabulate

    runs = json.loads(report.read_text())["runs"]
    rows, counts = verdicts(runs)
    print()
    print(tabulate(rows, headers=["#", "layout", "pred s", "meas s", "meas/pred", f"within {TIME_TOLERANCE:.0%}",
                                  "pred GiB", "meas GiB", "meas/pred", f"within {MEMORY_TOLERANCE:.0%}"]))
    print(f"\n{device}, {time.time() - begin:.0f}s in all: step time within {TIME_TOLERANCE:.0%} on "
          f"{counts['time_ok']} of {counts['measured']} layouts; peak memory (max_memory_allocated) within "
          f"{MEMORY_TOLERANCE:.0%} on {counts['memory_ok']} of {counts['memory_checked']}"
          + (" (not checked: CPU smoke run, memory is peak RSS)" if not counts["memory_checked"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
