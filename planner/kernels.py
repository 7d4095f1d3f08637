"""Which implementation runs each fused op of a plan, and at what rate: the profile's kernel table.

On a GPU, ``meshplan profile`` times each fused op (RMSNorm, SwiGLU, rotary, the linear + cross-entropy) in
each implementation the runtime has there (``fused``: meshplan's Triton kernels; ``liger``: liger-kernel's,
where it imports), forward + backward at the model's widths, and checks each against eager
(``profiler/phases/kernels.py``). A plan with fused kernels runs, per op, the fastest implementation whose
largest difference from eager stays within :data:`MAX_KERNEL_ERROR` (:func:`kernel_choice`; pins and a
written plan's own choice, ``Context.kernels``, come first), and the block's memory-bound terms price the
norm, rotary and SwiGLU bytes at the chosen implementation's measured rate (:func:`block_kernel_rates`)
instead of the device's memory rate. A full profile also times ``torch.compile`` of the reference norm,
SwiGLU and rotary (``compile``): where that is fastest, a plan that compiles its blocks runs the reference
op there (``reference``), which Inductor fuses into the block. Without a table (no profile, a CPU profile,
or an older file) every op runs ``fused`` at the memory rate. The loss is chosen the same way, between
``fused`` and ``liger``; a plan running liger's prices its head + loss as meshplan's chunked loss times the
two kernels' measured ratio (:func:`loss_time_ratio`), and its memory with planner/memory.py
liger_loss_bytes.

A rate is the planner's own bytes for the op at the timed shape (``compute.FUSED_PASSES``: forward passes,
and backward moving twice the forward's, as ``block.layer_cost`` counts it) over the measured forward +
backward seconds (``profiler/cluster_file.py`` kernel_table), so the planner's term reproduces the measured
time at the timed shape and scales with the bytes elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshplan.engines import MESHPLAN
from meshplan.measured import KernelRow
from meshplan.plan import KERNEL_NAMES
from meshplan.rules import head_is_whole
from meshplan.spec import ClusterSpec, ModelSpec

from . import compute

if TYPE_CHECKING:
    from .inputs import Config, Context
    from .vocab import VocabKey

KERNEL_OPS = KERNEL_NAMES
# The largest difference from eager (relative to eager's largest magnitude, over outputs and input gradients)
# an implementation may show and still be chosen: bf16's unit roundoff is 2^-8 = 3.9e-3, and a kernel that
# rounds once where eager rounds at each step differs by a few units.
MAX_KERNEL_ERROR = 2e-2
# Backward moves twice the forward's bytes (block.layer_cost: bwd = ... + 2 elementwise).
FWD_BWD_BYTES = 3


def measured_rows(cluster: ClusterSpec, precision: str) -> tuple[KernelRow, ...]:
    """The kernel table of the cluster's profile, where it was measured in ``precision``."""
    return compute.measured_compute(cluster, precision).kernels


def usable(row: KernelRow) -> bool:
    """The implementation ran and computes what eager computes."""
    return row.seconds is not None and row.seconds > 0 and row.max_error is not None \
        and row.max_error <= MAX_KERNEL_ERROR


def plan_impl(row: KernelRow) -> str:
    """The plan's ``kernels`` value a row stands for: ``compile`` (torch.compile of the reference op) is the
    reference op, which a compiled block's Inductor fuses."""
    return "reference" if row.impl == "compile" else row.impl


def kernel_choice(cluster: ClusterSpec, precision: str, compiled: bool = False) -> dict[str, str]:
    """Per op, the fastest usable implementation the profile timed, as the plan's ``kernels`` value; ``fused``
    where it timed none. The ``compile`` rows count only for a plan that compiles its blocks (``compiled``),
    and only for the norm, SwiGLU and rotary: the reference loss keeps the whole logits, which the search
    weighs as a memory choice (``fused_kernels``)."""
    best: dict[str, KernelRow] = {}
    for row in measured_rows(cluster, precision):
        is_compile = row.impl == "compile"
        if row.op not in KERNEL_OPS or not usable(row) or \
                (is_compile and (not compiled or row.op not in compute.FUSED_PASSES)):
            continue
        if row.op not in best or row.seconds < best[row.op].seconds:
            best[row.op] = row
    return {op: plan_impl(best[op]) if op in best else "fused" for op in KERNEL_OPS}


def plan_kernels(ctx: Context, cfg: Config | VocabKey) -> dict[str, str]:
    """The plan's ``kernels`` section: ``reference`` everywhere without fused kernels, ``fused`` everywhere
    for another engine (it runs its own); with meshplan's runtime, :func:`kernel_choice` for the plan's
    ``compile`` under the context's pins (``Context.kernels``: ``--fix <op>_kernel``, or a written plan's
    whole section), except that liger's loss needs the head whole on the rank (tp 1 and the vocabulary not
    split over pipeline ranks), where meshplan's vocabulary-parallel chunked loss runs instead."""
    if not cfg.fused_kernels:
        return {op: "reference" for op in KERNEL_OPS}
    if ctx.engine.name != MESHPLAN.name:
        return {op: "fused" for op in KERNEL_OPS}
    compiled = getattr(cfg, "compile", False)
    chosen = kernel_choice(ctx.cluster, ctx.train.precision, compiled) | dict(ctx.kernels or ())
    if chosen["loss"] == "liger" and not head_is_whole(cfg.tp, cfg.pp, cfg.vocab_parallel):
        chosen["loss"] = "fused"
    return chosen


def block_kernel_rates(ctx: Context, cfg: Config) -> tuple[tuple[str, float], ...]:
    """``(op, bytes/s)`` of each memory-bound op whose implementation in the plan the profile timed with a
    rate: a fused or liger kernel's row, or for a reference op in a compiled block its ``compile`` row. None
    for another engine, which runs kernels of its own."""
    if ctx.engine.name != MESHPLAN.name:
        return ()
    chosen = plan_kernels(ctx, cfg)
    return tuple((row.op, row.gbps * 1e9) for row in measured_rows(ctx.cluster, ctx.train.precision)
                 if row.op in compute.FUSED_PASSES and chosen[row.op] == plan_impl(row)
                 and (row.impl != "compile" or cfg.compile) and usable(row) and row.gbps)


def loss_time_ratio(cluster: ClusterSpec, precision: str, impl: str) -> float:
    """The measured time of the loss in ``impl`` over meshplan's chunked loss (``fused``), head GEMMs
    included, both timed by the profile on the same tokens (1 where either was not): the head + loss term,
    priced and fitted as meshplan's chunked loss, takes this factor when the plan runs ``impl``."""
    rows = {row.impl: row for row in measured_rows(cluster, precision) if row.op == "loss" and usable(row)}
    if impl == "fused" or impl not in rows or "fused" not in rows or rows[impl].tokens != rows["fused"].tokens:
        return 1.0
    return rows[impl].seconds / rows["fused"].seconds


def op_bytes(model: ModelSpec, op: str, tokens: int, act_bytes: int) -> float:
    """Forward + backward bytes the planner counts for one call of ``op`` on ``tokens`` tokens at tp 1: one
    norm over ``[tokens, hidden]``, SwiGLU over ``[tokens, ffn_hidden]``, rotary over q and k."""
    if op == "norm":
        elements = tokens * model.hidden
    elif op == "swiglu":
        elements = tokens * model.ffn_hidden
    else:
        elements = tokens * (model.q_width + model.kv_heads * model.head_dim)
    return FWD_BWD_BYTES * compute.FUSED_PASSES[op] * elements * act_bytes
