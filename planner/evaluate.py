"""Evaluate one parallel configuration: per-block costs, stage partition, recompute, time and memory.

``evaluate(config, ctx)`` returns an :class:`Evaluation` (a fitting plan with its prediction) or a
:class:`Rejection` (why it cannot run). It composes the cost model's modules, one per concern:

    block.py          per-block time and memory (compute, tensor and context parallel, recompute)
    vocab.py          embedding, head and loss, and vocabulary parallelism
    layout.py         layer partition and recompute counts per pipeline rank
    pipeline.py       makespan, exposed p2p, per-rank micro-batch time
    rank_memory.py    what is live on each pipeline rank at its peak
    data_parallel.py  data-parallel / ZeRO traffic and the optimizer step
    host.py           ranks that share a host's cores (CPU clusters; the null model on GPUs)

The search calls it many times, so per-block and vocabulary costs are cached and everything is plain
arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshplan.plan import Plan, Prediction, StagePlan, expert_layout_problem
from meshplan.planner import data_parallel, flops, memory, pipeline, rank_memory
from meshplan.planner.kernels import plan_kernels
from meshplan.planner.layout import Layout, block_split_counts, choose_layout, priced_for_own_blocks, split_counts
from meshplan.planner.layout import nccl_bytes as layout_nccl_bytes
from meshplan.planner.pipeline import PipelineTime
from meshplan.planner.step import Step, step_of

# names other packages import from here
from meshplan.planner.block import LayerCost, config_layer_cost, layer_cost  # noqa: F401
from meshplan.planner.host import shared_host_speed  # noqa: F401
from meshplan.planner.inputs import GIB, MODES, Config, Context, Rejection  # noqa: F401
from meshplan.planner.pipeline import (interleaved_warmup_passes, pipeline_makespan,  # noqa: F401
                                       pipeline_p2p_exposed)
from meshplan.planner.vocab import VocabCost, VocabKey, vocab_cost, vocab_edges_comm  # noqa: F401


@dataclass
class Evaluation:
    """A configuration that fits, with its partition, recompute counts per rank and predictions.
    ``rank_details[r]``: pipeline rank r's memory at its peak in bytes per category, the allocator margin left
    out (:meth:`rank_detail` adds it)."""

    config: Config
    iteration_s: float
    peak_bytes: float
    partition: list[int]                 # blocks per virtual stage
    rank_counts: list[dict[str, int]]    # recompute counts per pipeline rank
    rank_peaks: list[float]              # bytes, allocator margin included
    rank_static: list[tuple[float, float]]   # per rank: (bytes with no blocks, bytes per block), no activations
    time_breakdown: dict[str, float]
    rank_details: list[dict[str, float]]
    notes: list[str] = field(default_factory=list)
    rank_reserved: list[float] = field(default_factory=list)   # bytes the caching allocator reserves per rank
    nccl_bytes: float = 0.0                                     # NCCL's buffers per rank (layout.nccl_bytes)
    block_chunks: bool = False     # recompute counts spread evenly over a rank's chunks (Megatron's block method)

    @property
    def reserved_bytes(self) -> float:
        """The most any rank's caching allocator reserves (rank_memory.rank_reserved_bytes)."""
        return max(self.rank_reserved) if self.rank_reserved else self.peak_bytes

    @property
    def worst_rank(self) -> int:
        return max(range(len(self.rank_peaks)), key=lambda r: self.rank_peaks[r])

    def rank_detail(self, rank: int) -> dict[str, float]:
        """Pipeline rank ``rank``'s memory breakdown in bytes, the allocator ``margin`` included."""
        return rank_memory.with_margin(self.rank_details[rank])

    def stages(self) -> list[StagePlan]:
        p = self.config.pp
        n_stages = len(self.partition)
        out = []
        for j in range(n_stages):
            first = sum(self.partition[:j])
            split = block_split_counts if self.block_chunks else split_counts
            counts = split(self.rank_counts[j % p], self.partition, j, p, n_stages)
            out.append(StagePlan((first, first + self.partition[j]), counts, self.rank_peaks[j % p] / GIB))
        return out

    def memory_gib(self) -> list[dict[str, float]]:
        return [{k: x / GIB for k, x in self.rank_detail(r).items()} for r in range(self.config.pp)]

    def rank_peak_before_margin(self, rank: int) -> float:
        """Pipeline rank ``rank``'s predicted peak bytes without the allocator margin: what live tensors reach,
        the figure a fake-tensor run or a live-bytes tracker measures."""
        return peak_before_margin(self.rank_detail(rank))


def peak_before_margin(detail: dict[str, float]) -> float:
    """The sum of a rank's memory breakdown (``Evaluation.rank_detail``, bytes or GiB alike) but its
    allocator ``margin``."""
    return sum(v for k, v in detail.items() if k != "margin")


def evaluate(cfg: Config, ctx: Context, partition: list[int] | None = None,
             recompute_counts: list[dict[str, int]] | None = None) -> Evaluation | Rejection:
    """Predict one configuration. ``partition`` (layers per virtual stage) and ``recompute_counts``
    (per virtual stage) may be given to evaluate an exact plan; otherwise they are chosen here.

        iteration = pipeline makespan + exposed p2p + vocabulary edges + exposed data parallel + optimizer
    (the data-parallel term includes the gradient sum of replicated key/value heads where tp > kv_heads)."""
    expert_problem = expert_layout_problem(ctx.model, cfg.dp, cfg.tp, cfg.cp, cfg.ep, cfg.expert_tp)
    if expert_problem:
        return Rejection(f"divisibility: {expert_problem[0]}", expert_problem[1])
    s = step_of(ctx, cfg)
    base, slope = rank_memory.static_lines(s)
    layout = choose_layout(s, base, slope, partition, recompute_counts)
    if isinstance(layout, Rejection):
        return layout
    layout = priced_for_own_blocks(s, layout)
    pipe = pipeline.pipeline_time(s, pipeline.rank_times(s, layout))
    dp_time = data_parallel.dp_time(s, layout, pipe.makespan) + data_parallel.kv_replica_sync_time(s, layout)
    opt_time = data_parallel.optimizer_time(s, layout)
    details = [rank_memory.rank_peak_detail(s, layout, r) for r in range(s.p)]
    peaks = [sum(d.values()) * (1 + memory.ALLOCATOR_MARGIN) for d in details]
    worst = max(range(s.p), key=lambda r: peaks[r])
    # a plan fits when what its ranks reserve, NCCL's buffers beside, stays under the reserved capacity
    reserved = [rank_memory.rank_reserved_bytes(s, layout, r, details[r]) for r in range(s.p)]
    nccl = layout_nccl_bytes(s)
    needs = max(reserved) + nccl
    if needs > ctx.reserved_capacity_bytes:
        r = max(range(s.p), key=lambda k: reserved[k])
        return Rejection("OOM", f"pipeline rank {r} reserves {reserved[r] / GIB:.1f} GiB (+ {nccl / GIB:.2f} GiB "
                         f"NCCL)", needs - ctx.reserved_capacity_bytes)
    breakdown = time_breakdown(s, layout, pipe, dp_time, opt_time)
    return Evaluation(cfg, pipe.total + dp_time + opt_time, peaks[worst], list(layout.partition),
                      [c.counts for c in layout.choices], peaks, list(zip(base, slope)), breakdown, details,
                      rank_reserved=reserved, nccl_bytes=nccl, block_chunks=ctx.engine.block_recompute)


def time_breakdown(s: Step, layout: Layout, pipe: PipelineTime, dp_time: float, opt_time: float) -> dict[str, float]:
    """Where a step's seconds go. Tensor- and context-parallel communication, recompute and the vocabulary
    pass's communication are inside the makespan; compute is what is left of it (the embedding lookups
    outside the pipeline added) once those and the bubble are taken out."""
    lc, vc, num_mb, p = s.lc, s.vc, s.num_mb, s.p
    n_layers_total = sum(layout.rank_layers)
    tp_comm = lc.tp_comm * n_layers_total / p * num_mb
    cp_comm = lc.cp_comm * n_layers_total / p * num_mb
    ep_comm = lc.ep_comm * n_layers_total / p * num_mb
    recompute_total = max(c.time for c in layout.choices) * num_mb
    compute_total = (pipe.makespan + vc.edges_compute - pipe.bubble - tp_comm - cp_comm - ep_comm - recompute_total
                     - vc.vocab_comm * num_mb)
    out = {"compute": compute_total, "recompute": recompute_total, "tp_comm": tp_comm, "cp_comm": cp_comm,
           "pp_comm": pipe.pp_comm, "vocab_comm": vc.vocab_comm * num_mb + vc.edges_comm, "dp_comm": dp_time,
           "bubble": pipe.bubble, "optimizer": opt_time}
    if s.ctx.model.moe is not None:
        out["ep_comm"] = ep_comm
    return out


def to_plan(ev: Evaluation, ctx: Context, notes: list[str] | None = None, search: dict | None = None) -> Plan:
    """The :class:`Plan` of an evaluation: its degrees, stages and predictions (MFU against the device's peak in
    the training precision, model FLOPs as flops.model_flops_per_iteration counts them)."""
    cfg, train = ev.config, ctx.train
    num_mb = ctx.num_microbatches(cfg)
    device_peak = ctx.cluster.gpu.peak_flops(train.precision)
    model_flops = flops.model_flops_per_iteration(ctx.model, train.seq_len, train.global_batch)
    tflops = model_flops / ev.iteration_s / ctx.cluster.world_size
    per_rank = ev.memory_gib()
    prediction = Prediction(
        iteration_s=ev.iteration_s, tokens_per_s=train.tokens / ev.iteration_s, tflops_per_gpu=tflops / 1e12,
        mfu=tflops / device_peak, peak_memory_gib=ev.peak_bytes / GIB, time_breakdown_s=ev.time_breakdown,
        memory_breakdown_gib=per_rank[ev.worst_rank], reserved_memory_gib=ev.reserved_bytes / GIB,
        nccl_memory_gib=ev.nccl_bytes / GIB)
    kernels = plan_kernels(ctx, cfg)
    search = dict(search or {})
    search.setdefault("stage_memory_gib", [{k: round(x, 4) for k, x in m.items()} for m in per_rank])
    return Plan(engine=ctx.engine.name, dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, micro_batch=cfg.micro_batch, num_microbatches=num_mb,
                stages=tuple(ev.stages()), model=ctx.model, cluster=ctx.cluster, train=train, cp_kind=cfg.cp_kind,
                sequence_parallel=cfg.sp, attention=cfg.attention, vocab_parallel=cfg.vocab_parallel,
                schedule=cfg.schedule if cfg.pp > 1 else "1f1b", virtual_stages=cfg.virtual_stages, zero=cfg.zero,
                tp_overlap=cfg.tp_overlap, compile=cfg.compile, kernels=kernels, mesh_order=cfg.mesh_order,
                predicted=prediction, notes=tuple(notes or ev.notes), search=search, ep=cfg.ep,
                expert_tp=cfg.expert_tp, moe_imbalance=cfg.moe_imbalance or 0.0)

