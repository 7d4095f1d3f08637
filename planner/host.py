"""The host model: what ranks that share a host's cores cost beyond their compute and communication.

CPU processes on fewer cores than ranks are time-sliced by the operating system. Three effects follow, each
measured by ``meshplan profile`` (the profile's ``host`` section, ``cluster.profile.host``: meshplan/measured.py;
profiler/worker.py's host phases) and priced here:

* meeting (:func:`meeting_time`): ranks reach a collective at different moments and the first wait for the last;
* sharing (:func:`busy_speedup_table`): a rank idle in a pipeline bubble hands its share of the cores to the
  busy ones, which then run faster (the processor-sharing simulation in schedule_sim.py);
* pipeline op overhead (:func:`pipeline_op_overhead`): each schedule op's bookkeeping and send/recv, and the
  wait for a time-sliced neighbour.

The cost model reads them through one interface, :class:`HostModel`. :func:`host_model` gives the shared-cores
model for CPU clusters and the null model for GPU clusters (a device per rank: no meeting, no sharing, the host
runs ahead of the device queue), so a GPU prediction never runs the shared-cores model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from meshplan.spec import ClusterSpec
from meshplan.planner import schedule_sim
from meshplan.planner.curves import interpolate
from meshplan.planner.fit import fit_shared_cores, sharing_speed  # noqa: F401  (the fit's home; kept here)

# A lone rank measured this much faster than all of a host's ranks busy means they saturate its cores
# (the profile's sharing rounds agree within a few percent, profiler/phases/host.py: sharing_phase).
SATURATED_ABOVE = 0.1


class HostModel:
    """The null host model (GPU clusters): ranks are not time-sliced, so collectives cost their lined-up time,
    pipeline ops cost their compute and bubbles follow the closed forms (pipeline.pipeline_makespan)."""

    def meeting(self, segment_s: float, ranks: int) -> float:
        """Seconds a collective over ``ranks`` ranks costs beyond its lined-up time after ``segment_s`` of compute."""
        return 0.0

    def op_overhead(self) -> float:
        """Seconds one forward or backward op of a pipeline schedule costs beyond its compute."""
        return 0.0

    def pipeline_makespan(self, schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int,
                          forward_share: float, pp_stride: int, vocab_pass: float) -> float | None:
        """The pipeline's makespan where ranks share cores, or None where the closed form holds."""
        return None


NULL_HOST = HostModel()


@dataclass(frozen=True)
class SharedCoresHost(HostModel):
    """CPU ranks time-sliced on a host's cores, as the cluster's profile measured them (every figure 0 or the
    closed form where the profile did not measure it)."""

    cluster: ClusterSpec

    def meeting(self, segment_s: float, ranks: int) -> float:
        return meeting_time(self.cluster, segment_s, ranks)

    def op_overhead(self) -> float:
        return pipeline_op_overhead(self.cluster)

    def pipeline_makespan(self, schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int,
                          forward_share: float, pp_stride: int, vocab_pass: float) -> float | None:
        """The processor-sharing simulation (schedule_sim.shared_makespan) where the profile measured sharing:
        a rank idle in a bubble speeds the others up. Interleaved orders are simulated where micro-batches fill
        whole rounds (what the search generates); ``vocab_pass`` runs on the last rank and on helper threads
        beside the others' ops, so it is taken out of the ops' own times."""
        sharing = busy_speedup_table(self.cluster)
        p = len(rank_time)
        if not sharing or p == 1 or (schedule == "interleaved" and num_mb % p != 0):
            return None
        speed = shared_host_speed(sharing, self.cluster.gpus_per_node, p, pp_stride)
        return schedule_sim.shared_makespan(schedule, [t - vocab_pass for t in rank_time], num_mb, virtual_stages,
                                            forward_share, speed, vocab_pass)


def host_model(cluster: ClusterSpec) -> HostModel:
    """The shared-cores model for CPU clusters, the null model for GPU clusters."""
    return SharedCoresHost(cluster) if cluster.gpu.kind == "cpu" else NULL_HOST


# ------------------------------------------------------------------------------------------------
# meeting: the wait for the last time-sliced rank at a collective
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of ``n`` independent standard normal draws] (0 for one; 0.5642 for 2, 1.0294 for 4, 1.4236 for 8:
    Tippett 1925, the expected order statistics of the normal), by integrating x * n * phi(x) * Phi(x)^(n-1)
    numerically over [-8, 8] (about 3 ms; cached, as meeting_time asks for it for every plan the search
    evaluates)."""
    if n <= 1:
        return 0.0
    steps, low, high = 4000, -8.0, 8.0
    width = (high - low) / steps
    total = 0.0
    for i in range(steps + 1):
        x = low + i * width
        density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cumulative = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        weight = 0.5 if i in (0, steps) else 1.0
        total += weight * x * n * density * cumulative ** (n - 1)
    return total * width


def meeting_time(cluster: ClusterSpec, segment_s: float, ranks: int) -> float:
    """Seconds a collective over ``ranks`` ranks costs beyond its lined-up time when they come to it from
    ``segment_s`` of computing, as the profile measured it (``host.meeting``, worker
    ``meeting_phase``: the last rank's time for a segment after the ranks' mean time, over the ranks of one
    host), scaled from the profile's group to ``ranks`` by :func:`expected_max_normal`. Ranks time-sliced on
    shared cores reach a collective at different moments and the first wait for the last; the links phase
    times collectives lined up by a barrier and does not see it. 0 without a measurement and for one rank.

    The profile's figure at ``segment_s``:
    - ``curve`` (segments of 10 ms .. 2 s): interpolated linearly between its points; below the shortest, the
      shortest's;
    - a line ``base_s + per_segment * segment`` (files without a curve) within the measured segments (below
      the shortest, the shortest's), never below 0;
    - past the longest segment either way: that one's figure grown as the square root of the segment (how far
      apart time-sliced ranks drift is a sum of many scheduling delays; on 4 CPU ranks, from 0.5 s to 2 s the
      drift grows 1.6-3.3x, median 2.1x, where the square root gives 2x: docs/profiler.md).

    The group size: the last of ``n`` ranks whose drifts are independent normal draws arrives E[max of n
    standard normals] standard deviations after their mean -- 0.56 for two, 1.03 for four (inside dp4 steps,
    ``benchmarks/dp_step_phases.py``, the first unit's all-reduce waits 0.09-0.15 s for the last of four
    ranks; between the two replicas of dp2 pp2, ``benchmarks/dp_reduce_wait.py``, 0.047 s)."""
    host = cluster.profile.host
    meeting = host.meeting if host is not None else None
    if meeting is None:
        return 0.0
    measured_ranks = meeting.ranks or ranks
    if meeting.curve:
        points = sorted((segment, max(0.0, penalty)) for segment, penalty in meeting.curve)
        held, high = interpolate(points, segment_s), points[-1][0]
    elif meeting.base_s is not None and meeting.per_segment is not None:
        low, high = meeting.segments_s or (0.0, math.inf)
        held = max(0.0, meeting.base_s + meeting.per_segment * min(max(segment_s, low), high))
    else:
        return 0.0
    if not math.isfinite(held) or ranks <= 1 or measured_ranks <= 1:
        return 0.0
    if segment_s > high > 0:
        held *= math.sqrt(segment_s / high)
    return held * expected_max_normal(ranks) / expected_max_normal(measured_ranks)


# ------------------------------------------------------------------------------------------------
# sharing: how much faster the busy ranks run while others idle
# ------------------------------------------------------------------------------------------------

def measured_busy_speedup(cluster: ClusterSpec) -> tuple[tuple[int, float], ...]:
    """The profile's sharing measurement as it is (``host.busy_speedup``: ``[[busy ranks, speed
    / speed with all busy], ...]``, ``profiler/phases/host.py: sharing_phase``), sorted, unreadable rows dropped; entries below 1
    read as 1 (fewer busy ranks cannot compute slower). Empty without a measurement."""
    host = cluster.profile.host
    table = []
    for busy, speed in host.busy_speedup if host is not None else ():
        if busy >= 1 and math.isfinite(speed) and speed > 0:
            table.append((busy, max(1.0, speed)))
    return tuple(sorted(table))


def busy_speedup_table(cluster: ClusterSpec) -> tuple[tuple[int, float], ...]:
    """How much faster a rank computes when only some of its host's ranks are busy: ``[(busy, speed), ...]``
    for 1..ranks busy, from the processor-sharing law (:func:`sharing_speed`) on the core count fitted to
    the profile's measurement (:func:`fit_shared_cores`, :func:`measured_busy_speedup`): about ``ranks /
    busy`` up to one core per rank on CPU processes sharing fewer cores, 1 throughout on a device per rank.
    The law rather than the table itself: the pipeline simulation's fills and drains run on the entries
    with few ranks busy, where one noisy entry would price a bubble the runs do not show (docs/profiler.md).
    Empty without a measurement: a device per rank is assumed."""
    measured = measured_busy_speedup(cluster)
    if not measured:
        return ()
    ranks = max(busy for busy, _ in measured)
    cores = fit_shared_cores(measured)
    return tuple((busy, sharing_speed(ranks, cores, busy)) for busy in range(1, ranks + 1))


def busy_speedup(table: tuple[tuple[int, float], ...], busy: int) -> float:
    """Speed of each busy thread with ``busy`` threads of its host busy, relative to all its ranks busy
    (:func:`busy_speedup_table`), linear between listed counts; 1 without a table.

    Beyond the table (more threads than ranks: the vocabulary-parallel helper threads, schedule_sim.py) the
    host's cores are shared further: where the table shows them saturated -- a lone rank faster than all
    together, by more than the profile's noise -- ``n`` threads get ``N / n`` of what the ``N`` ranks each got
    (processor sharing, the cores' throughput fixed); where it does not, 1 (a core to spare is assumed)."""
    if not table or busy <= 0:
        return 1.0
    if busy <= table[0][0]:
        return table[0][1]
    for (b0, s0), (b1, s1) in zip(table, table[1:]):
        if b0 <= busy <= b1:
            return s0 + (s1 - s0) * (busy - b0) / (b1 - b0) if b1 > b0 else s0
    ranks, speed_all = table[-1]
    saturated = table[0][1] > speed_all * (1 + SATURATED_ABOVE)
    return speed_all * ranks / busy if saturated else speed_all


def shared_host_speed(table: tuple[tuple[int, float], ...], ranks_per_host: int, pp: int, pp_stride: int):
    """``speed(busy)`` for :func:`schedule_sim.shared_makespan`: the pipeline ranks ``pp_stride`` apart in the
    mesh, ``ranks_per_host // pp_stride`` of them on one host (1 when the stride spans a host), each with
    ``pp_stride`` ranks of its own there (its tp, cp, dp replicas, busy and idle together); ``busy[r]`` counts
    the threads pipeline rank r runs (its ops, a vocabulary helper thread), and each runs at
    :func:`busy_speedup` of the busy threads on its host."""
    per_host = 1 if pp_stride >= ranks_per_host else max(1, min(pp, ranks_per_host // pp_stride))
    ranks_each = max(1, ranks_per_host // per_host)

    def speed(busy: list[bool]) -> list[float]:
        on_host = [sum(busy[h * per_host:(h + 1) * per_host]) * ranks_each for h in range(-(-pp // per_host))]
        return [busy_speedup(table, on_host[r // per_host]) for r in range(pp)]
    return speed


# ------------------------------------------------------------------------------------------------
# the pipeline schedule's own cost per op
# ------------------------------------------------------------------------------------------------

def pipeline_op_overhead(cluster: ClusterSpec) -> float:
    """Seconds one forward or backward op of a pipeline schedule costs beyond its compute (the schedule's
    bookkeeping, its send/recv, the wait for a time-sliced neighbour), as the profile measured it
    (``host.pipeline.op_overhead_s``, ``profiler/phases/host.py: pipeline_phase``: torch.distributed.pipelining's
    1F1B over pairs of ranks, its slope over micro-batches less the stage's module alone, per op). 0 without a
    measurement."""
    host = cluster.profile.host
    pipeline = host.pipeline if host is not None else None
    value = pipeline.op_overhead_s if pipeline is not None and pipeline.op_overhead_s is not None else 0.0
    return max(0.0, value) if math.isfinite(value) else 0.0
