"""Where a data-parallel step without a pipeline spends its time on this machine: the runtime's train loop with
each micro-batch's forward + backward timed (the last one carries the gradient all-reduces: sync is off for
the others, ``train._accumulate_without_sync``) and the optimizer step after it.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/dp_step_phases.py --plan plan.yaml --steps 8

Every other argument goes to the runtime (``python -m meshplan.launcher.runtime.train --help``). Rank 0 prints,
averaged over the steps after the first two, for the slowest rank per step and phase and for the mean over
ranks: the step, the micro-batches without sync (mean), the last micro-batch (with the reduction), their
difference (what the reduction adds), and the optimizer step; next to the plan's predicted breakdown. Used in docs/profiler.md (session 12, dp4).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

import meshplan.launcher.runtime.train as train
from dp_reduce_wait import run_keeping_group   # benchmarks/ is on sys.path when run as a script


def main() -> int:
    marks: list[list[tuple[str, float]]] = []   # per step: (event, perf_counter)
    original_step, original_sync = train.train_step, train._accumulate_without_sync
    original_tied = train.sync_tied_embedding_grads

    def timed_step(trainer, inputs, targets):
        marks.append([("begin", time.perf_counter())])
        out = original_step(trainer, inputs, targets)
        marks[-1].append(("end", time.perf_counter()))
        timed_step.trainer = trainer
        return out

    def timed_sync(model, plan, last):
        marks[-1].append(("microbatch", time.perf_counter()))
        return original_sync(model, plan, last)

    def timed_tied(trainer):
        marks[-1].append(("accumulated", time.perf_counter()))
        return original_tied(trainer)

    train.train_step, train._accumulate_without_sync = timed_step, timed_sync
    train.sync_tied_embedding_grads = timed_tied
    code = run_keeping_group(sys.argv[1:])
    trainer = timed_step.trainer
    if trainer.plan.pp != 1:
        raise SystemExit("dp_step_phases: the plan needs pp = 1 (pipelined plans: benchmarks/dp_reduce_wait.py)")
    rows = []
    for step in marks:
        times = [t for _, t in step]
        mbs = [t for e, t in step if e == "microbatch"] + [t for e, t in step if e == "accumulated"]
        durations = [b - a for a, b in zip(mbs, mbs[1:])]
        rows.append([times[-1] - times[0], statistics.fmean(durations[:-1]) if len(durations) > 1 else 0.0,
                     durations[-1], times[-1] - mbs[-1]])
    slowest = torch.tensor(rows, dtype=torch.float64)
    mean = slowest.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)   # the slowest rank per step and phase
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    if dist.get_rank() == 0:
        for name, table in (("slowest rank", slowest), ("mean over ranks", mean)):
            kept = table[2:] if len(table) > 3 else table
            step, other, last, opt = (float(x) for x in kept.mean(0))
            print(f"steps {len(kept)} ({name}): step {step:.3f} s; micro-batches without sync {other:.3f} s each "
                  f"(x{trainer.plan.num_microbatches - 1}); the last, with the reduction, {last:.3f} s "
                  f"(+{last - other:.3f}); optimizer {opt:.3f} s")
        predicted = trainer.plan.predicted.time_breakdown_s
        print("predicted: " + ", ".join(f"{k} {v:.3f}" for k, v in predicted.items() if v))
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
