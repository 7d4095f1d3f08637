"""The loss kernels' memory on fake tensors (as ``meshplan check`` runs them) against the planner's terms, and a
whole-head plan's peak per loss kernel.

    python benchmarks/loss_kernel_memory.py [--json benchmarks/results/loss_kernels_check.json]

Table 1, per model and loss kernel (``fused``: meshplan's chunked loss; ``liger``: liger-kernel's, through
``liger.ShapeOnlyLoss``): the loss's peak above its inputs for one micro-batch of ``--seq-len`` tokens in bf16,
measured by check's live-bytes tracker, next to ``planner.memory.logits_bytes`` / ``liger_loss_bytes``.
Table 2: the meshplan plan of ``--plan-model`` (sequence ``--plan-seq-len``) on one DGX H100 node with tp 1 (a
whole head), its loss kernel set to each, checked on rank 0: measured and predicted peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from meshplan.launcher.check import LiveBytes, check_plan
from meshplan.launcher.runtime import kernels as K
from meshplan.planner import memory
from meshplan.planner.search import search
from meshplan.spec import MODEL_PRESETS, TrainSpec, load_cluster

GIB = 2**30


def loss_peak(tokens: int, hidden: int, vocab: int, impl: str) -> int:
    """Bytes the loss allocates above its inputs at its peak, bf16 fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(vocab, hidden, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.zeros(tokens, dtype=torch.long)
        with LiveBytes() as tracker:
            for t in (h, w, targets):
                tracker.track(t)
            start = tracker.live
            K.linear_cross_entropy(h, w, targets, impl=impl)
    return tracker.peak - start


def loss_table(seq_len: int) -> dict:
    rows = []
    for name in ("llama3.2-1b", "llama3-8b", "llama3-70b"):
        m = MODEL_PRESETS[name]
        for impl in ("fused", "liger"):
            measured = loss_peak(seq_len, m.hidden, m.vocab, impl)
            priced = (memory.liger_loss_bytes(seq_len, m.vocab, "bf16", m.hidden) if impl == "liger" else
                      memory.logits_bytes(seq_len, m.vocab, "bf16", True, m.hidden))
            rows.append([name, impl, f"{measured / GIB:.3f}", f"{priced / GIB:.3f}", f"{priced / measured - 1:+.2%}"])
    return {"caption": f"Loss peak above its inputs, one micro-batch of {seq_len} tokens, bf16 (GiB)",
            "headers": ["model", "loss", "check", "planner", "planner/check - 1"], "rows": rows}


def plan_table(model_name: str, seq_len: int) -> dict:
    plan = search(MODEL_PRESETS[model_name], load_cluster("dgx-h100:1"), TrainSpec(8, seq_len, "bf16"), {"tp": 1},
                  top=1, engine="meshplan").plans[0]
    rows = []
    for impl in ("fused", "liger"):
        variant = dataclasses.replace(plan, kernels={**plan.kernels, "loss": impl})
        (checked,) = check_plan(variant, [0]).ranks
        measured, predicted = checked.measured["peak"], checked.predicted["peak"]
        rows.append([impl, f"{measured / GIB:.3f}", f"{predicted / GIB:.3f}", f"{predicted / measured - 1:+.1%}"])
    fields = " ".join(f"{k}={v}" for k, v in plan.fields_for_fix().items())
    return {"caption": f"{model_name} on dgx-h100:1, global batch 8, seq {seq_len}, {fields}: rank 0 (GiB)",
            "headers": ["loss", "check peak", "predicted peak", "predicted/check - 1"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--plan-model", default="llama3.2-1b")
    parser.add_argument("--plan-seq-len", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also write the tables here (benchmarks/results/ format)")
    args = parser.parse_args()
    tables = [loss_table(args.seq_len), plan_table(args.plan_model, args.plan_seq_len)]
    for table in tables:
        print(table["caption"] + "\n")
        print(tabulate(table["rows"], table["headers"], tablefmt="github") + "\n")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_info import wrap

        data = wrap("python benchmarks/loss_kernel_memory.py", None)
        data.pop("result")
        data.update(title="The loss kernels' memory: planner against meshplan check", tables=tables, notes=[
            "check: the live bytes its tracker follows on fake tensors (liger's loss as liger.ShapeOnlyLoss); "
            "planner: planner.memory.logits_bytes (fused) and liger_loss_bytes (liger).",
            "The plan's predicted peak is the same for both losses where its largest phase is not the loss."])
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
