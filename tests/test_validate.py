"""meshplan validate: plan selection, comparison and calibration (pure), bad input, and one real run of two
layouts of a tiny model on two CPU processes with --update."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.planner.search import search
from meshplan.profiler import validate as v
from meshplan.spec import MODEL_PRESETS, TrainSpec, load_cluster

runner = CliRunner()


def _plans(top=16):
    return search(MODEL_PRESETS["tiny-llama"], load_cluster("localhost:2"), TrainSpec(4, 64, "fp32"), {}, top=top).plans


def test_zero_1_and_2_are_one_layout_to_the_runtime():
    plans = _plans()
    chosen = v.distinct_layouts(plans, 4)
    keys = [v.layout_key(p) for p in chosen]
    assert len(set(keys)) == len(keys)
    assert chosen[0] is plans[0]                       # the planner's first choice stays first
    import dataclasses
    a = dataclasses.replace(plans[0], zero=1)
    b = dataclasses.replace(plans[0], zero=2)
    c = dataclasses.replace(plans[0], zero=3)
    assert v.layout_key(a) == v.layout_key(b) != v.layout_key(c)


def _run(i, plan, predicted, measured):
    run = v.Run(i, plan, f"plan{i}.yaml", predicted, 0.1)
    run.measured_s = measured
    return run


def test_compare_reports_spearman_and_first_choice():
    plans = _plans()[:3]
    runs = [_run(1, plans[0], 1.0, 1.1), _run(2, plans[1], 1.2, 1.0), _run(3, plans[2], 1.5, 2.0)]
    got = v.compare(runs)
    assert got["spearman"] == pytest.approx(0.5)
    assert got["fastest"] == 2 and not got["first_is_fastest"]
    assert got["first_over_fastest"] == pytest.approx(1.1)


def test_noise_says_which_pairs_the_runs_resolve():
    """Layouts 1 and 2 lie within each other's run-to-run spread (unresolved); 3 is apart from both. The planner
    orders (1, 3) as measured and ties (2, 3); with no repeats there is nothing to say."""
    plans = _plans()[:3]
    runs = [_run(1, plans[0], 1.0, 1.00), _run(2, plans[1], 1.2, 1.02), _run(3, plans[2], 1.2, 1.30)]
    for run, times in zip(runs, [[1.00, 1.05], [1.02, 1.04], [1.30, 1.31]]):
        run.repeats_s = times
    got = v.compare(runs)
    assert got["pairs"] == 3 and got["resolved_pairs"] == 2
    assert (got["resolved_agree"], got["resolved_tied"], got["resolved_reversed"]) == (1, 1, 0)
    assert got["run_spread_max"] == pytest.approx(0.05)
    assert got["measured_span"] == pytest.approx(0.30)
    assert "pairs the runs resolve: 2 of 3" in v.noise_text(got)
    assert "ranks noise" not in v.noise_text(got)
    close = [_run(i, p, 1.0 + i / 100, 1.0 + i / 100) for i, p in enumerate(plans, 1)]
    for run in close:
        run.repeats_s = [run.measured_s, run.measured_s * 1.05]
    assert "ranks noise" in v.noise_text(v.compare(close))
    for run in runs:
        run.repeats_s = [run.measured_s]
    assert "resolved_pairs" not in v.compare(runs) and v.noise_text(v.compare(runs)) == ""
    # a calibration's new first choice is judged within the wider of SAME_WITHIN and the runs' own spread
    assert v.same_within(runs[0], runs[1]) == v.SAME_WITHIN
    runs[0].repeats_s = [1.00, 1.12]
    assert v.same_within(runs[0], runs[1]) == pytest.approx(0.12)


def test_calibration_scales_rates_and_links():
    cluster = load_cluster("localhost:2")
    data = {**cluster.to_dict(), "measured": {"compute": {"matmul_table": [[1e6, 0.02], [1e8, 0.04]],
                                                          "attention_tflops": 0.01, "memory_gbps": 4.0}}}
    out = v.apply_calibration(data, cluster, 2.0, 4.0, {"precision": "fp32"})
    comp = out["measured"]["compute"]
    assert comp["matmul_table"] == [[1e6, 0.01], [1e8, 0.02]]
    assert comp["attention_tflops"] == pytest.approx(0.005) and comp["memory_gbps"] == pytest.approx(2.0)
    assert out["intra_node"]["bandwidth_gbps"] == pytest.approx(cluster.intra_node.bandwidth_gbps / 4)
    assert out["intra_node"]["latency_us"] == pytest.approx(cluster.intra_node.latency_us * 4)
    assert out["measured"]["calibration"][-1]["precision"] == "fp32"
    assert data["measured"]["compute"]["attention_tflops"] == 0.01          # the input is not modified
    # a file without measured compute gets the current rates written, then scaled
    out = v.apply_calibration(cluster.to_dict(), cluster, 2.0, 1.0, {"precision": "fp32"})
    assert out["measured"]["compute"]["matmul_tflops"] > 0
    assert load_cluster  # the result is a loadable mapping
    from meshplan.spec import ClusterSpec
    ClusterSpec.from_dict(out)


@pytest.mark.parametrize("args, field", [
    (["--cluster", "localhost:2", "--top", "1"], "--top"),
    (["--cluster", "localhost:2", "--steps", "1"], "--steps"),
    (["--cluster", "localhost:2", "--repeats", "0"], "--repeats"),
    (["--cluster", "localhost:2", "--update"], "--update"),
    (["--cluster", "nowhere.yaml"], "--cluster"),
    (["--cluster", "localhost:2", "--model", "nope"], "--model"),
])
def test_validate_bad_input_is_one_line(args, field):
    result = runner.invoke(app, ["validate", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), result.output


def test_validate_two_layouts_and_update(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(load_cluster("localhost:2").to_dict()))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "meshplan.cli", "validate", "--model", "tiny-llama", "--cluster",
                           str(cluster), "--global-batch", "4", "--seq-len", "64", "--top", "2", "--steps", "3",
                           "--update", "--work-dir", str(tmp_path / "work"), "--json", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Spearman" in proc.stdout and "first choice fastest" in proc.stdout
    import json
    data = json.loads(report.read_text())
    assert len(data["runs"]) == 2 and all(r["measured_s"] for r in data["runs"])
    assert all(r["measured_gib"] for r in data["runs"])
    updated = load_cluster(str(cluster))
    assert updated.measured["calibration"][-1]["compute_scale"] > 0
    assert data["calibration"]["first_after_s"] > 0


def test_a_calibration_that_picks_a_slower_plan_is_not_kept(tmp_path, monkeypatch):
    """--update measures the recalibrated first choice; when it is slower than the first choice before, the
    cluster file keeps its rates and links and only records the rejected attempt."""
    cluster = tmp_path / "cluster.yaml"
    base = load_cluster("localhost:2").to_dict()
    base["measured"] = {"compute": {"precision": "fp32", "matmul_tflops": 0.05}}
    cluster.write_text("# my cluster\n" + yaml.safe_dump(base))
    before = load_cluster(str(cluster))

    def fake_measure(plans, steps, work, repeats):
        runs = [_run(i, p, p.predicted.iteration_s, 1.0 + 0.1 * i) for i, p in enumerate(plans, 1)]
        return runs

    monkeypatch.setattr(v, "measure_plans", fake_measure)
    monkeypatch.setattr(v, "after_calibration", lambda *a, **k: {"verdict": "worse", "after_over_before": 1.3})
    code = v.run_validate("tiny-llama", str(cluster), 4, 64, None, 3, 3, [], True, str(tmp_path / "w"), None)
    assert code == 0
    after = load_cluster(str(cluster))
    assert after.intra_node == before.intra_node and after.inter_node == before.inter_node
    assert after.measured["compute"]["matmul_tflops"] == pytest.approx(0.05)
    record = after.measured["calibration"][-1]
    assert record["applied"] is False and "slower" in record["rejected"]
    assert cluster.read_text().startswith("# my cluster")
