"""Re-evaluate a written Plan exactly: its degrees, its layer partition and its recompute counts.

``meshplan check`` compares what it measures for a rank with what the cost model predicts for that rank;
the plan file carries only the worst rank's breakdown, so the per-rank figures are recomputed here from
the plan itself (a plan edited by hand is predicted as edited).
"""

from __future__ import annotations

from meshplan.engines import get_engine
from meshplan.errors import InputError
from meshplan.plan import FUSED_IMPLS, Plan
from meshplan.planner.evaluate import Config, Context, Evaluation, evaluate


def config_of(plan: Plan) -> Config:
    """The search-space point a plan was made from."""
    return Config(dp=plan.dp, tp=plan.tp, pp=plan.pp, cp=plan.cp, micro_batch=plan.micro_batch,
                  schedule=plan.schedule, virtual_stages=plan.virtual_stages, zero=plan.zero,
                  vocab_parallel=plan.vocab_parallel, cp_kind=plan.cp_kind, tp_overlap=plan.tp_overlap,
                  compile=plan.compile, fused_kernels=fused_kernels(plan),
                  mesh_order=tuple(plan.mesh_order), sequence_parallel=plan.sequence_parallel or plan.tp == 1,
                  attention=plan.attention, ep=plan.ep, expert_tp=plan.expert_tp,
                  moe_imbalance=plan.moe_imbalance or None)


def fused_kernels(plan: Plan) -> bool:
    """The search's ``fused_kernels`` for the plan: its norm runs a fused kernel, or, in a compiled plan, its
    loss does (the kernel table may leave the norm to Inductor: ``reference`` in a compiled block)."""
    return plan.kernels.get("norm") in FUSED_IMPLS or (plan.compile and plan.kernels.get("loss") in FUSED_IMPLS)


def replay(plan: Plan) -> Evaluation:
    """The cost model's evaluation of exactly this plan (its partition and recompute counts pinned)."""
    partition = [stage.num_layers for stage in plan.stages]
    counts = [dict(stage.recompute_layers) for stage in plan.stages]
    ctx = Context(plan.model, plan.cluster, plan.train, get_engine(plan.engine), kernels=tuple(plan.kernels.items()))
    result = evaluate(config_of(plan), ctx, partition, counts)
    if not isinstance(result, Evaluation):
        raise InputError("plan", f"the cost model rejects this plan ({result.reason}: {result.detail})",
                         "re-plan with `meshplan plan`")
    return result


def predicted_rank_memory(plan: Plan) -> list[dict[str, float]]:
    """Bytes per pipeline rank: parameters, gradients, optimizer, activations, logits, buffers and the
    allocator margin (``evaluate``'s ``rank_detail``); ranks of one pipeline rank are alike."""
    ev = replay(plan)
    return [ev.rank_detail(r) for r in range(plan.pp)]
