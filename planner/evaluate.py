"""Evaluate one parallel configuration: per-layer costs, stage partition, recompute, time and memory.

``evaluate(config, ctx)`` returns an :class:`Evaluation` (a fitting plan with its prediction) or a
:class:`Rejection` (why it cannot run). The search calls it many times, so per-layer costs are cached
per (tp, cp, micro batch, ...) and everything here is plain arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, NamedTuple

from meshplan.plan import DEFAULT_MESH_ORDER, KERNEL_NAMES, Plan, Prediction, StagePlan
from meshplan.spec import ClusterSpec, ModelSpec, TrainSpec
from meshplan.planner import comm, compute, flops, memory, schedule_sim
from meshplan.planner.partition import balance_layers
from meshplan.planner.recompute import RecomputeChoice, choose_recompute

GIB = memory.GIB
MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Config:
    """One point of the search space (everything but the layer partition and recompute counts, which
    ``evaluate`` chooses). ``recompute`` pins a uniform mode; None lets the planner choose per stage."""

    dp: int
    tp: int
    pp: int
    cp: int
    micro_batch: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    vocab_parallel: bool = False
    cp_kind: str = "ulysses"
    tp_overlap: bool = False
    compile: bool = False
    fused_kernels: bool = False
    recompute: str | None = None
    mesh_order: tuple[str, ...] = DEFAULT_MESH_ORDER


@dataclass(frozen=True)
class Context:
    """The fixed inputs of a search.

    ``pipeline_grad_sync``: when the runtime that will run the plan reduces a pipeline stage's data-parallel
    gradients. ``"after_schedule"`` (meshplan's runtime, and torchtitan's: torch.distributed.pipelining keeps
    FSDP2/replicate gradient sync off for every backward and reduces in one REDUCE_GRAD action after the
    stage's last one, ``PipelineStage.perform_reduce_grad``, measured in benchmarks/dp_reduce_wait.py) or
    ``"overlapped"`` (Megatron-LM's ``overlap_grad_reduce``: buckets reduce as the last micro-batch's backward
    fills them). Only plans with ``pp > 1`` and data-parallel replicas are affected."""

    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    pipeline_grad_sync: str = "after_schedule"

    @property
    def act_bytes(self) -> int:
        return memory.ACT_BYTES[self.train.precision]

    @property
    def capacity_bytes(self) -> float:
        """What a rank may use: device memory less the CUDA context kept outside torch's allocator."""
        context = memory.CUDA_CONTEXT_GIB if self.cluster.gpu.kind == "gpu" else 0.0
        return (self.cluster.gpu.memory_gib - context) * GIB


@dataclass(frozen=True)
class Rejection:
    reason: str               # a short family name used for counting ("OOM", "divisibility: ...")
    detail: str = ""
    over_bytes: float = 0.0   # for OOM: by how much the best variant missed


@dataclass
class Evaluation:
    """A configuration that fits, with its partition, recompute counts per rank and predictions.
    ``rank_detail(r)`` gives rank r's memory breakdown in bytes (computed on demand: the search makes
    thousands of evaluations and reads the details of a few)."""

    config: Config
    iteration_s: float
    peak_bytes: float
    partition: list[int]                 # blocks per virtual stage
    rank_counts: list[dict[str, int]]    # recompute counts per pipeline rank
    rank_peaks: list[float]              # bytes, allocator margin included
    rank_static: list[tuple[float, float]]   # per rank: (bytes with no blocks, bytes per block), no activations
    time_breakdown: dict[str, float]
    rank_detail: Callable[[int], dict[str, float]]
    notes: list[str] = field(default_factory=list)

    @property
    def worst_rank(self) -> int:
        return max(range(len(self.rank_peaks)), key=lambda r: self.rank_peaks[r])

    def stages(self) -> list[StagePlan]:
        p = self.config.pp
        n_stages = len(self.partition)
        out = []
        for j in range(n_stages):
            first = sum(self.partition[:j])
            counts = _split_counts(self.rank_counts[j % p], self.partition, j, p, n_stages)
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


# ------------------------------------------------------------------------------------------------
# per-layer costs
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCost:
    """One block, one micro-batch, one rank."""

    fwd: float                      # seconds, compute + exposed TP/CP communication
    bwd: float
    recompute: dict[str, float]     # extra seconds per mode (none: 0)
    act: dict[str, float]           # bytes kept for backward per mode
    act_full_layer: float           # bytes of one block's activations, re-materialised during its backward
    params: float                   # parameters per rank
    tp_comm: float                  # exposed seconds (fwd + bwd) included above
    cp_comm: float
    matmul_fwd: float


def config_layer_cost(ctx: Context, cfg: Config) -> LayerCost:
    """The per-layer costs of ``cfg`` (cached)."""
    return layer_cost(ctx.model, ctx.cluster, ctx.train, cfg.tp, cfg.cp, cfg.micro_batch, cfg.cp_kind,
                      cfg.tp_overlap, cfg.compile or cfg.fused_kernels, cfg.fused_kernels, cfg.mesh_order,
                      cfg.dp, cfg.pp)


@lru_cache(maxsize=4096)
def layer_cost(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tp: int, cp: int, micro_batch: int,
               cp_kind: str, tp_overlap: bool, fused_elementwise: bool, fused_swiglu: bool,
               mesh_order: tuple[str, ...], dp: int, pp: int) -> LayerCost:
    """Time and memory of one block for one micro-batch on one rank. ``fused_elementwise``: norms, rotary,
    activation and residual ops run fused (compiled or fused kernels); ``fused_swiglu``: the SwiGLU kernel
    that recomputes silu in backward (saves one f-wide tensor)."""
    rates = compute.achieved_rates(cluster, train.precision)
    act_bytes = memory.ACT_BYTES[train.precision]
    seq = train.seq_len
    tokens = micro_batch * seq / cp
    sp = tp > 1
    degrees = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}

    # where the profile timed this very block, its measured / modelled ratio corrects the fitted parts
    timed = compute.measured_block_ratio(cluster, train.precision, tp, micro_batch, seq) if cp == 1 else 1.0
    matmul_fwd = timed * sum(compute.matmul_time(m, k, n, rates)
                             for m, k, n in compute.layer_matmul_shapes(model, tokens, tp))
    attn_fwd, attn_bwd = (timed * t for t in compute.attention_time(model, micro_batch, seq, tp, cp, rates))
    ew_fwd = timed * compute.elementwise_bytes_per_layer(model, tokens, tp, sp, fused_elementwise,
                                                         act_bytes) / rates.memory

    # Tensor parallel with sequence parallel: 2 all-gathers + 2 reduce-scatters of the [s, b, h] activation
    # per direction (Korthikanti et al. 2022, fig. 5).
    tp_link = comm.group_link(cluster, tp, comm.group_stride(mesh_order, degrees, "tp"))
    activation = tokens * model.hidden * act_bytes
    tp_dir = 2 * comm.allgather_time(activation, tp_link) + 2 * comm.reducescatter_time(activation, tp_link)
    fwd_compute_estimate = matmul_fwd + attn_fwd + ew_fwd
    if tp > 1:   # four calls per direction, each after about a quarter of the layer (comm.meeting_time)
        tp_dir += 4 * comm.meeting_time(cluster, fwd_compute_estimate / 4, tp)
    if tp_overlap:   # async TP: the collectives run under the matmuls they feed
        hidden_share = comm.overlap_exposed_fraction(cluster)
        tp_fwd = comm.exposed_time(tp_dir, matmul_fwd, hidden_share)
        tp_bwd = comm.exposed_time(tp_dir, 2 * matmul_fwd, hidden_share)
    else:
        tp_fwd = tp_bwd = tp_dir

    # Context parallel.
    cp_link = comm.group_link(cluster, cp, comm.group_stride(mesh_order, degrees, "cp"))
    kv_width = model.kv_heads * model.head_dim
    if cp == 1:
        cp_fwd = cp_bwd = 0.0
    elif cp_kind == "ulysses":
        # all-to-all q, k, v before attention and the output after (Jacobs et al. 2023), same in backward
        qkv_local = tokens * (model.hidden + 2 * kv_width) / tp * act_bytes
        out_local = tokens * model.hidden / tp * act_bytes
        cp_fwd = cp_bwd = (comm.alltoall_time(qkv_local, cp_link) + comm.alltoall_time(out_local, cp_link)
                           + 2 * comm.meeting_time(cluster, fwd_compute_estimate / 2, cp))
    else:
        # ring, as the runtime runs it (launcher/runtime/context_parallel.py): the slowest context rank's
        # attention (compute.ring_attention_time) replaces flash attention; cp-1 hops pass the fp32 K, V
        # chunk on (repeated to every head), backward K, V and their dK, dV accumulators plus one last hop
        # home for the accumulators. Each hop is waited for before the next block is computed: no overlap.
        attn_fwd, attn_bwd = compute.ring_attention_time(model, micro_batch, seq, tp, cp,
                                                         compute.achieved_rates(cluster, "fp32"))
        kv_local = tokens * 2 * model.hidden / tp * 4
        steps = cp - 1
        hop_meeting = comm.meeting_time(cluster, attn_fwd / cp, 2)   # each hop waits for its neighbour
        cp_fwd = steps * (comm.p2p_time(kv_local, cp_link) + hop_meeting)
        cp_bwd = steps * (comm.p2p_time(2 * kv_local, cp_link) + hop_meeting) + comm.p2p_time(kv_local, cp_link)

    fwd_compute = matmul_fwd + attn_fwd + ew_fwd
    fwd = fwd_compute + tp_fwd + cp_fwd
    bwd = 2 * matmul_fwd + attn_bwd + 2 * ew_fwd + tp_bwd + cp_bwd
    # Recompute: full re-runs the forward (its TP/CP communication included); selective re-runs every other
    # matmul and the memory-bound ops (flash attention recomputes its scores in backward anyway).
    selective_matmuls = timed * sum(compute.matmul_time(m, k, n, rates)
                                    for m, k, n in compute.selective_recompute_shapes(model, tokens, tp))
    # under SP the two all-gathers feeding wq/wk/wv and w1/w3 are not kept: re-gathered for the backward
    selective_gathers = 2 * comm.allgather_time(activation, tp_link) if sp and not tp_overlap else 0.0
    recompute_cost = {"none": 0.0, "selective": selective_matmuls + ew_fwd + selective_gathers, "full": fwd}

    def act(mode: str) -> float:
        # LayerNorm is PyTorch's fused kernel (keeps its input); the fused RMSNorm (Triton) takes plain tensors,
        # so under SP the runtime's RMSNorms are the reference ones
        fused_norm = model.norm == "layernorm" or (fused_swiglu and not sp)
        return memory.activation_bytes_per_layer(model, seq, micro_batch, tp=tp, sp=sp, cp=cp, act_bytes=act_bytes,
                                                 flash=True, recompute=mode, fused_swiglu=fused_swiglu,
                                                 fused_norm=fused_norm)

    acts = {mode: act(mode) for mode in MODES}
    return LayerCost(fwd=fwd, bwd=bwd, recompute=recompute_cost, act=acts, act_full_layer=acts["none"],
                     params=_layer_params_per_rank(model, tp), tp_comm=tp_fwd + tp_bwd, cp_comm=cp_fwd + cp_bwd,
                     matmul_fwd=matmul_fwd)


def _layer_params_per_rank(model: ModelSpec, tp: int) -> float:
    sharded = flops.attention_params_per_layer(model) + flops.mlp_params_per_layer(model)
    return sharded / tp + 2 * flops.norm_params(model)


# ------------------------------------------------------------------------------------------------
# vocabulary layers (embedding, head, loss)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VocabCost:
    """Per micro-batch seconds and bytes of the embedding (first) and head + loss (last) work, as they
    land on each pipeline rank; with vocab_parallel every rank carries an equal share."""

    first_time: float
    last_time: float
    each_time: float             # vocab_parallel: per-rank share (plus its communication)
    first_params: float
    last_params: float
    each_params: float
    logits_peak: float           # bytes, transient at the loss of one micro-batch
    logprob_saved: float         # bytes kept per in-flight micro-batch until its backward
    vocab_comm: float            # seconds per micro-batch (vocab_parallel only)
    pass_time: float = 0.0       # vocab_parallel: each rank's share of one micro-batch's head + loss pass,
                                 # its communication included (part of each_time; schedule_sim's vocab_pass)
    edges_comm: float = 0.0      # vocab_parallel: seconds per step of communication outside the pipeline
    edges_compute: float = 0.0   # vocab_parallel: the embedding lookups outside the pipeline, seconds per step


class VocabKey(NamedTuple):
    """The fields of a Config that :func:`vocab_cost` reads (its cache key: the search asks for the same
    vocabulary costs under every schedule, ZeRO stage and recompute choice)."""

    micro_batch: int
    cp: int
    tp: int
    pp: int
    dp: int
    vocab_parallel: bool
    fused_kernels: bool
    mesh_order: tuple[str, ...]


def vocab_cost(ctx: Context, cfg: Config) -> VocabCost:
    """Per micro-batch costs of the embedding and head + loss under ``cfg`` (cached on :class:`VocabKey`)."""
    return _vocab_cost(ctx, VocabKey(cfg.micro_batch, cfg.cp, cfg.tp, cfg.pp, cfg.dp, cfg.vocab_parallel,
                                     cfg.fused_kernels, tuple(cfg.mesh_order)))


@lru_cache(maxsize=4096)
def _vocab_cost(ctx: Context, cfg: VocabKey) -> VocabCost:
    model, train, cluster = ctx.model, ctx.train, ctx.cluster
    rates = compute.achieved_rates(cluster, train.precision)
    tokens = cfg.micro_batch * train.seq_len / cfg.cp
    shards = cfg.tp * (cfg.pp if cfg.vocab_parallel else 1)
    vocab_local = math.ceil(model.vocab / shards)
    head_fwd = compute.matmul_time(tokens, model.hidden, vocab_local, rates)
    # the runtime's vocabulary-parallel loss is always the chunked one (launcher/runtime/vocab_parallel.py)
    fused_loss = cfg.fused_kernels or (cfg.vocab_parallel and cfg.pp > 1)
    loss = tokens * vocab_local * compute.loss_bytes_per_logit(fused_loss, train.precision) / rates.memory
    if fused_loss:   # each chunk reads and writes the weight gradient
        loss += memory.loss_chunk_accumulate_bytes(int(tokens), model.hidden, vocab_local, ctx.act_bytes) / rates.memory
    # where the profile timed this head + loss at exactly this shape, the measurement replaces the model
    timed = compute.measured_head_loss_time(cluster, train.precision, tokens, model.hidden, vocab_local, fused_loss)
    head_time = timed if timed is not None else 3 * head_fwd + loss
    embed_time = 3 * tokens * model.hidden * ctx.act_bytes / (cfg.tp if cfg.tp > 1 else 1) / rates.memory
    embed_params = flops.embedding_params(model, train.seq_len) / cfg.tp
    head_params = (0 if model.tied_embeddings else model.vocab * model.hidden) / cfg.tp + flops.norm_params(model)
    logits_peak = memory.logits_bytes(tokens, vocab_local, train.precision, fused_loss, hidden=model.hidden,
                                       stage_keeps_logits=cfg.pp > 1)
    logprob = 0.0 if fused_loss else memory.saved_logprob_bytes(tokens, vocab_local, train.precision, cfg.pp > 1)
    if not cfg.vocab_parallel:
        return VocabCost(embed_time, head_time, 0.0, embed_params, head_params, 0.0, logits_peak, logprob, 0.0)
    # Vocabulary parallelism (Yeung et al. 2024) as meshplan's runtime does it (vocab_parallel.py): every
    # pp x tp rank holds V/(p*t) rows of the embedding and head. Per micro-batch, inside the pipeline, the
    # head pass: the last stage's hidden states broadcast over the pipeline row and its gradient reduced
    # back (two one-way transfers of the [s, b, h] activation, whole: each tp column moves the full sequence,
    # one all-reduce's worth), the softmax statistics all-gathered per loss chunk (2 fp32 per token) over the
    # pp x tp group, one latency per chunk. Outside the pipeline (VocabCost.edges_time): the embedding
    # partial sums reduced to the first stage before it and their gradient broadcast back after it, for
    # every micro-batch at once, and the shards' gradients all-reduced over the data x context ranks by hand.
    degrees = {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp}
    pp_link = comm.group_link(cluster, cfg.pp, comm.group_stride(cfg.mesh_order, degrees, "pp"))
    activation = tokens * model.hidden * ctx.act_bytes
    chunk = memory.loss_chunk_tokens(int(tokens), model.hidden, vocab_local)
    chunks = math.ceil(tokens / chunk)
    stats = chunks * comm.allgather_time(2 * chunk * 4.0 * cfg.pp * cfg.tp, pp_link)
    # every one of those calls makes the pipeline row meet (comm.meeting_time; the others come from their own
    # pipeline work, about a head pass apart)
    meetings = (2 + chunks) * comm.meeting_time(cluster, head_time, cfg.pp)
    vocab_comm = comm.allreduce_time(activation, pp_link) + stats + meetings
    each_params = (model.vocab * model.hidden * (1 if model.tied_embeddings else 2)) / shards
    pass_time = head_time + vocab_comm
    num_mb = train.global_batch // (cfg.dp * cfg.micro_batch)
    edges_comm = vocab_edges_comm(ctx, cfg, num_mb * activation, each_params, pp_link, embed_time * num_mb)
    # the first stage keeps a learned positions table (split over tp like the embedding it sits beside)
    positions = flops.position_params(model, train.seq_len) / cfg.tp
    return VocabCost(0.0, 0.0, pass_time, positions + flops.norm_params(model), flops.norm_params(model),
                     each_params, logits_peak, logprob, vocab_comm, pass_time, edges_comm, embed_time * num_mb)


def vocab_edges_comm(ctx: Context, cfg: Config | VocabKey, step_activation_bytes: float, shard_params: float, pp_link,
                     embed_s: float) -> float:
    """Seconds per step the vocabulary-parallel runtime communicates outside the pipeline, every rank in turn
    (vocab_parallel.py ``begin_step`` / ``end_step``, around the embedding lookup of every micro-batch,
    ``embed_s`` of work): the embedding's partial sums reduced to the first stage and the first stage's input
    gradient broadcast back (one all-reduce's worth of the step's activations over the pipeline row), and the
    shards' fp32 gradients
    (one or two tensors of ``shard_params``) all-reduced over the data x context ranks after the pipeline,
    where no backward is left to hide them; each call a meeting of ranks arriving from their own work."""
    cluster = ctx.cluster
    degrees = {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp}
    replicas = cfg.dp * cfg.cp
    dp_stride = min(comm.group_stride(cfg.mesh_order, degrees, "dp"), comm.group_stride(cfg.mesh_order, degrees, "cp"))
    dp_link = comm.group_link(cluster, replicas, dp_stride)
    tensors = 1 if ctx.model.tied_embeddings else 2
    grad_calls = tensors if replicas > 1 else 0
    tensor_bytes = shard_params / tensors * 4.0   # fp32
    one_call = comm.measured_collective_time(cluster, "all_reduce", replicas, dp_stride, tensor_bytes)
    if one_call is None:
        one_call = comm.allreduce_time(tensor_bytes, dp_link)
    grads = tensors * one_call if replicas > 1 else 0.0
    meetings = (2 * comm.meeting_time(cluster, embed_s, cfg.pp)             # the pipeline row's two calls
                + grad_calls * comm.meeting_time(cluster, embed_s, replicas))  # the replicas' gradient calls
    return comm.allreduce_time(step_activation_bytes, pp_link) + grads + meetings


# ------------------------------------------------------------------------------------------------
# the pipeline: makespan of the compute and the p2p on its critical path
# ------------------------------------------------------------------------------------------------

def interleaved_warmup_passes(pp: int, virtual_stages: int) -> int:
    """Forward chunk passes pipeline rank 0 runs before its first backward in interleaved 1F1B:
    (v - 1) * p + 2 * (p - 1) (Megatron-LM ``forward_backward_pipelining_with_interleaving``;
    torch.distributed.pipelining ``ScheduleInterleaved1F1B``, ``get_rank_warmup_ops`` at rank 0)."""
    return (virtual_stages - 1) * pp + 2 * (pp - 1)


def pipeline_makespan(schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int = 1) -> float:
    """Seconds from the first forward to the last backward of one step, compute only, where ``rank_time[r]``
    is pipeline rank r's forward + backward time for one micro-batch over all its layers.

        no pipeline (p = 1)    m * T
        GPipe, 1F1B            (m - 1) * T_max + sum_r T_r           fill/drain (p - 1)/m of the work
        interleaved, v chunks  m * T_max + (sum_r T_r - T_max) / v   fill/drain divided by v

    (Narayanan et al. 2021, sec. 2.2: bubble fraction (p - 1)/m for 1F1B and (p - 1)/(v * m) interleaved.)
    With m = p the 1F1B fill/drain is (p - 1)/p of the work and interleaving halves it at v = 2: the step
    takes (2p - 1) T against (p + (p - 1)/2) T, 30% apart at p = 8. Both match a dependency simulation of the
    schedules' op order exactly for equal stages (tests/test_cost_model.py)."""
    p = len(rank_time)
    slowest = max(rank_time)
    if p == 1:
        return num_mb * slowest
    if schedule == "interleaved" and virtual_stages > 1:
        return num_mb * slowest + (sum(rank_time) - slowest) / virtual_stages
    return (num_mb - 1) * slowest + sum(rank_time)


def shared_host_speed(table: tuple[tuple[int, float], ...], ranks_per_host: int, pp: int, pp_stride: int):
    """``speed(busy)`` for :func:`schedule_sim.shared_makespan`: the pipeline ranks ``pp_stride`` apart in the
    mesh, ``ranks_per_host // pp_stride`` of them on one host (1 when the stride spans a host), each with
    ``pp_stride`` ranks of its own there (its tp, cp, dp replicas, busy and idle together); ``busy[r]`` counts
    the threads pipeline rank r runs (its ops, a vocabulary helper thread), and each runs at
    ``compute.busy_speedup`` of the busy threads on its host."""
    per_host = 1 if pp_stride >= ranks_per_host else max(1, min(pp, ranks_per_host // pp_stride))
    ranks_each = max(1, ranks_per_host // per_host)

    def speed(busy: list[bool]) -> list[float]:
        on_host = [sum(busy[h * per_host:(h + 1) * per_host]) * ranks_each for h in range(-(-pp // per_host))]
        return [compute.busy_speedup(table, on_host[r // per_host]) for r in range(pp)]
    return speed


def pipeline_p2p_exposed(schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int,
                         hop: float) -> float:
    """Seconds of pipeline send/recv on a step's critical path; ``hop`` is one boundary transfer (one
    activation, or its gradient, between neighbouring ranks: alpha + S / bw).

    Sends are asynchronous and a rank waits only for the input of its next op, so a transfer costs time only
    where a rank idles for it. Read off the schedules' op order as a max-plus system (stage s waits on
    stage s - 1's forward and stage s + 1's backward, each rank runs its ops in order):

      fill and drain   the first micro-batch's forward crosses p*v - 1 boundaries and the last backward as
                       many again: 2 (p v - 1) hops, every schedule.
      steady state     the op chain "forward through every stage, backward through every stage, the next
                       op on rank 0" is a cycle; when it is longer than T_max per micro-batch it sets the pace:
          GPipe        no such cycle (all forwards, then all backwards): nothing more.
          1F1B         rank 0 warms up p - 1 forwards, the cycle spans p micro-batches:
                       (m - 1) * max(0, (sum_r T_r + 2 (p - 1) hop) / p - T_max)
                       (for equal stages 2 hop (p - 1)/p per micro-batch: p2p is never hidden).
          interleaved  rank 0 warms up w = (v - 1) p + 2 (p - 1) chunk passes (interleaved_warmup_passes),
                       the cycle spans (2 p v - 1)/v micro-batches and only micro-batches after the warm-up,
                       m - w/v of them, can be paced by it:
                       max(0, m - w/v) * max(0, v (sum_r T_r + 2 (p v - 1) hop) / (2 p v - 1) - T_max)
                       (zero unless a hop exceeds about half a chunk's compute: the extra warm-up hides it).

    Sources: the op orders of Megatron-LM (Narayanan et al. 2021) as implemented in
    torch.distributed.pipelining (Schedule1F1B, ScheduleInterleaved1F1B). Checked against a dependency
    simulation of those orders for equal stages (tests/test_cost_model.py; p = 2..16, m = p..4p, a hop up to
    10% of a rank's micro-batch time): exact for GPipe, within 3.2% for 1F1B and interleaved (worst at p = 2)."""
    p, v, m = len(rank_time), max(1, virtual_stages), num_mb
    if p == 1 or hop <= 0:
        return 0.0
    slowest, total = max(rank_time), sum(rank_time)
    interleaved = schedule == "interleaved" and v > 1
    stages = p * v if interleaved else p
    exposed = 2 * (stages - 1) * hop
    if schedule == "gpipe":
        return exposed
    if interleaved:
        paced = max(0.0, m - interleaved_warmup_passes(p, v) / v)
        cycle = v * (total + 2 * (stages - 1) * hop) / (2 * stages - 1)
    else:
        paced = m - 1
        cycle = (total + 2 * (stages - 1) * hop) / p
    return exposed + paced * max(0.0, cycle - slowest)


# ------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------

def evaluate(cfg: Config, ctx: Context, partition: list[int] | None = None,
             recompute_counts: list[dict[str, int]] | None = None) -> Evaluation | Rejection:
    """Predict one configuration. ``partition`` (layers per virtual stage) and ``recompute_counts``
    (per virtual stage) may be given to evaluate an exact plan; otherwise they are chosen here."""
    model, train, cluster = ctx.model, ctx.train, ctx.cluster
    p, v = cfg.pp, cfg.virtual_stages
    num_mb = train.global_batch // (cfg.dp * cfg.micro_batch)
    lc = config_layer_cost(ctx, cfg)
    vc = vocab_cost(ctx, cfg)
    sb = memory.state_bytes(train.precision, train.optimizer)
    degrees = {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp}
    # The runtime shards and reduces over dp and cp together (launcher/runtime/parallelize.py: Meshes.dp_cp):
    # context ranks hold the same weights and their gradients are summed like data-parallel ones.
    replicas = cfg.dp * cfg.cp
    dp_link = comm.group_link(cluster, replicas, min(comm.group_stride(cfg.mesh_order, degrees, "dp"),
                                                     comm.group_stride(cfg.mesh_order, degrees, "cp")))
    pp_link = comm.group_link(cluster, cfg.pp, comm.group_stride(cfg.mesh_order, degrees, "pp"))
    n_stages = p * v

    # Time of one micro-batch through each virtual stage, before recompute, and the extras per stage.
    layer_time = lc.fwd + lc.bwd
    extra_time = [0.0] * n_stages
    extra_time[0] += vc.first_time
    extra_time[-1] += vc.last_time
    if cfg.vocab_parallel:
        for rank in range(p):
            extra_time[rank] += vc.each_time     # placed on each rank's first chunk
    if p > 1:   # each chunk runs a forward and a backward op per micro-batch: the schedule's own cost (profiled)
        op_overhead = 2 * compute.pipeline_op_overhead(cluster)
        extra_time = [t + op_overhead for t in extra_time]
    # Pipeline p2p: the [s/cp, b, h] activation (split by tp under SP) crosses each stage boundary forward
    # and its gradient backward; how much of it lands on the critical path is pipeline_p2p_exposed's job.
    boundary_bytes = cfg.micro_batch * train.seq_len / cfg.cp * model.hidden / cfg.tp * ctx.act_bytes
    hop = comm.p2p_time(boundary_bytes, pp_link) if p > 1 else 0.0

    # Memory that does not depend on the partition, per pipeline rank.
    in_flight = [memory.microbatches_in_flight(cfg.schedule, p, r, num_mb, v) for r in range(p)]

    # The vocabulary shard (vocab_parallel) is outside FSDP2 (vocab_parallel.py): its fp32 weights, plain
    # AdamW state and fp32 gradient buffers, created at the step's start, are whole on every data rank and its
    # gradients are reduced by hand after the pipeline (VocabCost.edges_comm). Every rank holds one.
    vocab_shard_params = vc.each_params if cfg.vocab_parallel else 0.0
    shard_states = memory.model_state_bytes(vocab_shard_params, 0, 1, sb)

    def rank_root_params(rank: int) -> float:
        """The parameters of the rank's FSDP2 root unit, beside its blocks: the embedding (or, with the
        vocabulary split, the positions table) on the first rank, the final norm and head on the last."""
        params = 0.0
        if rank == 0:
            params += vc.first_params
        if rank == (n_stages - 1) % p:
            params += vc.last_params
        return params

    def rank_memory_phases(rank: int, layers: int, recomputes: bool) -> tuple[dict[str, float], dict[str, float],
                                                                             dict[str, float]]:
        """Everything on rank ``rank`` but the saved activations of its blocks, as (common, at the loss, in the
        first block's backward) breakdowns; the rank's peak is common + the larger phase
        (memory.step_peak_phases)."""
        root = rank_root_params(rank)
        params = root + layers * lc.params
        states = memory.model_state_bytes(params, memory.runtime_sharding_stage(cfg.zero), replicas, sb)
        states = {k: states[k] + shard_states[k] for k in states}
        fsdp = cfg.dp * cfg.cp > 1
        accumulates = p > 1 or (num_mb > 1 and cfg.zero <= 2)    # see launcher/runtime/train.py train_step
        accumulators, transient = memory.unsharded_grad_bytes(params, lc.params, sb, accumulates, fsdp)
        gathered_loss = memory.gathered_weight_bytes(params, cfg.zero, lc.params, sb, fsdp, root, during_backward=False)
        gathered_bwd = memory.gathered_weight_bytes(params, cfg.zero, lc.params, sb, fsdp, root, during_backward=True)
        # The sharded gradients: replaced by the fp32 accumulators while those exist (each block's reduce-scatter
        # frees its accumulator); else present from the first micro-batch's backward on, so at the last one's
        # loss only when there are several (optimizer.zero_grad(set_to_none=True) freed the last step's).
        grads = states.pop("gradients") - shard_states["gradients"]
        grads_common = (0.0 if accumulators else (grads if num_mb > 1 else 0.0)) + shard_states["gradients"]
        grads_backward = 0.0 if accumulators or num_mb > 1 else grads
        holds_loss = cfg.vocab_parallel or rank == (n_stages - 1) % p
        logits_loss = logits_kept = 0.0
        if holds_loss:   # GPipe keeps every earlier micro-batch's log-probabilities until its backward
            flight_loss = 2 if cfg.vocab_parallel else (num_mb if (cfg.schedule == "gpipe" and p > 1) else 1)
            logits_loss, logits_kept = vc.logits_peak, max(0, flight_loss - 1) * vc.logprob_saved
        pipeline = boundary_bytes * memory.pipeline_receive_buffers(p, rank, num_mb, v)
        common = {**states, "gradients": grads_common, "logits": logits_kept,
                  "buffers": gathered_loss + accumulators + pipeline}
        at_loss = {"logits": logits_loss}
        in_backward = {"gradients": grads_backward,     # (+ the block being re-materialised under recompute)
                       "buffers": gathered_bwd - gathered_loss + transient + (lc.act_full_layer if recomputes else 0.0)
                       + memory.sp_backward_workspace_bytes(cfg.micro_batch * train.seq_len / cfg.cp, model.hidden,
                                                            ctx.act_bytes, cfg.tp)}
        return common, at_loss, in_backward

    def rank_static_bytes(rank: int, layers: int, recomputes: bool = True) -> float:
        """The rank's peak without its blocks' saved activations (memory.step_peak_phases)."""
        common, at_loss, in_backward = rank_memory_phases(rank, layers, recomputes)
        return sum(common.values()) + memory.step_peak_phases(sum(at_loss.values()), sum(in_backward.values()))

    def act_bytes(rank: int, counts: dict[str, int]) -> float:
        return in_flight[rank] * sum(counts[m] * lc.act[m] for m in MODES)

    # Static memory as a linear upper bound in the number of blocks a rank holds, total(r, n) = base[r] +
    # n * slope[r] (the phase maximum is convex in n), with room for one re-materialised block; the reported
    # peak below is exact.
    def upper_slope(rank: int) -> float:
        (c0, a0, b0), (c1, a1, b1) = rank_memory_phases(rank, 0, True), rank_memory_phases(rank, 1, True)
        grows = [sum(x1.values()) - sum(x0.values()) for x0, x1 in ((c0, c1), (a0, a1), (b0, b1))]
        return grows[0] + max(0.0, grows[1], grows[2])

    base = [rank_static_bytes(r, 0) for r in range(p)]
    slope = [upper_slope(r) for r in range(p)]

    # Layer partition over virtual stages (balanced by time; memory enforced by recompute below).
    if partition is None:
        caps = _layer_caps(ctx, lc, base, slope, in_flight)
        if caps is None:
            need = min(base) + in_flight[0] * lc.act["full"] * model.layers / p
            return Rejection("OOM", "even full recompute does not fit", max(0.0, need - ctx.capacity_bytes))
        partition = balance_layers(model.layers, n_stages, layer_time, extra_time, caps, p)
        if partition is None:
            over = max(base[r] + in_flight[r] * lc.act["full"] * model.layers / n_stages for r in range(p))
            return Rejection("OOM", "no layer partition fits every stage's memory",
                             max(0.0, over - ctx.capacity_bytes))
    if len(partition) != n_stages or sum(partition) != model.layers:
        return Rejection("partition", f"partition {partition} does not cover {model.layers} layers")

    rank_layers = [sum(partition[j] for j in range(r, n_stages, p)) for r in range(p)]

    # Recompute per pipeline rank: minimal recompute time that fits its memory.
    choices: list[RecomputeChoice] = []
    for r in range(p):
        static = base[r] + rank_layers[r] * slope[r]   # (with room for one block re-materialised by recompute)
        budget = ctx.capacity_bytes / (1 + memory.ALLOCATOR_MARGIN) - static
        if recompute_counts is not None:
            counts = _rank_counts(recompute_counts, r, p, n_stages)
            choice = RecomputeChoice(counts, sum(counts[m] * lc.recompute[m] for m in MODES),
                                     act_bytes(r, counts))
        else:
            choice = choose_recompute(rank_layers[r], in_flight[r], lc.act, lc.recompute, budget, cfg.recompute)
            if choice is None:
                need = static + act_bytes(r, {"none": 0, "selective": 0, "full": rank_layers[r]})
                over = need * (1 + memory.ALLOCATOR_MARGIN) - ctx.capacity_bytes
                return Rejection("OOM", f"pipeline rank {r} needs {need / GIB:.1f} GiB", max(0.0, over))
        choices.append(choice)

    # Per-rank micro-batch compute time, the pipeline's makespan and the p2p on its critical path.
    rank_time = []
    for r in range(p):
        t = rank_layers[r] * layer_time + choices[r].time
        t += sum(extra_time[j] for j in range(r, n_stages, p))
        rank_time.append(t)
    slowest = max(rank_time)
    sharing = compute.busy_speedup_table(cluster)
    # ranks share cores: one idle in a bubble speeds the others up (schedule_sim.py; torch's interleaved order
    # is the one simulated where micro-batches fill whole rounds, what the search generates)
    if sharing and p > 1 and (cfg.schedule != "interleaved" or num_mb % p == 0):
        speed = shared_host_speed(sharing, cluster.gpus_per_node, p, comm.group_stride(cfg.mesh_order, degrees, "pp"))
        # a vocabulary pass runs on the last rank and on helper threads beside the others' ops (simulated as
        # such, so out of the ops' own times)
        vocab_pass = vc.pass_time if cfg.vocab_parallel else 0.0
        makespan = schedule_sim.shared_makespan(cfg.schedule, [t - vocab_pass for t in rank_time], num_mb, v,
                                                lc.fwd / layer_time, speed, vocab_pass)
    else:
        makespan = pipeline_makespan(cfg.schedule, rank_time, num_mb, v)
    pp_comm = pipeline_p2p_exposed(cfg.schedule, rank_time, num_mb, v, hop)
    pipeline = makespan + pp_comm + vc.edges_comm + vc.edges_compute
    bubble = max(0.0, makespan - num_mb * slowest)

    # Data-parallel / ZeRO traffic, per rank, with its overlap window (comm.exposed_time: what sticks out of
    # the window plus the measured share of what runs beside it).
    shown = comm.overlap_exposed_fraction(cluster)

    def exposed(comm_s: float, window_s: float) -> float:
        return comm.exposed_time(comm_s, window_s, shown)

    def tail(comm_s: float) -> float:
        """The part after the last layer's compute (no window at all); already inside ``exposed`` as far as
        the measured share shows a collective anyway (at 1, all of it)."""
        return comm_s * max(0.0, 1.0 - shown)

    # Where ranks time-slice shared cores, each collective call also costs the wait for the last rank to
    # reach it (comm.meeting_time, measured; 0 on GPUs): per call, after a layer's forward or backward.
    meet_fwd, meet_bwd = comm.meeting_time(cluster, lc.fwd, replicas), comm.meeting_time(cluster, lc.bwd, replicas)

    def gradient_meetings(units: int) -> float:
        """The meeting cost of one step's gradient reduction over ``units`` communication units. Without a
        pipeline each unit reduces after its own layer's backward: ``units`` meetings after a layer. Under
        torch.distributed.pipelining the reduction is one REDUCE_GRAD action after the stage's last backward
        (PipelineStage.perform_reduce_grad), the units back to back: the replicas meet once, after a whole
        step apart -- a segment of the pipeline's makespan, which meeting_time holds within the segments the
        profile measured (benchmarks/replica_drift.py: the drift grows far slower than the segment past them)
        -- and the other units follow at once (the shortest segment). Measured inside a dp2 pp2 step
        (benchmarks/dp_reduce_wait.py): the later replica arrives 0.047 s after the replicas' mean."""
        if p == 1:
            return meet_after_step + (units - 1) * meet_bwd
        return meet_after_step + (units - 1) * meet_next

    meet_after_step = comm.meeting_time(cluster, makespan, replicas)
    meet_next = comm.meeting_time(cluster, 0.0, replicas)

    def drain_after_last_backward(rank: int) -> float:
        """Seconds pipeline rank ``rank`` has left after its own last backward while the pipeline drains:
        in every schedule the runtime runs (GPipe, 1F1B, interleaved) a rank's last op is the last
        micro-batch's backward of its first chunk (stage ``rank``; schedule_sim.pipeline_ops), which then
        runs through stages ``rank - 1 .. 0``, one hop before each. Under ``pipeline_grad_sync ==
        "after_schedule"`` that is the only time a stage's gradient reduction can hide in: rank 0, finishing
        last, shows all of it."""
        return sum(partition[j] * lc.bwd + choices[j].time * partition[j] / max(1, rank_layers[j])
                   for j in range(rank)) + rank * hop

    after_schedule = p > 1 and ctx.pipeline_grad_sync == "after_schedule"

    def reduction_tail(comm_s: float) -> float:
        """``tail`` of the gradient reduction: none after the schedule, where its window is the drain."""
        return 0.0 if after_schedule else tail(comm_s)

    dp_stride = min(comm.group_stride(cfg.mesh_order, degrees, "dp"), comm.group_stride(cfg.mesh_order, degrees, "cp"))
    alpha_beta = {"all_reduce": comm.allreduce_time, "reduce_scatter": comm.reducescatter_time,
                  "all_gather": comm.allgather_time}

    def per_unit_measured(collective: str, bytes_per_param: float, blocks: int, root_params: float):
        """``(seconds, last call's seconds)`` of a step's ``collective`` over the data-parallel group, one call
        per communication unit as the runtime's replicate / FSDP2 make them (``blocks`` blocks, then the root
        when it holds parameters), each as the profile timed that size with every replica group of this shape
        at once (comm.measured_collective_time). None without such a table."""
        block = comm.measured_collective_time(cluster, collective, replicas, dp_stride, bytes_per_param * lc.params)
        if block is None:
            return None
        root = (comm.measured_collective_time(cluster, collective, replicas, dp_stride, bytes_per_param * root_params)
                if root_params > 0 else None)
        if root is None:
            return blocks * block, block
        return blocks * block + root, root

    dp_exposed = []
    for r in range(p):
        root_params = rank_root_params(r)
        params = root_params + rank_layers[r] * lc.params
        layers = max(1, rank_layers[r])
        bwd_mb = rank_layers[r] * lc.bwd
        fwd_mb = rank_layers[r] * lc.fwd
        grads = sb.grad * params
        # communication units (parallelize.apply_dp): each block, and the root when it holds parameters
        units = rank_layers[r] + (1 if root_params > 0 else 0)

        def step_collective(collective: str, bytes_per_param: float) -> float:
            """One step's ``collective`` of every unit's ``bytes_per_param * params``: per unit as measured
            where the profile timed it, else the alpha-beta time of all of it in one call."""
            measured = per_unit_measured(collective, bytes_per_param, rank_layers[r], root_params)
            if measured is not None:
                return measured[0]
            return alpha_beta[collective](bytes_per_param * params, dp_link)

        if replicas == 1:
            dp_exposed.append(0.0)
            continue
        # the gradient reduction's window: the last micro-batch's backward, or (one REDUCE_GRAD after the
        # stage's last backward) the rank's drain
        reduce_window = drain_after_last_backward(r) if after_schedule else bwd_mb
        if cfg.zero == 0:
            # DDP: one all-reduce of the gradients, bucketed under the last micro-batch's backward; the last
            # bucket cannot overlap. The runtime's replicate reduces per unit (units calls, the root last):
            # where the profile timed that, each call as measured and the root's call the last bucket.
            measured = per_unit_measured("all_reduce", sb.grad, rank_layers[r], root_params)
            if measured is not None:
                total, last_bucket = measured[0] + gradient_meetings(units), measured[1]
            else:
                total = comm.allreduce_time(grads, dp_link) + gradient_meetings(units)
                last_bucket = comm.allreduce_time(min(grads, memory.DDP_BUCKET_BYTES), dp_link)
            dp_exposed.append(exposed(total, reduce_window) + reduction_tail(last_bucket))
        elif cfg.zero == 1:
            # Sharded optimizer (Megatron's distributed optimizer): reduce-scatter the gradients under the
            # last backward, all-gather the updated 16-bit weights under the next forward.
            rs = step_collective("reduce_scatter", sb.grad) + gradient_meetings(units)
            ag = step_collective("all_gather", sb.compute_copy or sb.param) + units * meet_fwd
            dp_exposed.append(exposed(rs, reduce_window) + exposed(ag, fwd_mb) + reduction_tail(rs / layers)
                              + tail(ag / layers))
        elif cfg.zero == 2 or p > 1:
            # FSDP2 with gradients accumulated unsharded and reduce-scattered once per step (ZeRO-2 always;
            # ZeRO-3 under a pipeline, where torch.distributed.pipelining defers gradient sync to the last
            # micro-batch). ZeRO-2 keeps weights gathered for the whole step (one all-gather); ZeRO-3 gathers
            # each layer before its forward and backward in every micro-batch, prefetched one layer ahead.
            rs = step_collective("reduce_scatter", sb.grad) + gradient_meetings(units)
            ag = step_collective("all_gather", sb.compute_copy or sb.param)
            shows = exposed(rs, reduce_window) + reduction_tail(rs / layers)
            if cfg.zero == 2:
                ag += units * meet_fwd
                shows += exposed(ag, fwd_mb) + tail(ag / layers)
            else:
                shows += num_mb * (exposed(ag + units * meet_fwd, fwd_mb) + exposed(ag + rank_layers[r] * meet_bwd,
                                                                                   bwd_mb) + tail(2 * ag / layers))
            dp_exposed.append(shows)
        else:
            # FSDP2 ZeRO-3 without a pipeline: per micro-batch, all-gather each layer's weights before its
            # forward and backward and reduce-scatter its gradients after backward, prefetched one layer ahead.
            ag = step_collective("all_gather", sb.compute_copy or sb.param)
            rs = step_collective("reduce_scatter", sb.grad)
            per_mb = (exposed(ag + units * meet_fwd, fwd_mb) + exposed(ag + rs + (rank_layers[r] + units) * meet_bwd,
                                                                       bwd_mb) + tail((2 * ag + rs) / layers))
            dp_exposed.append(num_mb * per_mb)
    dp_time = max(dp_exposed)

    # Optimizer step: Adam reads param, grad, two moments and writes param and moments (28 B/param, fp32),
    # over the rank's shard; plus the gradient-norm read (4 B/param).
    # Measured instead where the profile timed the runtime's optimizer step (compute.measured_optimizer_...).
    rates = compute.achieved_rates(cluster, train.precision)
    opt_bytes = (28 if sb.optimizer == 8 else 20) + 4
    per_param = compute.measured_optimizer_seconds_per_param(cluster, train.precision, train.optimizer, cfg.tp)
    if per_param is None:
        per_param = opt_bytes / rates.memory
    opt_time = max(((rank_root_params(r) + rank_layers[r] * lc.params)
                    / (replicas if cfg.zero >= 1 else 1) + vocab_shard_params) * per_param
                   for r in range(p))

    iteration = pipeline + dp_time + opt_time

    # Memory per rank and the worst one: what is live at each rank's peak.
    def rank_peak_detail(r: int) -> dict[str, float]:
        recomputes = bool(choices[r].counts["full"] or choices[r].counts["selective"])
        common, at_loss, in_backward = rank_memory_phases(r, rank_layers[r], recomputes)
        phase = at_loss if sum(at_loss.values()) >= sum(in_backward.values()) else in_backward
        entry = {k: common.get(k, 0.0) + phase.get(k, 0.0)
                 for k in ("parameters", "gradients", "optimizer", "logits", "buffers")}
        entry["activations"] = choices[r].act_bytes
        accumulates = p > 1 or (num_mb > 1 and cfg.zero <= 2)
        if cfg.schedule == "interleaved" and v > 1:
            # replay the rank's operations: chunks differ in size and create their accumulators late
            stages = list(range(r, n_stages, p))
            acts = [sum(_split_counts(choices[r].counts, partition, j, p, n_stages)[m] * lc.act[m] for m in MODES)
                    for j in stages]
            chunk_params = [partition[j] * lc.params          # FSDP2's units (the vocabulary shard is not one)
                            + (vc.first_params if j == 0 else 0.0) + (vc.last_params if j == n_stages - 1 else 0.0)
                            for j in stages]
            fsdp = cfg.dp * cfg.cp > 1
            accs = [memory.unsharded_grad_bytes(x, lc.params, sb, accumulates, fsdp)[0] for x in chunk_params]
            shards = [memory.model_state_bytes(x, memory.runtime_sharding_stage(cfg.zero), replicas, sb)["gradients"]
                      if a else 0.0 for x, a in zip(chunk_params, accs)]
            ops = memory.interleaved_1f1b_order(p, r, num_mb, v)
            _, live, accumulated, extra = memory.schedule_peak(ops, acts, accs, shards, [sum(at_loss.values())] * v,
                                                               sum(in_backward.values()))
            phase = at_loss if extra == sum(at_loss.values()) and extra > 0 else in_backward
            entry = {k: common.get(k, 0.0) + phase.get(k, 0.0)
                     for k in ("parameters", "gradients", "optimizer", "logits", "buffers")}
            entry["buffers"] += accumulated - sum(accs)
            entry["activations"] = live
        return {k: entry[k] for k in ("parameters", "gradients", "optimizer", "activations", "logits", "buffers")}

    def rank_detail(r: int) -> dict[str, float]:
        entry = rank_peak_detail(r)
        entry["margin"] = memory.ALLOCATOR_MARGIN * sum(entry.values())
        return entry

    peaks = [sum(rank_peak_detail(r).values()) * (1 + memory.ALLOCATOR_MARGIN) for r in range(p)]
    worst = max(range(p), key=lambda r: peaks[r])
    if peaks[worst] > ctx.capacity_bytes:
        return Rejection("OOM", f"pipeline rank {worst} peaks at {peaks[worst] / GIB:.1f} GiB",
                         peaks[worst] - ctx.capacity_bytes)

    n_layers_total = sum(rank_layers)
    tp_comm = lc.tp_comm * n_layers_total / p * num_mb
    cp_comm = lc.cp_comm * n_layers_total / p * num_mb
    recompute_total = max(c.time for c in choices) * num_mb
    compute_total = (makespan + vc.edges_compute - bubble - tp_comm - cp_comm - recompute_total
                     - vc.vocab_comm * num_mb)
    breakdown = {"compute": compute_total, "recompute": recompute_total, "tp_comm": tp_comm, "cp_comm": cp_comm,
                 "pp_comm": pp_comm, "vocab_comm": vc.vocab_comm * num_mb + vc.edges_comm, "dp_comm": dp_time,
                 "bubble": bubble, "optimizer": opt_time}
    return Evaluation(cfg, iteration, peaks[worst], list(partition), [c.counts for c in choices], peaks,
                      list(zip(base, slope)), breakdown, rank_detail)


def _layer_caps(ctx, lc, base, slope, in_flight) -> list[int] | None:
    """The most blocks each pipeline rank can hold with full recompute (None if the ranks together cannot
    hold the model)."""
    capacity = ctx.capacity_bytes / (1 + memory.ALLOCATOR_MARGIN)
    caps = []
    for r in range(len(base)):
        per_layer = slope[r] + in_flight[r] * lc.act["full"]
        room = capacity - base[r]
        caps.append(max(0, int(room // per_layer)) if per_layer > 0 else ctx.model.layers)
    if sum(caps) < ctx.model.layers:
        return None
    return caps


def _rank_counts(stage_counts: list[dict[str, int]], rank: int, p: int, n_stages: int) -> dict[str, int]:
    total = {m: 0 for m in MODES}
    for j in range(rank, n_stages, p):
        for m in MODES:
            total[m] += stage_counts[j].get(m, 0)
    return total


def _split_counts(counts: dict[str, int], partition: list[int], stage: int, p: int, n_stages: int) -> dict[str, int]:
    """Hand a rank's recompute counts to its virtual stages in order: full first, then selective."""
    remaining = dict(counts)
    result = {m: 0 for m in MODES}
    for j in range(stage % p, n_stages, p):
        layers = partition[j]
        take = {}
        for m in ("full", "selective", "none"):
            take[m] = min(remaining[m], layers - sum(take.values()))
            remaining[m] -= take[m]
        if j == stage:
            result = take
            break
    return result


def to_plan(ev: Evaluation, ctx: Context, notes: list[str] | None = None, search: dict | None = None) -> Plan:
    cfg, train = ev.config, ctx.train
    num_mb = train.global_batch // (cfg.dp * cfg.micro_batch)
    device_peak = ctx.cluster.gpu.peak_flops(train.precision)
    model_flops = flops.model_flops_per_iteration(ctx.model, train.seq_len, train.global_batch)
    tflops = model_flops / ev.iteration_s / ctx.cluster.world_size
    per_rank = ev.memory_gib()
    prediction = Prediction(
        iteration_s=ev.iteration_s, tokens_per_s=train.tokens / ev.iteration_s, tflops_per_gpu=tflops / 1e12,
        mfu=tflops / device_peak, peak_memory_gib=ev.peak_bytes / GIB, time_breakdown_s=ev.time_breakdown,
        memory_breakdown_gib=per_rank[ev.worst_rank])
    kernels = {k: ("fused" if cfg.fused_kernels else "reference") for k in KERNEL_NAMES}
    search = dict(search or {})
    search.setdefault("stage_memory_gib", [{k: round(x, 4) for k, x in m.items()} for m in per_rank])
    return Plan(dp=cfg.dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, micro_batch=cfg.micro_batch, num_microbatches=num_mb,
                stages=tuple(ev.stages()), model=ctx.model, cluster=ctx.cluster, train=train, cp_kind=cfg.cp_kind,
                sequence_parallel=cfg.tp > 1, vocab_parallel=cfg.vocab_parallel,
                schedule=cfg.schedule if cfg.pp > 1 else "1f1b", virtual_stages=cfg.virtual_stages, zero=cfg.zero,
                tp_overlap=cfg.tp_overlap, compile=cfg.compile, kernels=kernels, mesh_order=cfg.mesh_order,
                predicted=prediction, notes=tuple(notes or ev.notes), search=search)

