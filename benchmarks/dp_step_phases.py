"""Where a data-parallel step without a pipeline spends its time on the machine it runs on: the runtime's train loop with
each micro-batch's forward + backward timed (the last one carries the gradient all-reduces: sync is off for
the others, ``train._accumulate_without_sync``) and the optimizer step after it.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/dp_step_phases.py --plan plan.yaml --steps 8

Every other argument goes to the runtime (``python -m meshplan.launcher.runtime.train --help``). Rank 0 prints,
averaged over the steps after the first two, for the slowest rank per step and phase and for the mean over
ranks: the step, the micro-batches without sync (mean), the last micro-batch (with the reduction), their
difference (what the reduction adds), and the optimizer step; next to the plan's predicted breakdown.

Then, per communication unit of the last micro-batch (blocks in backward order; the runtime's replicate
all-reduces each block's gradients in its post-backward, a blocking call on CPU): when each rank arrived at
the unit's all-reduce (a full backward hook, which fires before the unit's post-backward) and when it left
(the next block's backward pre-hook). Per unit: the spread of arrivals (the last rank's arrival after the
mean), the collective (the first departure after the last arrival: the call itself once all are there) and
the block's backward compute in the last micro-batch against the ones without sync. Wall clocks of one host
(``time.perf_counter`` is the system's monotonic clock): the replicas' meeting that ``planner/comm.py:
meeting_time`` prices.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

import meshplan.launcher.runtime.train as train
from dp_reduce_wait import run_keeping_group   # benchmarks/ is on sys.path when run as a script


def unit_marks(step: list, blocks: int) -> list[list[float]]:
    """One step's rows, one per block in backward order: [arrival at its all-reduce in the last micro-batch,
    departure (the next block's backward start; for block 0 the end of the backward, the root's reduction
    included), its backward compute in the last micro-batch, its mean backward compute in the others]."""
    starts = [k for k, (e, _) in enumerate(step) if e == "microbatch"] + [len(step)]
    micro = []
    for a, b in zip(starts, starts[1:]):
        micro.append({e: t for e, t in step[a:b] if isinstance(e, tuple)})
    end = next(t for e, t in step if e == "accumulated")
    last, others = micro[-1], micro[:-1]
    rows = []
    for i in reversed(range(blocks)):
        depart = last[("pre", i - 1)] if i > 0 else end
        compute = last[("post", i)] - last[("pre", i)]
        alone = (statistics.fmean(m[("post", i)] - m[("pre", i)] for m in others) if others else compute)
        rows.append([last[("post", i)], depart, compute, alone])
    return rows


def after_warmup(rows: list) -> list:
    """The rows of the steps after the first two (all of them with three steps or fewer)."""
    return rows[2:] if len(rows) > 3 else rows


def gathered(rows: list) -> torch.Tensor | None:
    """Every rank's ``rows`` (equal shapes) stacked on rank 0, ranks first; None on the other ranks."""
    mine = torch.tensor(rows, dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.stack(every) if dist.get_rank() == 0 else None


def unit_table(marks: list, blocks: int) -> None:
    """Per unit of the last micro-batch, over the ranks (all_gather) and the steps after the first two: the
    last arrival after the mean one, the collective (first departure - last arrival), the mean rank's wait
    (departure - its own arrival) and the block's backward compute with and without the reductions."""
    kept = after_warmup(marks)
    ranks = gathered([unit_marks(step, blocks) for step in kept])   # [rank, step, unit, field]
    if ranks is None:
        return
    arrive, depart, compute, alone = ranks.unbind(-1)
    spread = (arrive.max(0).values - arrive.mean(0)).mean(0)
    collective = (depart.min(0).values - arrive.max(0).values).mean(0)
    waited = (depart - arrive).mean(0).mean(0)
    print(f"per unit of the last micro-batch ({len(kept)} steps; block 0's departure is the backward's end, "
          "the root's reduction included):")
    print("  block   last arrival after mean   collective   mean rank's wait   bwd compute last / no sync")
    compute, alone = compute.mean((0, 1)), alone.mean((0, 1))
    for u in range(blocks):
        print(f"  {blocks - 1 - u:5d}   {spread[u]:23.4f}   {collective[u]:10.4f}   {waited[u]:16.4f}   "
              f"{compute[u]:.4f} / {alone[u]:.4f}")
    first = arrive[:, :, 0] - arrive[:, :, 0].mean(0)   # [rank, step]
    print("first unit's arrival after the mean, per step (columns: ranks): "
          + "; ".join(" ".join(f"{x:+.3f}" for x in first[:, k]) for k in range(first.shape[1])))
    print(f"  sum     {spread.sum():23.4f}   {collective.sum():10.4f}   {waited.sum():16.4f}   "
          f"{compute.sum():.4f} / {alone.sum():.4f}")


def phase_drift(marks: list, blocks: int) -> None:
    """Where the ranks drift apart between two steps' reductions: per rank and step, the seconds of each phase
    from the previous step's backward end (the last all-reduce) to the arrival at this step's first unit's
    all-reduce -- the optimizer and the loop around it, each micro-batch without sync, the last micro-batch
    up to the first unit -- and per phase the last rank's figure after the mean rank's, over the steps."""
    rows = []
    for prev, step in zip(marks, marks[1:]):
        prev_end = next(t for e, t in prev if e == "accumulated")
        mbs = [t for e, t in step if e == "microbatch"]
        arrive = unit_marks(step, blocks)[0][0]
        points = [prev_end] + mbs + [arrive]
        rows.append([b - a for a, b in zip(points, points[1:])])
    ranks = gathered(after_warmup(rows))   # [rank, step, phase]
    if ranks is None:
        return
    after = (ranks.max(0).values - ranks.mean(0)).mean(0)
    total = ranks.sum(-1)
    names = ["optimizer + loop"] + [f"mb {k}" for k in range(ranks.shape[-1] - 2)] + ["last mb to unit 1"]
    print("from one reduction to the next (mean rank s / last rank after mean s): " + "; ".join(
        f"{n} {m:.3f} / {a:.3f}" for n, m, a in zip(names, ranks.mean((0, 1)), after))
        + f"; whole {total.mean():.3f} / {(total.max(0).values - total.mean(0)).mean():.3f}")


def main() -> int:
    marks: list[list[tuple[str, float]]] = []   # per step: (event, perf_counter)
    original_step, original_sync = train.train_step, train._accumulate_without_sync
    original_tied = train.sync_tied_embedding_grads

    def hook_blocks(trainer) -> None:
        """Marks per block: ("pre", i) when its backward starts, ("post", i) when its inputs' gradients are
        computed (before its post-backward's all-reduce)."""
        model = trainer.parts[0][1]
        for name, block in model.layers.items():
            i = int(name)
            block.register_full_backward_pre_hook(
                lambda m, g, i=i: marks[-1].append((("pre", i), time.perf_counter())) and None)
            block.register_full_backward_hook(
                lambda m, gi, go, i=i: marks[-1].append((("post", i), time.perf_counter())) and None)

    def timed_step(trainer, inputs, targets, *rest):
        if not hasattr(timed_step, "trainer"):
            hook_blocks(trainer)
        marks.append([("begin", time.perf_counter())])
        out = original_step(trainer, inputs, targets, *rest)
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
            kept = after_warmup(table)
            step, other, last, opt = (float(x) for x in kept.mean(0))
            print(f"steps {len(kept)} ({name}): step {step:.3f} s; micro-batches without sync {other:.3f} s each "
                  f"(x{trainer.plan.num_microbatches - 1}); the last, with the reduction, {last:.3f} s "
                  f"(+{last - other:.3f}); optimizer {opt:.3f} s")
        predicted = trainer.plan.predicted.time_breakdown_s
        print("predicted: " + ", ".join(f"{k} {v:.3f}" for k, v in predicted.items() if v))
    unit_table(marks, len(trainer.parts[0][1].layers))
    phase_drift(marks, len(trainer.parts[0][1].layers))
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
