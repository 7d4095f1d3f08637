"""The cost model against published runs (../shared/benchmarks/public-runs.yaml)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fidelity  # noqa: E402

pytestmark = pytest.mark.skipif(not fidelity.DEFAULT_RUNS.exists(),
                                reason=f"{fidelity.DEFAULT_RUNS} not present (shared/ beside the checkout)")


@pytest.fixture(scope="module")
def result(fidelity_table):
    return fidelity_table(fidelity.DEFAULT_RUNS)


def test_median_error_within_six_percent(result):
    assert result["summary"]["median_abs_error"] <= 0.06


def test_worst_error_within_twelve_percent(result):
    assert result["summary"]["max_abs_error"] <= 0.12, [(r["name"], round(r["error"], 3)) for r in result["runs"]]


def test_torchtitan_memory_is_the_published_reserved_figure(result):
    """Predicted reserved memory within 10% of torchtitan's published max reserved, never 5% below it."""
    for run in result["runs"]:
        if run["measured_memory_gib"]:
            error = run["predicted_reserved_gib"] / run["measured_memory_gib"] - 1
            assert -0.05 <= error <= 0.10, (run["name"], error)


def test_torchtitan_pipeline_runs_use_torchtitans_default_microbatch_count():
    # torchtitan splits the local batch into pipeline_parallel_microbatches, default = the PP degree
    assert fidelity.torchtitan_pipeline_microbatches(8) == 8
    assert fidelity.torchtitan_pipeline_microbatches(8, configured=32) == 32
    piped = [c for c in fidelity.load_cases(fidelity.DEFAULT_RUNS)
             if c.name.startswith("torchtitan") and c.fixes["pp"] > 1]
    assert piped
    for case in piped:
        dp, pp, b = case.fixes["dp"], case.fixes["pp"], case.fixes["micro_batch"]
        assert case.train.global_batch // (dp * b) == pp     # 405B: local batch 32 -> 8 micro-batches of 4


def test_interleaving_gain_of_the_405b_runs_is_reproduced(result):
    runs = {r["name"]: r for r in result["runs"] if "405b" in r["name"]}
    one_f_one_b = next(r for n, r in runs.items() if n.endswith(", 1F1B"))
    interleaved = next(r for n, r in runs.items() if "interleaved" in n)
    measured = one_f_one_b["measured_iteration_s"] / interleaved["measured_iteration_s"]
    predicted = one_f_one_b["predicted_iteration_s"] / interleaved["predicted_iteration_s"]
    assert predicted == pytest.approx(measured, rel=0.05)


def test_every_published_run_fits_in_device_memory(result):
    assert all(run["fits"] for run in result["runs"])


def test_planner_choice_is_at_least_as_fast_and_fits(result):
    for run in result["runs"]:
        assert run["planner_iteration_s"] <= run["predicted_iteration_s"] * (1 + 1e-9), run["name"]
        assert run["planner_fits"], run["name"]
        assert run["planner_notes"], run["name"]
