"""Per-block time and memory: one transformer block, one micro-batch, one rank.

A block's forward is its GEMMs, its attention and its memory-bound ops (compute.py), plus the tensor- and
context-parallel communication on its critical path; its backward is twice the GEMMs and memory-bound ops,
the attention backward and the same communication. Recompute re-runs part or all of the forward; the saved
activations per recompute mode are memory.activation_bytes_per_layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from meshplan import rules
from meshplan.engines import MESHPLAN, Engine
from meshplan.spec import ClusterSpec, ModelSpec, TrainSpec
from meshplan.planner import comm, compute, flops, kernels, memory, moe
from meshplan.planner.comm import GroupLink
from meshplan.planner.host import HostModel, host_model
from meshplan.planner.inputs import MODES, Config, Context


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
    expert_params: float = 0.0      # of ``params``: the routed experts' (sharded over the expert-data-parallel group)
    ep_comm: float = 0.0            # exposed seconds (fwd + bwd) of the experts' all-to-all and expert-TP collectives
    imbalance: float = 1.0          # the MoE load factor applied (moe.default_imbalance or the pin)

    @property
    def dense_params(self) -> float:
        """Parameters the data x context group shares (all but the routed experts)."""
        return self.params - self.expert_params


@dataclass(frozen=True)
class BlockCompute:
    """Forward compute seconds of one block (attention backward too), each scaled by ``timed``: the
    profile's measured / modelled ratio for this very block (compute.measured_block_ratio; 1 elsewhere)."""

    matmul_fwd: float
    attn_fwd: float
    attn_bwd: float
    ew_fwd: float
    timed: float
    column_fwd: float = 0.0   # the column-parallel GEMMs (QKV, MLP-in) alone: their backward's windows


def config_layer_cost(ctx: Context, cfg: Config, moe_share: float | None = None) -> LayerCost:
    """The per-layer costs of ``cfg`` (cached on the context, keyed by the fields :func:`layer_cost` reads): the
    model's mean block, or with ``moe_share`` the mean of blocks of which that share are MoE blocks."""
    positional = (cfg.tp, cfg.cp, cfg.micro_batch, cfg.cp_kind, cfg.tp_overlap, cfg.compile or cfg.fused_kernels,
                  cfg.fused_kernels, cfg.mesh_order, cfg.dp, cfg.pp)
    # compile on its own too: with fused kernels it picks the kernel table's rows (kernels.block_kernel_rates)
    key = ("layer_cost", *positional, cfg.compile, cfg.sp, cfg.attention, cfg.ep, cfg.expert_tp, cfg.moe_imbalance,
           moe_share)
    memo = ctx.memo
    cost = memo.get(key)
    if cost is None:
        cost = memo[key] = layer_cost(ctx.model, ctx.cluster, ctx.train, *positional, engine=ctx.engine, sp=cfg.sp,
                                      attention=cfg.attention,
                                      experts=ExpertLayout(cfg.ep, cfg.expert_tp, cfg.moe_imbalance),
                                      moe_share=moe_share, op_rates=kernels.block_kernel_rates(ctx, cfg))
    return cost


def moe_share_of(model: ModelSpec, moe_share: float | None) -> float:
    """``moe_share``, or by default the model's share of MoE blocks (the mean block)."""
    if moe_share is not None:
        return moe_share
    return model.moe_layer_count / model.layers if model.moe is not None else 0.0


@dataclass(frozen=True)
class ExpertLayout:
    """How a mixture of experts is split (plan ``ep``, ``expert_tp``) and the load factor to price it with
    (None: moe.default_imbalance)."""

    ep: int = 1
    expert_tp: int = 1
    imbalance: float | None = None


DENSE = ExpertLayout()


@lru_cache(maxsize=4096)
def layer_cost(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tp: int, cp: int, micro_batch: int,
               cp_kind: str, tp_overlap: bool, fused_elementwise: bool, fused_swiglu: bool,
               mesh_order: tuple[str, ...], dp: int, pp: int, engine: Engine = MESHPLAN, sp: bool = True,
               attention: str = "flash", experts: ExpertLayout = DENSE,
               moe_share: float | None = None, op_rates: tuple[tuple[str, float], ...] = ()) -> LayerCost:
    """Time and memory of one block for one micro-batch on one rank, as ``engine`` runs it
    (meshplan/engines.py). ``fused_elementwise``: norms, rotary, activation and residual ops run fused
    (compiled or fused kernels); ``fused_swiglu``: the SwiGLU kernel that recomputes silu in backward (saves
    one f-wide tensor); ``op_rates``: the measured rates of the memory-bound ops' chosen kernels
    (planner/kernels.py block_kernel_rates); ``sp``: sequence parallel, in effect where tp > 1;
    ``attention``: ``flash`` or ``unfused`` (plan.attention).

        fwd = matmul + attention + elementwise + tp + cp        (exposed communication, each direction)
        bwd = 2 matmul + attention_bwd + 2 elementwise + tp + cp
    A model with experts has these of the mean block: :func:`moe_block_delta` in the share of MoE blocks
    (``moe_share``: of a rank's own blocks; by default the model's)."""
    host = host_model(cluster)
    act_bytes = memory.ACT_BYTES[train.precision]
    tokens = micro_batch * train.seq_len / cp
    sp = sp and tp > 1
    degrees = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
    c = block_compute(model, cluster, train, tp, cp, micro_batch, fused_elementwise, engine.attention_kernel, sp,
                      attention, op_rates)
    estimate = c.matmul_fwd + c.attn_fwd + c.ew_fwd
    tp_link = comm.group_link(cluster, tp, comm.group_stride(mesh_order, degrees, "tp"))
    activation = tokens * model.hidden * act_bytes
    gathered = activation * gather_bytes_ratio(engine, train.precision, act_bytes)
    if sp:
        tp_fwd, tp_bwd = tp_comm_time(activation, gathered, tp, tp_link, tp_overlap, estimate, c, cluster, host,
                                      engine)
    else:
        tp_fwd, tp_bwd = tp_allreduce_time(activation, tp, tp_link, estimate, c, cluster, host, engine)
    cp_link = comm.group_link(cluster, cp, comm.group_stride(mesh_order, degrees, "cp"))
    attn_fwd, attn_bwd = c.attn_fwd, c.attn_bwd
    if cp == 1:
        cp_fwd = cp_bwd = 0.0
    elif cp_kind == "ulysses":
        cp_fwd = cp_bwd = ulysses_time(model, tokens, tp, cp, cp_link, act_bytes, estimate, host)
    else:
        cp_fwd, cp_bwd = ring_flash_time(model, tokens, tp, cp, cp_link, act_bytes, c.attn_fwd, c.attn_bwd,
                                         comm.overlap_exposed_fraction(cluster))
    fwd_compute = c.matmul_fwd + attn_fwd + c.ew_fwd
    fwd = fwd_compute + tp_fwd + cp_fwd
    bwd = 2 * c.matmul_fwd + attn_bwd + 2 * c.ew_fwd + tp_bwd + cp_bwd
    params, expert_params, ep_comm, imbalance = layer_params_per_rank(model, tp), 0.0, 0.0, 1.0
    if model.moe is not None:
        rates = compute.achieved_rates(cluster, train.precision)
        mb = moe_of(model, cluster, train, tokens, tp, sp, degrees, mesh_order, experts, fused_swiglu)
        d_fwd, d_bwd, d_tp = moe_block_delta(model, train, tokens, tp, sp, c, mb, tp_fwd, tp_bwd, fused_swiglu,
                                             rates)
        share = moe_share_of(model, moe_share)
        fwd, bwd, tp_fwd, tp_bwd = fwd + share * d_fwd, bwd + share * d_bwd, tp_fwd - share * d_tp, tp_bwd - share * d_tp
        ep_comm = share * 2 * (mb.a2a + mb.etp_comm)
        params += share * (mb.expert_params + mb.other_params - flops.mlp_params_per_layer(model) / tp)
        expert_params, imbalance = share * mb.expert_params, mb.imbalance
    recompute_cost = recompute_seconds(model, cluster, train, tokens, tp, c, gathered, tp_link, tp_overlap, fwd,
                                       engine, attn_fwd + cp_fwd, sp)
    if model.moe is not None and engine.selective_recompute == "meshplan":
        recompute_cost["selective"] += share * moe_selective_delta(model, train, tokens, tp, sp, c, mb, experts.ep,
                                                                   fused_swiglu, rates)
    acts = {mode: block_activation_bytes(model, train.seq_len, micro_batch, tp, cp, act_bytes, fused_swiglu, mode,
                                         engine.sp_saved_input, engine.selective_recompute, sp,
                                         attention == "flash", experts=experts, imbalance=imbalance,
                                         moe_share=moe_share)
            for mode in MODES}
    return LayerCost(fwd=fwd, bwd=bwd, recompute=recompute_cost, act=acts, act_full_layer=acts["none"],
                     params=params, tp_comm=tp_fwd + tp_bwd, cp_comm=cp_fwd + cp_bwd,
                     matmul_fwd=c.matmul_fwd, expert_params=expert_params, ep_comm=ep_comm, imbalance=imbalance)


def expert_group_link(cluster: ClusterSpec, mesh_order: tuple[str, ...], degrees: dict[str, int],
                      ep: int) -> GroupLink:
    """The link of an EP group: ``ep`` consecutive members of the data x context group (plan.ep), strided as
    its innermost dimension."""
    return comm.group_link(cluster, ep, data_context_stride(mesh_order, degrees))


def data_context_stride(mesh_order: tuple[str, ...], degrees: dict[str, int]) -> int:
    """The rank distance of neighbours in the flattened data x context group: the stride of its inner
    dimension of more than one rank."""
    used = [comm.group_stride(mesh_order, degrees, d) for d in ("dp", "cp") if degrees[d] > 1]
    return min(used) if used else 1


def moe_of(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tokens: float, tp: int, sp: bool,
           degrees: dict[str, int], mesh_order: tuple[str, ...], experts: ExpertLayout,
           fused_swiglu: bool) -> moe.MoEBlock:
    """The MoE block (moe.moe_block) of this layout (``degrees``: dp, tp, pp, cp)."""
    ep_link = expert_group_link(cluster, mesh_order, degrees, experts.ep)
    tp_link = comm.group_link(cluster, tp, comm.group_stride(mesh_order, degrees, "tp"))
    return moe.moe_block(model, tokens, tp, sp, experts.ep, experts.expert_tp, ep_link, tp_link,
                         compute.achieved_rates(cluster, train.precision), memory.ACT_BYTES[train.precision],
                         fused_swiglu, experts.imbalance)


def moe_block_delta(model: ModelSpec, train: TrainSpec, tokens: float, tp: int, sp: bool, c: BlockCompute,
                    mb: moe.MoEBlock, tp_fwd: float, tp_bwd: float, fused_swiglu: bool,
                    rates: compute.Rates) -> tuple[float, float, float]:
    """(forward, backward, TP seconds each direction no longer spent) of an MoE block over the dense block:
        + experts, router and shared experts (moe.moe_block), the dispatch / combine and expert-TP collectives
        - the dense MLP's GEMMs (compute.layer_matmul_shapes' MLP pair) and its activation function's traffic
        - under sequence parallel without shared experts, the dense MLP's all-gather and reduce-scatter
          (half the block's TP collectives): the routed experts take the sequence-parallel shard as it is
    GEMMs and memory traffic scale by the profile's measured ratio of the block (``c.timed``)."""
    shapes = compute.layer_matmul_shapes(model, tokens, tp)[2:]
    act_passes = (3 if fused_swiglu else 5) if model.mlp == "swiglu" else 2
    dense = (sum(compute.matmul_time(m, k, n, rates) for m, k, n in shapes)
             + act_passes * tokens * model.ffn_hidden / tp * memory.ACT_BYTES[train.precision] / rates.memory)
    work = mb.gemm_fwd + mb.memory_fwd - dense
    comm_s = mb.a2a + mb.etp_comm
    saved_tp = 0.5 if sp and tp > 1 and not model.moe.shared_ffn_hidden else 0.0
    return (c.timed * work + comm_s - saved_tp * tp_fwd, c.timed * 2 * work + comm_s - saved_tp * tp_bwd,
            saved_tp * tp_fwd)


def moe_selective_delta(model: ModelSpec, train: TrainSpec, tokens: float, tp: int, sp: bool, c: BlockCompute,
                        mb: moe.MoEBlock, ep: int, fused_swiglu: bool, rates: compute.Rates) -> float:
    """Seconds meshplan's selective recompute re-runs in an MoE block beyond the dense block's
    (:func:`selective_seconds`):
        + the MoE MLP's matmuls whose outputs are not kept (moe.selective_matmuls), its memory traffic
          (router scores, permutes, SwiGLU) and the dispatch and combine all-to-alls (not on the save list)
        - the dense MLP's re-run w3 GEMM and its activation function's traffic
    GEMMs and memory traffic scale by the profile's measured ratio of the block (``c.timed``)."""
    routed = tokens / (tp if sp else 1)
    act_bytes = memory.ACT_BYTES[train.precision]
    grouped = rules.grouped_expert_gemms(act_bytes, model.hidden, model.moe.expert_ffn_hidden)
    _, rerun = moe.selective_matmuls(model, routed, mb.routed_rows, model.moe.experts // ep, grouped)
    work = moe.sequence_time(rerun, rates) + mb.memory_fwd
    if model.mlp == "swiglu":
        work -= (compute.matmul_time(tokens, model.hidden, model.ffn_hidden / tp, rates)
                 + (3 if fused_swiglu else 5) * tokens * model.ffn_hidden / tp * act_bytes / rates.memory)
    return c.timed * work + mb.a2a + mb.etp_comm


def gather_bytes_ratio(engine: Engine, precision: str, act_bytes: int) -> float:
    """Bytes a column-parallel input all-gather moves per byte of the 16-bit activation: under fp8 the engines
    that cast before gathering (``engine.fp8_allgather``: torchao Float8ColwiseParallel, Transformer Engine's
    fp8 LayerNormLinear) move 1 byte an element; 1 otherwise."""
    return 1.0 / act_bytes if precision == "fp8" and engine.fp8_allgather else 1.0


def block_compute(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tp: int, cp: int, micro_batch: int,
                  fused_elementwise: bool, attention_kernel: str = "flash2", sp: bool = True,
                  attention: str = "flash", kernel_rates: tuple[tuple[str, float], ...] = ()) -> BlockCompute:
    """The block's GEMMs (compute.layer_matmul_shapes), attention (flash: compute.attention_time; unfused:
    compute.unfused_attention_time) and memory-bound ops (compute.elementwise_bytes_by_op at the memory rate,
    those in ``kernel_rates`` at their kernel's measured rate, planner/kernels.py; split by tp
    outside the TP region under sequence parallel ``sp``, in effect where tp > 1), forward; where
    the profile timed this block (cp = 1), its measured / modelled ratio corrects the fitted parts."""
    rates = compute.achieved_rates(cluster, train.precision, attention_kernel)
    act_bytes = memory.ACT_BYTES[train.precision]
    seq = train.seq_len
    tokens = micro_batch * seq / cp
    timed = compute.measured_block_ratio(cluster, train.precision, tp, micro_batch, seq) if cp == 1 else 1.0
    gemms = [timed * compute.matmul_time(m, k, n, rates) for m, k, n in compute.layer_matmul_shapes(model, tokens, tp)]
    if attention == "unfused":
        attention_s = compute.unfused_attention_time(model, micro_batch, seq, tp, rates, act_bytes)
    else:
        attention_s = compute.attention_time(model, micro_batch, seq, tp, cp, rates)
    attn_fwd, attn_bwd = (timed * t for t in attention_s)
    moved = compute.elementwise_bytes_by_op(model, tokens, tp, sp and tp > 1, fused_elementwise, act_bytes)
    ew_fwd = timed * compute.elementwise_seconds(moved, rates.memory, kernel_rates)
    return BlockCompute(sum(gemms), attn_fwd, attn_bwd, ew_fwd, timed, gemms[0] + gemms[2])


def tp_comm_time(activation: float, gathered: float, tp: int, tp_link: GroupLink, tp_overlap: bool,
                 compute_estimate: float, c: BlockCompute, cluster: ClusterSpec, host: HostModel,
                 engine: Engine = MESHPLAN) -> tuple[float, float]:
    """Exposed tensor-parallel seconds (forward, backward) of one block under sequence parallel (Korthikanti et
    al. 2022, fig. 5). Forward: 2 all-gathers of the column-parallel inputs (``gathered`` bytes: 16-bit, or
    fp8 where the engine gathers fp8) + 2 reduce-scatters of the [s, b, h] ``activation``. Backward: 2
    all-gathers of the row-parallel output gradients + 2 reduce-scatters of the column-parallel input
    gradients, and where the engine keeps the sharded input (``sp_saved_input == "sharded"``, Megatron) 2 more
    all-gathers regathering it (:func:`tp_backward_time`). Each call is a meeting after about a quarter of the
    block (host.meeting). With TP overlap (Megatron's userbuffers, torchtitan's async TP) every collective is
    decomposed into tp chunks under its GEMM (:func:`decomposed_exposed`)."""
    if tp <= 1:
        return 0.0, 0.0
    ag, ag_in = comm.allgather_time(activation, tp_link), comm.allgather_time(gathered, tp_link)
    rs = comm.reducescatter_time(activation, tp_link)
    meetings = 4 * host.meeting(compute_estimate / 4, tp)
    regather = 2 * ag_in if engine.sp_saved_input == "sharded" else 0.0
    shown = comm.overlap_exposed_fraction(cluster)
    if tp_overlap:
        return (decomposed_exposed(2 * ag_in + 2 * rs, c.matmul_fwd, tp, shown) + meetings,
                decomposed_exposed(2 * ag + 2 * rs + regather, 2 * c.matmul_fwd, tp, shown) + meetings)
    fwd = 2 * ag_in + 2 * rs + meetings
    return fwd, tp_backward_time(ag, rs, regather, c.column_fwd, engine.tp_backward_async, shown) + meetings


def tp_backward_time(ag: float, rs: float, regather: float, column_fwd: float, is_async: bool,
                     shown: float) -> float:
    """Exposed backward tensor-parallel seconds without TP overlap: 2 all-gathers (``ag`` each) and 2
    reduce-scatters (``rs``) plus the ``regather`` all-gathers. Where the engine issues the column-parallel
    backward's collectives asynchronously (Megatron's LinearWithGradAccumulationAndAsyncCommunication: the
    input all-gather runs under the input-gradient GEMM, the gradient reduce-scatter under the weight-gradient
    GEMM, each GEMM as long as the forward's ``column_fwd``), those show only past their GEMMs:
        2 ag + exposed(regather, column_fwd) + exposed(2 rs, column_fwd)
    else everything waits: 2 ag + 2 rs + regather."""
    if not is_async:
        return 2 * ag + 2 * rs + regather
    return 2 * ag + comm.exposed_time(regather, column_fwd, shown) + comm.exposed_time(2 * rs, column_fwd, shown)


def tp_allreduce_time(activation: float, tp: int, tp_link: GroupLink, compute_estimate: float, c: BlockCompute,
                      cluster: ClusterSpec, host: HostModel, engine: Engine = MESHPLAN) -> tuple[float, float]:
    """Exposed tensor-parallel seconds (forward, backward) of one block without sequence parallel (Shoeybi et
    al. 2019, fig. 3: the f and g operators): forward 2 all-reduces of the [s, b, h] ``activation`` (after the
    attention output projection and the MLP's down projection), backward 2 all-reduces of the column-parallel
    input gradients. Where the engine issues them asynchronously (Megatron's
    LinearWithGradAccumulationAndAsyncCommunication: the input-gradient all-reduce runs under the
    weight-gradient GEMM, as long as the forward's column GEMMs) the backward's show only past that window.
    Each call is a meeting after about a quarter of the block (host.meeting)."""
    if tp <= 1:
        return 0.0, 0.0
    ar = comm.allreduce_time(activation, tp_link)
    meetings = 4 * host.meeting(compute_estimate / 4, tp)
    if engine.tp_backward_async:
        backward = comm.exposed_time(2 * ar, c.column_fwd, comm.overlap_exposed_fraction(cluster))
    else:
        backward = 2 * ar
    return 2 * ar + meetings, backward + meetings


def decomposed_exposed(comm_s: float, window_s: float, tp: int, shown: float = 0.0) -> float:
    """Seconds a collective decomposed into ``tp`` chunks beside the chunks of the GEMM it feeds (or is fed by)
    adds: the first (all-gather) or last (reduce-scatter) chunk has no GEMM chunk beside it, the other
    tp - 1 run under the ``window_s`` of GEMM (Wang et al. 2023, "Overlap communication with dependent
    computation via decomposition"; Megatron's --tp-comm-overlap through Transformer Engine userbuffers and
    torchtitan's async TP, torch's fused_all_gather_matmul / fused_matmul_reduce_scatter, both split this way):
        c / tp + exposed(c (tp - 1) / tp, window)"""
    if comm_s <= 0:
        return 0.0
    return comm_s / tp + comm.exposed_time(comm_s * (tp - 1) / tp, window_s, shown)


def ulysses_time(model: ModelSpec, tokens: float, tp: int, cp: int, cp_link: GroupLink, act_bytes: int,
                 compute_estimate: float, host: HostModel) -> float:
    """Seconds of Ulysses context parallelism per direction (Jacobs et al. 2023): all-to-all of q, k, v before
    attention and of the output after, two meetings about half a block apart. K and V travel at their own
    (grouped) width, or at the query width where cp does not divide the rank's key/value heads
    (launcher/runtime/context_parallel.py UlyssesAttention repeats them first)."""
    kv_local_heads = flops.kv_heads_per_rank(model, tp)
    if kv_local_heads % cp:     # fewer key/value heads than cp ranks: repeated to the query heads first
        kv_local_heads = model.heads / tp
    kv_local_width = kv_local_heads * model.head_dim
    qkv_local = tokens * (model.q_width / tp + 2 * kv_local_width) * act_bytes
    out_local = tokens * model.q_width / tp * act_bytes
    return (comm.alltoall_time(qkv_local, cp_link) + comm.alltoall_time(out_local, cp_link)
            + 2 * host.meeting(compute_estimate / 2, cp))


def ring_flash_time(model: ModelSpec, tokens: float, tp: int, cp: int, cp_link: GroupLink, act_bytes: int,
                    attn_fwd: float, attn_bwd: float, shown: float = 0.0) -> tuple[float, float]:
    """Exposed ``(cp forward, cp backward)`` seconds of ring attention on flash kernels with load-balanced
    chunks (Megatron --cp-comm-type p2p: Transformer Engine AttnFuncWithCPAndKVP2P, each rank holding chunks
    i and 2cp-1-i; torchtitan: torch's context_parallel with its head-tail load balancer; meshplan's runtime:
    context_parallel._RingAttention, zig-zag chunks). ``shown``: the share of overlapped communication that
    still shows (comm.overlap_exposed_fraction; 0 on GPUs). The rank's
    attention (``attn_fwd``, ``attn_bwd``: causal work / cp, compute.attention_time) runs in cp steps; before
    each of the cp - 1 later steps the next rank's 16-bit K, V chunk (kv heads only) arrives, sent during the
    current step, so a hop shows only past its step:
        forward   (cp - 1) * exposed(p2p(kv), attn_fwd / cp)
        backward  (cp - 1) * exposed(p2p(2 kv), attn_bwd / cp) + p2p(kv)   (dK, dV travel with K, V; one hop
                  home for the accumulators)"""
    kv_local = tokens * 2 * flops.kv_heads_per_rank(model, tp) * model.head_dim * act_bytes
    steps = cp - 1
    cp_fwd = steps * comm.exposed_time(comm.p2p_time(kv_local, cp_link), attn_fwd / cp, shown)
    cp_bwd = (steps * comm.exposed_time(comm.p2p_time(2 * kv_local, cp_link), attn_bwd / cp, shown)
              + comm.p2p_time(kv_local, cp_link))
    return cp_fwd, cp_bwd


def recompute_seconds(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tokens: float, tp: int,
                      c: BlockCompute, gathered: float, tp_link: GroupLink, tp_overlap: bool,
                      fwd: float, engine: Engine = MESHPLAN, attention_fwd: float | None = None,
                      sp: bool = True) -> dict[str, float]:
    """Extra seconds per recompute mode, as ``engine.selective_recompute`` says: full re-runs the forward (its
    TP/CP communication included) on every engine; selective is :func:`selective_seconds`."""
    return {"none": 0.0, "full": fwd,
            "selective": selective_seconds(model, cluster, train, tokens, tp, c, gathered, tp_link, tp_overlap, engine,
                                           c.attn_fwd if attention_fwd is None else attention_fwd,
                                           sp)}


def selective_seconds(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tokens: float, tp: int,
                      c: BlockCompute, gathered: float, tp_link: GroupLink, tp_overlap: bool, engine: Engine,
                      attention_fwd: float, sp: bool = True) -> float:
    """Seconds selective recompute adds to one block's backward.
      core_attention (Megatron --recompute-granularity selective, recompute_modules ["core_attn"],
          megatron/core/transformer/attention.py _checkpointed_attention_forward): the attention core's forward
          runs again, ``attention_fwd`` (with fused attention transformer_config.py warns there is little to
          gain: the kernel keeps no scores, so the re-run saves only its output).
      meshplan (the runtime) and op_policy (torchtitan _save_list: every other mm, SDPA, reduce-scatter and
          max saved): the matmuls whose outputs are not kept (the 2nd, 4th and 6th mm: wk, wo and w3,
          compute.selective_recompute_shapes) and the memory-bound ops; under sequence parallel the two
          all-gathered inputs of wq/wk/wv and w1/w3 are gathered again (all_gather is not on the save list),
          waited for; under torchtitan's async TP decomposed under the recomputed matmuls. The meshplan runtime
          prices them only without TP overlap."""
    if engine.selective_recompute == "core_attention":
        return attention_fwd
    rates = compute.achieved_rates(cluster, train.precision, engine.attention_kernel)
    matmuls = c.timed * sum(compute.matmul_time(m, k, n, rates)
                            for m, k, n in compute.selective_recompute_shapes(model, tokens, tp))
    gathers = 2 * comm.allgather_time(gathered, tp_link) if tp > 1 and sp else 0.0
    if tp_overlap:
        shown = comm.overlap_exposed_fraction(cluster)
        gathers = 0.0 if engine.selective_recompute == "meshplan" else decomposed_exposed(gathers, matmuls, tp, shown)
    return matmuls + c.ew_fwd + gathers


def block_activation_bytes(model: ModelSpec, seq: int, micro_batch: int, tp: int, cp: int, act_bytes: int,
                           fused_swiglu: bool, mode: str, sp_saved_input: str = "gathered",
                           selective: str = "meshplan", sp: bool = True, flash: bool = True,
                           experts: ExpertLayout = DENSE, imbalance: float = 1.0,
                           moe_share: float | None = None) -> float:
    """Bytes one block keeps for its backward under recompute ``mode`` (memory.activation_bytes_per_layer),
    as the engine runs it (meshplan/engines.py): ``sp_saved_input`` ``gathered`` (DTensor sequence parallel
    keeps the all-gathered input of each column-parallel linear) or ``sharded`` (Megatron-Core keeps its
    shard and gathers it again in backward); ``selective`` the engine's selective policy. LayerNorm is
    PyTorch's fused kernel (keeps its input); an engine with fused kernels runs a fused RMSNorm keeping its
    16-bit input (meshplan's Triton norm, on the local shard under sequence parallel; Transformer Engine's in
    Megatron-Core). ``sp``: sequence parallel, in effect where tp > 1; ``flash``: False keeps the unfused
    attention's scores. In the share of MoE blocks (``moe_share``, by default the model's) the dense MLP's
    bytes are replaced by the MoE MLP's: moe.selective_saved_bytes under meshplan's selective policy,
    moe.saved_bytes otherwise (``full`` keeps the block's input either way)."""
    sp = sp and tp > 1
    fused_norm = model.norm == "layernorm" or fused_swiglu
    dense = memory.activation_bytes_per_layer(model, seq, micro_batch, tp=tp, sp=sp, cp=cp, act_bytes=act_bytes,
                                              flash=flash, recompute=mode, fused_swiglu=fused_swiglu,
                                              fused_norm=fused_norm,
                                              gathered_linear_inputs=sp_saved_input == "gathered",
                                              selective=selective)
    if model.moe is None or mode == "full":
        return dense
    tokens = micro_batch * seq / cp
    routed = tokens / (tp if sp else 1)
    rows = routed * model.moe.top_k * imbalance * experts.expert_tp
    mlp_input = act_bytes * tokens * model.hidden * (1.0 if sp_saved_input == "gathered" or not sp else 1.0 / tp)
    if mode == "selective" and selective != "core_attention":     # the dense MLP kept w1's output only
        replaced = act_bytes * tokens * model.ffn_hidden / tp
    else:
        replaced = moe.dense_mlp_saved_bytes(model, tokens, tp, act_bytes, fused_swiglu, mlp_input)
    if mode == "selective" and selective == "meshplan":
        grouped = rules.grouped_expert_gemms(act_bytes, model.hidden, model.moe.expert_ffn_hidden)
        kept = moe.selective_saved_bytes(model, routed, rows, model.moe.experts // experts.ep, act_bytes, grouped)
    else:
        kept = moe.saved_bytes(model, routed, tokens, rows, model.moe.expert_ffn_hidden / experts.expert_tp, tp,
                               act_bytes, fused_swiglu)
    return dense + moe_share_of(model, moe_share) * (kept - replaced)


def layer_params_per_rank(model: ModelSpec, tp: int) -> float:
    """Parameters of one block on one rank: attention and MLP split over tp, k and v by their heads
    (flops.kv_heads_per_rank: one replicated head each when tp exceeds them), the two norms and the per-head
    q/k norms whole."""
    kv, qk_norms = flops.kv_params_per_layer(model), 2 * flops.qk_norm_params(model)
    sharded = flops.attention_params_per_layer(model) - kv - qk_norms + flops.mlp_params_per_layer(model)
    whole = 2 * flops.norm_params(model) + qk_norms
    return sharded / tp + kv * flops.kv_heads_per_rank(model, tp) / model.kv_heads + whole
