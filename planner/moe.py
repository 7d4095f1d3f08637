"""Mixture-of-experts terms: one MoE block's router, routed experts, dispatch and combine, and the bytes its
expert layout keeps.

Megatron-Core's MoE layer (megatron/core/transformer/moe/: router.py TopKRouter, token_dispatcher.py
MoEAlltoAllTokenDispatcher, experts.py GroupedMLP) and meshplan's runtime (launcher/runtime/moe.py) run the
MLP of an MoE block on one rank as:

    router     [T, h] x [h, E] GEMM, softmax or sigmoid, top-k          T = tokens the rank routes
    permute    the T*k (token, expert) rows gathered in expert order     memory-bound
    dispatch   all-to-all over the EP group, each rank's T*k rows of h   ep > 1
    experts    E/ep local experts, expert j a SwiGLU on its m_j rows:  gate+up [m_j, h] x [h, 2 f_e/etp],
               down [m_j, f_e/etp] x [f_e/etp, h]; with etp > 1 the received rows are all-gathered over the
               expert-TP group first and the outputs reduce-scattered after (Megatron's ETP)
    combine    all-to-all back, unpermute, the k outputs of a token summed with the router's weights
    shared     shared experts: a dense SwiGLU of width f_s, whole, over the rank's T tokens (the FLOPs of the
               dense MLP split over tp)

T is the rank's sequence-parallel shard of the micro-batch (tokens / tp under sequence parallel: the TP ranks
route their own tokens), and the routed rows a rank computes are T*k times the load imbalance of the slowest
EP rank (:func:`default_imbalance`, or ``--fix moe_imbalance``), at most the model's ``capacity_factor`` where
one is set (an engine that drops tokens; the planner refuses a capacity factor for the others). Dispatch and
combine are not overlapped with compute (Megatron-Core's all-to-all dispatcher, meshplan's runtime).
Everything here is per MoE block, one micro-batch, one rank; ``block.layer_cost`` puts it in place of the
dense MLP in the model's MoE blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshplan.spec import ModelSpec
from meshplan.planner import comm, compute, flops
from meshplan.planner.comm import GroupLink

# Passes over the router's [T, E] fp32 scores in forward: the softmax (read, write) and top-k (read).
ROUTER_SCORE_PASSES = 3
# Passes over the routed rows of h in forward: permute (read the token, write the row) and unpermute (read the
# row, write the weighted token), two each.
PERMUTE_PASSES = 4


def default_imbalance(rows_per_rank: float, ep: int) -> float:
    """The load of the busiest of ``ep`` ranks over the mean when ``rows_per_rank`` rows a rank go to uniformly
    random ranks: the maximum of a balanced balls-into-bins allocation, m/n + sqrt(2 (m/n) ln n) for
    m >> n ln n (Raab & Steger 1998, "Balls into bins -- a simple and tight analysis", theorem 1), divided by
    the mean m/n:
        1 + sqrt(2 ln(ep) / rows_per_rank)
    This is the imbalance of a router that balances perfectly on average (what the load-balancing loss trains
    towards); a router that prefers some experts is priced with ``--fix moe_imbalance=X``. 1 without EP."""
    if ep <= 1 or rows_per_rank <= 0:
        return 1.0
    return 1.0 + math.sqrt(2.0 * math.log(ep) / rows_per_rank)


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block's MLP on one rank for one micro-batch, forward (backward: twice the GEMMs and memory
    traffic, the same communication).

    Fields:
        routed_rows: rows the rank's local experts compute (T*k times the imbalance).
        imbalance: the load factor applied.
        gemm_fwd: router, routed and shared experts' GEMMs, seconds.
        memory_fwd: router scores, permute / unpermute, SwiGLU activations, seconds at the memory rate.
        a2a: dispatch + combine seconds, each direction (2 all-to-alls).
        etp_comm: the expert-TP all-gather + reduce-scatter seconds, each direction.
        expert_params: parameters of the rank's local experts (E/ep experts, split by etp).
        other_params: router, gate and shared experts (split by tp) on the rank.
        saved_bytes: what the MoE MLP keeps for its backward with no recompute.
    """

    routed_rows: float
    imbalance: float
    gemm_fwd: float
    memory_fwd: float
    a2a: float
    etp_comm: float
    expert_params: float
    other_params: float
    saved_bytes: float


def moe_block(model: ModelSpec, tokens: float, tp: int, sp: bool, ep: int, etp: int, ep_link: GroupLink,
              tp_link: GroupLink, rates: compute.Rates, act_bytes: int, fused_swiglu: bool,
              imbalance: float | None = None) -> MoEBlock:
    """The :class:`MoEBlock` of ``model`` for ``tokens`` tokens of a micro-batch on a rank (its context-
    parallel share), ``tp``-way tensor parallel (``sp``: sequence parallel), experts over ``ep`` ranks and
    each expert over ``etp``."""
    moe, h = model.moe, model.hidden
    routed = tokens / (tp if sp else 1)
    mean_rows = routed * moe.top_k
    factor = default_imbalance(mean_rows, ep) if imbalance is None else imbalance
    if not moe.dropless:        # no expert takes more than capacity_factor times its share (dropping engines)
        factor = min(factor, moe.capacity_factor)
    rows = mean_rows * factor
    local = moe.experts // ep
    per_expert = rows * etp / local
    f_local = moe.expert_ffn_hidden / etp
    experts = local * (compute.matmul_time(per_expert, h, 2 * f_local, rates)
                       + compute.matmul_time(per_expert, f_local, h, rates))
    router = compute.matmul_time(routed, h, moe.experts + (1 if moe.shared_expert_gate else 0), rates)
    shared = 0.0
    if moe.shared_ffn_hidden:
        shared = (compute.matmul_time(tokens, h, 2 * moe.shared_ffn_hidden / tp, rates)
                  + compute.matmul_time(tokens, moe.shared_ffn_hidden / tp, h, rates))
    swiglu_passes = 3 if fused_swiglu else 5
    moved = (ROUTER_SCORE_PASSES * routed * moe.experts * 4
             + act_bytes * (PERMUTE_PASSES * rows * h + swiglu_passes * rows * etp * f_local
                            + swiglu_passes * tokens * moe.shared_ffn_hidden / tp))
    row_bytes = rows * h * act_bytes
    a2a = 2 * comm.alltoall_time(row_bytes, ep_link) if ep > 1 else 0.0
    etp_comm = (comm.allgather_time(row_bytes * etp, tp_link) + comm.reducescatter_time(row_bytes * etp, tp_link)
                if etp > 1 else 0.0)
    return MoEBlock(rows, factor, experts + router + shared, moved / rates.memory, a2a, etp_comm,
                    local * flops.expert_params(model) / etp,
                    flops.router_params(model) + flops.shared_expert_params(model) / tp,
                    saved_bytes(model, routed, tokens, rows * etp, f_local, tp, act_bytes, fused_swiglu))


def saved_bytes(model: ModelSpec, routed: float, tokens: float, rows: float, f_local: float, tp: int,
                act_bytes: int, fused_swiglu: bool) -> float:
    """Bytes an MoE MLP keeps for its backward without recompute (``rows``: routed rows after any expert-TP
    gather):
        MLP input (the normed tokens the rank routes)     T h
        router scores and probabilities (fp32)            2 * 4 T E
        permuted rows (the experts' input)                rows h
        SwiGLU inner: gate, up, silu, product             4 rows f_e/etp  (3 with the fused SwiGLU)
        expert outputs (the combine's weighted sum)       rows h
        shared experts, as the dense MLP (flat, split by tp): input T_full h, inner 4 T_full f_s / tp
    at ``act_bytes`` an element but the router's."""
    moe, h = model.moe, model.hidden
    inner = 3 if fused_swiglu else 4
    routed_part = routed * h + 2 * rows * h + inner * rows * f_local
    shared_part = (tokens * h + inner * tokens * moe.shared_ffn_hidden / tp) if moe.shared_ffn_hidden else 0.0
    return act_bytes * (routed_part + shared_part) + 8.0 * routed * moe.experts


# The matmuls of a block before its MLP: wq, wk, wv, wo (launcher/runtime/model.py Attention).
ATTENTION_MATMULS = 4


def matmul_sequence(model: ModelSpec, routed: float, rows: float, local: int,
                    grouped: bool) -> list[tuple[float, float, float, int]]:
    """(m, k, n, groups) of each matmul op an MoE MLP runs on one rank, in the order meshplan's runtime runs
    them (launcher/runtime/moe.py MoE.forward): the router [routed, h] x [h, E]; the routed experts' w1, w3
    and w2 on ``rows`` rows, as three grouped GEMMs over the ``local`` experts (``grouped``,
    rules.grouped_expert_gemms) or as each local expert's three GEMMs on ``rows / local`` rows (every local
    expert runs, with or without rows); the shared experts' w1, w3, w2 and the shared gate [routed, h] x
    [h, 1], whole on the ``routed`` tokens (the rank's sequence shard; moe.tp_partial_params). ``groups``: the
    GEMMs of ``m / groups`` rows one op runs."""
    moe, h = model.moe, model.hidden
    f = moe.expert_ffn_hidden
    shapes = [(routed, h, moe.experts, 1)]
    if grouped:
        shapes += [(rows, h, f, local), (rows, h, f, local), (rows, f, h, local)]
    else:
        for _ in range(local):
            shapes += [(rows / local, h, f, 1), (rows / local, h, f, 1), (rows / local, f, h, 1)]
    if moe.shared_ffn_hidden:
        f_s = moe.shared_ffn_hidden
        shapes += [(routed, h, f_s, 1), (routed, h, f_s, 1), (routed, f_s, h, 1)]
    if moe.shared_expert_gate:
        shapes.append((routed, h, 1, 1))
    return shapes


def sequence_time(shapes: list[tuple[float, float, float, int]], rates: compute.Rates) -> float:
    """Seconds of the matmul ops ``shapes`` (:func:`matmul_sequence`): a grouped op costs its GEMMs'."""
    return sum(groups * compute.matmul_time(m / groups, k, n, rates) for m, k, n, groups in shapes)


def selective_matmuls(model: ModelSpec, routed: float, rows: float, local: int,
                      grouped: bool) -> tuple[list[tuple[float, float, float, int]],
                                              list[tuple[float, float, float, int]]]:
    """(kept, re-run) matmul ops of an MoE MLP under meshplan's selective recompute
    (launcher/runtime/parallelize.py selective_context): counting the block's matmul ops from its first, the
    odd-numbered outputs are kept but the block's last (parallelize.block_matmuls); the others run again in
    the backward, the last excepted (the recompute stops once the backward has what it needs)."""
    shapes = matmul_sequence(model, routed, rows, local, grouped)
    last = ATTENTION_MATMULS + len(shapes)
    kept, rerun = [], []
    for number, shape in enumerate(shapes, ATTENTION_MATMULS + 1):
        if number % 2 == 1 and number != last:
            kept.append(shape)
        elif number != last:
            rerun.append(shape)
    return kept, rerun


def selective_saved_bytes(model: ModelSpec, routed: float, rows: float, local: int, act_bytes: int,
                          grouped: bool) -> float:
    """Bytes an MoE MLP keeps under meshplan's selective recompute: the kept matmuls' outputs
    (:func:`selective_matmuls`), ``m * n`` elements each; everything else is re-run."""
    kept, _ = selective_matmuls(model, routed, rows, local, grouped)
    return act_bytes * sum(m * n for m, _, n, _ in kept)


def dense_mlp_saved_bytes(model: ModelSpec, tokens: float, tp: int, act_bytes: int, fused_swiglu: bool,
                          mlp_input_bytes: float) -> float:
    """What the dense MLP keeps (memory.activation_bytes_per_layer's MLP input and inner tensors), the part an
    MoE block replaces."""
    inner = (3 if fused_swiglu else 4) if model.mlp == "swiglu" else 2
    return mlp_input_bytes + inner * act_bytes * tokens * model.ffn_hidden / tp
