"""Memory terms of the cost model, each a small pure function returning bytes.

Sources:
    * ZeRO: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".
    * Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
      section 4 (per-layer saved bytes with TP, SP, selective/full recompute).
    * Pipeline in-flight micro-batches: Narayanan et al. 2021 (1F1B keeps p - rank micro-batches) and
      Korthikanti et al. 2022 section 4.2.3 (interleaved: p + (p - 1)/v on the first rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from meshplan.planner import flops
from meshplan.rules import ACT_BYTES, MIN_LOSS_CHUNK_TOKENS, liger_loss_chunk_tokens, loss_chunk_tokens  # noqa: F401
from meshplan.spec import ModelSpec

GIB = 2**30

# The allocated peak is reported with a 5% margin over the live bytes (ALLOCATOR_MARGIN: what ``meshplan check``
# compares its measured live peak with); whether a plan fits is decided on the reserved figure
# (reserved_bytes) plus what lives outside torch's allocator: CUDA_CONTEXT_GIB (CUDA context, cuBLAS
# workspaces) and NCCL's buffers (nccl_buffer_bytes).
ALLOCATOR_MARGIN = 0.05
CUDA_CONTEXT_GIB = 0.75
DEFAULT_MEMORY_HEADROOM = 0.05    # share of device memory a plan leaves unused (``meshplan plan --memory-headroom``)

# The CUDA caching allocator (PyTorch docs, "CUDA semantics: memory management"; c10/cuda/CUDACachingAllocator.cpp)
# never returns a freed block to the device during training (no empty_cache), rounds each request up to
# 512 bytes, serves requests <= 1 MiB from 2 MiB segments, 1-10 MiB requests from 20 MiB segments and larger
# ones from segments rounded up to 2 MiB, and reuses a cached block only for a request of its own stream that
# fits inside it (splitting it; a split block is merged again only with free neighbours). The bytes allocated
# and freed within every step -- saved activations, logits, gathered weights, unsharded gradients -- are
# therefore cached in blocks whose remainders later requests of other sizes cannot use (GMLake, Guo et al.,
# ASPLOS 2024, "GMLake: Efficient and Transparent GPU Memory Defragmentation for Large-scale DNN Training with
# Virtual Memory Stitching", measures this fragmentation in LLM training with recompute and ZeRO).
# FRAGMENTATION_SHARE is the reserved-but-unusable share of those bytes: one share for every plan, set so that
# torchtitan's seven published max_reserved figures (benchmarks/fidelity.py; 8B to 405B, FSDP, TP, PP,
# selective and full recompute) all lie between -5% and +10% of reserved_bytes, no run on its own.
FRAGMENTATION_SHARE = 0.09
ROUND_BYTES = 512                 # CUDACachingAllocator kMinBlockSize
SMALL_SEGMENT_BYTES = 2 * 2**20   # kSmallBuffer: segment for requests <= 1 MiB (kSmallSize)
LARGE_SEGMENT_BYTES = 20 * 2**20  # kLargeBuffer: segment for requests of 1-10 MiB (kMinLargeAlloc)
LARGE_ROUND_BYTES = 2 * 2**20     # kRoundLarge: requests over 10 MiB are rounded up to 2 MiB

# NCCL's buffers live outside torch's allocator (NCCL user guide, "Environment Variables": NCCL_BUFFSIZE,
# default 4194304 bytes, the buffer per connection between two GPUs; NCCL_MAX_NCHANNELS caps the channels,
# MAXCHANNELS = 32 in src/include/device.h). A ring collective connects each rank to two peers on every
# channel (src/graph/rings.cc), each connection with its receive buffer.
NCCL_BUFFSIZE = 4 * 2**20
NCCL_CHANNELS = 32
NCCL_RING_PEERS = 2
DDP_BUCKET_BYTES = 25 * 2**20     # torch DDP bucket_cap_mb default; two buckets in flight


@dataclass(frozen=True)
class StateBytes:
    """Per-parameter bytes of the training state, before sharding.

    param: the stored parameter (fp32 master in meshplan's runtime: autocast / FSDP2 mixed precision keep
        fp32 params and cast to 16 bits for compute); grad: gradient accumulation buffer; optimizer: optimizer
        state (+ a separate master copy where a framework keeps one); compute_copy: the 16-bit copy used for
        compute (autocast weight cache, or FSDP2's unsharded param_dtype), 0 in fp32.
    """

    param: int
    grad: int
    optimizer: int
    compute_copy: int


def state_bytes(precision: str, optimizer: str) -> StateBytes:
    """meshplan runtime convention: fp32 params and fp32 gradients (mixed precision keeps both in fp32,
    as torch autocast and FSDP2 with reduce_dtype=fp32 do), Adam's two fp32 moments (8 bytes), SGD momentum 4."""
    moments = 8 if optimizer in ("adam", "adamw") else 4
    compute_copy = 0 if precision == "fp32" else 2
    return StateBytes(param=4, grad=4, optimizer=moments, compute_copy=compute_copy)


def engine_state_bytes(state_layout: str, precision: str, optimizer: str) -> StateBytes:
    """Per-parameter state bytes as an engine holds them (meshplan/engines.py ``state_layout``).

    ``fsdp2`` (meshplan's runtime, torchtitan): :func:`state_bytes`. ``distributed_optimizer`` (Megatron-Core):
    16-bit parameters (4 bytes in fp32), the fp32 main-grad buffer (accumulate_allreduce_grads_in_fp32 is forced
    on under bf16, megatron/training/arguments.py), and in the optimizer the fp32 main parameters (none in
    fp32) and Adam's two fp32 moments; no separate compute copy. Sharded by ZeRO 1 this gives Megatron's
    documented 6 + 12/d bytes per parameter for bf16 (18 unsharded; docs.nvidia.com/megatron-core,
    "Distributed Optimizer")."""
    if state_layout != "distributed_optimizer":
        return state_bytes(precision, optimizer)
    moments = 8 if optimizer in ("adam", "adamw") else 4
    param = 4 if precision == "fp32" else 2
    main_params = 0 if precision == "fp32" else 4
    return StateBytes(param=param, grad=4, optimizer=moments + main_params, compute_copy=0)


def engine_sharding_stage(state_layout: str, zero: int) -> int:
    """The ZeRO stage of :func:`model_state_bytes` that describes what an engine keeps sharded between steps:
    meshplan's runtime and torchtitan (FSDP2) per :func:`runtime_sharding_stage`; Megatron-Core the stage itself
    (1: the distributed optimizer shards main parameters and moments only, the 16-bit parameters and the
    gradient buffer stay whole; 2 and 3: Megatron FSDP's optim_grads and optim_grads_params)."""
    return zero if state_layout == "distributed_optimizer" else runtime_sharding_stage(zero)


def model_state_bytes(params: float, zero: int, dp: int, b: StateBytes) -> dict[str, float]:
    """Parameters, gradients and optimizer state of one rank holding ``params`` parameters (already divided
    by TP/PP), sharded over ``dp`` ranks per ZeRO stage (Rajbhandari et al. 2020, section 5):
    stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the parameters.

    With the paper's mixed-precision Adam accounting (param 2, grad 2, optimizer 12 bytes) this gives
    16P, 4P + 12P/d, 2P + 14P/d and 16P/d: the paper's 120, 31.4, 16.6 and 1.9 GB for 7.5B params, d = 64.
    """
    shard = 1.0 / dp
    param = b.param * params * (shard if zero >= 3 else 1.0)
    grad = b.grad * params * (shard if zero >= 2 else 1.0)
    optim = b.optimizer * params * (shard if zero >= 1 else 1.0)
    return {"parameters": param, "gradients": grad, "optimizer": optim}


def runtime_sharding_stage(zero: int) -> int:
    """Which states meshplan's runtime keeps sharded between steps, as the ZeRO stage of
    :func:`model_state_bytes`: ZeRO 0 is ``replicate`` (nothing sharded); ZeRO 1, 2 and 3 are all FSDP2
    (``fully_shard``), which keeps parameters, gradients and optimizer state sharded at rest -- the stages
    differ in what is gathered *during* the step (:func:`compute_copy_bytes`), measured by ``meshplan check``."""
    return 0 if zero == 0 else 3


def gathered_weight_bytes(params: float, zero: int, largest_layer_params: float, b: StateBytes,
                          fsdp: bool = True, root_params: float = 0.0, during_backward: bool = True,
                          units_per_block: int = 1) -> float:
    """The compute-dtype weights that live beside the sharded state during a step, as meshplan's runtime
    holds them (measured by ``meshplan check``, docs/check.md).

    One data-parallel rank (no FSDP2; ``fsdp`` False): autocast casts every weight once per step and caches
    the cast until the step ends: ``compute_copy * P``. Otherwise FSDP2 (``replicate`` for ZeRO 0,
    ``fully_shard`` for 1-3): ZeRO 0-2 keep every weight gathered (cast) from the first forward to the last
    backward; ZeRO 3 keeps the root unit gathered (``root_params``: the embedding, final norm and head, kept
    from forward to backward -- the fused loss applies the head outside the module) and, during the backward
    (``during_backward``), the current and the prefetched unit; at the loss no block is gathered. A block is
    one unit, or two (``units_per_block``: a mixture of experts' routed experts are a unit of their own, beside
    the rest of the block), and then the current and the prefetched unit are the two parts of one block.
    """
    copy = b.compute_copy or b.param
    if not fsdp:
        return b.compute_copy * params
    if zero <= 2:
        return copy * params
    gathered_units = 2 * largest_layer_params if units_per_block == 1 else largest_layer_params
    return copy * ((gathered_units if during_backward else 0.0) + root_params)


def unsharded_grad_bytes(params: float, largest_layer_params: float, b: StateBytes, accumulates_unsharded: bool,
                         fsdp: bool = True) -> tuple[float, float]:
    """(accumulators, transient): the unsharded gradients FSDP2 holds beside the sharded state.

    While gradients accumulate over micro-batches without a reduction (ZeRO 0-2 with several micro-batches,
    any ZeRO under a pipeline: ``accumulates_unsharded``) FSDP2 keeps them unsharded in fp32 (its
    ``reduce_dtype``) from the first micro-batch's backward to the step's end: ``grad * P`` accumulators.
    Otherwise one block's unsharded gradient exists at a time, during its backward, in the compute dtype plus
    its fp32 cast for the reduce-scatter under mixed precision: the transient. Without FSDP2 (one data-parallel
    rank) gradients go straight into ``param.grad`` (the gradient state): neither.
    """
    if not fsdp:
        return 0.0, 0.0
    if accumulates_unsharded:
        return b.grad * params, 0.0
    copy = b.compute_copy or b.param
    return 0.0, (copy + (b.grad if copy != b.grad else 0)) * largest_layer_params


def compute_copy_bytes(params: float, zero: int, largest_layer_params: float, b: StateBytes,
                       accumulates_unsharded: bool, fsdp: bool = True, root_params: float = 0.0) -> float:
    """The gathered weights and unsharded gradients of the backward, together (:func:`gathered_weight_bytes`
    during the backward + both parts of :func:`unsharded_grad_bytes`): an upper bound on what lives beside
    the sharded state at any moment of a step."""
    accumulators, transient = unsharded_grad_bytes(params, largest_layer_params, b, accumulates_unsharded, fsdp)
    return gathered_weight_bytes(params, zero, largest_layer_params, b, fsdp, root_params) + accumulators + transient


def sp_backward_workspace_bytes(tokens: float, hidden: int, act_bytes: int, tp: int) -> float:
    """Full-sequence tensors a block's backward holds beyond its saved activations under sequence parallelism
    (DTensor): the output gradient all-gathered for the row-parallel linear (the collective's [t, s/t, b, h]
    output and its concatenation along the sequence, 2 tensors) and the column-parallel input gradient before
    its reduce-scatter (1): ``3 * tokens * h * act_bytes`` (``meshplan check`` of torchtitan's Llama 3 405B
    runs: three such [4, 8192, 16384] tensors live at the peak beside the recomputed block). 0 without TP."""
    return 3.0 * tokens * hidden * act_bytes if tp > 1 else 0.0


def step_peak_phases(loss_phase: float, backward_phase: float) -> float:
    """The step's peak over its two candidate moments, given what each adds to the bytes common to both
    (states, pipeline buffers, every in-flight micro-batch's saved activations):

    - the loss of the last micro-batch (end of its forward): the loss buffers (logits) and the weights
      gathered for it;
    - the backward of the first block after it: the block being re-materialised under recompute, its
      unsharded gradient, the blocks gathered under ZeRO 3.

    The two are not live together: the loss's buffers are freed before the first block's backward starts
    (``meshplan check`` of torchtitan's Llama 3 8B run finds the peak at ``nll_loss_forward``, 12 bytes per
    logit live, no gradient yet). Activations only shrink afterwards, so no later moment is higher.
    """
    return max(loss_phase, backward_phase)


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------

def activation_bytes_per_layer(
    m: ModelSpec, seq: int, micro_batch: int, *, tp: int = 1, sp: bool = False, cp: int = 1,
    act_bytes: int = 2, flash: bool = True, recompute: str = "none", dropout: bool | None = None,
    fused_swiglu: bool = False, fused_norm: bool = False, gathered_linear_inputs: bool = True,
    selective: str = "meshplan",
) -> float:
    """Bytes one block keeps for its backward pass, for one micro-batch (Korthikanti et al. 2022, sec. 4).

    Korthikanti's GPT block (16-bit activations, 1-byte dropout masks, MHA, GELU with f = 4h, no flash,
    no recompute) saves s*b*h*(34 + 5*a*s/h) bytes; with TP ``10 + 24/t + 5*a*s/(h*t)``; with TP+SP
    ``(34 + 5*a*s/h)/t``. This function computes the same terms one tensor at a time, so that GQA
    (k and v are kv/a of q), SwiGLU, flash attention, context parallel and 4-byte activations follow:

        LayerNorm/RMSNorm inputs     2 x sbh           (sharded by SP; the bytes per kernel, and one sbh under
                                                       parallel_residual: norm_saved_bytes)
        QKV input                    sbh               (sharded by SP in Megatron-LM, which re-gathers it in
                                                       backward; DTensor sequence parallel -- meshplan's
                                                       runtime, torchtitan -- keeps the all-gathered sbh)
        Q, K, V                      sbq * (1 + 2*kv_t*t/a) / t  (q = heads x head_dim; kv_t: kv_heads_per_rank)
        q/k norm inputs (qk_norm)    sbq * (1 + kv_t*t/a) / t  (:func:`norm_saved_bytes`)
        softmax out, mask, dropout   5*a*s^2*b / t  (bytes; 2*a*s^2*b / t without dropout) -- absent with
                                                             flash attention, which saves its output and a
                                                             fp32 logsumexp (4*a*s*b/t)
        attention output (proj in)   sbq / t
        attention dropout mask       sbh (1 byte)      (sharded by SP)
        MLP input                    sbh               (as the QKV input)
        GELU: fc1 out + GELU out     2 * sbf / t
        SwiGLU: gate, up, silu, prod 4 * sbf / t       (3 with a fused SwiGLU kernel that recomputes silu)
        MLP dropout mask             sbh (1 byte)      (sharded by SP)

    The sequence dimension is divided by ``cp`` throughout (context parallel splits the sequence).

    Recompute modes (what meshplan's runtime implements):
        full: only the block input is kept (2*sbh/t with SP) -- Korthikanti's "full recomputation".
        selective: op-level selective checkpointing after torchtitan's policy: the outputs of the attention
            op and of every *other* matmul are kept (the 1st, 3rd, ... of wq, wk, wv, wo, w1, w3, w2: wq, wv,
            w1), except the block's last matmul, whose output nothing in the backward needs (under TP it is
            the full-width partial sum before the reduce-scatter); everything else -- wk, wo, w3, w2, norms,
            the SP all-gathers, activation functions, rotary, elementwise ops -- is recomputed from the block
            input. Kept: block input, q, v, attention output (+ logsumexp), w1's output (f wide).
    ``selective`` is the engine's policy (engines.py): ``meshplan`` (above), ``op_policy`` (torchtitan,
    :func:`selective_op_bytes`) or ``core_attention`` (Megatron: all but the attention core's scores, or with
    flash its logsumexp: Korthikanti's 34*sbh/t under TP+SP).

    Checked against the runtime by ``meshplan check`` (fake tensors): within 1% per layer for Llama 3 8B /
    70B / 405B shapes at tp 1 / 4 / 8 (docs/check.md)."""
    b, h, f, a = micro_batch, m.hidden, m.ffn_hidden, m.heads
    s = seq / cp
    kv_ratio = flops.kv_heads_per_rank(m, tp) * tp / a      # k, v width over q's (one replicated head at tp > kv)
    dropout = (m.dropout > 0) if dropout is None else dropout
    sbh, sbq = s * b * h, s * b * m.q_width
    replicated = 1.0 / tp if sp else 1.0      # tensors outside the TP region: sharded by SP
    mask = 1.0 if dropout else 0.0

    if recompute == "full":
        return act_bytes * sbh * replicated

    qkv = act_bytes * sbq * (1 + 2 * kv_ratio) / tp
    attn_out = act_bytes * sbq / tp
    lse = 4.0 * a * s * b / tp if flash else 0.0
    # softmax output, and with dropout its 1-byte mask and output: 2*as^2b + as^2b + 2*as^2b at 16 bits
    scores = 0.0 if flash else a * s * s * b / tp * (act_bytes + mask * (1 + act_bytes))

    if recompute == "selective" and selective != "core_attention":
        return selective_op_bytes(sbh, sbq, s * b * f, kv_ratio, tp, act_bytes, replicated, mask,
                                  selective) + attn_out + lse
    if recompute not in ("none", "selective"):
        raise ValueError(f"unknown recompute mode {recompute!r}")
    attention_core = scores + lse if recompute == "none" else 0.0    # Megatron's selective drops the core's
    norms = norm_saved_bytes(m, sbh * replicated, sbq * (1 + kv_ratio) / tp, act_bytes, fused_norm)
    # DTensor SP (``gathered_linear_inputs``) keeps the all-gathered input of wq/wk/wv and w1/w3; Megatron-LM
    # keeps its own shard and gathers again in backward (the paper's count)
    linear_input = act_bytes * sbh * (1.0 if gathered_linear_inputs else replicated)
    qkv_input = mlp_input = linear_input
    if m.mlp == "swiglu":
        mlp_inner = (3 if fused_swiglu else 4) * act_bytes * s * b * f / tp
    else:
        mlp_inner = 2 * act_bytes * s * b * f / tp
    masks = 2 * mask * sbh * replicated
    return norms + qkv_input + qkv + attention_core + attn_out + mlp_input + mlp_inner + masks


def norm_saved_bytes(m: ModelSpec, normed_input: float, normed_qk: float, act_bytes: int, fused: bool) -> float:
    """Bytes a block's norms keep for backward: the two over ``normed_input`` elements (the block's and the
    MLP's input) and, with ``qk_norm``, those over ``normed_qk`` elements of q and k. A fused norm (and
    LayerNorm) keeps its input (``act_bytes``); meshplan's reference norm its fp32 input and normalised output
    (4 + act_bytes). Under ``parallel_residual`` both block norms read the block input, so a norm that keeps
    its input keeps the one tensor for both (measured by ``meshplan check``: tests/test_gpt_neox.py)."""
    per_element = act_bytes if fused else 4 + act_bytes
    block_norms = 1 if m.parallel_residual and fused else 2
    return per_element * (block_norms * normed_input + (normed_qk if m.qk_norm else 0.0))


def selective_op_bytes(sbh: float, sbq: float, sbf: float, kv_ratio: float, tp: int, act_bytes: int,
                       replicated: float, mask: float, policy: str) -> float:
    """What op-level selective recompute keeps of one block beside the attention output and its logsumexp
    (activation_bytes_per_layer): the block input (``replicated``: 1/t under SP), the outputs of wq and wv
    (q, ``sbq`` wide, and v at kv/a of q's width; the q/k norms are recomputed), w1's output (f wide), the
    two dropout masks; the ``op_policy`` (torchtitan's ``_save_list``, every odd mm) also keeps w2's
    full-width output and, under TP, the reduce-scatter outputs of wo and w2 (sbh/t each)."""
    if policy == "op_policy":
        kept_w2 = act_bytes * sbh + (2 * act_bytes * sbh / tp if tp > 1 else 0.0)
    elif policy == "meshplan":
        kept_w2 = 0.0
    else:
        raise ValueError(f"unknown selective policy {policy!r}")
    block_input = act_bytes * sbh * replicated
    q_and_v = act_bytes * sbq * (1 + kv_ratio) / tp
    w1_out = act_bytes * sbf / tp
    masks = 2 * mask * sbh * replicated
    return block_input + q_and_v + w1_out + masks + kept_w2


def microbatches_in_flight(schedule: str, pp: int, rank: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak, in units of the rank's
    whole share of layers.

    GPipe: all m. 1F1B: min(p - rank, m) (Narayanan et al. 2021). Interleaved 1F1B (Megatron's schedule):
    the rank runs (p - rank - 1)*2 + (v - 1)*p warm-up chunk passes, then holds one more: each chunk is 1/v
    of its layers, so min(m*v, 2(p - rank - 1) + (v - 1)p + 1) / v -- on rank 0 this is
    p + (p - 1)/v, Korthikanti et al. 2022 sec. 4.2.3.
    """
    m = num_microbatches
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved" and virtual_stages > 1:
        chunks = min(m * virtual_stages, 2 * (pp - rank - 1) + (virtual_stages - 1) * pp + 1)
        return chunks / virtual_stages
    return float(min(pp - rank, m))


def interleaved_1f1b_order(pp: int, rank: int, num_microbatches: int, virtual_stages: int) -> list[tuple[str, int]]:
    """The (``"F"`` or ``"B"``, local chunk) operations pipeline rank ``rank`` runs, in order, under torch's
    ``ScheduleInterleaved1F1B`` (torch 2.6-2.13, ``_calculate_single_rank_operations``): m micro-batches in
    rounds of ``mpr = m // max(1, m // pp)``; ``min((v - 1) * mpr + 2 * (pp - 1 - rank), m * v)`` warm-up
    forwards, then one forward and one backward alternating, then the remaining backwards. The k-th forward
    runs chunk ``(k // mpr) % v``, the k-th backward chunk ``v - 1 - (k // mpr) % v``
    (``schedule_sim.pipeline_ops``, which also says which micro-batch each op carries)."""
    return list(_interleaved_order(pp, rank, num_microbatches, virtual_stages))


@lru_cache(maxsize=1024)
def _interleaved_order(pp: int, rank: int, num_microbatches: int, virtual_stages: int) -> tuple[tuple[str, int], ...]:
    """:func:`interleaved_1f1b_order`, cached."""
    from meshplan.planner.schedule_sim import pipeline_ops

    return tuple((kind, stage // pp) for kind, stage, _ in pipeline_ops("interleaved", pp, rank, num_microbatches,
                                                                       virtual_stages))


@dataclass(frozen=True, eq=False)
class OpOrder:
    """A pipeline rank's (``"F"`` or ``"B"``, local chunk) operations as arrays, for :func:`schedule_peak`:
    each op's chunk, whether it is a forward, and whether it is its chunk's first or last backward (the last
    is the ``k``-th, k = the number of backwards of chunk 0, as the pipelining schedule counts them)."""

    chunk: np.ndarray
    forward: np.ndarray
    first_backward: np.ndarray
    last_backward: np.ndarray

    @classmethod
    def of(cls, ops: Sequence[tuple[str, int]]) -> OpOrder:
        chunk = np.array([c for _, c in ops], dtype=np.int64)
        forward = np.array([kind == "F" for kind, _ in ops], dtype=bool)
        per_chunk = int(np.sum(~forward & (chunk == 0))) or 1
        first, last = np.zeros(len(ops), dtype=bool), np.zeros(len(ops), dtype=bool)
        seen: dict[int, int] = {}
        for i in np.flatnonzero(~forward):
            c = int(chunk[i])
            seen[c] = seen.get(c, 0) + 1
            first[i], last[i] = seen[c] == 1, seen[c] == per_chunk
        return cls(chunk, forward, first, last)


@lru_cache(maxsize=1024)
def interleaved_op_order(pp: int, rank: int, num_microbatches: int, virtual_stages: int) -> OpOrder:
    """:func:`interleaved_1f1b_order` as an :class:`OpOrder`, cached: the search replays the same orders for
    thousands of configurations."""
    return OpOrder.of(_interleaved_order(pp, rank, num_microbatches, virtual_stages))


def _running_sum(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The running total at each op of amounts added just before it is measured (``before``) and just after
    (``after``), summed in op order as a loop would (``cumsum`` adds sequentially, so the floats are the
    loop's, bit for bit)."""
    steps = np.empty(2 * len(before))
    steps[0::2], steps[1::2] = before, after
    return np.cumsum(steps)[0::2]


def schedule_peak(order: OpOrder, activations: Sequence[float], accumulators: Sequence[float],
                  reduced: Sequence[float], at_forward: Sequence[float],
                  in_backward: float) -> tuple[float, float, float, float]:
    """Replay a pipeline rank's operations and return its peak as (total, activations, gradient
    accumulators, phase extra) at that moment.

    A forward of chunk c keeps ``activations[c]`` until that micro-batch's backward of c; the first backward
    of chunk c creates its fp32 gradient accumulators ``accumulators[c]`` (:func:`unsharded_grad_bytes`), its
    last backward reduce-scatters them (the pipelining schedule's ``last_backward``) and leaves the
    ``reduced[c]`` gradient shard; during a forward of c ``at_forward[c]`` is live (the loss on the last
    stage), during a backward ``in_backward`` (:func:`step_peak_phases`). Under interleaving the most
    micro-batches are in flight before the other chunks' backwards have created their accumulators, and a
    chunk's accumulators may be reduced before the next one's exist: adding both maxima over-predicts
    (torchtitan's Llama 3 405B interleaved configuration: +22%, docs/check.md). The peak is the first op
    with the largest total (none above zero: all four are 0).
    """
    chunk, forward, backward = order.chunk, order.forward, ~order.forward
    act = np.asarray(activations, dtype=float)[chunk]
    acc = np.asarray(accumulators, dtype=float)
    left = (np.asarray(reduced, dtype=float) - acc)[chunk]
    live = _running_sum(np.where(forward, act, 0.0), np.where(backward, -act, 0.0))
    gradients = _running_sum(np.where(order.first_backward, acc[chunk], 0.0), np.where(order.last_backward, left, 0.0))
    extra = np.where(forward, np.asarray(at_forward, dtype=float)[chunk], in_backward)
    total = live + gradients + extra
    if not len(total) or total.max() <= 0.0:
        return (0.0, 0.0, 0.0, 0.0)
    i = int(np.argmax(total))
    return (float(total[i]), float(live[i]), float(gradients[i]), float(extra[i]))


def pipeline_receive_buffers(pp: int, rank: int, num_microbatches: int, virtual_stages: int = 1,
                             held: str = "per_microbatch") -> int:
    """Stage-boundary tensors ([b, s/cp, h/tp] each) that ``torch.distributed.pipelining`` keeps allocated on
    pipeline rank ``rank`` for the whole step.

    ``PipelineStage`` allocates, when a schedule first runs, one activation-receive buffer per micro-batch for
    every stage but the first and one gradient-receive buffer per micro-batch for every stage but the last
    (``_prepare_forward_infra`` / ``_prepare_backward_infra``, torch 2.6-2.13), and keeps them for reuse. Rank
    ``rank`` runs stages ``j * pp + rank`` for ``j < v``; with n = pp * v stages the count is
    m * (#{stages > 0} + #{stages < n - 1}). Measured by ``meshplan check``: 448 buffers (7 * 64) on both end
    ranks of Megatron's 462B configuration (pp16, v4, m64), 7.9 GiB. The stages' outputs kept for backward
    are the last block's activations, counted there.

    ``held = "per_transfer"`` (Megatron-LM, p2p_communication.py ``_communicate``): each receive allocates
    its tensor; an activation received becomes the chunk's saved input, counted with the blocks, so beyond
    the activations one activation and one gradient are in transit at a time: 2 on every rank.
    """
    if pp <= 1:
        return 0
    if held == "per_transfer":
        return 2
    stages = [j * pp + rank for j in range(virtual_stages)]
    last = pp * virtual_stages - 1
    return num_microbatches * (sum(s > 0 for s in stages) + sum(s < last for s in stages))


def loss_chunk_accumulate_bytes(tokens: int, hidden: int, vocab_local: int, weight_bytes: float) -> float:
    """Memory traffic of the chunked loss's weight-gradient accumulation for one micro-batch: each of the
    ``ceil(T / chunk)`` chunks reads and writes the ``[V_local, h]`` gradient, kept in the weight's dtype
    (``weight_bytes`` per element, as Liger-Kernel does): 2·b·V_local·h bytes per chunk."""
    chunks = math.ceil(tokens / loss_chunk_tokens(tokens, hidden, vocab_local))
    return chunks * 2.0 * weight_bytes * vocab_local * hidden


def logits_bytes(tokens: float, vocab_local: float, precision: str, fused_loss: bool, hidden: int = 0,
                 stage_keeps_logits: bool = False) -> float:
    """Peak bytes of the LM head output and the loss for ``tokens`` tokens of one micro-batch, as measured
    for meshplan's kernels (docs/kernels.md, benchmarks/bench_loss_memory.py: predicted = measured).

    Reference path: 12 bytes per logit live at the loss (``meshplan check`` of the torchtitan 8B
    configuration finds the step's peak at ``nll_loss_forward``: the 16-bit logits, a 16-bit copy, the fp32
    upcast and the fp32 log-softmax). Its backward holds 12 more at ``log_softmax_backward``: the saved fp32
    log-softmax, the gradient ``nll_loss_backward`` made and the one being written; a pipeline stage keeps
    its output, the logits (b bytes), until that backward (``stage_keeps_logits``, pp > 1), so there the loss
    peaks at 12 + b per logit (``meshplan check``: 16 B/logit at ``_log_softmax_backward_data``, fp32 last
    stage of 4). Fused chunked linear + cross-entropy: the gradients of the hidden states and of the
    weight shard are computed in the forward and kept, (T + V) * h * b, plus one chunk of logits at c bytes per
    logit (c = b + 4, + 4 more when b != 4), with chunk = next_pow2(ceil(T / ceil(V / h))) tokens.
    """
    b = ACT_BYTES[precision]
    if not fused_loss:
        return (12.0 + (b if stage_keeps_logits else 0)) * tokens * vocab_local
    per_logit = b + 4 + (4 if b != 4 else 0)
    chunk = loss_chunk_tokens(int(tokens), hidden, int(vocab_local))
    return (tokens + vocab_local) * hidden * b + chunk * vocab_local * per_logit


def liger_loss_bytes(tokens: float, vocab: float, precision: str, hidden: int) -> float:
    """Peak bytes of liger-kernel's fused linear cross-entropy (``kernels.loss: liger``) for ``tokens`` tokens
    of one micro-batch: the hidden states' and the weight's gradients, computed in the forward and kept,
    (T + V) * h * b, plus one chunk of logits at b bytes per logit (its kernel writes the gradient over the
    logits), chunk = next_pow2(ceil(T / ceil(V / h))) tokens (``rules.liger_loss_chunk_tokens``), plus, in
    fp32, the fresh fp32 [V, h] product each chunk adds to the weight gradient (16-bit logits on CUDA add it
    in place). ``launcher/runtime/kernels/liger.py`` ShapeOnlyLoss allocates the same for ``meshplan check``."""
    b = ACT_BYTES[precision]
    chunk = liger_loss_chunk_tokens(int(tokens), hidden, int(vocab))
    product = vocab * hidden * 4 if b == 4 else 0.0
    return (tokens + vocab) * hidden * b + chunk * vocab * b + product


def saved_logprob_bytes(tokens: float, vocab_local: float, precision: str = "fp32",
                        stage_keeps_logits: bool = False) -> float:
    """What a reference loss keeps until its micro-batch's backward (GPipe holds m of them): the fp32
    log-softmax, and the logits themselves where a pipeline stage keeps its output (``logits_bytes``)."""
    b = ACT_BYTES[precision]
    return (4.0 + (b if stage_keeps_logits else 0)) * tokens * vocab_local


# ------------------------------------------------------------------------------------------------
# What the job reserves: the caching allocator and NCCL
# ------------------------------------------------------------------------------------------------

def allocator_block_bytes(request: float) -> float:
    """The bytes the CUDA caching allocator sets aside for one request (c10/cuda/CUDACachingAllocator.cpp
    round_size / get_allocation_size): rounded up to 512 bytes; a request <= 1 MiB is carved from a 2 MiB
    segment, one of 1-10 MiB from a 20 MiB segment, a larger one gets a segment rounded up to 2 MiB. The
    segment, not the request, is what a first allocation of that size reserves."""
    rounded = math.ceil(request / ROUND_BYTES) * ROUND_BYTES
    if rounded <= 2**20:
        return float(SMALL_SEGMENT_BYTES)
    if rounded < 10 * 2**20:
        return float(LARGE_SEGMENT_BYTES)
    return float(math.ceil(rounded / LARGE_ROUND_BYTES) * LARGE_ROUND_BYTES)


def reserved_bytes(live_peak: float, backward_working_set: float, persistent: float, caching: bool = True) -> float:
    """What the CUDA caching allocator holds (``torch.cuda.max_memory_reserved``) when a rank's live tensors
    peak at ``live_peak`` bytes.

        reserved = live_peak + backward_working_set + FRAGMENTATION_SHARE * (live_peak - persistent)

    ``persistent``: bytes allocated once and kept (sharded state, Megatron's gradient buffer, pipeline receive
    buffers): never freed, never fragmented. The rest is allocated and freed every step and is cached in blocks
    of its own sizes (module docstring: the allocator's rules); FRAGMENTATION_SHARE of it stays reserved and
    unusable. ``backward_working_set``: what a block's backward allocates beside the saved activations (the
    re-materialised block, its gradients, the sequence-parallel workspace; rank_memory ``in_backward``): it is
    allocated anew for every block while the previous block's is being freed, and a cached block is reused
    only for a request that fits inside it and merged only with free neighbours, so one working set stays
    cached beside the peak, wherever the peak is. Without the CUDA allocator (CPU ranks): the live peak."""
    if not caching:
        return live_peak
    return live_peak + backward_working_set + FRAGMENTATION_SHARE * max(0.0, live_peak - persistent)


def nccl_buffer_bytes(group_sizes: list[int]) -> float:
    """Device memory NCCL allocates outside torch for the communicators of a rank: per communicator of more
    than one rank, NCCL_CHANNELS channels x NCCL_RING_PEERS connections x NCCL_BUFFSIZE (the NCCL user guide's
    NCCL_BUFFSIZE, default 4 MiB per connection; up to 32 channels): 256 MiB each."""
    return float(sum(NCCL_CHANNELS * NCCL_RING_PEERS * NCCL_BUFFSIZE for g in group_sizes if g > 1))
