"""The pipeline schedule of a plan as the planner prices it, for the report's timeline picture.

The cost model re-prices the plan as written (its degrees, layer partition and recompute counts) and the
planner's own schedule simulation runs its ops (:func:`meshplan.planner.pipeline.pipeline_timeline`: the op
order of planner/schedule_sim.py, each op's forward or backward time from the rank times the makespan is priced
on, the host's sharing speeds where ranks share cores). A plan the cost model rejects is drawn on the same op
order with rank times proportional to the rank's blocks (a backward twice its forward, plus recompute), scaled
so that the busiest rank's micro-batches take the predicted compute and recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.errors import MeshplanError
from meshplan.plan import Plan
from meshplan.planner import pipeline, rank_memory
from meshplan.planner.inputs import Context, Rejection
from meshplan.planner.layout import choose_layout
from meshplan.planner.replay import config_of
from meshplan.planner.schedule_sim import TimedOp, schedule_timeline
from meshplan.planner.step import step_of
from meshplan.report.facts import _time_breakdown


@dataclass(frozen=True)
class Schedule:
    """The ops of ``micro_batches`` micro-batches with start and end; ``seconds``: op times are seconds (else
    units of one block's forward time); ``priced``: the times are the cost model's; ``complete``: every op ran
    (an interleaved order with a partial round of micro-batches may not)."""

    ops: list[TimedOp]
    micro_batches: int
    seconds: bool
    priced: bool
    complete: bool = True


def plan_schedule(plan: Plan, max_micro: int | None = None) -> Schedule:
    """The plan's schedule over its first ``min(num_microbatches, max_micro)`` micro-batches."""
    m = plan.num_microbatches if max_micro is None else min(plan.num_microbatches, max_micro)
    priced = _priced_timeline(plan, m)
    if priced is not None:
        ops, complete = priced
        return Schedule(ops, m, True, True, complete)
    rank_time, seconds = _block_rank_times(plan)
    v = max(1, plan.virtual_stages)
    ops, complete = _run(lambda: schedule_timeline(plan.schedule, rank_time, m, v, 1 / 3))
    return Schedule(ops, m, seconds, False, complete)


def _run(timeline) -> tuple[list[TimedOp], bool]:
    try:
        return timeline(), True
    except RuntimeError:        # the op order deadlocks (an interleaved partial round): nothing to draw
        return [], False


def _priced_timeline(plan: Plan, m: int) -> tuple[list[TimedOp], bool] | None:
    """The cost model's timeline of the plan, or None where it cannot price the plan."""
    try:
        ctx = Context(plan.model, plan.cluster, plan.train)
        s = step_of(ctx, config_of(plan))
        base, slope = rank_memory.static_lines(s)
        layout = choose_layout(s, base, slope, [st.num_layers for st in plan.stages],
                               [dict(st.recompute_layers) for st in plan.stages])
    except MeshplanError:
        return None
    if isinstance(layout, Rejection):
        return None
    rank_time = pipeline.rank_times(s, layout)
    return _run(lambda: pipeline.pipeline_timeline(s, rank_time, m))


def _block_rank_times(plan: Plan) -> tuple[list[float], bool]:
    """Rank times proportional to blocks for a plan the cost model cannot price: ``3 * blocks + full +
    selective / 4`` per rank (forward 1, backward 2, recompute), in seconds when the plan predicts compute."""
    pp = plan.pp
    work = [0.0] * pp
    for j, st in enumerate(plan.stages):
        rc = st.recompute_layers
        work[plan.pipeline_rank_of_stage(j)] += 3 * max(st.num_layers, 0.5) + rc.get("full", 0) + 0.25 * rc.get("selective", 0)
    tb = _time_breakdown(plan)
    busy = tb["compute"] + tb["recompute"]
    if busy > 0 and max(work) > 0:
        scale = busy / (plan.num_microbatches * max(work))
        return [w * scale for w in work], True
    return work, False
