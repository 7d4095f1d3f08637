"""What a profiled cluster file changes in the cost model: each collective at its own measured rate, the
measured share of a collective that shows beside compute, the timed block's correction, the runtime's
ring attention priced as it runs, pipeline bubbles on ranks that share cores, the wait for time-sliced ranks at
each collective and the pipeline schedule's own cost per op (pure, fast)."""

from __future__ import annotations

import dataclasses

import pytest

from meshplan.errors import InputError
from meshplan.planner import block, comm, compute, evaluate, memory, schedule_sim
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
    for given, read in ((1.02, 1.02), (-0.3, 0.0), (99.0, 4.0), (float("nan"), 0.0)):
        cluster = _with_measured(base, {"links": {"overlap": {"exposed_fraction": given}}})
        assert comm.overlap_exposed_fraction(cluster) == pytest.approx(read)
    with pytest.raises(InputError, match=r"measured\.links\.overlap\.exposed_fraction: expected a number"):
        comm.overlap_exposed_fraction(_with_measured(base, {"links": {"overlap": {"exposed_fraction": "x"}}}))


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


def _vocab_cost(model, cluster, train, **fields):
    cfg = evaluate.Config(**{"dp": 1, "tp": 2, "pp": 1, "cp": 1, "micro_batch": 2, **fields})
    return evaluate.vocab_cost(evaluate.Context(model, cluster, train), cfg)


def test_the_timed_head_and_loss_replace_the_model_at_their_shape_and_scale_with_it():
    """The profile times the head + reference loss and the runtime's chunked head + loss per shape; the
    planner takes them where tokens, width and vocabulary rows match (the fused loss and every shard of a
    vocabulary-parallel pass use the chunked one). At another shape of the same width it takes the nearest
    timing scaled by the model's own ratio between the two shapes; the model alone without a timing."""
    base = load_cluster("localhost:4")
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")
    tokens, rows = 2 * 256, -(-model.vocab // 2)
    row = {"tp": 2, "micro_batch": 2, "seq": 256, "tokens": tokens, "hidden": model.hidden, "vocab_local": rows,
           "head_s": 0.010, "loss_s": 0.004, "embedding_s": 0.001, "chunked_head_loss_s": 0.021}
    cluster = _with_measured(base, {"compute": {"precision": "fp32", "vocab": [row]}})

    def timed(cluster, op, n=tokens, hidden=model.hidden, precision="fp32"):
        return compute.measured_vocab_op(cluster, precision, op, n, hidden, rows)
    assert timed(cluster, "head_loss") == (tokens, rows, pytest.approx(0.014))
    assert timed(cluster, "chunked_head_loss") == (tokens, rows, pytest.approx(0.021))
    assert timed(cluster, "chunked_head_loss", n=4 * tokens) == (tokens, rows, pytest.approx(0.021))  # nearest
    assert timed(cluster, "chunked_head_loss", precision="bf16") is None
    assert timed(cluster, "chunked_head_loss", hidden=model.hidden + 8) is None
    older = _with_measured(base, {"compute": {"precision": "fp32", "vocab": [
        {k: v for k, v in row.items() if k not in ("tokens", "hidden", "vocab_local", "chunked_head_loss_s")}]}})
    assert timed(older, "head_loss") is None

    assert _vocab_cost(model, cluster, train).last_time == pytest.approx(0.014)          # tp2: V/2 rows on each
    assert _vocab_cost(model, cluster, train, fused_kernels=True).last_time == pytest.approx(0.021)
    assert _vocab_cost(model, base, train).last_time != pytest.approx(0.014)
    # twice the tokens, or twice the rows (tp1): the timing times the model's ratio, which the un-profiled
    # cluster's model gives alone
    modelled = _vocab_cost(model, base, train).last_time
    for other in ({"micro_batch": 4}, {"tp": 1}):
        assert _vocab_cost(model, cluster, train, **other).last_time == pytest.approx(
            0.014 * _vocab_cost(model, base, train, **other).last_time / modelled)
    nearest = _with_measured(base, {"compute": {"precision": "fp32", "vocab": [
        row, {**row, "micro_batch": 4, "tokens": 2 * tokens, "head_s": 0.030}]}})
    assert _vocab_cost(model, nearest, train, micro_batch=4).last_time == pytest.approx(0.034)
    # vocabulary parallelism over tp1 x pp2: each shard's pass runs the chunked loss on V/2 rows
    shared = _vocab_cost(model, cluster, train, tp=1, pp=2, vocab_parallel=True)
    assert shared.pass_time == pytest.approx(0.021 + shared.vocab_comm)


def test_the_timed_embedding_replaces_the_model_at_its_shard_rows():
    """The profile times the embedding on a tp rank's vocab / tp rows (its backward's dense gradient is most of
    its time on a CPU); the planner scales it like the head (above). Unprofiled, the model prices the
    activation passes and one write of the [rows, hidden] gradient; an older row (all rows timed, no
    ``embedding_rows``) is not read."""
    base = load_cluster("localhost:4")
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")
    tokens, rows = 2 * 256, -(-model.vocab // 2)
    row = {"tp": 2, "micro_batch": 2, "seq": 256, "tokens": tokens, "hidden": model.hidden, "vocab_local": rows,
           "head_s": 0.010, "loss_s": 0.004, "embedding_s": 0.003, "embedding_rows": rows,
           "chunked_head_loss_s": 0.021}
    cluster = _with_measured(base, {"compute": {"precision": "fp32", "vocab": [row]}})
    assert compute.measured_vocab_op(cluster, "fp32", "embedding", tokens, model.hidden, rows) == (tokens, rows, 0.003)
    assert compute.measured_vocab_op(cluster, "fp32", "embedding", tokens, model.hidden + 8, rows) is None
    older = _with_measured(base, {"compute": {"precision": "fp32", "vocab": [
        {k: v for k, v in row.items() if k != "embedding_rows"}]}})
    assert compute.measured_vocab_op(older, "fp32", "embedding", tokens, model.hidden, rows) is None

    assert _vocab_cost(model, cluster, train).first_time == pytest.approx(0.003)
    rate = compute.achieved_rates(base, "fp32").memory
    activation, gradient = 3 * tokens * model.hidden * 4 / 2, rows * model.hidden * 4
    assert _vocab_cost(model, base, train).first_time == pytest.approx((activation + gradient) / rate)
    assert _vocab_cost(model, base, train, tp=1, micro_batch=4).first_time == pytest.approx(
        (3 * 2 * tokens * model.hidden * 4 + model.vocab * model.hidden * 4) / rate)
    assert _vocab_cost(model, cluster, train, micro_batch=4).first_time == pytest.approx(
        0.003 * (2 * activation + gradient) / (activation + gradient))


def test_the_timed_optimizer_step_prices_the_optimizer():
    """The profile times the runtime's AdamW over a per-rank block at each tp; the planner prices a rank's
    step at the nearest tp's seconds per parameter, and falls back to bytes at the memory rate."""
    base = load_cluster("localhost:4")
    rows = [{"tp": 1, "params": 1000, "tensors": 9, "step_s": 0.002, "seconds_per_param": 2e-6},
            {"tp": 4, "params": 250, "tensors": 9, "step_s": 0.001, "seconds_per_param": 4e-6}]
    cluster = _with_measured(base, {"compute": {"precision": "fp32", "optimizer": rows}})
    assert compute.measured_optimizer_seconds_per_param(cluster, "fp32", "adamw", 1) == 2e-6
    assert compute.measured_optimizer_seconds_per_param(cluster, "fp32", "adamw", 2) == 2e-6   # log-nearest: tie
    assert compute.measured_optimizer_seconds_per_param(cluster, "fp32", "adam", 4) == 4e-6
    assert compute.measured_optimizer_seconds_per_param(cluster, "fp32", "sgd", 1) is None
    assert compute.measured_optimizer_seconds_per_param(cluster, "bf16", "adamw", 1) is None
    assert compute.measured_optimizer_seconds_per_param(base, "fp32", "adamw", 1) is None
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32", "adamw")
    cfg = evaluate.Config(dp=1, tp=1, pp=2, cp=1, micro_batch=2)
    timed = evaluate.evaluate(cfg, evaluate.Context(model, cluster, train))
    plain = evaluate.evaluate(cfg, evaluate.Context(model, base, train))
    # the same rank and parameters, priced at 2e-6 s each instead of 32 B at the memory rate
    ratio = 2e-6 / (32 / compute.achieved_rates(base, "fp32").memory)
    assert timed.time_breakdown["optimizer"] == pytest.approx(plain.time_breakdown["optimizer"] * ratio, rel=1e-9)


def test_ring_attention_hops_show_as_the_measured_overlap_says():
    """On CPU ranks the next K/V hop runs beside the current hop's attention, and the profile's
    exposed fraction of overlapped communication shows (block.ring_flash_time)."""
    cluster, model = load_cluster("localhost:4"), load_model("tiny-llama")
    b, s, cp = 2, 256, 4
    train = TrainSpec(8, s, "fp32")
    args = (1, cp, b, "ring", False, False, False, ("pp", "dp", "cp", "tp"), 1, 1)
    lc = evaluate.layer_cost(model, cluster, train, *args)
    link = comm.group_link(cluster, cp, 1)
    rates = compute.achieved_rates(cluster, "fp32")
    attn_fwd, attn_bwd = compute.attention_time(model, b, s, 1, cp, rates)
    expected = sum(block.ring_flash_time(model, b * s / cp, 1, cp, link, 4, attn_fwd, attn_bwd,
                                         comm.overlap_exposed_fraction(cluster)))
    assert lc.cp_comm == pytest.approx(expected)
    assert lc.cp_comm >= (cp - 1) * comm.p2p_time(b * s / cp * 2 * model.kv_heads * model.head_dim * 4, link) * \
        comm.overlap_exposed_fraction(cluster)


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


# ------------------------------------------------------------------------------------------------
# ranks sharing cores: the profile's busy_speedup and the processor-sharing pipeline simulation
# ------------------------------------------------------------------------------------------------

TWO_CORES_FOUR_RANKS = ((1, 2.0), (2, 2.0), (3, 4 / 3), (4, 1.0))   # one core per busy rank, at most


def test_busy_speedup_is_read_from_the_profile_and_kept_sane():
    base = load_cluster("localhost:4")
    assert compute.busy_speedup_table(base) == ()
    table = [[4, 1.0], [1, 1.9], [2, 0.8], [0, 2.0], [3, float("nan")]]
    read = compute.measured_busy_speedup(_with_measured(base, {"host": {"busy_speedup": table}}))
    assert read == ((1, 1.9), (2, 1.0), (4, 1.0))       # sorted, unusable rows dropped, below 1 read as 1
    with pytest.raises(InputError, match=r"measured\.host\.busy_speedup\[3\]\[0\]: expected a whole number"):
        compute.measured_busy_speedup(_with_measured(base, {"host": {"busy_speedup": [*table[:3], ["x", 2]]}}))
    assert compute.busy_speedup(TWO_CORES_FOUR_RANKS, 3) == pytest.approx(4 / 3)
    assert compute.busy_speedup(((1, 2.0), (4, 1.0)), 2) == pytest.approx(2 - 1 / 3)   # linear in between
    assert compute.busy_speedup((), 1) == 1.0
    # more threads than ranks (vocabulary helper threads): the saturated cores shared further, 4 / n
    assert compute.busy_speedup(TWO_CORES_FOUR_RANKS, 6) == pytest.approx(4 / 6)
    assert compute.busy_speedup(TWO_CORES_FOUR_RANKS, 8) == pytest.approx(0.5)
    # a host whose ranks each had a core (a lone one no faster): a spare core is assumed
    assert compute.busy_speedup(((1, 1.02), (4, 1.0)), 6) == 1.0


def test_sharing_follows_the_processor_sharing_law_fitted_to_the_profile():
    """The planner uses ranks / max(busy, C) with C fitted to the profile's table, not the table itself: a
    profile of 4 CPU ranks on 2 cores with two busy ranks at x1.69 (x2 by the law) would price a bubble at pp2
    that runs do not show; the fit puts it at 1.77 cores, x2 for two busy."""
    base = load_cluster("localhost:4")
    noisy = [[1, 2.25866], [2, 1.69455], [3, 1.27854], [4, 1.0]]          # a measured table, 4 ranks on 2 cores
    assert compute.fit_shared_cores(tuple(map(tuple, noisy))) == pytest.approx(1.77)
    table = compute.busy_speedup_table(_with_measured(base, {"host": {"busy_speedup": noisy}}))
    assert [b for b, _ in table] == [1, 2, 3, 4]
    assert [s for _, s in table] == pytest.approx([4 / 1.77, 2.0, 4 / 3, 1.0])
    # exact two-core figures give back two cores; a device per rank gives 1 throughout
    assert compute.fit_shared_cores(TWO_CORES_FOUR_RANKS) == pytest.approx(2.0)
    per_device = compute.busy_speedup_table(_with_measured(base, {"host": {"busy_speedup": [[1, 1.0], [4, 1.0]]}}))
    assert per_device == ((1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0))
    assert compute.sharing_speed(4, 2.0, 1) == 2.0 and compute.sharing_speed(4, 8.0, 1) == 1.0   # C <= ranks


SPEED_ONE_CASES = [(schedule, v, p, m) for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2),
                                                              ("interleaved", 4))
                   for p in (2, 4, 8) for m in (3, 8, 16)
                   if schedule != "interleaved" or m % p == 0]     # interleaved: whole rounds, as searched


@pytest.mark.parametrize("schedule,v,p,m", SPEED_ONE_CASES)
def test_the_sharing_simulation_at_speed_one_is_the_closed_form(schedule, v, p, m):
    times = [1.0 + 0.1 * r for r in range(p)] if schedule != "interleaved" else [1.0] * p
    alone = schedule_sim.shared_makespan(schedule, times, m, v, 1 / 3, lambda busy: [1.0] * len(busy))
    assert alone == pytest.approx(evaluate.pipeline_makespan(schedule, times, m, v))


def _torch_interleaved_ops(pp: int, rank: int, m: int, v: int) -> list[tuple[str, int, int]]:
    """torch's own op list for ScheduleInterleaved1F1B (its ``_calculate_single_rank_operations``, built from
    the same private helpers without process groups)."""
    from torch.distributed.pipelining import schedules

    per_round = m // max(1, m // pp)
    warmup = schedules._get_warmup_ops(rank, v, per_round, pp, m, multiply_factor=2)
    steady = v * m - warmup
    actions = schedules._get_1f1b_rank_ops(
        v, pp, warmup, steady, v * m - steady, rank, lambda step: ((step // per_round) % v) * pp + rank,
        lambda step: (v - 1 - ((step - warmup) // per_round) % v) * pp + rank)
    forward = schedules._ComputationType.FORWARD
    return [("F" if a.computation_type == forward else "B", a.stage_index, a.microbatch_index)
            for a in actions if a is not None]


@pytest.mark.parametrize("p,m,v", [(2, 4, 1), (2, 8, 2), (4, 4, 1), (4, 8, 2), (4, 8, 3), (2, 2, 4)])
def test_the_simulated_order_is_torchs_interleaved_order(p, m, v):
    for rank in range(p):
        ops = schedule_sim.pipeline_ops("interleaved", p, rank, m, v)
        assert ops == _torch_interleaved_ops(p, rank, m, v)
        assert [(kind, stage // p) for kind, stage, _ in ops] == memory.interleaved_1f1b_order(p, rank, m, v)
        assert sorted(ops) == sorted((k, c * p + rank, i) for k in "FB" for c in range(v) for i in range(m))


def test_bubbles_cost_nothing_where_the_busy_ranks_alone_fill_the_cores():
    """Four ranks on two cores, pp2 x dp2: in the fill and the drain the two ranks of one stage are busy and
    each gets a core (twice the all-busy speed), so the step takes m * T; pp4 x dp1 leaves a core idle
    while one rank runs alone and keeps part of its bubble."""
    pp2 = evaluate.shared_host_speed(TWO_CORES_FOUR_RANKS, 4, 2, 2)
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 4)):
        assert schedule_sim.shared_makespan(schedule, [1.0, 1.0], 4, v, 1 / 3, pp2) == pytest.approx(4.0)
        assert evaluate.pipeline_makespan(schedule, [1.0, 1.0], 4, v) > 4.0
    pp4 = evaluate.shared_host_speed(TWO_CORES_FOUR_RANKS, 4, 4, 1)
    shared = schedule_sim.shared_makespan("1f1b", [1.0] * 4, 4, 1, 1 / 3, pp4)
    assert 4.0 < shared < evaluate.pipeline_makespan("1f1b", [1.0] * 4, 4, 1) == 7.0
    # the stride spans the host (one pipeline rank per host): nothing to hand over
    apart = evaluate.shared_host_speed(TWO_CORES_FOUR_RANKS, 4, 2, 4)
    assert schedule_sim.shared_makespan("1f1b", [1.0, 1.0], 4, 1, 1 / 3, apart) == pytest.approx(5.0)


def test_a_hand_written_interleaved_plan_with_partial_rounds_keeps_the_closed_form():
    """The search makes interleaved plans with m % pp == 0; a plan written by hand with partial rounds is still
    predicted (closed form), not a traceback from the simulation."""
    shared = _with_measured(load_cluster("localhost:4"),
                            {"host": {"busy_speedup": [list(x) for x in TWO_CORES_FOUR_RANKS]}})
    cfg = evaluate.Config(dp=2, tp=1, pp=2, cp=1, micro_batch=1, schedule="interleaved", virtual_stages=2, zero=0)
    with pytest.raises(RuntimeError):    # what the simulation makes of partial rounds (m = 5, pp = 2)
        schedule_sim.shared_makespan("interleaved", [1.0, 1.0], 5, 2, 1 / 3, lambda busy: [1.0] * len(busy))
    result = evaluate.evaluate(cfg, evaluate.Context(load_model("tiny-llama"), shared, TrainSpec(10, 256, "fp32")))
    assert isinstance(result, evaluate.Evaluation) and result.iteration_s > 0


def test_the_vocabulary_pass_ends_the_last_forward_and_waits_for_the_slowest_share():
    """vocab_parallel.py: the last stage's forward ends with the head pass; the other ranks run their share on a
    helper thread beside their own ops. Hand-worked timelines (forward 1/3, backward 2/3 of a micro-batch)."""
    own_device = lambda busy: [1.0] * len(busy)          # noqa: E731  (every thread its own device)
    # one micro-batch: F0, F1, the pass on both ranks at once (0.5), B1, B0
    assert schedule_sim.shared_makespan("1f1b", [1.0, 1.0], 1, 1, 1 / 3, own_device, 0.5) == pytest.approx(2.5)
    assert evaluate.pipeline_makespan("1f1b", [1.0, 1.0], 1) == pytest.approx(2.0)
    # a rank's helper thread and its ops share that rank's device (speed 1 / threads): micro-batch 1's pass
    # starts at 1.9667 while rank 0 runs B0 (1/3 left); both at half speed, the helper's 0.3 ends at 2.5667,
    # 0.3 after the last rank's own share -- the last stage waits for it; B0 ends at 2.6, then B1 (1,1) and
    # (0,1): 3.2333, 3.9
    per_rank_device = lambda busy: [1.0 / b if b else 1.0 for b in busy]     # noqa: E731
    assert schedule_sim.shared_makespan("1f1b", [1.0, 1.0], 2, 1, 1 / 3, per_rank_device, 0.3) == pytest.approx(3.9)
    # nothing without a pass, and the pass never shortens a step
    for schedule, v, m in (("1f1b", 1, 4), ("gpipe", 1, 4), ("interleaved", 2, 4)):
        speed = evaluate.shared_host_speed(TWO_CORES_FOUR_RANKS, 4, 2, 2)
        without = schedule_sim.shared_makespan(schedule, [1.0, 1.0], m, v, 1 / 3, speed)
        assert schedule_sim.shared_makespan(schedule, [1.0, 1.0], m, v, 1 / 3, speed, 0.0) == without
        assert schedule_sim.shared_makespan(schedule, [1.0, 1.0], m, v, 1 / 3, speed, 0.1) > without + 0.1 * m - 1e-9


def test_vocabulary_parallel_work_outside_the_pipeline_is_on_the_step():
    """begin_step / end_step of vocab_parallel.py: the embedding reduce and its gradient broadcast over the
    pipeline row for the whole step, the shards' fp32 gradients all-reduced by hand over the data ranks (one
    tensor per untied matrix), after the pipeline -- not hidden under a backward like the blocks' DDP traffic."""
    model, cluster = load_model("tiny-llama"), load_cluster("localhost:4")
    train = TrainSpec(16, 256, "fp32")
    ctx = evaluate.Context(model, cluster, train)
    cfg = evaluate.Config(dp=2, tp=1, pp=2, cp=1, micro_batch=2, schedule="1f1b", zero=0, vocab_parallel=True)
    vc = evaluate.vocab_cost(ctx, cfg)
    num_mb = 16 // (2 * 2)
    activation = 2 * 256 * model.hidden * ctx.act_bytes
    degrees = {"dp": 2, "tp": 1, "pp": 2, "cp": 1}
    pp_link = comm.group_link(cluster, 2, comm.group_stride(cfg.mesh_order, degrees, "pp"))
    dp_link = comm.group_link(cluster, 2, comm.group_stride(cfg.mesh_order, degrees, "dp"))
    tensors = 1 if model.tied_embeddings else 2
    shard = model.vocab * model.hidden * tensors / 2
    assert vc.edges_comm == pytest.approx(comm.allreduce_time(num_mb * activation, pp_link)
                                          + tensors * comm.allreduce_time(shard / tensors * 4.0, dp_link))
    assert vc.each_params == pytest.approx(shard) and vc.pass_time == vc.each_time > 0
    result = evaluate.evaluate(cfg, ctx)
    assert isinstance(result, evaluate.Evaluation)
    assert sum(result.time_breakdown.values()) == pytest.approx(result.iteration_s)
    assert result.time_breakdown["vocab_comm"] == pytest.approx(vc.vocab_comm * num_mb + vc.edges_comm)
    # one data rank: no gradient all-reduce
    alone = evaluate.Config(dp=1, tp=1, pp=2, cp=1, micro_batch=2, schedule="1f1b", zero=0, vocab_parallel=True)
    assert evaluate.vocab_cost(ctx, alone).edges_comm == pytest.approx(
        comm.allreduce_time(2 * num_mb * activation, pp_link))


def test_a_shared_host_makes_pipelined_plans_cheaper_and_leaves_the_rest_alone():
    from meshplan.planner.search import evaluate_pinned

    base = load_cluster("localhost:4")
    shared = _with_measured(base, {"host": {"busy_speedup": [list(x) for x in TWO_CORES_FOUR_RANKS]}})
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")
    pipelined = {"dp": 2, "tp": 1, "pp": 2, "cp": 1, "micro_batch": 4, "schedule": "1f1b", "zero": 0}
    flat = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 4, "zero": 0}
    before, after = (evaluate_pinned(model, c, train, pipelined).predicted for c in (base, shared))
    assert before.time_breakdown_s["bubble"] > 0 and after.time_breakdown_s["bubble"] == pytest.approx(0, abs=1e-9)
    # the whole bubble goes, and a little more: the last rank (the head's extra work) runs faster while the
    # first one idles
    no_bubble = before.iteration_s - before.time_breakdown_s["bubble"]
    assert 0.97 * no_bubble < after.iteration_s <= no_bubble
    assert (evaluate_pinned(model, shared, train, flat).predicted.iteration_s
            == evaluate_pinned(model, base, train, flat).predicted.iteration_s)


# ------------------------------------------------------------------------------------------------
# the meeting time per collective call and the pipeline schedule's cost per op
# ------------------------------------------------------------------------------------------------

def test_meeting_time_is_the_profiled_line_within_its_segments_and_a_square_root_past_them():
    from meshplan.profiler.cluster_file import fit_meeting

    raw = {"meeting": {"level": "intra_node", "samples": [
        {"segment_s": 0.01, "penalty_s": 0.002}, {"segment_s": 0.04, "penalty_s": 0.005},
        {"segment_s": 0.16, "penalty_s": 0.017}]}}
    fit = fit_meeting(raw)
    assert fit["per_segment"] == pytest.approx(0.1, rel=0.05) and fit["segments_s"] == [0.01, 0.16]
    cluster = _with_measured(load_cluster("localhost:4"), {"host": {"meeting": fit}})
    assert comm.meeting_time(cluster, 0.04, 4) == pytest.approx(fit["base_s"] + 0.04 * fit["per_segment"])
    # past the longest segment: its figure grown as the square root (a drift of many independent delays)
    assert comm.meeting_time(cluster, 0.64, 4) == pytest.approx(2 * comm.meeting_time(cluster, 0.16, 4))
    assert comm.meeting_time(cluster, 0.0, 4) == comm.meeting_time(cluster, 0.01, 4)
    assert comm.meeting_time(load_cluster("localhost:4"), 0.05, 4) == 0.0            # GPUs, presets: nothing
    negative = _with_measured(cluster, {"host": {"meeting": {"base_s": -0.01, "per_segment": 0.0}}})
    assert comm.meeting_time(negative, 0.05, 4) == 0.0
    # measured over a host's 4 ranks: a pair's last arrival is nearer the mean (E[max] of 2 normals against
    # 4), one rank meets nobody, 8 ranks wait longer
    four = _with_measured(cluster, {"host": {"meeting": {**fit, "ranks": 4}}})
    assert comm.meeting_time(four, 0.04, 4) == pytest.approx(comm.meeting_time(cluster, 0.04, 4))
    assert comm.meeting_time(four, 0.04, 2) == pytest.approx(0.5642 / 1.0294 * comm.meeting_time(four, 0.04, 4),
                                                             rel=1e-3)
    assert comm.meeting_time(four, 0.04, 1) == 0.0
    assert comm.meeting_time(four, 0.04, 8) > comm.meeting_time(four, 0.04, 4)
    assert fit_meeting({}) is None
    # a negative sample (the machine drifted between the loops) counts as 0, and the line never falls
    drifted = fit_meeting({"meeting": {"samples": [{"segment_s": 0.01, "penalty_s": 0.002},
                                                   {"segment_s": 0.04, "penalty_s": 0.006},
                                                   {"segment_s": 0.18, "penalty_s": -0.045}]}})
    assert drifted["per_segment"] == 0.0 and drifted["base_s"] == pytest.approx(0.008 / 3)


def test_meeting_time_reads_the_drift_curve_and_grows_past_it_as_a_square_root():
    """A profile timed as drift (``timing: drift``) is priced off its curve: interpolated between the segments, the
    shortest's figure below them, the longest's grown as a square root past them; a dip in the samples (noise:
    ranks do not drift less apart over a longer segment) is pooled with its neighbour."""
    from meshplan.profiler.cluster_file import fit_meeting, nondecreasing

    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert nondecreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0] and nondecreasing([]) == []
    raw = {"meeting": {"timing": "drift", "ranks": 4, "samples": [
        {"segment_s": 0.01, "penalty_s": 0.003}, {"segment_s": 0.5, "penalty_s": 0.045},
        {"segment_s": 0.16, "penalty_s": 0.017}, {"segment_s": 1.0, "penalty_s": 0.070},
        {"segment_s": 2.0, "penalty_s": 0.066}]}}
    fit = fit_meeting(raw)
    assert [p["segment_s"] for p in fit["curve"]] == [0.01, 0.16, 0.5, 1.0, 2.0]
    assert [p["penalty_s"] for p in fit["curve"]] == pytest.approx([0.003, 0.017, 0.045, 0.068, 0.068])
    cluster = _with_measured(load_cluster("localhost:4"), {"host": {"meeting": fit}})
    assert comm.meeting_time(cluster, 0.33, 4) == pytest.approx((0.017 + 0.045) / 2)
    assert comm.meeting_time(cluster, 0.001, 4) == pytest.approx(0.003)
    assert comm.meeting_time(cluster, 8.0, 4) == pytest.approx(2 * 0.068)
    assert comm.meeting_time(cluster, 1.5, 2) == pytest.approx(0.068 * 0.5642 / 1.0294, rel=1e-3)


def test_expected_max_normal_is_tippetts_table():
    """E[max of n standard normals], Tippett (1925) / Harter (1961): 0.5642, 0.8463, 1.0294, 1.1630, 1.5388
    for n = 2, 3, 4, 5, 10; 0 for one draw."""
    assert comm.expected_max_normal(1) == 0.0
    for n, table in ((2, 0.5642), (3, 0.8463), (4, 1.0294), (5, 1.1630), (10, 1.5388)):
        assert comm.expected_max_normal(n) == pytest.approx(table, abs=2e-4)


def test_each_collective_call_pays_the_meeting_time():
    """ZeRO-1 makes two calls per communication unit (reduce-scatter and all-gather), ZeRO-0 one: with a
    measured meeting time of 5 ms the difference grows by units x 5 ms (f = 1: nothing hides)."""
    from meshplan.planner.search import evaluate_pinned

    base = _with_measured(load_cluster("localhost:4"), {"links": {"overlap": {"exposed_fraction": 1.0}}})
    meeting = _with_measured(base, {**base.measured, "host": {"meeting": {"base_s": 0.005, "per_segment": 0.0}}})
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")

    def dp_comm(cluster, zero):
        fixes = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 4, "zero": zero}
        return evaluate_pinned(model, cluster, train, fixes).predicted.time_breakdown_s["dp_comm"]

    units = model.layers + 1
    tail = lambda cluster, zero: dp_comm(cluster, zero) - dp_comm(base, zero)   # noqa: E731
    assert tail(meeting, 0) == pytest.approx(units * 0.005, rel=1e-6)
    assert tail(meeting, 1) == pytest.approx(2 * units * 0.005, rel=1e-6)


def test_a_pipelined_gradient_reduction_meets_once_after_the_step():
    """Under torch.distributed.pipelining the gradients are reduced in one REDUCE_GRAD after the stage's last
    backward: the replicas meet once after the whole step, the other units right after, whatever the
    micro-batch (a flat meeting line: exactly one meeting per unit); without a pipeline every unit meets after
    its own layer's backward (a rising line: more than the base per unit)."""
    from meshplan.planner.search import evaluate_pinned

    base = _with_measured(load_cluster("localhost:4"), {"links": {"overlap": {"exposed_fraction": 1.0}}})
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")

    def tail(fixes, line):
        meeting = _with_measured(base, {**base.measured, "host": {"meeting": line}})
        dp_comm = lambda c: evaluate_pinned(model, c, train, fixes).predicted.time_breakdown_s["dp_comm"]  # noqa: E731
        return dp_comm(meeting) - dp_comm(base)

    flat = {"base_s": 0.001, "per_segment": 0.0, "segments_s": [0.0001, 1000.0]}
    units = model.layers // 2 + 1                               # the first stage's blocks and its root
    tails = [tail({"dp": 2, "tp": 1, "pp": 2, "cp": 1, "micro_batch": mb, "schedule": "1f1b", "zero": 0}, flat)
             for mb in (1, 2)]
    assert tails[0] == pytest.approx(units * 0.001, rel=0.05) and tails[1] == pytest.approx(tails[0], rel=0.05)
    rising = {"base_s": 0.001, "per_segment": 0.1, "segments_s": [0.0001, 1000.0]}
    flat_dp = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 2, "zero": 0}
    per_layer = tail(flat_dp, rising)
    assert per_layer > (model.layers + 1) * 0.001              # per layer: grows with the layer's backward
    # without a pipeline too, the first unit's all-reduce is the first collective since the last step's:
    # the replicas meet there after the whole step's compute (benchmarks/dp_step_phases.py: 0.09-0.15 s on
    # 4 CPU ranks), then after each layer's backward
    step = evaluate_pinned(model, base, train, flat_dp).predicted.time_breakdown_s["compute"]
    assert per_layer > 0.001 + 0.1 * step + model.layers * 0.001


def test_the_schedule_pays_its_op_overhead_per_chunk_and_micro_batch():
    from meshplan.planner.search import evaluate_pinned

    base = load_cluster("localhost:4")
    assert compute.pipeline_op_overhead(base) == 0.0
    overhead = _with_measured(base, {"host": {"pipeline": {"op_overhead_s": 0.002}}})
    assert compute.pipeline_op_overhead(overhead) == 0.002
    with pytest.raises(InputError, match=r"measured\.host\.pipeline\.op_overhead_s: expected a number"):
        compute.pipeline_op_overhead(_with_measured(base, {"host": {"pipeline": {"op_overhead_s": "x"}}}))
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")
    gpipe = {"dp": 2, "tp": 1, "pp": 2, "cp": 1, "micro_batch": 1, "schedule": "gpipe", "zero": 0}
    interleaved = {**gpipe, "schedule": "interleaved", "virtual_stages": 2}
    flat = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 4, "zero": 0}

    def extra(fixes):
        a, b = (evaluate_pinned(model, c, train, fixes).predicted.iteration_s for c in (base, overhead))
        return b - a
    # GPipe: every rank's ops in a row, m forwards and m backwards, plus the fill and the drain
    m, p = 8, 2
    assert extra(gpipe) == pytest.approx((m - 1 + p) * 2 * 0.002, rel=1e-6)
    assert extra(interleaved) > extra(gpipe)            # twice the ops per rank
    assert extra(flat) == 0.0                           # no pipeline, no schedule


def test_the_measured_reduction_table_is_read_linearly_between_its_sizes():
    """comm.measured_collective_time: linear in bytes between two measured sizes, the smallest's time below
    them (latency-bound), the last segment's slope past them; only for the collective and group shape
    measured (the alpha-beta line prices the rest)."""
    rows = [{"collective": "all_reduce", "ranks": 2, "stride": 1, "bytes": b, "seconds": t}
            for b, t in ((1e6, 0.010), (4e6, 0.020), (2e6, float("nan")))]
    cluster = _with_measured(load_cluster("localhost:4"), {"links": {"reduction": {"samples": rows}}})
    read = lambda n, size=2, stride=1, name="all_reduce": comm.measured_collective_time(  # noqa: E731
        cluster, name, size, stride, n)
    assert read(2.5e6) == pytest.approx(0.015)
    assert read(0.5e6) == pytest.approx(0.010)
    assert read(8e6) == pytest.approx(0.020 + 0.010 / 3e6 * 4e6)
    assert read(2e6, stride=2) is None and read(2e6, size=4) is None and read(2e6, name="all_gather") is None
    assert read(2e6, size=1) == 0.0
    bad = _with_measured(cluster, {"links": {"reduction": {"samples": [*rows[:2], {**rows[2], "seconds": "bad"}]}}})
    with pytest.raises(InputError, match=r"measured\.links\.reduction\.samples\[2\]\.seconds"):
        comm.measured_collective_time(bad, "all_reduce", 2, 1, 2e6)


def test_data_parallel_traffic_is_priced_per_unit_from_the_measured_table():
    """With the profile's reduction table for the plan's group shape, a ZeRO-0 step's gradient reduction is
    one all-reduce per communication unit (each block and the root, as the runtime's replicate makes them),
    each at its measured time; a table for another group shape changes nothing. ZeRO-1's reduce-scatter and
    all-gather are read the same way. (f = 1: nothing hides, so dp_comm is the sum.)"""
    from meshplan.planner import flops
    from meshplan.planner.search import evaluate_pinned

    base = _with_measured(load_cluster("localhost:4"), {"links": {"overlap": {"exposed_fraction": 1.0}}})
    model, train = load_model("tiny-llama"), TrainSpec(16, 256, "fp32")
    fixes = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 4, "zero": 0}

    def table(stride, seconds_per_byte, names=("all_reduce",)):
        rows = [{"collective": name, "ranks": 4, "stride": stride, "bytes": b, "seconds": 0.002 + b * seconds_per_byte}
                for name in names for b in (2**16, 2**24)]
        return _with_measured(base, {**base.measured, "links": {**base.measured["links"],
                                                                 "reduction": {"samples": rows}}})

    def dp_comm(cluster, zero=0):
        return evaluate_pinned(model, cluster, train, {**fixes, "zero": zero}).predicted.time_breakdown_s["dp_comm"]

    block = 4.0 * flops.params_per_layer(model)
    root = 4.0 * (flops.embedding_params(model, 256) + flops.head_params(model))
    per_unit = lambda b: 0.002 + b * 1e-9   # noqa: E731
    expected = model.layers * per_unit(block) + per_unit(root)
    assert dp_comm(table(1, 1e-9)) == pytest.approx(expected, rel=1e-6)
    assert dp_comm(table(2, 1e-9)) == pytest.approx(dp_comm(base), rel=1e-12)    # not this plan's shape
    zero1 = table(1, 1e-9, ("reduce_scatter", "all_gather"))
    assert dp_comm(zero1, 1) == pytest.approx(2 * expected, rel=1e-6)
