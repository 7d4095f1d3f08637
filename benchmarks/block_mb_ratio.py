"""How well can the profile pin the relative cost of micro-batch sizes? The runtime's block at one tensor-parallel
degree, timed at two micro-batch sizes one after the other in ``--rounds`` rounds, on every rank at once, as the
profile's compute phase times it (``profiler/worker.py: time_block``: slowest-rank samples, lower quartile of
``--reps``).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/block_mb_ratio.py --model small.yaml --rounds 8

Rank 0 prints one row per round (each size's seconds per sequence and their ratio) and the median ratio: how
far the per-sequence cost of micro-batch 2 over 1 moves within one job, the noise the profile's block lines
(``cluster_file.micro_batch_lines``) pool.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from tabulate import tabulate

from meshplan.profiler import worker
from meshplan.spec import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="a preset name or a model YAML")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tp", type=int, default=1, help="the block's per-rank widths at this tensor-parallel degree")
    p.add_argument("--micro-batches", default="1,2", help="the two micro-batch sizes to compare")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="samples a shape per round, as `meshplan profile --reps`")
    a = p.parse_args()
    small, large = (int(x) for x in a.micro_batches.split(","))
    device = worker.init("cpu")
    spec = load_model(a.model)
    rows = []
    for round_ in range(a.rounds):
        per_sequence = []
        for mb in (small, large):
            times = worker.time_block(spec, a.tp, mb, a.seq_len, device, torch.float32, a.reps)
            per_sequence.append(worker.lower_quartile(times) / mb)
        rows.append([round_ + 1, per_sequence[0] * 1e3, per_sequence[1] * 1e3, per_sequence[1] / per_sequence[0]])
    if dist.get_rank() == 0:
        print(tabulate(rows, headers=["round", f"mb{small} ms/seq", f"mb{large} ms/seq", f"mb{large} / mb{small}"],
                       floatfmt=".3g"))
        print(f"median ratio {statistics.median(r[3] for r in rows):.3f} over {a.rounds} rounds "
              f"(tp {a.tp}, {dist.get_world_size()} ranks)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
