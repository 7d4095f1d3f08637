"""Choosing activation recomputation per pipeline rank, and the joint partition + recompute ILP.

Per rank the problem is a small integer program: split its n blocks into none / selective / full counts
c_m minimising the recompute time sum(c_m * R_m) subject to in_flight * sum(c_m * A_m) <= budget.
``choose_recompute`` solves it exactly by enumerating c_full (for each, the fewest selective blocks that fit
is a closed form), O(n). ``solve_partition_ilp`` solves the coupled problem over all ranks -- how many blocks
each rank holds *and* how each recomputes, minimising the pipeline's iteration time
(m - 1) * T_max + sum_r T_r under every rank's memory -- with PuLP/CBC, one binary per rank and block count
it may hold, each priced with its cheapest recomputation; the search runs it on its finalists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from meshplan.plan import RECOMPUTE_MODES as MODES


@dataclass(frozen=True)
class RecomputeChoice:
    counts: dict[str, int]
    time: float        # extra seconds per micro-batch
    act_bytes: float   # saved activations at the rank's peak (in-flight micro-batches included)


def choose_recompute(layers: int, in_flight: float, act: dict[str, float], cost: dict[str, float],
                     budget: float, pinned: str | None = None) -> RecomputeChoice | None:
    """Cheapest recompute counts for ``layers`` blocks whose saved activations must fit ``budget`` bytes.
    ``pinned`` forces one mode for every block. None if even the allowed modes do not fit."""
    def make(counts: dict[str, int]) -> RecomputeChoice:
        return RecomputeChoice(counts, sum(counts[m] * cost[m] for m in MODES),
                               in_flight * sum(counts[m] * act[m] for m in MODES))

    if pinned is not None:
        choice = make({m: (layers if m == pinned else 0) for m in MODES})
        return choice if choice.act_bytes <= budget else None
    if budget < 0:
        return None
    per_flight = budget / in_flight if in_flight > 0 else math.inf
    best = None
    saving_sel = act["none"] - act["selective"]
    for full in range(layers + 1):
        rest = layers - full
        room = per_flight - full * act["full"]
        if room < 0:
            break
        need = rest * act["none"] - room          # bytes to save by going selective on some blocks
        if need <= 0:
            selective = 0
        elif saving_sel <= 0:
            continue
        else:
            selective = math.ceil(need / saving_sel - 1e-9)
            if selective > rest:
                continue
        choice = make({"none": rest - selective, "selective": selective, "full": full})
        if best is None or choice.time < best.time - 1e-15:
            best = choice
        if selective == 0:
            break   # more full blocks only add time
    return best


def solve_partition_ilp(num_layers: int, num_microbatches: int, layer_time: float, rank_extra: list[float],
                        static_bytes: list[float], bytes_per_layer: list[float], in_flight: list[float],
                        act: dict[str, float], cost: dict[str, float], capacity: float,
                        pinned: str | None = None, time_limit_s: float = 10.0) -> tuple[list[int], list[dict[str, int]]] | None:
    """Blocks per pipeline rank and recompute counts per rank minimising (m - 1) * T_max + sum_r T_r with
    T_r = rank_extra[r] + sum_m c_{r,m} * (layer_time + cost[m]), subject to
    static_bytes[r] + n_r * bytes_per_layer[r] + in_flight[r] * sum_m c_{r,m} * act[m] <= capacity.
    Returns (blocks per rank, counts per rank), or None if infeasible. Identical problems (finalists that
    differ only where the ILP does not look) are solved once."""
    solved = _solve_partition(num_layers, num_microbatches, layer_time, tuple(rank_extra), tuple(static_bytes),
                              tuple(bytes_per_layer), tuple(in_flight), tuple(sorted(act.items())),
                              tuple(sorted(cost.items())), capacity, pinned, time_limit_s)
    if solved is None:
        return None
    return list(solved[0]), [dict(c) for c in solved[1]]


def rank_options(num_layers: int, ranks: int, rank: int, layer_time: float, rank_extra: float, static_bytes: float,
                 bytes_per_layer: float, in_flight: float, act: dict[str, float], cost: dict[str, float],
                 capacity: float, pinned: str | None) -> dict[int, tuple[float, RecomputeChoice]]:
    """Rank ``rank``'s choices for the partition ILP: for each block count n it can hold (1 up to what leaves
    every other rank one), its time T_r(n) and the cheapest recomputation that fits (:func:`choose_recompute`,
    exact). For a given n fewer recomputed blocks only lower both T_max and sum_r T_r, so the joint optimum
    uses this choice; memory only shrinks as n grows, so the first n that does not fit ends the list."""
    options = {}
    for n in range(1, num_layers - ranks + 2):
        choice = choose_recompute(n, in_flight, act, cost, capacity - static_bytes - n * bytes_per_layer, pinned)
        if choice is None:
            break
        options[n] = (rank_extra + n * layer_time + choice.time, choice)
    return options


@lru_cache(maxsize=256)
def _solve_partition(num_layers: int, num_microbatches: int, layer_time: float, rank_extra: tuple[float, ...],
                     static_bytes: tuple[float, ...], bytes_per_layer: tuple[float, ...], in_flight: tuple[float, ...],
                     act: tuple[tuple[str, float], ...], cost: tuple[tuple[str, float], ...], capacity: float,
                     pinned: str | None, time_limit_s: float):
    """:func:`solve_partition_ilp` as a multiple-choice ILP: a binary x_{r,n} per rank and block count it can
    hold (:func:`rank_options`), one per rank, the counts summing to the model's blocks. Its LP relaxation is
    much tighter than one over the counts c_{r,m}: CBC proves the optimum of Llama 3 405B's 8 stages of
    126 blocks in a fraction of a second (benchmarks/check_speed.py)."""
    import pulp

    act_d, cost_d, ranks = dict(act), dict(cost), range(len(rank_extra))
    options = [rank_options(num_layers, len(rank_extra), r, layer_time, rank_extra[r], static_bytes[r],
                            bytes_per_layer[r], in_flight[r], act_d, cost_d, capacity, pinned) for r in ranks]
    if not all(options):
        return None
    problem = pulp.LpProblem("meshplan_partition_recompute", pulp.LpMinimize)
    x = [{n: pulp.LpVariable(f"x_{r}_{n}", cat="Binary") for n in options[r]} for r in ranks]
    t_max = pulp.LpVariable("t_max", lowBound=0)
    stage_time = [pulp.lpSum(time * x[r][n] for n, (time, _) in options[r].items()) for r in ranks]
    problem += (num_microbatches - 1) * t_max + pulp.lpSum(stage_time)
    problem += pulp.lpSum(n * var for r in ranks for n, var in x[r].items()) == num_layers
    for r in ranks:
        problem += pulp.lpSum(x[r].values()) == 1
        problem += t_max >= stage_time[r]
    status = problem.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit_s))
    if pulp.LpStatus[status] != "Optimal":
        return None
    blocks = tuple(next(n for n, var in x[r].items() if var.value() > 0.5) for r in ranks)
    return blocks, tuple(tuple(options[r][n][1].counts.items()) for r, n in zip(ranks, blocks))
