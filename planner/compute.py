"""Compute-time terms: achieved rates and the time of matmuls, attention and memory-bound work.

Time of a matmul [m, k] x [k, n]: its FLOPs at the matmul rate and its operand traffic at the memory rate. On
GPUs the two overlap (tensor cores compute while the next tiles stream in), so the GEMM takes the larger:
max(2*m*n*k / matmul_rate, bytes(m*k + k*n + m*n) / memory_rate) (the roofline, Williams et al. 2009). On
CPU ranks the core that multiplies also fetches, and the two add (the form the profiler's rates are fitted in).

Achieved rates come from the cluster's measured profile when ``meshplan profile`` wrote one (``cluster.profile``,
meshplan/measured.py: ``compute`` with ``matmul_tflops``, ``attention_tflops``, ``memory_gbps``), else from the
documented defaults below, as fractions of the spec-sheet peak.

A measured GEMM table (the profile's ``compute.matmul_table``: ``[[flops, tflops], ...]``, the forward
FLOPs 2mnk of one GEMM and the rate its forward + backward achieved, sorted by size; written by
``meshplan profile``) replaces the roofline: a GEMM then takes ``2mnk / rate(2mnk)``, the rate interpolated
linearly in log(FLOPs) between the measured sizes and held constant beyond them (the measured time already
includes the operand traffic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshplan.planner import flops
from meshplan.measured import Compute
from meshplan.rules import ELEMENT_BYTES
from meshplan.spec import ClusterSpec, ModelSpec
from meshplan.planner.host import (  # noqa: F401  (the host model's; kept here for callers)
    SATURATED_ABOVE, busy_speedup, busy_speedup_table, fit_shared_cores, measured_busy_speedup, pipeline_op_overhead,
    sharing_speed)

# Fractions of spec-sheet peak reached by real kernels, used when no profile exists, per GPU generation
# (GPU_EFFICIENCY; a device's generation from its name, :func:`device_generation`) and for other devices
# (DEFAULT_EFFICIENCY).
# * matmul, Hopper (H100, H200) 0.53: the fraction of dense peak that reproduces Megatron-Core's published
#   H100 weak-scaling table (../shared/benchmarks/public-runs.yaml) with GEMMs priced on the max-roofline
#   (:func:`roofline`); calibrated once for the class, never per run. 524 TFLOP/s of 989: cuBLAS at LLM
#   shapes under the 700 W power limit, the clocks below boost. The H200 is the same die, clocks and power
#   limit: the same fraction (its larger HBM bandwidth enters through the memory rate). Other GPUs are
#   priced like the calibrated class (DEFAULT_EFFICIENCY).
# * matmul, Ampere (A100) 0.65: Korthikanti et al. 2022, table 4: 56% model FLOPs utilisation end to end on
#   A100 for 530B and 1T GPT models, attention, communication and the pipeline bubble included, so the GEMMs
#   run above that; the A100 sustains its boost clock at 400 W (cuBLAS bf16 at LLM shapes: 200-230 of 312).
# * matmul_fp8 0.37 (of the fp8 peak, which is 2x bf16): fp8 linears with dynamic scaling pay casts and
#   amax reductions. torchao's float8 training results show 1.2-1.5x end to end over bf16; at the low end
#   (S = 1.25, tensorwise scaling) with the GEMMs g = 0.7 of a bf16 step, the GEMMs alone run
#   g / (1/S - (1 - g)) = 1.4x faster: 0.53 * 1.4 / 2 = 0.37. Ampere has no fp8 tensor cores (its fp8 peak
#   is its bf16 one).
# * attention, per kernel (``attention_flash2``: torch SDPA's FlashAttention-2; ``attention_cudnn``:
#   Transformer Engine's cuDNN fused attention), forward + backward:
#     Hopper: FlashAttention-2 reaches 35% of H100 peak (Shah et al. 2024, FlashAttention-3, sec. 1: it uses
#     no Hopper-specific instructions); cuDNN's Hopper kernels reach 500-700 TFLOP/s forward and run the
#     backward slower (the same paper's comparison): 0.50.
#     Ampere: FlashAttention-2 reaches 50-73% of A100 peak forward and up to 72% forward + backward (Dao
#     2023, sec. 4.1), lower under the causal mask at head dim 128: 0.60; on Ampere Transformer Engine runs
#     the same FlashAttention kernels.
# * memory 0.80: elementwise kernels reach ~80-90% of HBM bandwidth (stream-style copy tests).
# * CPU ranks: torch's fp32 GEMM reaches roughly half of a core's peak; memory-bound ops are cache-bound.
DEFAULT_EFFICIENCY = {
    "gpu": {"matmul": 0.53, "matmul_fp8": 0.37, "attention_flash2": 0.35, "attention_cudnn": 0.50,
            "memory": 0.80},
    "cpu": {"matmul": 0.50, "matmul_fp8": 0.50, "attention_flash2": 0.25, "attention_cudnn": 0.25,
            "memory": 0.50},
}
GPU_EFFICIENCY = {
    "hopper": {"matmul": 0.53, "matmul_fp8": 0.37, "attention_flash2": 0.35, "attention_cudnn": 0.50,
               "memory": 0.80},
    "ampere": {"matmul": 0.65, "matmul_fp8": 0.65, "attention_flash2": 0.60, "attention_cudnn": 0.60,
               "memory": 0.80},
}
# Device names (DeviceSpec.name, lower case) of each generation: NVIDIA's product names.
GENERATION_NAMES = {"hopper": ("h100", "h200", "h800", "h20", "gh200"), "ampere": ("a100", "a800", "a30")}


def device_generation(device) -> str:
    """The GPU generation of ``device`` (a DeviceSpec) from its name (GENERATION_NAMES), or ``""`` for a CPU
    or an unknown GPU (DEFAULT_EFFICIENCY prices those)."""
    if device.kind != "gpu":
        return ""
    name = device.name.lower()
    return next((g for g, names in GENERATION_NAMES.items() if any(n in name for n in names)), "")


def efficiency(device) -> dict[str, float]:
    """Fractions of peak for ``device``: its generation's (GPU_EFFICIENCY), else its kind's default."""
    return GPU_EFFICIENCY.get(device_generation(device)) or DEFAULT_EFFICIENCY[device.kind]


@dataclass(frozen=True)
class Rates:
    """Achieved rates of one device for one precision."""

    matmul: float      # FLOP/s
    attention: float   # FLOP/s
    memory: float      # bytes/s
    matmul_bytes: int  # bytes per element the matmuls read and write
    matmul_table: tuple[tuple[float, float], ...] = ()   # measured (forward FLOPs, FLOP/s), sorted by FLOPs
    overlapped: bool = False   # compute and memory traffic overlap (GPUs): an op takes the larger of the two


def interpolate_rate(table: tuple[tuple[float, float], ...], flops: float) -> float:
    """Achieved rate at ``flops`` from a sorted ``(flops, rate)`` table: linear in log(flops) between two
    measured sizes, the nearest measured rate outside the table."""
    if flops <= table[0][0]:
        return table[0][1]
    if flops >= table[-1][0]:
        return table[-1][1]
    for (x0, r0), (x1, r1) in zip(table, table[1:]):
        if x0 <= flops <= x1:
            w = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return r0 + w * (r1 - r0)
    return table[-1][1]


def _measured_table(rows: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    """The profile's ``(flops, TFLOP/s)`` table as sorted ``(flops, FLOP/s)`` pairs (non-positive rows dropped)."""
    return tuple(sorted((flops, tflops * 1e12) for flops, tflops in rows if flops > 0 and tflops > 0))


_NOTHING_MEASURED = Compute()


def measured_compute(cluster: ClusterSpec, precision: str) -> Compute:
    """The profile's compute section (``compute``) if it was measured in ``precision``, else an empty one:
    rates profiled in another precision are not these rates."""
    return cluster.profile.measured_in(precision) or _NOTHING_MEASURED


def achieved_rates(cluster: ClusterSpec, precision: str, attention_kernel: str = "flash2") -> Rates:
    """The achieved rates of ``cluster``'s device in ``precision``: measured where the profile has them, else
    the device's efficiency (:func:`efficiency`) times its peak; ``attention_kernel`` (the engine's,
    meshplan/engines.py) picks the attention efficiency."""
    device = cluster.gpu
    measured = measured_compute(cluster, precision)
    eff = efficiency(device)
    peak = device.peak_flops(precision)
    peak_16 = device.peak_flops("bf16")
    matmul_eff = eff["matmul_fp8"] if precision == "fp8" else eff["matmul"]
    matmul = (measured.matmul_tflops or 0) * 1e12 or matmul_eff * peak
    attention_peak = peak_16 if precision == "fp8" else peak          # attention stays in bf16 under fp8
    attention_eff = eff.get(f"attention_{attention_kernel}", eff["attention_flash2"])
    attention = (measured.attention_tflops or 0) * 1e12 or attention_eff * attention_peak
    memory = (measured.memory_gbps or 0) * 1e9 or eff["memory"] * device.memory_bandwidth_gbps * 1e9
    element = ELEMENT_BYTES[precision]
    table = _measured_table(measured.matmul_table)
    return Rates(matmul=matmul, attention=attention, memory=memory, matmul_bytes=element, matmul_table=table,
                 overlapped=device.kind == "gpu")


def measured_block_ratio(cluster: ClusterSpec, precision: str, tp: int, micro_batch: int, seq: int) -> float:
    """Measured over modelled time of the runtime's block at exactly this shape, from the profile's
    ``compute.block_check`` (the profiler times the block ``launch`` runs, forward + backward,
    next to what the fitted GEMM / attention / memory-rate model says for it); 1 where the shape was not
    profiled or in another precision. The fitted parts interpolate between shapes; where the whole block
    was timed, its time is the better figure (CPU caches make small and large micro-batches differ in
    ways the per-GEMM table does not see)."""
    for row in measured_compute(cluster, precision).block_check:
        if (row.tp, row.micro_batch, row.seq) == (tp, micro_batch, seq):
            model, seconds = row.model_s, row.measured_s
            return seconds / model if model > 0 and seconds > 0 else 1.0
    return 1.0


# The vocabulary ops ``measured_vocab_op`` reads: each row field's seconds, and the rows it was timed on.
VOCAB_OPS = {"head_loss": lambda row: (row.head_s + row.loss_s, row.vocab_local),
             "chunked_head_loss": lambda row: (row.chunked_head_loss_s, row.vocab_local),
             "embedding": lambda row: (row.embedding_s, row.embedding_rows)}


def measured_vocab_op(cluster: ClusterSpec, precision: str, op: str, tokens: float, hidden: int,
                      rows: int) -> tuple[int, int, float] | None:
    """``(profiled tokens, profiled rows, seconds)``: a vocabulary op, forward + backward, as the profile timed
    it (``compute.vocab``, worker ``measure_vocab``, every rank busy) at this hidden size, at the profiled
    shape nearest ``tokens`` x ``rows`` (the sum of the two ratios' logarithms: the quick profile times the
    smallest micro-batch of the tensor-parallel degrees its budget reaches); ``None`` where no row has this
    width (an older row without its shape neither). ``op``: ``head_loss`` the head GEMM plus the reference
    cross-entropy on materialised fp32 logits, ``chunked_head_loss`` the runtime's chunked linear +
    cross-entropy (the fused loss, and each shard's head pass under vocabulary parallelism), ``embedding``
    the lookup into a tp rank's rows (files since it is timed on them). The planner scales it to its own
    shape by its model's ratio (vocab.scaled_measurement)."""
    if tokens <= 0 or rows <= 0:
        return None
    best = None
    for row in measured_compute(cluster, precision).vocab:
        seconds, timed_rows = VOCAB_OPS[op](row)
        if row.hidden != hidden or not row.tokens or not timed_rows:
            continue
        if seconds is None or not (seconds > 0 and math.isfinite(seconds)):
            continue
        distance = abs(math.log(row.tokens / tokens)) + abs(math.log(timed_rows / rows))
        if best is None or distance < best[0]:
            best = (distance, row.tokens, timed_rows, seconds)
    return None if best is None else best[1:]


def measured_optimizer_seconds_per_param(cluster: ClusterSpec, precision: str, optimizer: str, tp: int) -> float | None:
    """Seconds one optimizer step takes per parameter a rank updates, as the profile timed the runtime's AdamW
    on a per-rank block at the nearest tensor-parallel degree (``compute.optimizer``, worker
    ``measure_optimizer``, every rank busy; a block's tensors shrink with tp, so their fixed costs weigh more
    per parameter). ``None`` without a measurement or for another optimizer than Adam(W), the runtime's:
    the planner then prices ``(28 + 4) B`` a parameter at the memory-bound rate."""
    if optimizer not in ("adam", "adamw"):
        return None
    rows = [(abs(math.log(row.tp / tp)), row.seconds_per_param)
            for row in measured_compute(cluster, precision).optimizer if row.tp > 0]
    rows = [r for r in rows if r[1] > 0 and math.isfinite(r[1])]
    return min(rows)[1] if rows else None


def matmul_time(m: float, k: float, n: float, rates: Rates) -> float:
    """One GEMM: 2mnk FLOPs at the achieved matmul rate and its operand traffic at the memory rate, the larger
    of the two where they overlap (GPUs), else their sum (:func:`roofline`); a measured table's rate where
    the profile has one."""
    if m <= 0 or k <= 0 or n <= 0:
        return 0.0
    if rates.matmul_table:
        flops = 2.0 * m * n * k
        return flops / interpolate_rate(rates.matmul_table, flops)
    return roofline(2.0 * m * n * k / rates.matmul, rates.matmul_bytes * (m * k + k * n + m * n) / rates.memory,
                    rates.overlapped)


def roofline(compute_s: float, memory_s: float, overlapped: bool) -> float:
    """An operation's seconds from its compute and memory times: max(compute, memory) where the two run at
    once (a GPU kernel streams its next tiles while it computes; Williams et al. 2009, Roofline), their sum
    where one unit does both in turn."""
    return max(compute_s, memory_s) if overlapped else compute_s + memory_s


def layer_matmul_shapes(model: ModelSpec, tokens: float, tp: int) -> list[tuple[float, float, float]]:
    """The forward GEMMs of one block on one tensor-parallel rank, as (m, k, n): column-parallel QKV and
    MLP-in (n split by tp), row-parallel output projection and MLP-out (k split by tp), Megatron-style; q
    and the attention output are ``q_width`` (heads x head_dim) wide."""
    h, f, q = model.hidden, model.ffn_hidden, model.q_width
    kv_local_width = flops.kv_heads_per_rank(model, tp) * model.head_dim   # a replicated head when tp > kv_heads
    mlp_in = f * (2 if model.mlp == "swiglu" else 1)
    return [
        (tokens, h, q / tp + 2 * kv_local_width),   # QKV
        (tokens, q / tp, h),                    # attention output projection
        (tokens, h, mlp_in / tp),               # fc1 / gate+up
        (tokens, f / tp, h),                    # fc2 / down
    ]


def selective_recompute_shapes(model: ModelSpec, tokens: float, tp: int) -> list[tuple[float, float, float]]:
    """The GEMMs selective recompute re-runs (the matmuls whose outputs are not kept, see
    memory.activation_bytes_per_layer) that the backward needs: wk and wo, plus w3 for SwiGLU. The block's
    last matmul (w2) is not re-run: the recompute stops once the backward has what it needs."""
    h, f = model.hidden, model.ffn_hidden
    shapes = [(tokens, h, flops.kv_heads_per_rank(model, tp) * model.head_dim), (tokens, model.q_width / tp, h)]
    if model.mlp == "swiglu":
        shapes.append((tokens, h, f / tp))
    return shapes


def attention_time(model: ModelSpec, micro_batch: int, seq: int, tp: int, cp: int, rates: Rates) -> tuple[float, float]:
    """Flash attention forward and backward on one rank: causal forward FLOPs 2*b*s_local*s*q/tp
    (4*b*s*s*q halved by the mask, the queries split over cp; q = heads x head_dim), backward 2.5x forward
    (5 matmuls against 2, Dao 2023)."""
    fwd_flops = 2.0 * micro_batch * (seq / cp) * seq * model.q_width / tp
    return fwd_flops / rates.attention, 2.5 * fwd_flops / rates.attention


# Unfused attention (Megatron-Core ``--attention-backend unfused``: megatron/core/transformer/
# dot_product_attention.py DotProductAttention, and the core attention of Korthikanti et al. 2022) materialises
# the [b, heads, s, s] scores at the activation width. Passes over them beside the GEMMs, each a read or a write:
#   forward   fused scale-mask-softmax (r+w): 2; attention dropout, where the model has it: read the
#             probabilities, write the output and a 1-byte mask (half a 2-byte pass): 2.5
#   backward  dropout backward (read the gradient and the mask, write): 2.5; softmax backward (read the
#             probabilities and the gradient, write): 3
UNFUSED_SCORE_PASSES_FWD = 2.0
UNFUSED_SCORE_PASSES_BWD = 3.0
UNFUSED_DROPOUT_PASSES = 2.5     # each direction, with attention dropout


def unfused_attention_time(model: ModelSpec, micro_batch: int, seq: int, tp: int, rates: Rates,
                           act_bytes: int) -> tuple[float, float]:
    """Forward and backward seconds of unfused attention on one rank (cp = 1). With a = heads/tp and
    d = head_dim, the causal mask is applied to fully computed scores, so no work is skipped:
        forward   QK^T and PV: 2 batched GEMMs of (a*b*s) x d x s            -> 4 a b s^2 d FLOPs
        backward  dV, dP, dQ, dK: 4 of them (the probabilities are kept)     -> 8 a b s^2 d FLOPs
    at the matmul rate (compute.matmul_time), plus the UNFUSED_SCORE_PASSES over the a*b*s*s scores at the
    memory rate (and UNFUSED_DROPOUT_PASSES where the model has dropout), ``act_bytes`` an element."""
    rows = micro_batch * model.heads / tp * seq
    gemm = matmul_time(rows, model.head_dim, seq, rates)
    score_bytes = rows * seq * act_bytes
    dropout = UNFUSED_DROPOUT_PASSES if model.dropout > 0 else 0.0
    fwd = 2 * gemm + (UNFUSED_SCORE_PASSES_FWD + dropout) * score_bytes / rates.memory
    bwd = 4 * gemm + (UNFUSED_SCORE_PASSES_BWD + dropout) * score_bytes / rates.memory
    return fwd, bwd


def elementwise_bytes_per_layer(model: ModelSpec, tokens: float, tp: int, sp: bool, fused: bool,
                                act_bytes: int) -> float:
    """Forward bytes moved by the memory-bound ops of one block (backward moves about twice as much): the sum
    of :func:`elementwise_bytes_by_op`."""
    return sum(elementwise_bytes_by_op(model, tokens, tp, sp, fused, act_bytes).values())


# Forward passes (reads + writes of whole tensors) of the fused kernels, per op: RMSNorm reads x and writes y;
# rotary reads and writes q and k; SwiGLU reads gate and up and writes the product. The profile's kernel table
# (planner/kernels.py) turns each measured kernel's time into a rate over these same bytes.
FUSED_PASSES = {"norm": 2, "rope": 2, "swiglu": 3}
EAGER_PASSES = {"norm": 6, "rope": 6, "swiglu": 5}


def elementwise_bytes_by_op(model: ModelSpec, tokens: float, tp: int, sp: bool, fused: bool,
                            act_bytes: int) -> dict[str, float]:
    """Forward bytes moved by the memory-bound ops of one block, per op.

    Counted as (reads + writes) of whole tensors, per op:
        norm           two norms, fused: read x, write y (2 passes over h); eager: ~6 passes (fp32 upcast,
                       square, mean, rsqrt-scale, weight multiply, downcast), and where the activations are
                       16-bit the NORM_FP32_TOUCHES between the upcast and the downcast move 4 bytes, not 2
                       (:func:`eager_norm_upcast_bytes`); with ``qk_norm`` the same over q and k
        rope           rotary on q and k, fused: 2 passes over (h + 2*kv/a*h)/2 ... read and write q and k;
                       eager: 6 passes; over the rotated share ``rotary_width / head_dim`` of them; a share
                       below one adds the copy of the rotated features (2 passes over the share) and the
                       concatenation that puts q and k back together (2 passes over q and k)
        swiglu         (``activation`` for other MLPs) SwiGLU fused: read gate, up, write out (3 passes over
                       f); eager: silu then multiply (5 passes); GELU fused 2 passes, eager 2
        residual       two residual adds: read two, write one (3 passes over h)
    Tensors outside the tensor-parallel region (norms, residuals) are split by tp under sequence parallel.
    """
    passes = FUSED_PASSES if fused else EAGER_PASSES
    h, f = model.hidden, model.ffn_hidden
    outside = tokens * h / (tp if sp else 1)
    qk = tokens * (model.q_width / tp + flops.kv_heads_per_rank(model, tp) * model.head_dim)
    normed = 2 * outside + (qk if model.qk_norm else 0.0)
    upcast = 0.0 if fused else eager_norm_upcast_bytes(act_bytes) * normed
    out = {"norm": act_bytes * passes["norm"] * normed + upcast}
    if model.position == "rope":
        share = model.rotary_width / model.head_dim
        out["rope"] = act_bytes * qk * (passes["rope"] * share + (2 * share + 2 if share < 1 else 0.0))
    if model.mlp == "swiglu":
        out["swiglu"] = act_bytes * passes["swiglu"] * tokens * f / tp
    else:
        out["activation"] = act_bytes * 2 * tokens * f / tp
    out["residual"] = act_bytes * 2 * 3 * outside
    return out


def elementwise_seconds(bytes_by_op: dict[str, float], memory_rate: float,
                        op_rates: tuple[tuple[str, float], ...] = ()) -> float:
    """Seconds of the memory-bound ops: each op's bytes at its measured kernel's rate (``op_rates``,
    planner/kernels.py block_kernel_rates), the rest at ``memory_rate``."""
    rates = dict(op_rates)
    return sum(moved / rates.get(op, memory_rate) for op, moved in bytes_by_op.items())


# Reads and writes of the eager RMSNorm that touch its fp32 copy (launcher/runtime/model.py rms_norm and
# torchtitan's RMSNorm both compute ``x.float()`` then cast back): the upcast's write, pow (read + write),
# mean (read), the rsqrt multiply (read + write) and the downcast's read.
NORM_FP32_TOUCHES = 7


def eager_norm_upcast_bytes(act_bytes: int) -> float:
    """Bytes per element an eager norm moves beyond its pass count at ``act_bytes``: its fp32 touches at
    4 - act_bytes more each (0 when the activations are fp32 already)."""
    return NORM_FP32_TOUCHES * max(0, 4 - act_bytes)


def loss_bytes_per_logit(fused: bool, precision: str) -> float:
    """Memory traffic of the loss per logit, forward + backward. Reference: write 16-bit logits (2), upcast
    (read 2 + write 4), log-softmax (read 4 + write 4), backward softmax-gradient (read 4 + write 4) and
    downcast (read 4 + write 2) = 30 B. Fused chunked kernel: logits written and read once at 16 bits plus
    the 16-bit gradient written and read: 8 B."""
    if precision == "fp32":
        return 8.0 * 4 / 2 if fused else 4 * 8.0
    return 8.0 if fused else 30.0
