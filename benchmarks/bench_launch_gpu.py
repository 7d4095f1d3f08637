"""Measure a ~1B Llama plan on this node's GPUs against the plan's prediction (needs CUDA GPUs).

    python benchmarks/bench_launch_gpu.py --gpus 1 --steps 30 --out bench/

It plans ``llama3.2-1b`` (16 blocks, hidden 2048, GQA 32/8, vocabulary 128256) for ``localhost:N`` with the
planner (bf16, AdamW, global batch 8 x 2048 tokens per GPU), launches it with ``meshplan launch`` and prints
measured tokens/s, MFU and peak memory next to the prediction (the first steps are warm-up; the runtime's
summary uses the median of the steps after the first). The numbers are whatever the run measures; on a
machine without a GPU the script refuses to run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--model", default="llama3.2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-per-gpu", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-launch"))
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < args.gpus:
        print(f"error: needs {args.gpus} CUDA GPU(s); this machine has "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}", file=sys.stderr)
        return 2
    from meshplan.planner.search import search
    from meshplan.spec import TrainSpec, load_cluster, load_model

    args.out.mkdir(parents=True, exist_ok=True)
    cluster = load_cluster(f"localhost:{args.gpus}")
    train = TrainSpec(global_batch=args.batch_per_gpu * args.gpus, seq_len=args.seq_len, precision="bf16")
    plan = search(load_model(args.model), cluster, train, {}, top=1).plans[0]
    plan_path = args.out / "plan.yaml"
    plan.save(plan_path)
    metrics_path = args.out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "meshplan.launcher", str(plan_path), "--steps", str(args.steps),
           "--metrics-out", str(metrics_path)]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        return proc.returncode
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()][args.warmup:]
    measured = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "iteration_s": statistics.median(r["step_time_s"] for r in records),
    }
    predicted = plan.predicted.to_dict() if plan.predicted else {}
    result = {"device": torch.cuda.get_device_name(0), "gpus": args.gpus, "model": args.model,
              "plan": plan.fields_for_fix(), "measured": measured,
              "predicted": {k: predicted.get(k) for k in measured}}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{'':18}{'measured':>14}{'predicted':>14}")
    for key, value in measured.items():
        pred = result["predicted"].get(key)
        print(f"{key:18}{value:14.4g}{pred if pred is None else format(pred, '14.4g'):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
