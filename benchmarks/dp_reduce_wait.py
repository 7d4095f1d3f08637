"""What the data-parallel gradient reduction of a pipelined plan costs inside real steps, and how much of it is
waiting for the other replica: the runtime's train loop with each rank's ``REDUCE_GRAD`` action
(``torch.distributed.pipelining``'s ``perform_reduce_grad``: FSDP2 / replicate reduce every unit's gradients
after the stage's last backward, nothing overlapped) timed per step.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/dp_reduce_wait.py --plan plan.yaml --steps 8

Every other argument goes to the runtime (``python -m meshplan.launcher.runtime.train --help``). Rank 0 prints
one row per step: the step time, each rank's reduce time, and per data-parallel group the gap between its
ranks' arrivals at the reduce (the first to arrive waits about that long; wall clocks of one host). The
planner's priced ``dp_comm`` for the plan is printed beside the mean.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import stage as pipelining_stage

import meshplan.launcher.runtime.train as train


def run_keeping_group(argv: list[str]) -> int:
    """The runtime's ``train.main(argv)`` with its process group kept after the run (the benchmarks gather their
    rows over it, then destroy it themselves)."""
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    try:
        return train.main(argv)
    finally:
        dist.destroy_process_group = destroy


def main() -> int:
    reduce_calls: list[tuple[float, float]] = []   # (arrival wall time, seconds) per REDUCE_GRAD on this rank
    step_calls: list[tuple[float, float]] = []
    original_reduce = pipelining_stage._PipelineStageBase.perform_reduce_grad
    original_step = train.train_step

    def timed_reduce(self, *args, **kwargs):
        begin = time.time()
        out = original_reduce(self, *args, **kwargs)
        reduce_calls.append((begin, time.time() - begin))
        return out

    def timed_step(trainer, inputs, targets, *rest):
        begin = time.time()
        out = original_step(trainer, inputs, targets, *rest)
        step_calls.append((begin, time.time() - begin))
        timed_step.trainer = trainer
        return out

    pipelining_stage._PipelineStageBase.perform_reduce_grad = timed_reduce
    train.train_step = timed_step
    code = run_keeping_group(sys.argv[1:])
    trainer = timed_step.trainer
    if trainer.plan.pp == 1 or trainer.meshes.dp_cp is None:
        raise SystemExit("dp_reduce_wait: the plan needs pp > 1 and dp > 1 (REDUCE_GRAD runs only under a pipeline)")
    steps = len(step_calls)
    per_step = len(reduce_calls) // steps   # one per stage this rank holds
    rows = torch.tensor([[s for _, s in step_calls],
                         [sum(d for _, d in reduce_calls[i * per_step:(i + 1) * per_step]) for i in range(steps)],
                         [reduce_calls[i * per_step][0] for i in range(steps)]], dtype=torch.float64)
    world = dist.get_world_size()
    gathered = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows)
    dp_group = trainer.meshes.dp_cp.get_group()
    groups = [None] * world
    dist.all_gather_object(groups, tuple(sorted(dist.get_process_group_ranks(dp_group))))
    if dist.get_rank() == 0:
        from tabulate import tabulate

        replicas = sorted(set(groups))
        table, gaps = [], []
        for i in range(steps):
            gap = [max(gathered[r][2][i] for r in g) - min(gathered[r][2][i] for r in g) for g in replicas]
            if i:
                gaps.extend(gap)
            table.append([i + 1, f"{max(gathered[r][0][i] for r in range(world)):.3f}",
                          *(f"{gathered[r][1][i]:.3f}" for r in range(world)), *(f"{g:.3f}" for g in gap)])
        print(tabulate(table, headers=["step", "step s", *(f"reduce r{r}" for r in range(world)),
                                       *(f"arrival gap {'/'.join(map(str, g))}" for g in replicas)]))
        later = [float(gathered[r][1][i]) for r in range(world) for i in range(1, steps)]
        predicted = (trainer.plan.predicted.time_breakdown_s or {}).get("dp_comm") if trainer.plan.predicted else None
        print(f"\nafter the first step: reduce {statistics.fmean(later):.3f} s mean per rank and step "
              f"(min {min(later):.3f}, max {max(later):.3f}); arrival gap {statistics.fmean(gaps):.3f} s mean, "
              f"{max(gaps):.3f} max; the planner priced dp_comm "
              + (f"{predicted:.3f} s" if predicted is not None else "(not in the plan)"), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
