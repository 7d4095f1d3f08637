"""Where the blocks go: the layer partition over virtual stages (balanced by time, memory enforced) and the
recompute counts per pipeline rank (the least recompute time that fits, recompute.choose_recompute).

A rank's static memory is bounded by a line in the number of blocks it holds, ``base[r] + n * slope[r]``
(rank_memory.static_lines: reserved bytes in activation units, with room for one re-materialised block); its
saved activations add ``in_flight[r] * sum_m c_m * act_m`` for c_m blocks under recompute mode m; together they
stay under activation_capacity (what the rank may reserve, less NCCL's buffers). Engines that run one recompute
mode for the whole model get one (uniform_choices).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.planner import memory
from meshplan.planner.inputs import GIB, MODES, Rejection
from meshplan.planner.partition import balance_layers
from meshplan.planner.recompute import RecomputeChoice, choose_recompute
from meshplan.planner.step import Step


@dataclass(frozen=True)
class Layout:
    """Blocks per virtual stage, blocks per pipeline rank, and each rank's recompute choice."""

    partition: tuple[int, ...]
    rank_layers: tuple[int, ...]
    choices: tuple[RecomputeChoice, ...]


def stage_layers(partition: list[int] | tuple[int, ...], stage: int) -> list[int]:
    """The blocks of virtual stage ``stage``: the partition's consecutive ranges, in stage order."""
    first = sum(partition[:stage])
    return list(range(first, first + partition[stage]))


def rank_layer_ids(layout: "Layout", rank: int, p: int) -> list[int]:
    """The blocks pipeline rank ``rank`` holds: those of its virtual stages ``rank, rank + p, ...``."""
    return [i for j in range(rank, len(layout.partition), p) for i in stage_layers(layout.partition, j)]


def rank_step(s: Step, layout: "Layout", rank: int) -> Step:
    """``s`` with its block cost that of the rank's own blocks (Step.for_blocks)."""
    return s.for_blocks(rank_layer_ids(layout, rank, s.p)) if s.mixes_blocks else s


def priced_for_own_blocks(s: Step, layout: "Layout") -> "Layout":
    """``layout`` with each rank's recompute time and saved activations those of its own blocks, where the
    model mixes dense and MoE blocks (the partition and the counts are chosen on the mean block)."""
    if not s.mixes_blocks:
        return layout
    choices = tuple(counted_choice(rank_step(s, layout, r), r, choice.counts)
                    for r, choice in enumerate(layout.choices))
    return Layout(layout.partition, layout.rank_layers, choices)


def counted_choice(s: Step, rank: int, counts: dict[str, int]) -> RecomputeChoice:
    """The :class:`RecomputeChoice` of given recompute ``counts`` on ``rank``: their recompute seconds and
    saved activations at ``s``'s block cost."""
    return RecomputeChoice(counts, sum(counts[m] * s.lc.recompute[m] for m in MODES),
                           saved_activation_bytes(s, rank, counts))


def stage_extra_time(s: Step) -> list[float]:
    """Seconds per micro-batch each virtual stage runs beside its blocks: the embedding on the first, head +
    loss on the last, each rank's vocabulary-parallel share on its first chunk, and -- under a pipeline -- a
    forward and a backward op's own cost (host.op_overhead, profiled on CPU ranks)."""
    p, n_stages, vc = s.p, s.n_stages, s.vc
    extra_time = [0.0] * n_stages
    extra_time[0] += vc.first_time
    extra_time[-1] += vc.last_time
    if s.cfg.vocab_parallel:
        for rank in range(p):
            extra_time[rank] += vc.each_time
    if p > 1:
        op_overhead = 2 * s.host.op_overhead()
        extra_time = [t + op_overhead for t in extra_time]
    return extra_time


def nccl_bytes(s: Step) -> float:
    """NCCL's buffers on a rank (memory.nccl_buffer_bytes): one communicator each for data parallel (with
    context parallel: FSDP2 shards over both), tensor, pipeline and context parallel. None on CPU ranks, whose
    gloo buffers live in host memory torch allocates."""
    cfg = s.cfg
    if not s.ctx.caching_allocator:
        return 0.0
    return memory.nccl_buffer_bytes([cfg.dp * cfg.cp, cfg.tp, cfg.pp, cfg.cp])


def activation_capacity(s: Step) -> float:
    """What a rank's static bytes plus saved activations may reach, both in the activation units of
    rank_memory.reserved_static: the reserved capacity (Context.reserved_capacity_bytes) less NCCL's buffers,
    over ``1 + fragmentation share``."""
    share = memory.FRAGMENTATION_SHARE if s.ctx.caching_allocator else 0.0
    return (s.ctx.reserved_capacity_bytes - nccl_bytes(s)) / (1.0 + share)


def layer_caps(s: Step, base: list[float], slope: list[float]) -> list[int] | None:
    """The most blocks each pipeline rank can hold with full recompute (None if the ranks together cannot
    hold the model)."""
    ctx, lc = s.ctx, s.lc
    capacity = activation_capacity(s)
    caps = []
    for r in range(len(base)):
        per_layer = slope[r] + s.in_flight[r] * lc.act["full"]
        room = capacity - base[r]
        caps.append(max(0, int(room // per_layer)) if per_layer > 0 else ctx.model.layers)
    if sum(caps) < ctx.model.layers:
        return None
    return caps


def choose_partition(s: Step, base: list[float], slope: list[float],
                     partition: list[int] | None) -> list[int] | Rejection:
    """``partition`` checked, or -- when None -- the time-balanced partition within each rank's block cap
    (partition.balance_layers)."""
    ctx, lc, p, n_stages = s.ctx, s.lc, s.p, s.n_stages
    model = ctx.model
    if partition is None:
        caps = layer_caps(s, base, slope)
        if caps is None:
            need = min(base) + s.in_flight[0] * lc.act["full"] * model.layers / p
            return Rejection("OOM", "even full recompute does not fit", max(0.0, need - activation_capacity(s)))
        partition = balance_layers(model.layers, n_stages, lc.fwd + lc.bwd, stage_extra_time(s), caps, p)
        if partition is None:
            over = max(base[r] + s.in_flight[r] * lc.act["full"] * model.layers / n_stages for r in range(p))
            return Rejection("OOM", "no layer partition fits every stage's memory",
                             max(0.0, over - activation_capacity(s)))
    if len(partition) != n_stages or sum(partition) != model.layers:
        return Rejection("partition", f"partition {partition} does not cover {model.layers} layers")
    return partition


def choose_layout(s: Step, base: list[float], slope: list[float], partition: list[int] | None,
                  recompute_counts: list[dict[str, int]] | None) -> Layout | Rejection:
    """The partition (:func:`choose_partition`) and per pipeline rank the recompute counts: the given ones
    (``recompute_counts`` per virtual stage), or the least recompute time whose activations fit the rank's
    memory beside its static bytes."""
    ctx, lc, p, n_stages = s.ctx, s.lc, s.p, s.n_stages
    partition = choose_partition(s, base, slope, partition)
    if isinstance(partition, Rejection):
        return partition
    rank_layers = [sum(partition[j] for j in range(r, n_stages, p)) for r in range(p)]
    capacity = activation_capacity(s)
    # (static bytes with room for one block re-materialised by recompute)
    budgets = [capacity - (base[r] + rank_layers[r] * slope[r]) for r in range(p)]
    if recompute_counts is None and s.cfg.recompute is None and not ctx.engine.mixed_recompute:
        uniform = uniform_choices(s, rank_layers, budgets, min(partition))
        if uniform is None:
            return _oom(s, rank_layers, budgets, 0)
        return Layout(tuple(partition), tuple(rank_layers), tuple(uniform))
    choices: list[RecomputeChoice] = []
    for r in range(p):
        if recompute_counts is not None:
            choice = counted_choice(s, r, rank_counts(recompute_counts, r, p, n_stages))
        else:
            choice = choose_recompute(rank_layers[r], s.in_flight[r], lc.act, lc.recompute, budgets[r],
                                      s.cfg.recompute)
            if choice is None:
                return _oom(s, rank_layers, budgets, r)
        choices.append(choice)
    return Layout(tuple(partition), tuple(rank_layers), tuple(choices))


def _oom(s: Step, rank_layers: list[int], budgets: list[float], r: int) -> Rejection:
    """Pipeline rank ``r`` cannot hold its blocks even under full recompute: by how many reserved bytes."""
    full = saved_activation_bytes(s, r, {"none": 0, "selective": 0, "full": rank_layers[r]})
    share = memory.FRAGMENTATION_SHARE if s.ctx.caching_allocator else 0.0
    over = (full - budgets[r]) * (1 + share)
    need = s.ctx.reserved_capacity_bytes + over
    return Rejection("OOM", f"pipeline rank {r} needs {need / GIB:.1f} GiB reserved", max(0.0, over))


def uniform_choices(s: Step, rank_layers: list[int], budgets: list[float],
                    smallest_chunk: int) -> list[RecomputeChoice] | None:
    """Recompute for an engine that runs one mode for the whole model (``mixed_recompute`` False): the mode,
    the same on every rank, whose slowest rank recomputes least among those that fit every rank's ``budgets``;
    where the engine runs ``block_recompute`` (Megatron's ``--recompute-method block``, applied to each model
    chunk: megatron/core/transformer/transformer_block.py ``_checkpointed_forward``) also full recompute of the
    same fewest N blocks in every chunk that fits (N * virtual stages on a rank), the others recomputing
    nothing. None if nothing fits."""
    lc, p = s.lc, s.p
    candidates = []
    for mode in MODES:
        chosen = [choose_recompute(rank_layers[r], s.in_flight[r], lc.act, lc.recompute, budgets[r], mode)
                  for r in range(p)]
        if all(c is not None for c in chosen):
            candidates.append(chosen)
    if s.ctx.engine.block_recompute:
        for per_chunk in range(1, smallest_chunk):
            blocks = per_chunk * s.v
            counts = [{"none": n - blocks, "selective": 0, "full": blocks} for n in rank_layers]
            chosen = [RecomputeChoice(c, blocks * lc.recompute["full"], saved_activation_bytes(s, r, c))
                      for r, c in enumerate(counts)]
            if all(c.act_bytes <= budgets[r] for r, c in enumerate(chosen)):
                candidates.append(chosen)
                break
    if not candidates:
        return None
    return min(candidates, key=lambda chosen: max(c.time for c in chosen))


def saved_activation_bytes(s: Step, rank: int, counts: dict[str, int]) -> float:
    """Bytes of saved activations on ``rank``: its in-flight micro-batches times each block's bytes under its
    recompute mode."""
    return s.in_flight[rank] * sum(counts[m] * s.lc.act[m] for m in MODES)


def rank_counts(stage_counts: list[dict[str, int]], rank: int, p: int, n_stages: int) -> dict[str, int]:
    """A pipeline rank's recompute counts: the sum over its virtual stages."""
    total = {m: 0 for m in MODES}
    for j in range(rank, n_stages, p):
        for m in MODES:
            total[m] += stage_counts[j].get(m, 0)
    return total


def block_split_counts(counts: dict[str, int], partition: list[int] | tuple[int, ...], stage: int, p: int,
                       n_stages: int) -> dict[str, int]:
    """A rank's recompute counts handed to its virtual stages as Megatron's block method runs them: the same
    number of fully recomputed blocks in every chunk (uniform_choices); any other counts as split_counts."""
    chunks = len(range(stage % p, n_stages, p))
    rank_total = sum(partition[j] for j in range(stage % p, n_stages, p))
    full = counts.get("full", 0)
    if counts.get("selective", 0) or not 0 < full < rank_total or full % chunks:
        return split_counts(counts, partition, stage, p, n_stages)
    take = min(full // chunks, partition[stage])
    return {"full": take, "selective": 0, "none": partition[stage] - take}


def split_counts(counts: dict[str, int], partition: list[int] | tuple[int, ...], stage: int, p: int,
                 n_stages: int) -> dict[str, int]:
    """Hand a rank's recompute counts to its virtual stages in order: full first, then selective."""
    return rank_chunk_counts(counts, partition, stage, p, n_stages)[stage // p]


def rank_chunk_counts(counts: dict[str, int], partition: list[int] | tuple[int, ...], rank: int, p: int,
                      n_stages: int) -> list[dict[str, int]]:
    """:func:`split_counts` of every virtual stage of pipeline rank ``rank % p``, in stage order."""
    remaining = dict(counts)
    chunks = []
    for j in range(rank % p, n_stages, p):
        layers, used, take = partition[j], 0, {}
        for m in ("full", "selective", "none"):
            take[m] = min(remaining[m], layers - used)
            used += take[m]
            remaining[m] -= take[m]
        chunks.append(take)
    return chunks
