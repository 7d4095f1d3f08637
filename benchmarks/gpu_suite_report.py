"""The GPU suite's tables (benchmarks/gpu_suite.sh): measured against predicted, torchtitan, kernels, MoE experts.

    python benchmarks/gpu_suite_report.py OUT_DIR                 # prints Markdown, writes OUT_DIR/suite.json
    python benchmarks/gpu_suite_report.py OUT_DIR --json benchmarks/results/gpu_suite_h100.json

``suite.json`` has the results page's format (``title``, ``command``, ``date``, ``machine``, ``tables``,
``notes``; scripts/gen_results.py renders it). The launch row compares the median step time, tokens/s and MFU
over the steps after ``--warmup`` and the largest ``max_memory_allocated`` / ``max_memory_reserved`` with the
plan's prediction (its allocated peak before the planner's allocator margin); the targets row states the
runtime's goals: MFU >= 45% or torchtitan's tokens/s, step time within 10%, allocated memory within 5% and
reserved within 10% of the prediction. A step that did not run shows as missing, never as zero.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path


def launch_summary(out: Path, warmup: int) -> dict | None:
    path = out / "launch.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][warmup:]
    if not records:
        return None
    return {"step_time_s": statistics.median(r["step_time_s"] for r in records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
            "reserved_memory_gib": max(r["reserved_memory_gib"] for r in records)}


def predicted(out: Path) -> tuple[dict | None, str]:
    from meshplan.plan import Plan
    from meshplan.planner.memory import ALLOCATOR_MARGIN

    path = out / "plan.yaml"
    if not path.exists():
        return None, "no plan"
    plan = Plan.load(path)
    p = plan.predicted
    fields = plan.fields_for_fix()
    kernels = ",".join(f"{op}:{impl}" for op, impl in plan.kernels.items())
    choice = " ".join(f"{k}={v}" for k, v in fields.items()) + f" compile={plan.compile} kernels={kernels}"
    return {"step_time_s": p.iteration_s, "tokens_per_s": p.tokens_per_s, "mfu": p.mfu,
            "peak_memory_gib": p.peak_memory_gib / (1 + ALLOCATOR_MARGIN),
            "reserved_memory_gib": p.reserved_memory_gib}, choice


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def launch_table(measured: dict | None, pred: dict | None, titan: dict | None) -> dict:
    keys = [("step_time_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"), ("mfu", "MFU", ".1%"),
            ("peak_memory_gib", "allocated GiB", ".2f"), ("reserved_memory_gib", "reserved GiB", ".2f")]
    rows = [["meshplan, measured", *(cell((measured or {}).get(k), f) for k, _, f in keys)],
            ["meshplan, predicted", *(cell((pred or {}).get(k), f) for k, _, f in keys)]]
    if measured and pred:
        rows.append(["measured / predicted", *(cell(measured[k] / pred[k], ".3f") if pred.get(k) else "-"
                                               for k, _, _ in keys)])
    if titan:
        rows.append(["torchtitan, measured", *(cell(titan.get(k), f) for k, _, f in keys)])
    return {"caption": "One GPU, the planner's first choice", "headers": ["run", *(h for _, h, _ in keys)],
            "rows": rows}


def targets(measured: dict | None, pred: dict | None, titan: dict | None) -> list[str]:
    if not (measured and pred):
        return ["the launch did not complete: no target is measured"]
    ratio = (measured["tokens_per_s"] / titan["tokens_per_s"]) if titan else None
    speed_ok = measured["mfu"] >= 0.45 or (ratio is not None and ratio >= 1.0)
    err = {k: abs(measured[k] / pred[k] - 1) for k in ("step_time_s", "peak_memory_gib", "reserved_memory_gib")}
    return [f"MFU {measured['mfu']:.1%}, tokens/s {cell(ratio, '.2f')} x torchtitan's: "
            f"{'met' if speed_ok else 'NOT met'} (MFU >= 45% or >= torchtitan)",
            f"step time off by {err['step_time_s']:.1%}: {'met' if err['step_time_s'] <= 0.10 else 'NOT met'} (10%)",
            f"allocated off by {err['peak_memory_gib']:.1%}: "
            f"{'met' if err['peak_memory_gib'] <= 0.05 else 'NOT met'} (5%)",
            f"reserved off by {err['reserved_memory_gib']:.1%}: "
            f"{'met' if err['reserved_memory_gib'] <= 0.10 else 'NOT met'} (10%)"]


def kernel_table(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = []
    for r in data["rows"]:
        achieved = (f"{r['achieved'] / 1e12:.1f} TFLOP/s" if r["kernel"] == "loss"
                    else f"{r['achieved'] / 1e9:.0f} GB/s ({r['achieved'] / r['copy_bandwidth']:.0%})")
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        rows.append([r["kernel"], r["impl"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
                     f"{r['speedup_vs_eager']:.2f}x", achieved, peak, f"{r['max_error']:.1e}"])
    fastest = {}
    for r in data["rows"]:
        if r["max_error"] < 2e-2 and (r["kernel"] not in fastest or r["fwd_bwd_ms"] < fastest[r["kernel"]][1]):
            fastest[r["kernel"]] = (r["impl"], r["fwd_bwd_ms"])
    caption = (f"Kernels at {data.get('shapes', '?')} widths, {data.get('tokens', '?')} tokens, {data['dtype']}; "
               f"fastest correct: " + ", ".join(f"{k} {v[0]}" for k, v in fastest.items()))
    return {"caption": caption, "headers": ["kernel", "impl", "fwd ms", "fwd+bwd ms", "vs eager", "achieved",
                                            "peak MiB", "max err"], "rows": rows}


def moe_table(path: Path) -> dict | None:
    """benchmarks/bench_moe_gpu.py's rows: measured against planned milliseconds of the experts' GEMMs."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [[r["model"], r["impl"], r["rows"], f"{r['fwd_ms']:.3f}", f"{r['predicted_fwd_ms']:.3f}",
             f"{r['predicted_fwd_ms'] / r['fwd_ms'] - 1:+.0%}", f"{r['fwd_bwd_ms']:.3f}",
             f"{3 * r['predicted_fwd_ms']:.3f}", f"{r['tflops']:.0f}", f"{r['max_error']:.1e}"]
            for r in data["rows"]]
    return {"caption": f"MoE routed experts, {data['tokens']} tokens, {data['dtype']}, every expert on this device; "
                       f"planned at {data['cluster']}'s rates (backward twice the forward)",
            "headers": ["model", "impl", "rows", "fwd ms", "planned fwd ms", "planned vs measured",
                        "fwd+bwd ms", "planned fwd+bwd ms", "TFLOP/s", "max err"], "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write here (default OUT/suite.json)")
    args = parser.parse_args()
    measured = launch_summary(args.out, args.warmup)
    pred, choice = predicted(args.out)
    titan_path = args.out / "titan.json"
    titan = json.loads(titan_path.read_text()) if titan_path.exists() else None
    tables = [launch_table(measured, pred, titan)]
    tables += [t for t in (kernel_table(args.out / f"kernels-{s}.json") for s in ("8b", "70b")) if t]
    tables += [t for t in (moe_table(args.out / "moe.json"),) if t]
    device = (args.out / "device.txt").read_text().strip().replace("\n", ", ") if (args.out / "device.txt").exists() \
        else "unknown"
    notes = [f"plan: {choice}", *targets(measured, pred, titan)]
    if titan is None:
        notes.append("torchtitan did not run here (see titan.log)")
    if (args.out / "plan-liger.yaml").exists():
        notes.append("the plan's liger-kernel kernels failed at launch (launch-liger.log): measured with meshplan's "
                     "fused kernels, against the plan's prediction for liger's")
    suite = {"title": "meshplan's runtime on one GPU", "command": "bash benchmarks/gpu_suite.sh OUT",
             "date": dt.date.today().isoformat(), "machine": device, "tables": tables, "notes": notes}
    for path in {args.out / "suite.json", args.json} - {None}:
        path.write_text(json.dumps(suite, indent=2) + "\n")
    for table in tables:
        print(table["caption"] + ":\n")
        print("| " + " | ".join(table["headers"]) + " |")
        print("|" + "---|" * len(table["headers"]))
        for row in table["rows"]:
            print("| " + " | ".join(str(c) for c in row) + " |")
        print()
    print("\n".join(f"- {n}" for n in notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
