"""One MoE block's activation bytes, ``meshplan check`` (the runtime's own build on fake tensors) against the
planner, per recompute mode.

    python benchmarks/moe_block_bytes.py [--seq-len 2048]

The model is Mixtral-shaped, narrowed to width 1024 (8 experts of width 2048, top-2; with ``--shared`` rows a
gated shared expert of width 1024), bf16 on H100s, dp 2 x ep 2 (x tp 2 with sequence parallel), ZeRO-3 and
fused kernels. One block's bytes are the two-block model's activations minus the one-block model's (rank 0,
one micro-batch); ``check`` routes tokens evenly. In bf16 the routed experts run as grouped GEMMs
(``rules.grouped_expert_gemms``), which the table's ``expert GEMMs`` column says.
"""

from __future__ import annotations

import argparse

from tabulate import tabulate

from meshplan import rules
from meshplan.launcher.check import check_rank
from meshplan.plan import Plan, StagePlan
from meshplan.planner.block import ExpertLayout, block_activation_bytes
from meshplan.spec import MODEL_PRESETS, ModelSpec, TrainSpec, load_cluster

MIB = 2**20


def block_plan(layers: int, tp: int, mode: str, shared: bool, seq_len: int) -> Plan:
    moe = dict(experts=8, top_k=2, expert_ffn_hidden=2048)
    if shared:
        moe.update(shared_experts=1, shared_ffn_hidden=1024, shared_expert_gate=True)
    spec = ModelSpec(name="moe-block", layers=layers, hidden=1024, heads=8, kv_heads=4, ffn_hidden=2048,
                     vocab=1024, moe=moe, rope_theta=MODEL_PRESETS["mixtral-8x7b"].rope_theta)
    return Plan(dp=2, tp=tp, pp=1, cp=1, ep=2, micro_batch=1, num_microbatches=1,
                stages=(StagePlan((0, layers), {mode: layers}),), model=spec, cluster=load_cluster("dgx-h100:1"),
                train=TrainSpec(2, seq_len, precision="bf16"), sequence_parallel=tp > 1, zero=3,
                kernels={"norm": "fused", "swiglu": "fused", "rope": "fused", "loss": "reference"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    rows = []
    for tp, shared in ((1, False), (2, True)):
        for mode in ("none", "selective", "full"):
            one, two = (check_rank(block_plan(n, tp, mode, shared, args.seq_len), 0).activations_per_microbatch[0]
                        for n in (1, 2))
            plan = block_plan(2, tp, mode, shared, args.seq_len)
            predicted = block_activation_bytes(plan.model, args.seq_len, 1, tp, 1, 2, True, mode,
                                               experts=ExpertLayout(ep=2))
            grouped = rules.grouped_expert_gemms(2, plan.model.hidden, plan.model.moe.expert_ffn_hidden)
            measured = two - one
            rows.append([tp, "yes" if shared else "no", mode, "grouped" if grouped else "per expert",
                         f"{measured / MIB:.2f}", f"{predicted / MIB:.2f}", f"{(predicted / measured - 1):+.1%}"])
    print(tabulate(rows, headers=["tp", "shared expert", "recompute", "expert GEMMs", "measured MiB",
                                  "predicted MiB", "error"], disable_numparse=True))


if __name__ == "__main__":
    main()
