"""Data-parallel and ZeRO terms: the gradient reduction and weight gathering each pipeline rank leaves on a
step's critical path, and the optimizer step.

Each collective runs beside a window of compute and shows what sticks out of it plus the measured share of
what runs beside it (comm.exposed_time); the part after the last layer's compute has no window at all
(:func:`tail`). Where the profile timed the data-parallel collectives at the runtime's unit sizes, each unit's
call is priced as measured (comm.measured_collective_time), else the alpha-beta line prices all of it in one
call. Where ranks are time-sliced, each call also waits for the last rank to reach it (host.meeting).

    ZeRO-0 (DDP)      all-reduce of the gradients under the last backward; the last bucket cannot overlap
    ZeRO-1            reduce-scatter under the last backward, all-gather of the 16-bit weights under the next forward
    ZeRO-2, or ZeRO-3 under a pipeline
                      reduce-scatter once per step; ZeRO-2 gathers once, ZeRO-3 before each block's forward and
                      backward in every micro-batch
    ZeRO-3            per micro-batch, all-gather before forward and backward and reduce-scatter after backward
(Rajbhandari et al. 2020; PyTorch FSDP2, replicate; Megatron-LM's distributed optimizer.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshplan.planner import comm, compute, flops, memory
from meshplan.planner.layout import Layout, rank_step
from meshplan.planner.pipeline import drain_after_last_backward
from meshplan.planner.rank_memory import rank_root_params
from meshplan.planner.step import Step

ALPHA_BETA = {"all_reduce": comm.allreduce_time, "reduce_scatter": comm.reducescatter_time,
              "all_gather": comm.allgather_time}


@dataclass(frozen=True)
class Overlap:
    """How a step's data-parallel collectives meet compute: ``shown``, the measured share of a collective that
    shows beside compute (comm.overlap_exposed_fraction); the meetings per call after a block's forward,
    after its backward, after a whole step (``makespan``) and right after another call (host.meeting);
    ``after_schedule``: the reduction is one action after the stage's last backward (Context)."""

    shown: float
    meet_fwd: float
    meet_bwd: float
    meet_after_step: float
    meet_next: float
    after_schedule: bool


@dataclass(frozen=True)
class RankTraffic:
    """One pipeline rank's data-parallel traffic: its blocks, root parameters and communication units (each
    block, and the root when it holds parameters: parallelize.apply_dp), and its compute windows."""

    blocks: int
    root_params: float
    params: float
    units: int
    fwd_mb: float
    bwd_mb: float
    reduce_window: float

    @property
    def layers(self) -> int:
        return max(1, self.blocks)


def overlap_of(s: Step, makespan: float) -> Overlap:
    host, replicas = s.host, s.replicas
    return Overlap(comm.overlap_exposed_fraction(s.ctx.cluster), host.meeting(s.lc.fwd, replicas),
                   host.meeting(s.lc.bwd, replicas), host.meeting(makespan, replicas), host.meeting(0.0, replicas),
                   s.p > 1 and s.ctx.pipeline_grad_sync == "after_schedule")


def exposed(o: Overlap, comm_s: float, window_s: float) -> float:
    return comm.exposed_time(comm_s, window_s, o.shown)


def tail(o: Overlap, comm_s: float) -> float:
    """The part after the last layer's compute (no window at all); already inside ``exposed`` as far as
    the measured share shows a collective anyway (at 1, all of it)."""
    return comm_s * max(0.0, 1.0 - o.shown)


def reduction_tail(o: Overlap, comm_s: float) -> float:
    """``tail`` of the gradient reduction: none after the schedule, where its window is the drain."""
    return 0.0 if o.after_schedule else tail(o, comm_s)


def gradient_meetings(s: Step, o: Overlap, units: int) -> float:
    """The meeting cost of one step's gradient reduction over ``units`` communication units. Without a
    pipeline each unit reduces after its own layer's backward: ``units`` meetings after a layer. Under
    torch.distributed.pipelining the reduction is one REDUCE_GRAD action after the stage's last backward
    (PipelineStage.perform_reduce_grad), the units back to back: the replicas meet once, after a whole step
    apart -- a segment of the pipeline's makespan, which host.meeting holds within the segments the profile
    measured (benchmarks/replica_drift.py: the drift grows far slower than the segment past them) -- and the
    other units follow at once (the shortest segment). Inside a dp2 pp2 step (benchmarks/dp_reduce_wait.py)
    the later replica arrives 0.047 s after the replicas' mean."""
    if s.p == 1:
        return o.meet_after_step + (units - 1) * o.meet_bwd
    return o.meet_after_step + (units - 1) * o.meet_next


def per_unit_measured(s: Step, collective: str, bytes_per_param: float, blocks: int,
                      root_params: float) -> tuple[float, float] | None:
    """``(seconds, last call's seconds)`` of a step's ``collective`` over the data-parallel group, one call
    per communication unit as the runtime's replicate / FSDP2 make them (``blocks`` blocks, then the root
    when it holds parameters), each as the profile timed that size with every replica group of this shape
    at once (comm.measured_collective_time). None without such a table."""
    cluster = s.ctx.cluster
    block = comm.measured_collective_time(cluster, collective, s.replicas, s.dp_stride,
                                          bytes_per_param * s.lc.dense_params)
    if block is None:
        return None
    root = (comm.measured_collective_time(cluster, collective, s.replicas, s.dp_stride, bytes_per_param * root_params)
            if root_params > 0 else None)
    if root is None:
        return blocks * block, block
    return blocks * block + root, root


def step_collective(s: Step, k: RankTraffic, collective: str, bytes_per_param: float) -> float:
    """One step's ``collective`` of every unit's ``bytes_per_param * params``: per unit as measured where the
    profile timed it, else the alpha-beta time of all of it in one call."""
    measured = per_unit_measured(s, collective, bytes_per_param, k.blocks, k.root_params)
    if measured is not None:
        return measured[0]
    return ALPHA_BETA[collective](bytes_per_param * k.params, s.dp_link)


def ddp_exposed(s: Step, o: Overlap, k: RankTraffic) -> float:
    """ZeRO-0: one all-reduce of the gradients, bucketed under the last micro-batch's backward; the last bucket
    cannot overlap. The runtime's replicate reduces per unit (``units`` calls, the root last): where the profile
    timed that, each call as measured and the root's call the last bucket."""
    measured = per_unit_measured(s, "all_reduce", s.sb.grad, k.blocks, k.root_params)
    if measured is not None:
        total, last_bucket = measured[0] + gradient_meetings(s, o, k.units), measured[1]
    else:
        grads = s.sb.grad * k.params
        total = comm.allreduce_time(grads, s.dp_link) + gradient_meetings(s, o, k.units)
        last_bucket = comm.allreduce_time(min(grads, memory.DDP_BUCKET_BYTES), s.dp_link)
    return exposed(o, total, k.reduce_window) + reduction_tail(o, last_bucket)


def zero1_exposed(s: Step, o: Overlap, k: RankTraffic) -> float:
    """ZeRO-1 (Megatron's distributed optimizer): reduce-scatter the gradients under the last backward,
    all-gather the updated 16-bit weights under the next forward."""
    rs = step_collective(s, k, "reduce_scatter", s.sb.grad) + gradient_meetings(s, o, k.units)
    ag = step_collective(s, k, "all_gather", s.sb.compute_copy or s.sb.param) + k.units * o.meet_fwd
    return (exposed(o, rs, k.reduce_window) + exposed(o, ag, k.fwd_mb) + reduction_tail(o, rs / k.layers)
            + tail(o, ag / k.layers))


def sharded_step_exposed(s: Step, o: Overlap, k: RankTraffic) -> float:
    """FSDP2 with gradients accumulated unsharded and reduce-scattered once per step (ZeRO-2 always; ZeRO-3
    under a pipeline, where torch.distributed.pipelining defers gradient sync to the last micro-batch).
    ZeRO-2 keeps weights gathered for the whole step (one all-gather); ZeRO-3 gathers each layer before its
    forward and backward in every micro-batch, prefetched one layer ahead."""
    rs = step_collective(s, k, "reduce_scatter", s.sb.grad) + gradient_meetings(s, o, k.units)
    ag = step_collective(s, k, "all_gather", s.sb.compute_copy or s.sb.param)
    shows = exposed(o, rs, k.reduce_window) + reduction_tail(o, rs / k.layers)
    if s.cfg.zero == 2:
        ag += k.units * o.meet_fwd
        return shows + (exposed(o, ag, k.fwd_mb) + tail(o, ag / k.layers))
    return shows + s.num_mb * (exposed(o, ag + k.units * o.meet_fwd, k.fwd_mb)
                               + exposed(o, ag + k.blocks * o.meet_bwd, k.bwd_mb) + tail(o, 2 * ag / k.layers))


def zero3_exposed(s: Step, o: Overlap, k: RankTraffic) -> float:
    """FSDP2 ZeRO-3 without a pipeline: per micro-batch, all-gather each layer's weights before its forward
    and backward and reduce-scatter its gradients after backward, prefetched one layer ahead."""
    ag = step_collective(s, k, "all_gather", s.sb.compute_copy or s.sb.param)
    rs = step_collective(s, k, "reduce_scatter", s.sb.grad)
    per_mb = (exposed(o, ag + k.units * o.meet_fwd, k.fwd_mb)
              + exposed(o, ag + rs + (k.blocks + k.units) * o.meet_bwd, k.bwd_mb) + tail(o, (2 * ag + rs) / k.layers))
    return s.num_mb * per_mb


def rank_traffic(s: Step, layout: Layout, o: Overlap, r: int, roots: bool = True) -> RankTraffic:
    """Pipeline rank ``r``'s :class:`RankTraffic` (its blocks' shared parameters, and with ``roots`` its root
    unit's); the gradient reduction's window is the last micro-batch's backward, or (one REDUCE_GRAD after the
    stage's last backward) the rank's drain."""
    blocks = layout.rank_layers[r]
    root_params = rank_root_params(s, r) if roots else 0.0
    window = drain_after_last_backward(s, layout, r) if o.after_schedule else blocks * s.lc.bwd
    return RankTraffic(blocks, root_params, root_params + blocks * s.lc.dense_params,
                       blocks + (1 if root_params > 0 else 0), blocks * s.lc.fwd, blocks * s.lc.bwd, window)


def dp_time(s: Step, layout: Layout, makespan: float) -> float:
    """The slowest pipeline rank's exposed data-parallel seconds per step (0 without replicas), with the
    routed experts' reduction over their own group (:func:`expert_dp_step`) beside it; each rank's blocks
    priced as its own (layout.rank_step)."""
    ranks = [rank_step(s, layout, r) for r in range(s.p)]
    expert = 0.0
    if s.lc.expert_params and s.expert_dp > 1:
        expert = max(rank_dp_exposed(expert_dp_step(own), layout, makespan, r, roots=False)
                     for r, own in enumerate(ranks))
    if s.replicas == 1:
        return expert
    return expert + max(rank_dp_exposed(own, layout, makespan, r, roots=True) for r, own in enumerate(ranks))


def rank_dp_exposed(s: Step, layout: Layout, makespan: float, r: int, roots: bool) -> float:
    """Pipeline rank ``r``'s exposed data-parallel seconds under the plan's ZeRO stage."""
    o = overlap_of(s, makespan)
    term = {0: ddp_exposed, 1: zero1_exposed}.get(s.cfg.zero)
    if term is None:
        term = sharded_step_exposed if s.cfg.zero == 2 or s.p > 1 else zero3_exposed
    return term(s, o, rank_traffic(s, layout, o, r, roots))


def expert_dp_step(s: Step) -> Step:
    """The step as the routed experts' data-parallel traffic sees it: their parameters per block, reduced (and
    under ZeRO gathered) over the expert-data-parallel group on its link. Its exposed seconds add to the
    shared parameters' (each priced beside the same compute windows)."""
    lc = replace(s.lc, params=s.lc.expert_params, expert_params=0.0)
    return replace(s, lc=lc, replicas=s.expert_dp, dp_link=s.expert_dp_link, dp_stride=s.dp_stride * s.cfg.ep)


def kv_replica_sync_time(s: Step, layout: Layout) -> float:
    """Seconds of summing the gradients of replicated key/value heads (tp > kv_heads: each of the
    ``tp / kv_heads`` ranks holding one head has its own copy, flops.kv_heads_per_rank) on the slowest
    pipeline rank: one all-reduce of the copies' gradients (one k and one v head per block, ``sb.grad`` bytes a
    parameter, the rank's ZeRO shard of them) over those ranks, after the backward and before the optimizer
    (launcher/runtime/train.py sync_kv_replica_grads). 0 where tp divides the key/value heads."""
    model, cfg = s.ctx.model, s.cfg
    if cfg.tp <= model.kv_heads:
        return 0.0
    copies = cfg.tp // model.kv_heads
    link = comm.group_link(s.ctx.cluster, copies, comm.group_stride(cfg.mesh_order, cfg.degrees, "tp"))
    per_block = flops.kv_params_per_layer(model) / model.kv_heads * s.sb.grad / (s.replicas if cfg.zero >= 1 else 1)
    return max(comm.allreduce_time(layout.rank_layers[r] * per_block, link) for r in range(s.p))


def optimizer_time(s: Step, layout: Layout) -> float:
    """Seconds of the optimizer step on the slowest rank: Adam reads param, grad, two moments and writes param
    and moments (28 B/param, fp32), plus the gradient-norm read (4 B/param), at the memory rate over the rank's
    shard (and its whole vocabulary shard); measured instead where the profile timed the runtime's optimizer
    step (compute.measured_optimizer_seconds_per_param)."""
    ctx, cfg, sb = s.ctx, s.cfg, s.sb
    rates = compute.achieved_rates(ctx.cluster, ctx.train.precision)
    opt_bytes = (28 if sb.optimizer == 8 else 20) + 4
    per_param = compute.measured_optimizer_seconds_per_param(ctx.cluster, ctx.train.precision, ctx.train.optimizer,
                                                             cfg.tp)
    if per_param is None:
        per_param = opt_bytes / rates.memory
    seconds = []
    for r in range(s.p):
        lc = rank_step(s, layout, r).lc
        shared = rank_root_params(s, r) + layout.rank_layers[r] * lc.dense_params
        experts = layout.rank_layers[r] * lc.expert_params
        if cfg.zero >= 1:
            shared, experts = shared / s.replicas, experts / s.expert_dp
        seconds.append((shared + experts + s.vocab_shard_params) * per_param)
    return max(seconds)
