"""Per-block time and memory: one transformer block, one micro-batch, one rank.

A block's forward is its GEMMs, its attention and its memory-bound ops (compute.py), plus the tensor- and
context-parallel communication on its critical path; its backward is twice the GEMMs and memory-bound ops,
the attention backward and the same communication. Recompute re-runs part or all of the forward; the saved
activations per recompute mode are memory.activation_bytes_per_layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from meshplan.spec import ClusterSpec, ModelSpec, TrainSpec
from meshplan.planner import comm, compute, flops, memory
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


@dataclass(frozen=True)
class BlockCompute:
    """Forward compute seconds of one block (attention backward too), each scaled by ``timed``: the
    profile's measured / modelled ratio for this very block (compute.measured_block_ratio; 1 elsewhere)."""

    matmul_fwd: float
    attn_fwd: float
    attn_bwd: float
    ew_fwd: float
    timed: float


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
    that recomputes silu in backward (saves one f-wide tensor).

        fwd = matmul + attention + elementwise + tp + cp        (exposed communication, each direction)
        bwd = 2 matmul + attention_bwd + 2 elementwise + tp + cp"""
    host = host_model(cluster)
    act_bytes = memory.ACT_BYTES[train.precision]
    tokens = micro_batch * train.seq_len / cp
    degrees = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
    c = block_compute(model, cluster, train, tp, cp, micro_batch, fused_elementwise)
    estimate = c.matmul_fwd + c.attn_fwd + c.ew_fwd
    tp_link = comm.group_link(cluster, tp, comm.group_stride(mesh_order, degrees, "tp"))
    activation = tokens * model.hidden * act_bytes
    tp_fwd, tp_bwd = tp_comm_time(activation, tp, tp_link, tp_overlap, estimate, c.matmul_fwd, cluster, host)
    cp_link = comm.group_link(cluster, cp, comm.group_stride(mesh_order, degrees, "cp"))
    attn_fwd, attn_bwd = c.attn_fwd, c.attn_bwd
    if cp == 1:
        cp_fwd = cp_bwd = 0.0
    elif cp_kind == "ulysses":
        cp_fwd = cp_bwd = ulysses_time(model, tokens, tp, cp, cp_link, act_bytes, estimate, host)
    else:
        attn_fwd, attn_bwd, cp_fwd, cp_bwd = ring_time(model, cluster, micro_batch, train.seq_len, tp, cp, cp_link,
                                                       host)
    fwd_compute = c.matmul_fwd + attn_fwd + c.ew_fwd
    fwd = fwd_compute + tp_fwd + cp_fwd
    bwd = 2 * c.matmul_fwd + attn_bwd + 2 * c.ew_fwd + tp_bwd + cp_bwd
    recompute_cost = recompute_seconds(model, cluster, train, tokens, tp, c, activation, tp_link, tp_overlap, fwd)
    acts = {mode: block_activation_bytes(model, train.seq_len, micro_batch, tp, cp, act_bytes, fused_swiglu, mode)
            for mode in MODES}
    return LayerCost(fwd=fwd, bwd=bwd, recompute=recompute_cost, act=acts, act_full_layer=acts["none"],
                     params=layer_params_per_rank(model, tp), tp_comm=tp_fwd + tp_bwd, cp_comm=cp_fwd + cp_bwd,
                     matmul_fwd=c.matmul_fwd)


def block_compute(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tp: int, cp: int, micro_batch: int,
                  fused_elementwise: bool) -> BlockCompute:
    """The block's GEMMs (compute.layer_matmul_shapes), flash attention (compute.attention_time) and memory-bound
    ops (compute.elementwise_bytes_per_layer at the memory rate), forward; where the profile timed this block
    (cp = 1), its measured / modelled ratio corrects the fitted parts."""
    rates = compute.achieved_rates(cluster, train.precision)
    act_bytes = memory.ACT_BYTES[train.precision]
    seq = train.seq_len
    tokens = micro_batch * seq / cp
    timed = compute.measured_block_ratio(cluster, train.precision, tp, micro_batch, seq) if cp == 1 else 1.0
    matmul_fwd = timed * sum(compute.matmul_time(m, k, n, rates)
                             for m, k, n in compute.layer_matmul_shapes(model, tokens, tp))
    attn_fwd, attn_bwd = (timed * t for t in compute.attention_time(model, micro_batch, seq, tp, cp, rates))
    ew_fwd = timed * compute.elementwise_bytes_per_layer(model, tokens, tp, tp > 1, fused_elementwise,
                                                         act_bytes) / rates.memory
    return BlockCompute(matmul_fwd, attn_fwd, attn_bwd, ew_fwd, timed)


def tp_comm_time(activation: float, tp: int, tp_link: GroupLink, tp_overlap: bool, compute_estimate: float,
                 matmul_fwd: float, cluster: ClusterSpec, host: HostModel) -> tuple[float, float]:
    """Exposed tensor-parallel seconds (forward, backward) of one block. With sequence parallel: 2 all-gathers +
    2 reduce-scatters of the [s, b, h] ``activation`` per direction (Korthikanti et al. 2022, fig. 5), each of
    the four calls a meeting after about a quarter of the block (host.meeting). Async TP runs the collectives
    under the matmuls they feed (comm.exposed_time with the measured overlap share)."""
    tp_dir = 2 * comm.allgather_time(activation, tp_link) + 2 * comm.reducescatter_time(activation, tp_link)
    if tp > 1:
        tp_dir += 4 * host.meeting(compute_estimate / 4, tp)
    if not tp_overlap:
        return tp_dir, tp_dir
    hidden_share = comm.overlap_exposed_fraction(cluster)
    return (comm.exposed_time(tp_dir, matmul_fwd, hidden_share),
            comm.exposed_time(tp_dir, 2 * matmul_fwd, hidden_share))


def ulysses_time(model: ModelSpec, tokens: float, tp: int, cp: int, cp_link: GroupLink, act_bytes: int,
                 compute_estimate: float, host: HostModel) -> float:
    """Seconds of Ulysses context parallelism per direction (Jacobs et al. 2023): all-to-all of q, k, v before
    attention and of the output after, two meetings about half a block apart."""
    kv_width = model.kv_heads * model.head_dim
    qkv_local = tokens * (model.hidden + 2 * kv_width) / tp * act_bytes
    out_local = tokens * model.hidden / tp * act_bytes
    return (comm.alltoall_time(qkv_local, cp_link) + comm.alltoall_time(out_local, cp_link)
            + 2 * host.meeting(compute_estimate / 2, cp))


def ring_time(model: ModelSpec, cluster: ClusterSpec, micro_batch: int, seq: int, tp: int, cp: int,
              cp_link: GroupLink, host: HostModel) -> tuple[float, float, float, float]:
    """``(attention forward, attention backward, cp forward, cp backward)`` seconds of ring attention as the
    runtime runs it (launcher/runtime/context_parallel.py): the slowest context rank's attention
    (compute.ring_attention_time) replaces flash attention; cp - 1 hops pass the fp32 K, V chunk on (repeated to
    every head), backward K, V and their dK, dV accumulators plus one last hop home for the accumulators. Each
    hop is waited for before the next block is computed (no overlap), a meeting of two neighbours."""
    attn_fwd, attn_bwd = compute.ring_attention_time(model, micro_batch, seq, tp, cp,
                                                     compute.achieved_rates(cluster, "fp32"))
    tokens = micro_batch * seq / cp
    kv_local = tokens * 2 * model.hidden / tp * 4
    steps = cp - 1
    hop_meeting = host.meeting(attn_fwd / cp, 2)
    cp_fwd = steps * (comm.p2p_time(kv_local, cp_link) + hop_meeting)
    cp_bwd = steps * (comm.p2p_time(2 * kv_local, cp_link) + hop_meeting) + comm.p2p_time(kv_local, cp_link)
    return attn_fwd, attn_bwd, cp_fwd, cp_bwd


def recompute_seconds(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, tokens: float, tp: int,
                      c: BlockCompute, activation: float, tp_link: GroupLink, tp_overlap: bool,
                      fwd: float) -> dict[str, float]:
    """Extra seconds per recompute mode: full re-runs the forward (its TP/CP communication included);
    selective re-runs the matmuls whose outputs are not kept (compute.selective_recompute_shapes) and the
    memory-bound ops (flash attention recomputes its scores in backward anyway), and under sequence parallel
    re-gathers the two all-gathered inputs of wq/wk/wv and w1/w3."""
    rates = compute.achieved_rates(cluster, train.precision)
    selective_matmuls = c.timed * sum(compute.matmul_time(m, k, n, rates)
                                      for m, k, n in compute.selective_recompute_shapes(model, tokens, tp))
    selective_gathers = 2 * comm.allgather_time(activation, tp_link) if tp > 1 and not tp_overlap else 0.0
    return {"none": 0.0, "selective": selective_matmuls + c.ew_fwd + selective_gathers, "full": fwd}


def block_activation_bytes(model: ModelSpec, seq: int, micro_batch: int, tp: int, cp: int, act_bytes: int,
                           fused_swiglu: bool, mode: str) -> float:
    """Bytes one block keeps for its backward under recompute ``mode`` (memory.activation_bytes_per_layer).
    LayerNorm is PyTorch's fused kernel (keeps its input); the fused RMSNorm (Triton) takes plain tensors, so
    under sequence parallel the runtime's RMSNorms are the reference ones."""
    sp = tp > 1
    fused_norm = model.norm == "layernorm" or (fused_swiglu and not sp)
    return memory.activation_bytes_per_layer(model, seq, micro_batch, tp=tp, sp=sp, cp=cp, act_bytes=act_bytes,
                                             flash=True, recompute=mode, fused_swiglu=fused_swiglu,
                                             fused_norm=fused_norm)


def layer_params_per_rank(model: ModelSpec, tp: int) -> float:
    """Parameters of one block on one rank: attention and MLP split over tp, the two norms whole."""
    sharded = flops.attention_params_per_layer(model) + flops.mlp_params_per_layer(model)
    return sharded / tp + 2 * flops.norm_params(model)
