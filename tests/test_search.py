import time

import pytest

from meshplan.plan import Plan
from meshplan.spec import TrainSpec, load_cluster, load_model
from meshplan.errors import InputError, NoFeasiblePlan
from meshplan.planner.search import parse_fixes, search


@pytest.mark.alone
def test_llama3_8b_one_node_in_well_under_a_second():
    start = time.perf_counter()
    result = search(load_model("llama3-8b"), load_cluster("dgx-h100:1"), TrainSpec(64, 8192), top=3)
    assert time.perf_counter() - start < 1.0
    times = [p.predicted.iteration_s for p in result.plans]
    assert times == sorted(times) and len(times) == 3
    for plan in result.plans:
        assert plan.world_size == 8
        assert plan.predicted.peak_memory_gib <= plan.cluster.gpu.memory_gib
        assert plan.dp * plan.micro_batch * plan.num_microbatches == 64
    assert result.rejected and sum(result.rejected.values()) > 0


@pytest.mark.slow
@pytest.mark.alone
def test_llama3_405b_on_16384_gpus_within_five_seconds():
    start = time.perf_counter()
    result = search(load_model("llama3-405b"), load_cluster("dgx-h100:2048"), TrainSpec(2048, 8192), top=3)
    elapsed = time.perf_counter() - start
    assert elapsed <= 5.0, f"search took {elapsed:.1f}s"
    best = result.plans[0]
    assert best.world_size == 16384 and best.tp <= 8
    assert sum(s.num_layers for s in best.stages) == 126


@pytest.mark.parametrize("model,cluster,batch,seq", [("llama3-8b", "dgx-h100:1", 64, 8192),
                                                      ("llama3-70b", "dgx-h100:8", 128, 4096),
                                                      ("gpt3-175b", "dgx-a100:16", 256, 2048)])
def test_every_printed_plan_is_reproduced_by_pinning_its_fields(model, cluster, batch, seq):
    m, c, t = load_model(model), load_cluster(cluster), TrainSpec(batch, seq)
    for plan in search(m, c, t, top=3).plans:
        again = search(m, c, t, plan.fields_for_fix(), top=1).plans[0]
        assert again.fields_for_fix() == plan.fields_for_fix()
        assert again.predicted.iteration_s == pytest.approx(plan.predicted.iteration_s, rel=1e-9)


def test_fully_pinned_evaluates_exactly_that_configuration():
    fixes = parse_fixes(["dp=2", "tp=2", "pp=2", "cp=1", "micro_batch=1", "schedule=gpipe", "zero=1",
                         "recompute=full", "vocab_parallel=false"])
    plan = search(load_model("llama3-8b"), load_cluster("dgx-h100:1"), TrainSpec(16, 4096), fixes).plans[0]
    assert (plan.dp, plan.tp, plan.pp, plan.schedule, plan.zero, plan.recompute) == (2, 2, 2, "gpipe", 1, "full")


def test_pipeline_plan_is_uneven_when_the_head_is_heavy():
    fixes = parse_fixes(["tp=1", "pp=4", "cp=1", "schedule=1f1b", "vocab_parallel=false"])
    plan = search(load_model("llama3-8b"), load_cluster("dgx-h100:1"), TrainSpec(64, 4096), fixes).plans[0]
    layers = [s.num_layers for s in plan.stages]
    assert sum(layers) == 32 and layers[-1] < max(layers)


def test_memory_pressure_turns_on_recompute():
    plan = search(load_model("llama3-70b"), load_cluster("dgx-h100:4"), TrainSpec(32, 8192),
                  parse_fixes(["tp=8", "pp=2", "cp=1", "micro_batch=1", "zero=1", "schedule=1f1b"])).plans[0]
    assert plan.recompute != "none"
    assert plan.predicted.peak_memory_gib <= plan.cluster.gpu.memory_gib


def test_plan_round_trips_through_yaml(tmp_path):
    plan = search(load_model("llama3-8b"), load_cluster("dgx-h100:1"), TrainSpec(64, 8192), top=1).plans[0]
    path = tmp_path / "plan.yaml"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_alternatives_carry_their_time_and_memory_breakdowns_through_files(tmp_path, suffix):
    result = search(load_model("llama3-70b"), load_cluster("dgx-h100:4"), TrainSpec(64, 4096), top=3)
    plan = result.plans[0]
    alternatives = plan.search["alternatives"]
    assert len(alternatives) == 3
    for alt, other in zip(alternatives, result.plans):
        assert alt["fix"]["dp"] == other.dp and alt["iteration_s"] == pytest.approx(other.predicted.iteration_s)
        assert set(alt["time_breakdown_s"]) == set(other.predicted.time_breakdown_s)
        assert alt["time_breakdown_s"] == pytest.approx(other.predicted.time_breakdown_s, abs=1e-6)
        assert alt["peak_memory_gib"] == pytest.approx(other.predicted.peak_memory_gib, abs=1e-3)
        assert sum(alt["time_breakdown_s"].values()) == pytest.approx(alt["iteration_s"], rel=1e-5)
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    again = Plan.load(path)
    assert again.search["alternatives"] == alternatives


def test_nothing_fits_says_what_would():
    with pytest.raises(NoFeasiblePlan) as info:
        search(load_model("llama3-405b"), load_cluster("dgx-h100:1"), TrainSpec(8, 8192))
    assert "at least" in str(info.value) and "GPUs" in str(info.value)


@pytest.mark.parametrize("pins,field", [(["tp=3"], "--fix tp"), (["tp=16"], "--fix tp"), (["pp=400"], "--fix pp"),
                                        (["dp=3"], "--fix dp"), (["micro_batch=7"], "--fix micro_batch"),
                                        (["bogus=1"], "--fix bogus"), (["zero=5"], "--fix zero")])
def test_impossible_pins_are_input_errors(pins, field):
    with pytest.raises(InputError) as info:
        search(load_model("llama3-8b"), load_cluster("dgx-h100:2"), TrainSpec(64, 8192), parse_fixes(pins))
    assert info.value.field == field


def test_plans_predicted_equally_fast_are_ranked_by_memory(tmp_path):
    """GPipe and 1F1B over two stages have one makespan: the planner lists the one with the lower peak first
    (1F1B holds fewer micro-batches), whatever order it evaluated them in."""
    (tmp_path / "small.yaml").write_text("name: small\nlayers: 8\nhidden: 256\nheads: 8\nkv_heads: 4\n"
                                         "vocab: 2048\nmlp: swiglu\nnorm: rmsnorm\nposition: rope\n")
    result = search(load_model(str(tmp_path / "small.yaml")), load_cluster("localhost:4"), TrainSpec(16, 256, "fp32"),
                    parse_fixes(["pp=2", "dp=2", "micro_batch=4", "zero=0", "vocab_parallel=false", "recompute=none"]),
                    top=8)
    keys = [(round(p.predicted.iteration_s, 9), p.predicted.peak_memory_gib) for p in result.plans]
    assert keys == sorted(keys)
    by_schedule = {p.schedule: p for p in result.plans if p.virtual_stages == 1}
    assert {"gpipe", "1f1b"} <= set(by_schedule), [p.schedule for p in result.plans]
    gpipe, one_f_one_b = by_schedule["gpipe"], by_schedule["1f1b"]
    assert gpipe.predicted.iteration_s == pytest.approx(one_f_one_b.predicted.iteration_s, rel=1e-9)
    assert one_f_one_b.predicted.peak_memory_gib < gpipe.predicted.peak_memory_gib
    assert result.plans.index(one_f_one_b) < result.plans.index(gpipe)
