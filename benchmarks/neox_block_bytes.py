"""One GPT-NeoX block's activation bytes, ``meshplan check`` (the runtime's own build on fake tensors) against
the planner, per recompute mode, with the attention and the MLP side by side (Pythia's parallel residual) and
one after the other.

    python benchmarks/neox_block_bytes.py [--seq-len 4096]

The block is Pythia-1B's (width 2048, 8 heads, a quarter of each head rotated, LayerNorm, erf GELU), bf16 on
H100s, dp 2 (x tp 2 with sequence parallel), ZeRO-3. One block's bytes are the two-block model's activations
minus the one-block model's (rank 0, one micro-batch).
"""

from __future__ import annotations

import argparse
import dataclasses

from tabulate import tabulate

from meshplan.launcher.check import check_rank
from meshplan.plan import Plan, StagePlan
from meshplan.planner import memory
from meshplan.spec import MODEL_PRESETS, ModelSpec, TrainSpec, load_cluster

MIB = 2**20


def block_plan(spec: ModelSpec, tp: int, mode: str, layers: int, seq_len: int = 4096) -> Plan:
    """``spec`` cut to ``layers`` blocks on two H100 ranks (x ``tp``), bf16, ZeRO-3, fused kernels."""
    spec = dataclasses.replace(spec, layers=layers)
    return Plan(dp=2, tp=tp, pp=1, cp=1, micro_batch=1, num_microbatches=1,
                stages=(StagePlan((0, layers), {mode: layers}),), model=spec, cluster=load_cluster("dgx-h100:1"),
                train=TrainSpec(2, seq_len, precision="bf16"), sequence_parallel=tp > 1, zero=3,
                kernels={"norm": "fused", "swiglu": "fused", "rope": "fused", "loss": "reference"})


def measured_block_bytes(spec: ModelSpec, tp: int, mode: str, seq_len: int) -> float:
    """One block's bytes kept for backward: the two-block plan's rank 0 minus the one-block plan's."""
    one, two = (check_rank(block_plan(spec, tp, mode, n, seq_len), 0).activations_per_microbatch[0] for n in (1, 2))
    return two - one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    rows = []
    for parallel in (True, False):
        spec = dataclasses.replace(MODEL_PRESETS["pythia-1b"], parallel_residual=parallel)
        for tp in (1, 2):
            for mode in ("none", "selective", "full"):
                measured = measured_block_bytes(spec, tp, mode, args.seq_len)
                predicted = memory.activation_bytes_per_layer(spec, args.seq_len, 1, tp=tp, sp=tp > 1, act_bytes=2,
                                                              recompute=mode, fused_swiglu=True, fused_norm=True)
                rows.append(["parallel" if parallel else "sequential", tp, mode, f"{measured / MIB:.2f}",
                             f"{predicted / MIB:.2f}", f"{(predicted / measured - 1):+.1%}"])
    print(tabulate(rows, headers=["residual", "tp", "recompute", "measured MiB", "predicted MiB", "error"],
                   disable_numparse=True))


if __name__ == "__main__":
    main()
