"""The loss kernels' memory on fake tensors (as ``meshplan check`` runs them) against the planner's terms, and a
whole-head plan's peak per loss kernel.

    python benchmarks/loss_kernel_memory.py

Table 1, per model and loss kernel (``fused``: meshplan's chunked loss; ``liger``: liger-kernel's, through
``liger.ShapeOnlyLoss``): the loss's peak above its inputs for one micro-batch of ``--seq-len`` tokens in bf16,
measured by check's live-bytes tracker, next to ``planner.memory.logits_bytes`` / ``liger_loss_bytes``.
Table 2: the meshplan plan of ``--plan-model`` on one DGX H100 node with tp 1 (a whole head), its loss kernel
set to each, checked on rank 0: measured and predicted peak.
"""

from __future__ import annotations

import argparse
import dataclasses

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--plan-model", default="llama3.2-1b")
    args = parser.parse_args()
    rows = []
    for name in ("llama3.2-1b", "llama3-8b", "llama3-70b"):
        m = MODEL_PRESETS[name]
        for impl in ("fused", "liger"):
            measured = loss_peak(args.seq_len, m.hidden, m.vocab, impl)
            priced = (memory.liger_loss_bytes(args.seq_len, m.vocab, "bf16", m.hidden) if impl == "liger" else
                      memory.logits_bytes(args.seq_len, m.vocab, "bf16", True, m.hidden))
            rows.append([name, impl, f"{measured / GIB:.3f}", f"{priced / GIB:.3f}", f"{priced / measured - 1:+.2%}"])
    print(f"Loss peak above its inputs, one micro-batch of {args.seq_len} tokens, bf16 (GiB)\n")
    print(tabulate(rows, ["model", "loss", "check", "planner", "planner/check - 1"], tablefmt="github"))

    model = MODEL_PRESETS[args.plan_model]
    plan = search(model, load_cluster("dgx-h100:1"), TrainSpec(8, args.seq_len // 2, "bf16"), {"tp": 1}, top=1,
                  engine="meshplan").plans[0]
    rows = []
    for impl in ("fused", "liger"):
        variant = dataclasses.replace(plan, kernels={**plan.kernels, "loss": impl})
        (checked,) = check_plan(variant, [0]).ranks
        measured, predicted = checked.measured["peak"], checked.predicted["peak"]
        rows.append([impl, f"{measured / GIB:.3f}", f"{predicted / GIB:.3f}", f"{predicted / measured - 1:+.1%}"])
    fields = " ".join(f"{k}={v}" for k, v in plan.fields_for_fix().items())
    print(f"\n{args.plan_model} on dgx-h100:1, global batch 8, seq {args.seq_len // 2}, {fields}: rank 0 (GiB)\n")
    print(tabulate(rows, ["loss", "check peak", "predicted peak", "predicted/check - 1"], tablefmt="github"))


if __name__ == "__main__":
    main()
