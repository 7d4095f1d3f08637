"""The vocabulary layers: embedding (first stage), head and loss (last stage), or -- under vocabulary
parallelism (Yeung et al. 2024) -- an equal share of both on every pipeline rank, with the communication that
split costs inside and outside the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from meshplan.planner import comm, compute, flops, memory
from meshplan.planner.comm import GroupLink
from meshplan.planner.inputs import Config, Context


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
    h = head_and_loss(ctx, cfg)
    embed_params = flops.embedding_params(model, train.seq_len) / cfg.tp
    head_params = (0 if model.tied_embeddings else model.vocab * model.hidden) / cfg.tp + flops.norm_params(model)
    if not cfg.vocab_parallel:
        return VocabCost(h.embed_time, h.head_time, 0.0, embed_params, head_params, 0.0, h.logits_peak, h.logprob,
                         0.0)
    return vocab_parallel_cost(ctx, cfg, h)


def head_and_loss(ctx: Context, cfg: VocabKey) -> HeadLoss:
    """Seconds of one micro-batch's head + loss (``3 * head GEMM + loss bytes / memory rate``, or the profile's
    timing of exactly this shape, compute.measured_head_loss_time) and embedding (3 passes over the [s, b, h]
    activation), and the loss's logits bytes. The runtime's vocabulary-parallel loss is always the chunked
    one (launcher/runtime/vocab_parallel.py); each chunk of a chunked loss reads and writes the weight
    gradient."""
    model, train, cluster = ctx.model, ctx.train, ctx.cluster
    rates = compute.achieved_rates(cluster, train.precision)
    tokens = cfg.micro_batch * train.seq_len / cfg.cp
    shards = cfg.tp * (cfg.pp if cfg.vocab_parallel else 1)
    vocab_local = math.ceil(model.vocab / shards)
    head_fwd = compute.matmul_time(tokens, model.hidden, vocab_local, rates)
    fused_loss = cfg.fused_kernels or (cfg.vocab_parallel and cfg.pp > 1)
    loss = tokens * vocab_local * compute.loss_bytes_per_logit(fused_loss, train.precision) / rates.memory
    if fused_loss:
        loss += memory.loss_chunk_accumulate_bytes(int(tokens), model.hidden, vocab_local, ctx.act_bytes) / rates.memory
    timed = compute.measured_head_loss_time(cluster, train.precision, tokens, model.hidden, vocab_local, fused_loss)
    head_time = timed if timed is not None else 3 * head_fwd + loss
    embed_time = 3 * tokens * model.hidden * ctx.act_bytes / (cfg.tp if cfg.tp > 1 else 1) / rates.memory
    logits_peak = memory.logits_bytes(tokens, vocab_local, train.precision, fused_loss, hidden=model.hidden,
                                      stage_keeps_logits=cfg.pp > 1)
    logprob = 0.0 if fused_loss else memory.saved_logprob_bytes(tokens, vocab_local, train.precision, cfg.pp > 1)
    return HeadLoss(tokens, vocab_local, fused_loss, head_time, embed_time, logits_peak, logprob)


def vocab_parallel_cost(ctx: Context, cfg: VocabKey, h: HeadLoss) -> VocabCost:
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
    edges_comm = vocab_edges_comm(ctx, cfg, num_mb * activation, each_params, pp_link, h.embed_time * num_mb)
    # the first stage keeps a learned positions table (split over tp like the embedding it sits beside)
    positions = flops.position_params(model, train.seq_len) / cfg.tp
    return VocabCost(0.0, 0.0, pass_time, positions + flops.norm_params(model), flops.norm_params(model),
                     each_params, h.logits_peak, h.logprob, vocab_comm, pass_time, edges_comm, h.embed_time * num_mb)


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
