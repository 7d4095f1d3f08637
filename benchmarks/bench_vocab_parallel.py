"""Vocabulary parallelism across pipeline ranks on CPU ranks: step time and per-rank peak memory with
``vocab_parallel`` false vs true, next to the planner's predicted ratios.

    python benchmarks/bench_vocab_parallel.py                                  # 8 layers, vocab 65536, pp4, 1F1B
    python benchmarks/bench_vocab_parallel.py --pp 2 --cluster cluster.yaml    # a profiled cluster (meshplan profile)
    python benchmarks/bench_vocab_parallel.py --vocab 32768 --steps 3 --out bench-vocab.json

Each configuration runs two real ``torchrun`` jobs (gloo, fp32): ``launcher.runtime.train`` for ``--steps``
steps (step time: the median of the steps after the first) and ``launcher.runtime.memory_run`` (each rank's
peak live tensor bytes over one step, optimizer state included: the tracker ``meshplan check`` uses, entered
in the vocabulary helper thread too). The planner's numbers come from ``planner.replay`` of the same plans
on ``--cluster`` (``iteration_s``; each pipeline rank's peak without the allocator margin, which live bytes
do not see). The figure of merit is the ratio true / false, measured against predicted (docs/results.md).
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

from meshplan.plan import Plan, StagePlan
from meshplan.spec import ModelSpec, TrainSpec, load_cluster

def make_plan(args, vocab_parallel: bool) -> Plan:
    model = ModelSpec(name=f"bench-{args.layers}l-v{args.vocab}", layers=args.layers, hidden=args.hidden,
                      heads=args.heads, kv_heads=args.heads, ffn_hidden=4 * args.hidden, vocab=args.vocab)
    pp, m = args.pp, args.microbatches
    bounds = [round(i * args.layers / pp) for i in range(pp + 1)]
    stages = tuple(StagePlan((bounds[i], bounds[i + 1]), {"none": bounds[i + 1] - bounds[i]}) for i in range(pp))
    return Plan(dp=1, tp=1, pp=pp, cp=1, micro_batch=args.global_batch // m, num_microbatches=m, stages=stages,
                model=model, cluster=load_cluster(args.cluster or f"localhost:{pp}"),
                train=TrainSpec(args.global_batch, args.seq_len, precision="fp32"), schedule="1f1b",
                vocab_parallel=vocab_parallel)


def _torchrun(plan: Plan, module: str, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.world_size}",
           "-m", module, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def run(plan: Plan, workdir: Path, name: str, steps: int) -> dict:
    plan_path, metrics, mem = workdir / f"{name}.yaml", workdir / f"{name}.jsonl", workdir / f"{name}-mem"
    plan.save(plan_path)
    _torchrun(plan, "meshplan.launcher.runtime.train", "--plan", str(plan_path), "--steps", str(steps),
              "--metrics-out", str(metrics))
    _torchrun(plan, "meshplan.launcher.runtime.memory_run", "--plan", str(plan_path), "--out", str(mem))
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    ranks = sorted((json.loads(p.read_text()) for p in mem.glob("rank*.json")), key=lambda r: r["rank"])
    return {"step_s": statistics.median(r["step_time_s"] for r in records[1:] or records),
            "loss": [r["loss"] for r in records], "rank_mib": [r["measured"]["peak"] / 2**20 for r in ranks]}


def predicted(plan: Plan) -> dict:
    from meshplan.planner.replay import replay

    ev = replay(plan)
    peaks = [ev.rank_peak_before_margin(r) for r in range(plan.pp)]
    return {"step_s": ev.iteration_s, "rank_mib": [b / 2**20 for b in peaks]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cluster", default=None, help="cluster the planner predicts on: a `meshplan profile` YAML "
                   "or a preset (default localhost:<pp>)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vp in (False, True):
            plan = make_plan(args, vp)
            name = f"vocab_parallel={str(vp).lower()}"
            results[name] = {"measured": run(plan, Path(tmp), name.replace("=", "-"), args.steps),
                             "predicted": predicted(plan)}
    off, on = results["vocab_parallel=false"], results["vocab_parallel=true"]
    rows = [("step time (s)", off["measured"]["step_s"], on["measured"]["step_s"],
             off["predicted"]["step_s"], on["predicted"]["step_s"])]
    for r in range(args.pp):
        rows.append((f"rank {r} peak memory (MiB)", off["measured"]["rank_mib"][r], on["measured"]["rank_mib"][r],
                     off["predicted"]["rank_mib"][r], on["predicted"]["rank_mib"][r]))
    rows.append(("max rank peak memory (MiB)", max(off["measured"]["rank_mib"]), max(on["measured"]["rank_mib"]),
                 max(off["predicted"]["rank_mib"]), max(on["predicted"]["rank_mib"])))
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, seq {args.seq_len}, "
          f"global batch {args.global_batch}, {args.microbatches} micro-batches, pp{args.pp} 1F1B, fp32, CPU/gloo, "
          f"predicted on {args.cluster or f'localhost:{args.pp}'}\n")
    print("| quantity | measured false | measured true | measured ratio | predicted false | predicted true "
          "| predicted ratio | ratio error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, m0, m1, p0, p1 in rows:
        mr, pr = m1 / m0, p1 / p0
        print(f"| {label} | {m0:.3f} | {m1:.3f} | {mr:.3f} | {p0:.3f} | {p1:.3f} | {pr:.3f} | {pr / mr - 1:+.1%} |")
    print(f"\nlosses false: {off['measured']['loss']}\nlosses true:  {on['measured']['loss']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
