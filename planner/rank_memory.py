"""Per-rank memory: what is live on a pipeline rank at its peak.

A rank's peak is ``common + max(at the loss, in the first block's backward)`` (memory.step_peak_phases):
common holds the training state (memory.model_state_bytes, sharded per the runtime's ZeRO stage), the
gradient accumulators, gathered weights and pipeline receive buffers; the loss phase adds the logits; the
backward phase adds the weights gathered for backward, the transient gradients, a block re-materialised by
recompute and the sequence-parallel workspace. Saved activations come on top (layout.saved_activation_bytes;
interleaved schedules replay the rank's ops, memory.schedule_peak). The allocator's margin
(memory.ALLOCATOR_MARGIN) is added to the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.planner import memory
from meshplan.planner.inputs import MODES
from meshplan.planner.layout import Layout, rank_chunk_counts, rank_step, stage_layers
from meshplan.planner.step import Step

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "logits", "buffers")


@dataclass(frozen=True)
class Phases:
    """Everything on a rank but its blocks' saved activations, bytes per category: always live (``common``),
    at the loss (``at_loss``) and in the first block's backward (``in_backward``)."""

    common: dict[str, float]
    at_loss: dict[str, float]
    in_backward: dict[str, float]
    persistent: float = 0.0     # bytes of ``common`` allocated once and kept (memory.reserved_bytes)


def rank_root_params(s: Step, rank: int) -> float:
    """The parameters of the rank's FSDP2 root unit, beside its blocks: the embedding (or, with the
    vocabulary split, the positions table) on the first rank, the final norm and head on the last."""
    params = 0.0
    if rank == 0:
        params += s.vc.first_params
    if rank == (s.n_stages - 1) % s.p:
        params += s.vc.last_params
    return params


def rank_state_bytes(s: Step, root: float, layers: int) -> dict[str, float]:
    """Parameters, gradients and optimizer state of a rank with ``root`` root parameters and ``layers`` blocks
    (memory.model_state_bytes): the routed experts' sharded over the expert-data-parallel group, everything
    else over the data x context replicas."""
    stage, lc = sharding_stage(s), s.lc
    states = memory.model_state_bytes(root + layers * lc.dense_params, stage, s.replicas, s.sb)
    if lc.expert_params:
        experts = memory.model_state_bytes(layers * lc.expert_params, stage, s.expert_dp, s.sb)
        states = {k: states[k] + experts[k] for k in states}
    return states


def uses_fsdp(s: Step) -> bool:
    """Whether the rank's state is wrapped by FSDP2 / replicate (meshplan's runtime, torchtitan: with more than
    one data-parallel rank) or gathers parameters like it (Megatron FSDP, ZeRO 3). Megatron below ZeRO 3 keeps
    16-bit parameters whole and its main-grad buffer for the whole run (ZeRO 2, optim_grads: the buffer is
    the gradient shard, each bucket reduce-scattered into it)."""
    if s.cfg.dp * s.cfg.cp <= 1:
        return False
    return s.ctx.engine.state_layout != "distributed_optimizer" or s.cfg.zero >= 3


def fsdp_units_per_block(s: Step) -> int:
    """FSDP2 units in a block: 2 for a mixture of experts on an engine wrapping each block's routed experts
    as a unit of their own (meshplan's runtime parallelize.apply_expert_dp, torchtitan's expert FSDP), else 1."""
    return 2 if s.lc.expert_params and s.ctx.engine.state_layout != "distributed_optimizer" else 1


def sharding_stage(s: Step) -> int:
    """The ZeRO stage of memory.model_state_bytes for this engine (memory.engine_sharding_stage)."""
    return memory.engine_sharding_stage(s.ctx.engine.state_layout, s.cfg.zero)


def accumulates_unsharded(s: Step) -> bool:
    """Whether gradients accumulate in unsharded fp32 buffers across micro-batches (launcher/runtime/train.py
    train_step: under a pipeline, or over several micro-batches below ZeRO-3)."""
    return s.p > 1 or (s.num_mb > 1 and s.cfg.zero <= 2)


def rank_memory_phases(s: Step, rank: int, layers: int, recomputes: bool) -> Phases:
    """The :class:`Phases` of pipeline rank ``rank`` holding ``layers`` blocks. The sharded gradients are
    replaced by the fp32 accumulators while those exist (each block's reduce-scatter frees its accumulator);
    else present from the first micro-batch's backward on, so at the last one's loss only when there are
    several (optimizer.zero_grad(set_to_none=True) frees the last step's). GPipe keeps every earlier
    micro-batch's log-probabilities until its backward."""
    cfg, lc, sb, p, num_mb, train = s.cfg, s.lc, s.sb, s.p, s.num_mb, s.ctx.train
    root = rank_root_params(s, rank)
    params = root + layers * lc.params
    states = rank_state_bytes(s, root, layers)
    states = {k: states[k] + s.shard_states[k] for k in states}
    fsdp = uses_fsdp(s)
    grad_buffer = not fsdp and s.ctx.engine.state_layout == "distributed_optimizer"   # kept for the whole run
    accumulators, transient = memory.unsharded_grad_bytes(params, lc.params, sb, accumulates_unsharded(s), fsdp)
    gathered_loss = memory.gathered_weight_bytes(params, cfg.zero, lc.params, sb, fsdp, root, during_backward=False)
    gathered_bwd = memory.gathered_weight_bytes(params, cfg.zero, lc.params, sb, fsdp, root, during_backward=True,
                                                units_per_block=fsdp_units_per_block(s))
    grads = states.pop("gradients") - s.shard_states["gradients"]
    grads_common = ((0.0 if accumulators else (grads if num_mb > 1 or grad_buffer else 0.0))
                    + s.shard_states["gradients"])
    grads_backward = 0.0 if accumulators or num_mb > 1 or grad_buffer else grads
    holds_loss = cfg.vocab_parallel or rank == (s.n_stages - 1) % p
    logits_loss = logits_kept = 0.0
    if holds_loss:
        flight_loss = 2 if cfg.vocab_parallel else (num_mb if (cfg.schedule == "gpipe" and p > 1) else 1)
        logits_loss, logits_kept = s.vc.logits_peak, max(0, flight_loss - 1) * s.vc.logprob_saved
    pipeline = s.boundary_bytes * memory.pipeline_receive_buffers(p, rank, num_mb, s.v,
                                                                  s.ctx.engine.pipeline_buffers)
    common = {**states, "gradients": grads_common, "logits": logits_kept,
              "buffers": gathered_loss + accumulators + pipeline}
    at_loss = {"logits": logits_loss}
    in_backward = {"gradients": grads_backward,     # (+ the block being re-materialised under recompute)
                   "buffers": gathered_bwd - gathered_loss + transient + (lc.act_full_layer if recomputes else 0.0)
                   + memory.sp_backward_workspace_bytes(cfg.micro_batch * train.seq_len / cfg.cp,
                                                        s.ctx.model.hidden, s.ctx.act_bytes, cfg.tp)}
    persistent = (states["parameters"] + states["optimizer"] + pipeline
                  + (grads_common if grad_buffer else s.shard_states["gradients"]))
    return Phases(common, at_loss, in_backward, persistent)


def fragmentation_share(s: Step) -> float:
    """memory.FRAGMENTATION_SHARE on ranks that allocate through the CUDA caching allocator, else 0."""
    return memory.FRAGMENTATION_SHARE if s.ctx.caching_allocator else 0.0


def phase_sums(ph: Phases) -> tuple[float, float, float, float]:
    """(common, at the loss, in the backward, persistent) bytes of ``ph``."""
    return sum(ph.common.values()), sum(ph.at_loss.values()), sum(ph.in_backward.values()), ph.persistent


def reserved_static(s: Step, common: float, loss: float, backward: float, persistent: float) -> float:
    """memory.reserved_bytes of a rank without saved activations, divided by ``1 + fragmentation_share``: in
    these units a block's saved activations add their own bytes, so ``static + activations <= activation
    capacity`` (layout.activation_capacity) is ``reserved <= what the rank may reserve``."""
    live = common + memory.step_peak_phases(loss, backward)
    reserved = memory.reserved_bytes(live, backward, persistent, s.ctx.caching_allocator)
    return reserved / (1.0 + fragmentation_share(s))


def static_line(s: Step, rank: int) -> tuple[float, float]:
    """(the rank's reserved bytes with no blocks, in activation units (:func:`reserved_static`), bytes per block
    of their linear upper bound in its blocks). With f the fragmentation share, reserved = (1 + f) (common +
    max(loss, bwd)) + bwd - f persistent (memory.reserved_bytes): its growth per block is bounded by the common
    part's, the larger phase's (the maximum is convex in the number of blocks), the backward's and the
    persistent part's."""
    a, b = (phase_sums(rank_memory_phases(s, rank, n, True)) for n in (0, 1))
    common, loss, backward, persistent = (x1 - x0 for x0, x1 in zip(a, b))
    f = fragmentation_share(s)
    if not s.ctx.caching_allocator:
        slope = common + max(0.0, loss, backward)
    else:
        slope = ((1 + f) * (common + max(0.0, loss, backward)) + backward - f * persistent) / (1 + f)
    return reserved_static(s, *a), slope


def static_lines(s: Step) -> tuple[list[float], list[float]]:
    """Static memory (reserved, in activation units: :func:`reserved_static`) as a linear upper bound in the
    number of blocks a rank holds, ``total(r, n) = base[r] + n * slope[r]``, with room for one re-materialised
    block (the reported peaks, :func:`rank_peak_detail` and :func:`rank_reserved_bytes`, are exact)."""
    lines = [static_line(s, r) for r in range(s.p)]
    return [base for base, _ in lines], [slope for _, slope in lines]


def rank_reserved_bytes(s: Step, layout: Layout, r: int, detail: dict[str, float]) -> float:
    """What pipeline rank ``r``'s caching allocator reserves at its peak (memory.reserved_bytes): its live peak
    (``detail``, :func:`rank_peak_detail`), one backward working set cached beside it and the fragmented share
    of what is not persistent."""
    s = rank_step(s, layout, r)
    choice = layout.choices[r]
    recomputes = bool(choice.counts["full"] or choice.counts["selective"])
    _, loss, backward, persistent = phase_sums(rank_memory_phases(s, r, layout.rank_layers[r], recomputes))
    return memory.reserved_bytes(sum(detail.values()), backward, persistent, s.ctx.caching_allocator)


def rank_peak_detail(s: Step, layout: Layout, r: int) -> dict[str, float]:
    """Bytes per category at pipeline rank ``r``'s peak, the allocator margin left out (its own blocks' costs:
    layout.rank_step)."""
    s = rank_step(s, layout, r)
    choice = layout.choices[r]
    recomputes = bool(choice.counts["full"] or choice.counts["selective"])
    ph = rank_memory_phases(s, r, layout.rank_layers[r], recomputes)
    if s.cfg.schedule == "interleaved" and s.v > 1:
        return interleaved_peak_detail(s, layout, r, ph)
    phase = ph.at_loss if sum(ph.at_loss.values()) >= sum(ph.in_backward.values()) else ph.in_backward
    entry = {k: ph.common.get(k, 0.0) + phase.get(k, 0.0)
             for k in ("parameters", "gradients", "optimizer", "logits", "buffers")}
    entry["activations"] = choice.act_bytes
    return {k: entry[k] for k in CATEGORIES}


def interleaved_peak_detail(s: Step, layout: Layout, r: int, ph: Phases) -> dict[str, float]:
    """The interleaved rank's peak by replaying its ops (memory.schedule_peak): its chunks differ in size and
    create their gradient accumulators late."""
    p, n_stages, sb, vc = s.p, s.n_stages, s.sb, s.vc
    partition, counts = layout.partition, layout.choices[r].counts
    stages = list(range(r, n_stages, p))
    chunk_costs = [s.for_blocks(stage_layers(partition, j)).lc for j in stages]     # each chunk's own blocks
    acts = [sum(chunk[m] * lc.act[m] for m in MODES)
            for chunk, lc in zip(rank_chunk_counts(counts, partition, r, p, n_stages), chunk_costs)]
    chunk_params = [partition[j] * lc.params          # FSDP2's units (the vocabulary shard is not one)
                    + (vc.first_params if j == 0 else 0.0) + (vc.last_params if j == n_stages - 1 else 0.0)
                    for j, lc in zip(stages, chunk_costs)]
    fsdp = uses_fsdp(s)
    accs = [memory.unsharded_grad_bytes(x, lc.params, sb, accumulates_unsharded(s), fsdp)[0]
            for x, lc in zip(chunk_params, chunk_costs)]
    shards = [memory.model_state_bytes(x, sharding_stage(s), s.replicas, sb)["gradients"]
              if a else 0.0 for x, a in zip(chunk_params, accs)]
    ops = memory.interleaved_op_order(p, r, s.num_mb, s.v)
    at_loss, in_backward = sum(ph.at_loss.values()), sum(ph.in_backward.values())
    _, live, accumulated, extra = memory.schedule_peak(ops, acts, accs, shards, [at_loss] * s.v, in_backward)
    phase = ph.at_loss if extra == at_loss and extra > 0 else ph.in_backward
    entry = {k: ph.common.get(k, 0.0) + phase.get(k, 0.0)
             for k in ("parameters", "gradients", "optimizer", "logits", "buffers")}
    entry["buffers"] += accumulated - sum(accs)
    entry["activations"] = live
    return {k: entry[k] for k in CATEGORIES}


def with_margin(detail: dict[str, float]) -> dict[str, float]:
    """A rank's breakdown with the allocator's ``margin`` (memory.ALLOCATOR_MARGIN of the rest) added."""
    return {**detail, "margin": memory.ALLOCATOR_MARGIN * sum(detail.values())}
