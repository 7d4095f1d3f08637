"""The pipeline: the makespan of a step's compute, the point-to-point transfers on its critical path, and the
micro-batch time of each pipeline rank.

Closed forms (Narayanan et al. 2021) where every rank has a device of its own; where ranks share cores the host
model simulates the schedule instead (host.HostModel.pipeline_makespan, schedule_sim.py). :func:`pipeline_timeline`
gives the ops of that schedule with their start and end, the picture ``meshplan report`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.planner import comm, host, schedule_sim
from meshplan.planner.layout import Layout, rank_step, stage_extra_time, stage_layers
from meshplan.planner.schedule_sim import TimedOp
from meshplan.planner.step import Step


@dataclass(frozen=True)
class PipelineTime:
    """One step's pipeline: compute makespan, exposed p2p, bubble (makespan beyond m * T_max) and the total
    with the vocabulary-parallel work outside the pipeline."""

    makespan: float
    pp_comm: float
    bubble: float
    total: float


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


def rank_times(s: Step, layout: Layout) -> list[float]:
    """Pipeline rank r's forward + backward seconds for one micro-batch over all its chunks: its blocks, their
    recompute, and its stages' extra work (layout.stage_extra_time). Each rank's blocks cost their own
    (layout.rank_step: a model's dense and MoE blocks differ)."""
    extra_time = stage_extra_time(s)
    rank_time = []
    for r in range(s.p):
        lc = rank_step(s, layout, r).lc
        t = layout.rank_layers[r] * (lc.fwd + lc.bwd) + layout.choices[r].time
        t += sum(extra_time[j] for j in range(r, s.n_stages, s.p))
        rank_time.append(t)
    return rank_time


def pipeline_time(s: Step, rank_time: list[float]) -> PipelineTime:
    """The step's :class:`PipelineTime`: the host model's makespan where ranks share cores (a vocabulary pass
    runs on the last rank and on helper threads beside the others' ops), else :func:`pipeline_makespan`; the
    exposed p2p (:func:`pipeline_p2p_exposed`); the vocabulary-parallel communication and embedding lookups
    outside the pipeline (vocab.vocab_edges_comm)."""
    cfg, vc, num_mb = s.cfg, s.vc, s.num_mb
    vocab_pass = vc.pass_time if cfg.vocab_parallel else 0.0
    pp_stride = comm.group_stride(cfg.mesh_order, cfg.degrees, "pp")
    makespan = s.host.pipeline_makespan(cfg.schedule, rank_time, num_mb, s.v, s.lc.fwd / (s.lc.fwd + s.lc.bwd),
                                        pp_stride, vocab_pass)
    if makespan is None:
        makespan = pipeline_makespan(cfg.schedule, rank_time, num_mb, s.v)
    pp_comm = pipeline_p2p_exposed(cfg.schedule, rank_time, num_mb, s.v, s.hop)
    bubble = max(0.0, makespan - num_mb * max(rank_time))
    return PipelineTime(makespan, pp_comm, bubble, makespan + pp_comm + vc.edges_comm + vc.edges_compute)


def pipeline_timeline(s: Step, rank_time: list[float], num_mb: int | None = None) -> list[TimedOp]:
    """Every op of the step's schedule with its start and end (schedule_sim.schedule_timeline) for
    ``num_mb`` micro-batches (the step's own by default), on the rank times the makespan is priced on
    (:func:`rank_times`). Where the host model simulates the schedule (:func:`pipeline_time`: ranks that
    share cores) the ops run at its sharing speeds with the vocabulary pass apart, as it prices them; elsewhere
    every rank runs at its own device's speed, where the simulation's last end is
    :func:`pipeline_makespan` (tests/test_measured_costs.py)."""
    cfg, m = s.cfg, s.num_mb if num_mb is None else num_mb
    forward_share = s.lc.fwd / (s.lc.fwd + s.lc.bwd)
    vocab_pass = s.vc.pass_time if cfg.vocab_parallel else 0.0
    pp_stride = comm.group_stride(cfg.mesh_order, cfg.degrees, "pp")
    if s.host.pipeline_makespan(cfg.schedule, rank_time, s.num_mb, s.v, forward_share, pp_stride,
                                vocab_pass) is None:
        return schedule_sim.schedule_timeline(cfg.schedule, rank_time, m, s.v, forward_share)
    cluster = s.ctx.cluster
    speed = host.shared_host_speed(host.busy_speedup_table(cluster), cluster.gpus_per_node, s.p, pp_stride)
    return schedule_sim.schedule_timeline(cfg.schedule, [t - vocab_pass for t in rank_time], m, s.v,
                                          forward_share, speed, vocab_pass)


def drain_after_last_backward(s: Step, layout: Layout, rank: int) -> float:
    """Seconds pipeline rank ``rank`` has left after its own last backward while the pipeline drains: in every
    schedule the runtime runs (GPipe, 1F1B, interleaved) a rank's last op is the last micro-batch's backward of
    its first chunk (stage ``rank``; schedule_sim.pipeline_ops), which then runs through stages
    ``rank - 1 .. 0``, one hop before each."""
    partition, choices, rank_layers = layout.partition, layout.choices, layout.rank_layers
    return sum(partition[j] * s.for_blocks(stage_layers(partition, j)).lc.bwd
               + choices[j].time * partition[j] / max(1, rank_layers[j]) for j in range(rank)) + rank * s.hop
