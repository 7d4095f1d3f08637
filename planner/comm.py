"""Communication terms: where each parallel group sits on the topology, and alpha-beta collective times.

Placement: ranks are laid out row-major over the plan's ``mesh_order`` (outermost first), so the innermost
dimension has consecutive ranks. A group of size n whose members are ``stride`` ranks apart has
``k = min(n, gpus_per_node // stride)`` members per node (1 if stride >= gpus_per_node).

Bandwidth (nccl-tests PERFORMANCE.md conventions): a collective over n ranks moving S bytes takes
    all-reduce      2(n-1)/n * S / busbw
    all-gather      (n-1)/n * S / busbw      (S = the gathered, full size)
    reduce-scatter  (n-1)/n * S / busbw      (S = the full input size)
    all-to-all      (n-1)/n * S / busbw      (S = one rank's local data)
plus a latency alpha * ceil(log2 n) (NCCL's tree / PAT algorithms keep latency logarithmic at scale).
A group inside one node sees the intra-node busbw; a group spanning nodes with k members per node drives
k NICs per node, so its busbw is min(intra, k * inter) -- a ring crossing nodes carries 1/k of the data
through each NIC (NCCL opens one ring per NIC).

The profile is read typed (``cluster.profile``, meshplan/measured.py).

Measured links: when ``meshplan profile`` wrote a per-pair bandwidth matrix
(the profile's ``links.pair_bandwidth_gbps``, world x world, rank-major as placed here), a group's busbw
is scaled by :func:`slow_pair_factor`: its slowest ring neighbour pair against the median pair of the same
level (a ring runs at the pace of its slowest link), so one slow cable or NIC is seen and avoided.
Where the profile fitted each collective on its own (``links.<level>.collectives``), a collective
runs at its own bandwidth and latency relative to the level's joint fit (:func:`collective_scales`): gloo's
reduce-scatter, for one, is an all-reduce underneath and fits at about a third of the level's bus bandwidth on
four CPU ranks (docs/profiler.md).

Measured data-parallel traffic: where the profile timed the data-parallel collectives over a group shape at
the runtime's gradient-unit sizes (``links.reduction``), :func:`measured_collective_time` reads
them off that table instead of the alpha-beta line (planner/data_parallel.py).

Overlap (:func:`exposed_time`): communication that runs beside compute is hidden by the fraction the profile
measured (``links.overlap.exposed_fraction``; without one, fully hidden up to the compute
window).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

from meshplan.spec import ClusterSpec
from meshplan.planner.curves import interpolate
from meshplan.planner.fit import latency_steps, volume_factor
# the host model's meeting terms, kept importable from here
from meshplan.planner.host import expected_max_normal, meeting_time  # noqa: F401


@dataclass(frozen=True)
class GroupLink:
    """The link a process group's collectives run over. ``scales``: per collective, its measured bus
    bandwidth and latency relative to the level's joint fit (:func:`collective_scales`); empty: all alike."""

    size: int
    busbw: float          # bytes/s
    latency: float        # seconds per log2 step
    crosses_nodes: bool
    scales: tuple[tuple[str, float, float], ...] = ()
    per_node: int = 0     # members per node (0: all in one node)
    nic_bw: float = 0.0   # bytes/s of one member's own share of its node's NICs (crossing groups)
    intra_bw: float = 0.0  # bytes/s inside a node

    def for_collective(self, name: str) -> "GroupLink":
        """The link as ``name`` (all_reduce, all_gather, reduce_scatter, all_to_all, p2p) sees it."""
        for collective, bandwidth, latency in self.scales:
            if collective == name:
                return GroupLink(self.size, self.busbw * bandwidth, self.latency * latency, self.crosses_nodes,
                                 (), self.per_node, self.nic_bw * bandwidth, self.intra_bw * bandwidth)
        return self


def collective_scales(cluster: ClusterSpec, level: str) -> tuple[tuple[str, float, float], ...]:
    """``(collective, bandwidth ratio, latency ratio)`` of each collective the profile fitted on ``level``
    (``intra_node`` / ``inter_node``), against that level's joint fit in the same file: a ring all-reduce
    and gloo's all-reduce-based reduce-scatter do not move bytes at the same rate. Ratios, so that a
    calibration (``validate --update``, which rescales the level) carries over. Fits with a non-positive
    bandwidth are skipped; a latency ratio needs a positive joint latency (else 1)."""
    links = cluster.profile.links
    fit = links.level(level) if links is not None else None
    if fit is None:
        return ()
    out = []
    joint_bw, joint_lat = fit.bandwidth_gbps or 0.0, fit.latency_us or 0.0
    for name, one in fit.collectives:
        bw, lat = one.bandwidth_gbps or 0.0, one.latency_us or 0.0
        if joint_bw > 0 and bw > 0:
            out.append((name, bw / joint_bw, lat / joint_lat if joint_lat > 0 else 1.0))
    return tuple(out)


_REDUCTION_TABLES: dict[int, tuple[object, dict]] = {}


def _reduction_table(cluster: ClusterSpec) -> dict[tuple[str, int, int], tuple[tuple[float, float], ...]]:
    """``{(collective, ranks, stride): ((bytes, seconds), ...) sorted}`` from the profile's
    ``links.reduction`` samples, gathered once per profile (non-positive or non-finite rows dropped)."""
    profile = cluster.profile
    key = id(profile)
    cached = _REDUCTION_TABLES.get(key)
    if cached is not None and cached[0] is profile:
        return cached[1]
    table: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    reduction = profile.links.reduction if profile.links is not None else None
    for row in reduction.samples if reduction is not None else ():
        if row.bytes > 0 and row.seconds > 0 and math.isfinite(row.seconds):
            table.setdefault((row.collective, row.ranks, row.stride), []).append((row.bytes, row.seconds))
    result = {k: tuple(sorted(v)) for k, v in table.items()}
    if len(_REDUCTION_TABLES) > 16:
        _REDUCTION_TABLES.clear()
    _REDUCTION_TABLES[key] = (profile, result)   # the profile itself is kept, so its id is not reused
    return result


def measured_collective_time(cluster: ClusterSpec, collective: str, size: int, stride: int,
                             nbytes: float) -> float | None:
    """Seconds of one ``collective`` (all_reduce, reduce_scatter, all_gather) of ``nbytes`` (nccl-tests'
    convention, as :func:`allreduce_time` and the others take it) over a group of ``size`` ranks ``stride``
    apart while every group of that shape runs it at once -- a data-parallel step's reduction -- as the profile
    timed it (``links.reduction``, ``profiler/phases/links.py: reduction_phase``, at the sizes of the runtime's
    gradient units): linear in bytes between the two measured sizes around ``nbytes``; past the largest, along
    the last segment's slope (where it rises); below the smallest, the smallest's time (latency-bound).
    ``None`` where the profile did not time this collective over this shape: the alpha-beta fit prices it.
    Measured because the alpha-beta line fitted over 4 KiB-16 MiB misses the sizes a plan reduces by a median
    31-43% on 4 CPU ranks (docs/profiler.md)."""
    if size <= 1 or nbytes <= 0:
        return 0.0 if size <= 1 else None
    points = _reduction_table(cluster).get((collective, size, stride))
    if not points:
        return None
    if nbytes <= points[0][0] or len(points) == 1:
        first_bytes, first_s = points[0]
        return first_s if nbytes <= first_bytes else first_s * nbytes / first_bytes
    if nbytes <= points[-1][0]:
        return interpolate(points, nbytes)
    (x0, t0), (x1, t1) = points[-2], points[-1]
    slope = (t1 - t0) / (x1 - x0) if x1 > x0 and t1 > t0 else t1 / x1
    return t1 + slope * (nbytes - x1)


def overlap_exposed_fraction(cluster: ClusterSpec) -> float:
    """The share of a collective's own time that still shows when it runs beside compute, as the profile
    measured it (``links.overlap.exposed_fraction``): 0 where it hides completely, 1
    where the two take turns, above 1 where they slow each other down (CPU ranks sharing cores with
    gloo's threads). 0 without a measurement (the planner's assumption for GPUs: NCCL on its own
    stream)."""
    links = cluster.profile.links
    overlap = links.overlap if links is not None else None
    value = overlap.exposed_fraction if overlap is not None and overlap.exposed_fraction is not None else 0.0
    return min(max(value, 0.0), 4.0) if math.isfinite(value) else 0.0


def exposed_time(comm_s: float, window_s: float, exposed_fraction: float = 0.0) -> float:
    """Seconds a collective of ``comm_s`` adds to a step when it runs beside ``window_s`` of compute:
    what sticks out past the window, plus ``exposed_fraction`` of the overlapped part
    (:func:`overlap_exposed_fraction`):  (c - o) + f * o  with  o = min(c, w).
    f = 0 is the usual max(0, c - w); f = 1 no overlap at all."""
    overlapped = min(max(comm_s, 0.0), max(window_s, 0.0))
    return max(comm_s, 0.0) - overlapped + exposed_fraction * overlapped


def group_stride(mesh_order: tuple[str, ...], degrees: dict[str, int], dim: str) -> int:
    """Distance in ranks between neighbours of ``dim``'s group: product of the sizes of inner dims."""
    index = mesh_order.index(dim)
    stride = 1
    for inner in mesh_order[index + 1:]:
        stride *= degrees[inner]
    return stride


def group_link(cluster: ClusterSpec, size: int, stride: int) -> GroupLink:
    """Which link a group of ``size`` ranks, ``stride`` apart, runs on, and its effective bus bandwidth."""
    gpn = cluster.gpus_per_node
    intra_bw = cluster.intra_node.bandwidth_gbps * 1e9
    inter_bw = cluster.inter_node.bandwidth_gbps * 1e9
    if size <= 1:
        return GroupLink(1, intra_bw, 0.0, False)
    per_node = 1 if stride >= gpn else min(size, gpn // stride)
    factor = slow_pair_factor(cluster, size, stride)
    if per_node >= size:
        return GroupLink(size, factor * intra_bw, cluster.intra_node.latency_us * 1e-6, False,
                         collective_scales(cluster, "intra_node"))
    return GroupLink(size, factor * min(intra_bw, per_node * inter_bw), cluster.inter_node.latency_us * 1e-6, True,
                     collective_scales(cluster, "inter_node"), per_node, factor * inter_bw, factor * intra_bw)


def slow_pair_factor(cluster: ClusterSpec, size: int, stride: int) -> float:
    """<= 1: the slowest ring-neighbour pair of any group of ``size`` ranks ``stride`` apart, relative to the
    median measured pair of its level (intra- or inter-node); 1 without a measured matrix of this world."""
    links = cluster.profile.links
    matrix = links.pair_bandwidth_gbps if links is not None else ()
    if not matrix or size <= 1 or len(matrix) != cluster.world_size:
        return 1.0
    return _slow_pair_factor(matrix, cluster.gpus_per_node, size, stride)


@lru_cache(maxsize=1024)
def _slow_pair_factor(matrix: tuple[tuple[float, ...], ...], gpus_per_node: int, size: int, stride: int) -> float:
    world = len(matrix)
    if any(len(row) != world for row in matrix):
        return 1.0

    def level(i: int, j: int) -> bool:
        return i // gpus_per_node != j // gpus_per_node

    typical = {}
    for crosses in (False, True):
        values = [matrix[i][j] for i in range(world) for j in range(world)
                  if i != j and level(i, j) == crosses and matrix[i][j] > 0]
        typical[crosses] = statistics.median(values) if values else 0.0
    factor = 1.0
    for base in range(world):
        if (base // stride) % size:
            continue
        members = [base + i * stride for i in range(size)]
        if members[-1] >= world:
            continue
        for a, b in zip(members, members[1:] + members[:1]):
            bw = min(matrix[a][b] or matrix[b][a], matrix[b][a] or matrix[a][b])
            ref = typical[level(a, b)]
            if bw > 0 and ref > 0:
                factor = min(factor, bw / ref)
    return factor


def _alpha_beta(collective: str, nbytes: float, link: GroupLink) -> float:
    """The alpha-beta law, with the factors the profiler fits it by (planner/fit.py: :func:`volume_factor`,
    :func:`latency_steps`): ``factor(c, n) * S / busbw + alpha * steps(c, n)``."""
    n = link.size
    if (n <= 1 and collective != "p2p") or nbytes <= 0:
        return 0.0
    link = link.for_collective(collective)
    return volume_factor(collective, n) * nbytes / link.busbw + link.latency * latency_steps(collective, n)


def allreduce_time(nbytes: float, link: GroupLink) -> float:
    """Ring all-reduce: 2(n-1)/n * S / busbw + alpha*log2(n)."""
    return _alpha_beta("all_reduce", nbytes, link)


def allgather_time(nbytes: float, link: GroupLink) -> float:
    """All-gather of a tensor of total size S: (n-1)/n * S / busbw + alpha*log2(n)."""
    return _alpha_beta("all_gather", nbytes, link)


def reducescatter_time(nbytes: float, link: GroupLink) -> float:
    """Reduce-scatter of an input of size S: (n-1)/n * S / busbw + alpha*log2(n) (nccl-tests busbw factor)."""
    return _alpha_beta("reduce_scatter", nbytes, link)


def alltoall_time(local_bytes: float, link: GroupLink) -> float:
    """All-to-all where each rank holds ``local_bytes``: (n-1)/n * S / busbw + alpha*log2(n) inside a node.
    A group that crosses nodes (k members per node) sends (n-k)/n of S off its node through the member's own
    NIC share and (k-1)/n over the node's links, both at once (:func:`alltoall_crossing_time`): an
    all-to-all has no ring to spread over the node's other NICs (nccl-tests PERFORMANCE.md: alltoall
    busbw is bounded by the per-rank network bandwidth)."""
    if link.crosses_nodes and link.nic_bw > 0 and link.per_node > 0:
        return alltoall_crossing_time(local_bytes, link.for_collective("all_to_all"))
    return _alpha_beta("all_to_all", local_bytes, link)


def alltoall_crossing_time(local_bytes: float, link: GroupLink) -> float:
    """All-to-all over nodes:  max((n-k)/n * S / nic_bw, (k-1)/n * S / intra_bw) + alpha * steps."""
    n, k = link.size, link.per_node
    if n <= 1 or local_bytes <= 0:
        return 0.0
    off_node = (n - k) / n * local_bytes / link.nic_bw
    on_node = (k - 1) / n * local_bytes / link.intra_bw if k > 1 and link.intra_bw > 0 else 0.0
    return max(off_node, on_node) + link.latency * latency_steps("all_to_all", n)


def p2p_time(nbytes: float, link: GroupLink) -> float:
    """One send/recv between neighbours: alpha + S / bw (bus bandwidth equals algorithm bandwidth for p2p)."""
    return _alpha_beta("p2p", nbytes, link)
