"""Checks that a plan can run here, torch-free (``meshplan launch`` runs them before starting torchrun and
every rank runs :func:`check_supported` again)."""

from __future__ import annotations

from meshplan.engines import MESHPLAN
from meshplan.errors import InputError
from meshplan.plan import Plan, schedule_problem


def check_supported(plan: Plan) -> None:
    """Plans the runtime cannot run are refused in one line naming the field and the fix: a plan priced for
    another engine, and any field value meshplan's engine profile does not list (meshplan/engines.py; the
    runtime reads every value that profile lists)."""
    if plan.engine != "meshplan":
        raise InputError("plan.engine", f"this plan is priced for {plan.engine}, not for meshplan's runtime",
                         f"run it with `meshplan export PLAN --to {plan.engine}`, or re-plan with --engine meshplan")
    MESHPLAN.check(plan.engine_fields(), "plan")
    m = plan.model
    if plan.tp > 1 and (m.heads % plan.tp or m.kv_heads % plan.tp):
        raise InputError("plan.tp", f"tp={plan.tp} does not divide heads={m.heads} and kv_heads={m.kv_heads}",
                         "re-plan with a tensor-parallel degree dividing both")
    if plan.tp > 1 and m.vocab % plan.tp and not (plan.vocab_parallel and plan.pp > 1):
        # (vocab_parallel with pp > 1 shards the vocabulary over pp x tp with uneven rows allowed)
        raise InputError("plan.tp", f"tp={plan.tp} does not divide the vocabulary {m.vocab}",
                         "pad the vocabulary to a multiple of tp, or re-plan")
    shards = (plan.tp if plan.sequence_parallel else 1) * plan.cp
    if plan.train.seq_len % shards:
        raise InputError("plan.train.seq_len", f"{plan.train.seq_len} is not divisible by the {shards} sequence shards",
                         "re-plan with a sequence length divisible by tp*cp")
    if plan.cp > 1 and plan.cp_kind == "ulysses" and (m.heads // plan.tp) % plan.cp:
        raise InputError("plan.cp", f"Ulysses needs heads/tp = {m.heads // plan.tp} divisible by cp={plan.cp}",
                         "re-plan with cp_kind ring or a smaller cp")
    if plan.micro_batch * plan.num_microbatches * plan.dp != plan.train.global_batch:
        raise InputError("plan.micro_batch", "dp * micro_batch * num_microbatches is not the global batch",
                         "re-plan")
    problem = schedule_problem(plan.schedule, plan.pp, plan.num_microbatches)
    if problem:
        raise InputError("plan.schedule", problem, "re-plan, or pin --fix schedule=gpipe or a smaller micro_batch")


def check_local(plan: Plan, nproc: int) -> None:
    """The plan's device kind and per-node process count must match this machine."""
    import torch  # only for a real launch: planning and --dry-run/--emit stay torch-free

    here = "gpu" if torch.cuda.is_available() else "cpu"
    want = plan.cluster.gpu.kind
    if want != here:
        raise InputError("plan.cluster.gpu.kind", f"the plan is for {want} ranks but this machine has "
                         f"{'GPUs' if here == 'gpu' else 'no GPU'}",
                         f"re-plan here (meshplan plan --cluster localhost:{plan.world_size}) or pass --replan")
    if want == "gpu" and nproc > torch.cuda.device_count():
        raise InputError("plan: dp*tp*pp*cp", f"{nproc} ranks per node but this node has "
                         f"{torch.cuda.device_count()} GPUs", "pass --nnodes, or re-plan for this node (--replan)")
