"""Partitioning transformer blocks over pipeline stages.

``partition_dp`` is the general dynamic program (minimise the slowest stage, per-block costs may differ,
each stage may carry extra fixed work such as the embedding or the LM head + loss). ``balance_layers`` is
its closed form for identical blocks, which the search uses: adding blocks one at a time to the stage whose
time would grow least is optimal for identical blocks (an exchange argument), and costs O(L log S) instead of
the DP's O(S * L^2). ``tests/test_partition.py`` checks the two agree.
"""

from __future__ import annotations

import heapq
from functools import lru_cache


def partition_dp(block_costs: list[float], num_stages: int, stage_extra: list[float],
                 max_blocks: list[int] | None = None, min_blocks: int = 1) -> list[int] | None:
    """Contiguous split of ``block_costs`` into ``num_stages`` stages minimising
    max_j (stage_extra[j] + sum of its blocks), with at most ``max_blocks[j]`` and at least ``min_blocks``
    blocks per stage. Returns blocks per stage, or None if no split satisfies the limits."""
    n = len(block_costs)
    prefix = [0.0]
    for c in block_costs:
        prefix.append(prefix[-1] + c)
    caps = max_blocks or [n] * num_stages
    INF = float("inf")

    @lru_cache(maxsize=None)
    def best(stage: int, start: int) -> tuple[float, tuple[int, ...]]:
        if stage == num_stages:
            return (0.0, ()) if start == n else (INF, ())
        remaining_stages = num_stages - stage - 1
        result = (INF, ())
        for count in range(min_blocks, min(caps[stage], n - start - remaining_stages * min_blocks) + 1):
            here = stage_extra[stage] + prefix[start + count] - prefix[start]
            if here >= result[0]:
                break   # costs are non-negative: larger counts only grow this stage
            rest, split = best(stage + 1, start + count)
            value = max(here, rest)
            if value < result[0]:
                result = (value, (count,) + split)
        return result

    value, split = best(0, 0)
    return list(split) if value < INF else None


def balance_layers(num_layers: int, num_stages: int, layer_time: float, stage_extra: list[float],
                   rank_caps: list[int], pp: int, min_blocks: int = 1) -> list[int] | None:
    """Identical blocks of ``layer_time`` over ``num_stages`` (virtual) stages with fixed extras: the
    min-max split, each stage holding at least ``min_blocks`` and each pipeline rank (stage j runs on rank
    j % pp) at most ``rank_caps[rank]`` blocks over all its stages. None if the caps cannot hold the model."""
    if num_layers < num_stages * min_blocks:
        return None
    counts = [min_blocks] * num_stages
    rank_load = [0] * pp
    for j in range(num_stages):
        rank_load[j % pp] += min_blocks
    if any(rank_load[r] > rank_caps[r] for r in range(pp)):
        return None
    heap = [(stage_extra[j] + (counts[j] + 1) * layer_time, j) for j in range(num_stages)]
    heapq.heapify(heap)
    placed = sum(counts)
    while placed < num_layers:
        if not heap:
            return None
        _, j = heapq.heappop(heap)
        rank = j % pp
        if rank_load[rank] >= rank_caps[rank]:
            continue   # this rank is full: its stages take no more blocks
        counts[j] += 1
        rank_load[rank] += 1
        placed += 1
        heapq.heappush(heap, (stage_extra[j] + (counts[j] + 1) * layer_time, j))
    return counts
