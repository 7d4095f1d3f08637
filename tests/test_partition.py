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


@pytest.mark.parametrize("budget", [5, 20, 41, 60, 80, 200])
def test_recompute_enumeration_equals_the_ilp(budget):
    layers, flight = 8, 2.0
    enum = choose_recompute(layers, flight, ACT, COST, budget)
    ilp = solve_partition_ilp(layers, 1, 1.0, [0.0], [0.0], [0.0], [flight], ACT, COST, budget)
    if enum is None:
        assert ilp is None
        return
    _, counts = ilp
    assert enum.time == pytest.approx(sum(counts[0][m] * COST[m] for m in COST))
    assert enum.act_bytes <= budget


def test_pinned_mode_is_all_or_nothing():
    assert choose_recompute(4, 1, ACT, COST, 100, "full").counts == {"none": 0, "selective": 0, "full": 4}
    assert choose_recompute(4, 1, ACT, COST, 3, "full") is None


def test_ilp_moves_layers_off_a_memory_bound_rank():
    # rank 0 holds 4 micro-batches in flight, rank 1 one: the ILP gives rank 1 more blocks
    got = solve_partition_ilp(8, 8, 1.0, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [4.0, 1.0], ACT, COST, 130.0)
    layers, counts = got
    assert sum(layers) == 8 and layers[1] >= layers[0]
