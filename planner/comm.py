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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshplan.spec import ClusterSpec


@dataclass(frozen=True)
class GroupLink:
    """The link a process group's collectives run over."""

    size: int
    busbw: float          # bytes/s
    latency: float        # seconds per log2 step
    crosses_nodes: bool


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
    if per_node >= size:
        return GroupLink(size, intra_bw, cluster.intra_node.latency_us * 1e-6, False)
    return GroupLink(size, min(intra_bw, per_node * inter_bw), cluster.inter_node.latency_us * 1e-6, True)


def _latency(link: GroupLink) -> float:
    return link.latency * math.ceil(math.log2(link.size)) if link.size > 1 else 0.0


def allreduce_time(nbytes: float, link: GroupLink) -> float:
    """Ring all-reduce: 2(n-1)/n * S / busbw + alpha*log2(n)."""
    n = link.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.busbw + _latency(link)


def allgather_time(nbytes: float, link: GroupLink) -> float:
    """All-gather of a tensor of total size S: (n-1)/n * S / busbw + alpha*log2(n)."""
    n = link.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / link.busbw + _latency(link)


reducescatter_time = allgather_time  # same volume per rank: (n-1)/n * S (nccl-tests busbw factor)


def alltoall_time(local_bytes: float, link: GroupLink) -> float:
    """All-to-all where each rank holds ``local_bytes``: (n-1)/n * S / busbw + alpha*log2(n)."""
    return allgather_time(local_bytes, link)


def p2p_time(nbytes: float, link: GroupLink) -> float:
    """One send/recv between neighbours: alpha + S / bw (bus bandwidth equals algorithm bandwidth for p2p)."""
    if nbytes <= 0:
        return 0.0
    return link.latency + nbytes / link.busbw
