import itertools
import random

import pytest

from meshplan.planner.partition import balance_layers, partition_dp
from meshplan.planner.recompute import choose_recompute, solve_partition_ilp


def stage_max(counts, t, extra):
    return max(e + c * t for c, e in zip(counts, extra))


@pytest.mark.parametrize("seed", range(20))
def test_closed_form_balance_equals_the_dynamic_program(seed):
    rng = random.Random(seed)
    layers, stages = rng.randint(4, 40), rng.randint(1, 6)
    if layers < stages:
        layers = stages
    t = rng.uniform(0.5, 2.0)
    extra = [rng.uniform(0, 3 * t) for _ in range(stages)]
    greedy = balance_layers(layers, stages, t, extra, [layers] * stages, stages)
    dp = partition_dp([t] * layers, stages, extra)
    assert sum(greedy) == layers
    assert stage_max(greedy, t, extra) == pytest.approx(stage_max(dp, t, extra))


def test_uneven_partition_gives_the_head_stage_fewer_layers():
    counts = balance_layers(32, 4, 1.0, [0.5, 0, 0, 3.0], [32] * 4, 4)
    assert counts[3] < counts[1] and sum(counts) == 32


def test_caps_are_respected_or_none():
    assert balance_layers(10, 2, 1.0, [0, 0], [3, 3], 2) is None
    assert balance_layers(6, 2, 1.0, [0, 0], [3, 3], 2) == [3, 3]


ACT = {"none": 10.0, "selective": 6.0, "full": 1.0}
COST = {"none": 0.0, "selective": 0.2, "full": 1.0}


MODES = ("none", "selective", "full")


def _objective(counts, m, layer_time, extra, cost):
    times = [e + sum(c[mode] * (layer_time + cost[mode]) for mode in MODES) for c, e in zip(counts, extra)]
    return (m - 1) * max(times) + sum(times)


def _brute_force(layers, m, layer_time, extra, static, per_block, flight, act, cost, capacity, pinned):
    """The partition ILP's optimum by trying every block split and every none/selective/full count on every
    rank (tiny problems only)."""
    def fits(r, c):
        n = sum(c.values())
        allowed = pinned is None or c[pinned] == n
        return allowed and static[r] + n * per_block[r] + flight[r] * sum(c[x] * act[x] for x in MODES) <= capacity

    ranks = len(extra)
    counts = [[dict(zip(MODES, (n - s - f, s, f))) for n in range(1, layers + 1) for f in range(n + 1)
               for s in range(n - f + 1)] for _ in range(ranks)]
    counts = [[c for c in options if fits(r, c)] for r, options in enumerate(counts)]
    best = None
    for choice in itertools.product(*counts):
        if sum(sum(c.values()) for c in choice) == layers:
            value = _objective(choice, m, layer_time, extra, cost)
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_partition_ilp_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    ranks = rng.randint(1, 3)
    layers, m = rng.randint(ranks, 7), rng.randint(1, 9)
    extra = [rng.uniform(0, 1.5) for _ in range(ranks)]
    static = [rng.uniform(0, 20) for _ in range(ranks)]
    per_block = [rng.uniform(0.5, 3)] * ranks
    flight = [float(min(ranks - r, m)) for r in range(ranks)]
    act = {"none": rng.uniform(2, 5)}
    act.update(selective=act["none"] * rng.uniform(0.2, 0.6), full=act["none"] * 0.05)
    cost = {"none": 0.0, "selective": rng.uniform(0.05, 0.3), "full": rng.uniform(0.3, 0.8)}
    capacity, pinned = rng.uniform(25, 90), rng.choice([None, None, "full", "selective"])
    problem = (layers, m, 1.0, extra, static, per_block, flight, act, cost, capacity)
    expected = _brute_force(*problem, pinned)
    solved = solve_partition_ilp(*problem, pinned=pinned)
    if expected is None:
        assert solved is None
        return
    blocks, counts = solved
    assert blocks == [sum(c.values()) for c in counts] and sum(blocks) == layers
    assert _objective(counts, m, 1.0, extra, cost) == pytest.approx(expected, rel=1e-9)
    for r, c in enumerate(counts):
        assert static[r] + blocks[r] * per_block[r] + flight[r] * sum(c[x] * act[x] for x in MODES) <= capacity
        assert pinned is None or c[pinned] == blocks[r]


def test_pinned_mode_is_all_or_nothing():
    assert choose_recompute(4, 1, ACT, COST, 100, "full").counts == {"none": 0, "selective": 0, "full": 4}
    assert choose_recompute(4, 1, ACT, COST, 3, "full") is None


def test_ilp_moves_layers_off_a_memory_bound_rank():
    # rank 0 holds 4 micro-batches in flight, rank 1 one: the ILP gives rank 1 more blocks
    got = solve_partition_ilp(8, 8, 1.0, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 1.0], ACT, COST, 130.0)
    layers, counts = got
    assert sum(layers) == 8 and layers[1] >= layers[0]
