"""Choosing activation recomputation per pipeline rank, and the joint partition + recompute ILP.

Per rank the problem is a small integer program: split its n blocks into none / selective / full counts
c_m minimising the recompute time sum(c_m * R_m) subject to in_flight * sum(c_m * A_m) <= budget.
``choose_recompute`` solves it exactly by enumerating c_full (for each, the fewest selective blocks that fit
is a closed form), O(n). ``solve_partition_ilp`` solves the coupled problem over all ranks -- how many blocks
each rank holds *and* how each recomputes, minimising the pipeline's iteration time
(m - 1) * T_max + sum_r T_r under every rank's memory -- with PuLP/CBC; the search runs it on its finalists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    Returns (blocks per rank, counts per rank), or None if infeasible."""
    import pulp

    ranks = range(len(rank_extra))
    problem = pulp.LpProblem("meshplan_partition_recompute", pulp.LpMinimize)
    c = {(r, m): pulp.LpVariable(f"c_{r}_{m}", lowBound=0, upBound=num_layers, cat="Integer")
         for r in ranks for m in MODES}
    t_max = pulp.LpVariable("t_max", lowBound=0)
    stage_time = {r: rank_extra[r] + pulp.lpSum(c[r, m] * (layer_time + cost[m]) for m in MODES) for r in ranks}
    problem += (num_microbatches - 1) * t_max + pulp.lpSum(stage_time.values())
    problem += pulp.lpSum(c[r, m] for r in ranks for m in MODES) == num_layers
    for r in ranks:
        n_r = pulp.lpSum(c[r, m] for m in MODES)
        problem += n_r >= 1
        problem += t_max >= stage_time[r]
        problem += (static_bytes[r] + bytes_per_layer[r] * n_r
                    + in_flight[r] * pulp.lpSum(c[r, m] * act[m] for m in MODES)) <= capacity
        if pinned is not None:
            for m in MODES:
                if m != pinned:
                    problem += c[r, m] == 0
    status = problem.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit_s))
    if pulp.LpStatus[status] != "Optimal":
        return None
    counts = [{m: int(round(c[r, m].value() or 0)) for m in MODES} for r in ranks]
    return [sum(cr.values()) for cr in counts], counts
