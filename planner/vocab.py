"""The vocabulary layers: embedding (first stage), head and loss (last stage), or -- under vocabulary
parallelism (Yeung et al. 2024) -- an equal share of both on every pipeline rank, with the communication that
split costs inside and outside the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

from meshplan.planner import comm, compute, flops, memory
from meshplan.planner.comm import GroupLink
from meshplan.planner.inputs import Config, Context
from meshplan.planner.kernels import loss_time_ratio, plan_kernels


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


@dataclass(frozen=True)
class HeadLoss:
    """One micro-batch's head + loss and embedding on the ranks that hold them (or each shard of them)."""

    tokens: float
    vocab_local: int
    fused_loss: bool
    head_time: float
    embed_time: float
    logits_peak: float
    logprob: float


def vocab_cost(ctx: Context, cfg: Config) -> VocabCost:
    """Per micro-batch costs of the embedding and head + loss under ``cfg`` (cached on :class:`VocabKey`)."""
    return _vocab_cost(ctx, VocabKey(cfg.micro_batch, cfg.cp, cfg.tp, cfg.pp, cfg.dp, cfg.vocab_parallel,
                                     cfg.fused_kernels, tuple(cfg.mesh_order)))


@lru_cache(maxsize=4096)
def _vocab_cost(ctx: Context, cfg: VocabKey) -> VocabCost:
    model, train = ctx.model, ctx.train
    rates = compute.achieved_rates(ctx.cluster, train.precision)
    h = head_and_loss(ctx, cfg, rates)
    embed_params = flops.embedding_params(model, train.seq_len) / cfg.tp
    head_params = (0 if model.tied_embeddings else model.vocab * model.hidden) / cfg.tp + flops.norm_params(model)
    if not cfg.vocab_parallel:
        return VocabCost(h.embed_time, h.head_time, 0.0, embed_params, head_params, 0.0, h.logits_peak, h.logprob,
                         0.0)
    return vocab_parallel_cost(ctx, cfg, h, rates)


def head_and_loss(ctx: Context, cfg: VocabKey, rates: compute.Rates) -> HeadLoss:
    """Seconds of one micro-batch's head + loss (:func:`head_loss_time`) and embedding
    (:func:`embedding_time`), and the loss's logits bytes. The runtime's vocabulary-parallel loss is always
    the chunked one (launcher/runtime/vocab_parallel.py)."""
    model, train = ctx.model, ctx.train
    tokens = cfg.micro_batch * train.seq_len / cfg.cp
    shards = cfg.tp * (cfg.pp if cfg.vocab_parallel else 1)
    vocab_local = math.ceil(model.vocab / shards)
    fused_loss = cfg.fused_kernels or (cfg.vocab_parallel and cfg.pp > 1)
    head_time = head_loss_time(ctx, tokens, vocab_local, fused_loss, rates)
    embed_time = embedding_time(ctx, tokens, vocab_local, cfg.tp, rates)
    if fused_loss and plan_kernels(ctx, cfg)["loss"] == "liger":
        head_time *= loss_time_ratio(ctx.cluster, train.precision, "liger")
        logits_peak = memory.liger_loss_bytes(tokens, vocab_local, train.precision, model.hidden)
    else:
        logits_peak = memory.logits_bytes(tokens, vocab_local, train.precision, fused_loss, hidden=model.hidden,
                                          stage_keeps_logits=cfg.pp > 1)
    logprob = 0.0 if fused_loss else memory.saved_logprob_bytes(tokens, vocab_local, train.precision, cfg.pp > 1)
    return HeadLoss(tokens, vocab_local, fused_loss, head_time, embed_time, logits_peak, logprob)


def vocab_parallel_cost(ctx: Context, cfg: VocabKey, h: HeadLoss, rates: compute.Rates) -> VocabCost:
    """Vocabulary parallelism as meshplan's runtime does it (vocab_parallel.py): every pp x tp rank holds
    V/(p*t) rows of the embedding and head. Per micro-batch, inside the pipeline, the head pass: the last
    stage's hidden states broadcast over the pipeline row and its gradient reduced back (two one-way transfers
    of the [s, b, h] activation, whole: each tp column moves the full sequence, one all-reduce's worth), the
    softmax statistics all-gathered per loss chunk (2 fp32 per token) over the pp x tp group, one latency per
    chunk, and every one of those calls a meeting of the pipeline row (host.meeting; the others come from their
    own pipeline work, about a head pass apart). Outside the pipeline: :func:`vocab_edges_comm`."""
    model, train = ctx.model, ctx.train
    pp_link = comm.group_link(ctx.cluster, cfg.pp, comm.group_stride(cfg.mesh_order, _degrees(cfg), "pp"))
    activation = h.tokens * model.hidden * ctx.act_bytes
    chunk = memory.loss_chunk_tokens(int(h.tokens), model.hidden, h.vocab_local)
    chunks = math.ceil(h.tokens / chunk)
    stats = chunks * comm.allgather_time(2 * chunk * 4.0 * cfg.pp * cfg.tp, pp_link)
    meetings = (2 + chunks) * ctx.host.meeting(h.head_time, cfg.pp)
    vocab_comm = comm.allreduce_time(activation, pp_link) + stats + meetings
    shards = cfg.tp * cfg.pp
    each_params = (model.vocab * model.hidden * (1 if model.tied_embeddings else 2)) / shards
    pass_time = h.head_time + vocab_comm
    num_mb = train.global_batch // (cfg.dp * cfg.micro_batch)
    # the first stage looks up every micro-batch's tokens at once, one dense gradient a step (begin_step)
    step_embed = embedding_time(ctx, num_mb * h.tokens, h.vocab_local, cfg.tp, rates)
    edges_comm = vocab_edges_comm(ctx, cfg, num_mb * activation, each_params, pp_link, step_embed)
    # the first stage keeps a learned positions table (split over tp like the embedding it sits beside)
    positions = flops.position_params(model, train.seq_len) / cfg.tp
    return VocabCost(0.0, 0.0, pass_time, positions + flops.norm_params(model), flops.norm_params(model),
                     each_params, h.logits_peak, h.logprob, vocab_comm, pass_time, edges_comm, step_embed)


def _degrees(cfg: Config | VocabKey) -> dict[str, int]:
    return {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp}


def vocab_edges_comm(ctx: Context, cfg: Config | VocabKey, step_activation_bytes: float, shard_params: float,
                     pp_link: GroupLink, embed_s: float) -> float:
    """Seconds per step the vocabulary-parallel runtime communicates outside the pipeline, every rank in turn
    (vocab_parallel.py ``begin_step`` / ``end_step``, around the embedding lookup of every micro-batch,
    ``embed_s`` of work): the embedding's partial sums reduced to the first stage and the first stage's input
    gradient broadcast back (one all-reduce's worth of the step's activations over the pipeline row), and the
    shards' fp32 gradients (one or two tensors of ``shard_params``) all-reduced over the data x context ranks
    after the pipeline, where no backward is left to hide them; each call a meeting of ranks arriving from
    their own work."""
    cluster = ctx.cluster
    degrees = _degrees(cfg)
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
    meetings = (2 * ctx.host.meeting(embed_s, cfg.pp)             # the pipeline row's two calls
                + grad_calls * ctx.host.meeting(embed_s, replicas))  # the replicas' gradient calls
    return comm.allreduce_time(step_activation_bytes, pp_link) + grads + meetings


def scaled_measurement(ctx: Context, op: str, tokens: float, rows: int,
                       modelled: Callable[[float, int], float]) -> float:
    """A vocabulary op's seconds on ``tokens`` tokens and ``rows`` vocabulary rows: the profile's timing at the
    nearest profiled shape (compute.measured_vocab_op) times the model's ratio between the two shapes, the way
    a measured block corrects its fitted parts; the model alone where none was profiled. Measured because the
    model misses both ways: on 2 CPU ranks the reference loss takes about 35 ns a logit against 1 priced from
    the memory rate and the embedding's backward 18x its bytes at that rate (the page faults of a fresh dense
    gradient every call), while an H200 runs the chunked loss at 0.85x eager's speed where the byte counts
    price its loss at 8 B a logit against the reference's 30 (docs/kernels.md)."""
    timed = compute.measured_vocab_op(ctx.cluster, ctx.train.precision, op, tokens, ctx.model.hidden, rows)
    if timed is None:
        return modelled(tokens, rows)
    timed_tokens, timed_rows, seconds = timed
    at_timed = modelled(timed_tokens, timed_rows)
    return seconds * modelled(tokens, rows) / at_timed if at_timed > 0 else seconds


def head_loss_time(ctx: Context, tokens: float, vocab_local: int, fused_loss: bool, rates: compute.Rates) -> float:
    """Seconds of the LM head and its loss on ``tokens`` tokens and ``vocab_local`` rows, forward + backward:
    ``3 * head GEMM + loss bytes / memory rate`` (each chunk of a chunked loss also reads and writes the weight
    gradient), scaled to the profile's timing (:func:`scaled_measurement`)."""
    hidden = ctx.model.hidden
    per_logit = compute.loss_bytes_per_logit(fused_loss, ctx.train.precision)

    def modelled(n: float, rows: int) -> float:
        loss = n * rows * per_logit / rates.memory
        if fused_loss:
            loss += memory.loss_chunk_accumulate_bytes(int(n), hidden, rows, ctx.act_bytes) / rates.memory
        return 3 * compute.matmul_time(n, hidden, rows, rates) + loss
    op = "chunked_head_loss" if fused_loss else "head_loss"
    return scaled_measurement(ctx, op, tokens, vocab_local, modelled)


def embedding_time(ctx: Context, tokens: float, rows: int, tp: int, rates: compute.Rates) -> float:
    """Seconds of one token-embedding lookup of ``tokens`` tokens into a rank's ``rows`` vocabulary rows,
    forward + backward (``vocab / tp`` rows under parallelize.VocabShardEmbedding, ``vocab / (pp tp)`` under
    vocabulary parallelism): 3 passes over the ``[s, b, h / tp]`` activation (the lookup's output, its
    gradient, the gradient's scatter) and one write of the dense ``[rows, h]`` weight gradient the backward
    zero-fills (``embedding_dense_backward``), at the memory rate, scaled to the profile's timing
    (:func:`scaled_measurement`)."""
    hidden, element = ctx.model.hidden, ctx.act_bytes

    def modelled(n: float, shard_rows: int) -> float:
        return (3 * n * hidden * element / tp + shard_rows * hidden * element) / rates.memory
    return scaled_measurement(ctx, "embedding", tokens, rows, modelled)
