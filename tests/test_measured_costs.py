"""What a profiled cluster file changes in the cost model: each collective at its own measured rate, the
measured share of a collective that shows beside compute, the timed block's correction, and the runtime's
ring attention priced as it runs (pure, fast)."""

from __future__ import annotations

import dataclasses

import pytest

from meshplan.planner import comm, compute, evaluate
from meshplan.spec import TrainSpec, load_cluster, load_model


def _with_measured(cluster, measured: dict):
    return dataclasses.replace(cluster, measured=measured)


def test_exposed_time_spans_hidden_to_interfering():
    assert comm.exposed_time(3.0, 5.0, 0.0) == 0.0                  # hides under the window
    assert comm.exposed_time(8.0, 5.0, 0.0) == pytest.approx(3.0)   # max(0, c - w)
    assert comm.exposed_time(3.0, 5.0, 1.0) == pytest.approx(3.0)   # no overlap at all
    assert comm.exposed_time(3.0, 5.0, 1.5) == pytest.approx(4.5)   # the two slow each other down
    assert comm.exposed_time(8.0, 5.0, 0.5) == pytest.approx(3.0 + 2.5)
    assert comm.exposed_time(2.0, 0.0, 0.0) == pytest.approx(2.0)   # nothing to hide under


def test_overlap_fraction_is_read_from_the_profile_and_kept_sane():
    base = load_cluster("localhost:4")
    assert comm.overlap_exposed_fraction(base) == 0.0
    for given, read in ((1.02, 1.02), (-0.3, 0.0), (99.0, 4.0), ("nan", 0.0), ("x", 0.0)):
        cluster = _with_measured(base, {"links": {"overlap": {"exposed_fraction": given}}})
        assert comm.overlap_exposed_fraction(cluster) == pytest.approx(read)


def test_each_collective_runs_at_its_measured_rate_relative_to_the_level():
    base = load_cluster("localhost:4")
    level = {"bandwidth_gbps": 0.8, "latency_us": 1000.0,
             "collectives": {"reduce_scatter": {"bandwidth_gbps": 0.4, "latency_us": 2000.0},
                             "all_gather": {"bandwidth_gbps": 0.8, "latency_us": 1000.0},
                             "broken": {"bandwidth_gbps": 0.0, "latency_us": 5.0}}}
    cluster = _with_measured(dataclasses.replace(base, intra_node=dataclasses.replace(
        base.intra_node, bandwidth_gbps=0.8, latency_us=1000.0)), {"links": {"intra_node": level}})
    link = comm.group_link(cluster, 4, 1)
    size = 4e6
    plain = 3 / 4 * size / 0.8e9 + 1e-3 * 2
    assert comm.allgather_time(size, link) == pytest.approx(plain)
    assert comm.reducescatter_time(size, link) == pytest.approx(3 / 4 * size / 0.4e9 + 2e-3 * 2)
    assert comm.allreduce_time(size, link) == pytest.approx(2 * 3 / 4 * size / 0.8e9 + 1e-3 * 2)  # not fitted
    # a calibration rescales the level; the ratios carry over
    slower = dataclasses.replace(cluster, intra_node=dataclasses.replace(cluster.intra_node, bandwidth_gbps=0.4))
    assert comm.reducescatter_time(size, comm.group_link(slower, 4, 1)) == pytest.approx(
        3 / 4 * size / 0.2e9 + 2e-3 * 2)


def test_the_timed_block_corrects_the_fitted_parts_at_its_shape_only():
    base = load_cluster("localhost:4")
    check = [{"tp": 1, "micro_batch": 2, "seq": 256, "measured_s": 0.3, "model_s": 0.2}]
    cluster = _with_measured(base, {"compute": {"precision": "fp32", "block_check": check}})
    assert compute.measured_block_ratio(cluster, "fp32", 1, 2, 256) == pytest.approx(1.5)
    assert compute.measured_block_ratio(cluster, "fp32", 1, 4, 256) == 1.0
    assert compute.measured_block_ratio(cluster, "bf16", 1, 2, 256) == 1.0   # profiled in fp32
    model, train = load_model("tiny-llama"), TrainSpec(8, 256, "fp32")
    args = (1, 1, 2, "ulysses", False, False, False, ("pp", "dp", "cp", "tp"), 4, 1)
    plain = evaluate.layer_cost(model, base, train, *args)
    timed = evaluate.layer_cost(model, cluster, train, *args)
    assert timed.fwd == pytest.approx(1.5 * plain.fwd) and timed.bwd == pytest.approx(1.5 * plain.bwd)


def test_ring_attention_is_priced_as_the_runtime_runs_it():
    cluster, model = load_cluster("localhost:4"), load_model("tiny-llama")
    rates = compute.achieved_rates(cluster, "fp32")
    b, s, cp = 2, 256, 4
    fwd, bwd = compute.ring_attention_time(model, b, s, 1, cp, rates)
    chunk = s / cp
    rows = b * model.heads * chunk
    gemm = compute.matmul_time(rows, model.head_dim, chunk, rates)
    scores = rows * chunk * 4
    # the last context rank does cp blocks (no load balancing): 2 GEMMs forward, 5 backward per block
    assert fwd == pytest.approx(cp * (2 * gemm + 9 * scores / rates.memory))
    assert bwd == pytest.approx(cp * (5 * gemm + 13 * scores / rates.memory))
    # doubling cp halves the chunk: blocks x4 smaller, twice as many on the last rank
    fwd8, _ = compute.ring_attention_time(model, b, s, 1, 2 * cp, rates)
    assert fwd8 < fwd
    # and it costs more than the flash attention the planner assumes for Ulysses (materialised fp32 scores)
    flash_fwd, _ = compute.attention_time(model, b, s, 1, cp, rates)
    assert fwd > flash_fwd
    # its hops are not hidden: each is waited for before the next block
    train = TrainSpec(8, s, "fp32")
    args = (1, cp, b, "ring", False, False, False, ("pp", "dp", "cp", "tp"), 1, 1)
    lc = evaluate.layer_cost(model, cluster, train, *args)
    kv = b * s / cp * 2 * model.hidden * 4
    link = comm.group_link(cluster, cp, 1)
    assert lc.cp_comm == pytest.approx((cp - 1) * (comm.p2p_time(kv, link) + comm.p2p_time(2 * kv, link))
                                       + comm.p2p_time(kv, link))


def test_an_interfering_overlap_makes_per_microbatch_zero3_cost_more():
    """ZeRO-3 gathers every micro-batch; where a collective does not hide (CPU ranks), the planner must see
    more micro-batches as more communication, and ZeRO-1 (one reduce per step) as cheaper."""
    from meshplan.planner.search import search

    base = load_cluster("localhost:4")
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")

    def dp_comm(cluster, mb, zero):
        fixes = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": mb, "zero": zero}
        from meshplan.planner.search import evaluate_pinned
        return evaluate_pinned(model, cluster, train, fixes).predicted.time_breakdown_s["dp_comm"]

    interfering = _with_measured(base, {"links": {"overlap": {"exposed_fraction": 1.0}}})
    assert dp_comm(interfering, 1, 3) > dp_comm(interfering, 4, 3) > dp_comm(interfering, 4, 1)
    assert dp_comm(interfering, 1, 3) > dp_comm(base, 1, 3)
    assert search(model, interfering, train, {}, top=1).plans    # still plans


def test_context_ranks_reduce_and_shard_like_data_ranks():
    """The runtime applies FSDP / replicate over dp x cp (Meshes.dp_cp): a cp=4, dp=1 plan still reduces its
    gradients over four ranks and shards its optimizer state four ways."""
    from meshplan.planner.search import evaluate_pinned

    cluster, model, train = load_cluster("localhost:4"), load_model("tiny-llama"), TrainSpec(4, 256, "fp32")
    fixed = {"tp": 1, "pp": 1, "cp_kind": "ulysses", "micro_batch": 4, "zero": 1}
    cp4 = evaluate_pinned(model, cluster, train, {**fixed, "dp": 1, "cp": 4})
    dp4 = evaluate_pinned(model, cluster, TrainSpec(16, 256, "fp32"), {**fixed, "dp": 4, "cp": 1})
    alone = evaluate_pinned(model, load_cluster("localhost:1"), TrainSpec(4, 256, "fp32"),
                            {**fixed, "dp": 1, "cp": 1})
    assert cp4.predicted.time_breakdown_s["dp_comm"] > 0
    assert cp4.predicted.time_breakdown_s["dp_comm"] == pytest.approx(dp4.predicted.time_breakdown_s["dp_comm"])
    optimizer = lambda plan: plan.predicted.memory_breakdown_gib["optimizer"]   # noqa: E731
    assert optimizer(cp4) == pytest.approx(optimizer(alone) / 4)
