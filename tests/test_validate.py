"""meshplan validate: plan selection, comparison and calibration (pure), bad input, and one real run of two
layouts of a tiny model on two CPU processes with --update."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.planner.search import search
from meshplan import validate as v
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


def test_spearman_ceiling_is_what_a_perfect_planner_would_score_against_the_noise():
    """Layouts far apart next to their standard errors: a planner knowing the true times scores about 1.
    Layouts closer than their noise: the shrunk true times collapse and the ceiling is 0. Fewer than three
    layouts, or no repeats: nothing to say. Deterministic (seeded)."""
    plans = _plans()[:4]
    assert len(plans) == 4
    apart = [_run(i, p, 1.0, 1.0 + 0.2 * i) for i, p in enumerate(plans, 1)]
    for run in apart:
        run.repeats_s = [run.measured_s * 0.995, run.measured_s * 1.005]
    assert v.spearman_ceiling(apart) == pytest.approx(1.0, abs=0.01)
    assert v.spearman_ceiling(apart) == v.spearman_ceiling(apart)
    close = [_run(i, p, 1.0, 1.0 + 0.001 * i) for i, p in enumerate(plans, 1)]
    for run in close:
        run.repeats_s = [run.measured_s * 0.9, run.measured_s * 1.1]
    assert v.spearman_ceiling(close) == 0.0
    middling = [_run(i, p, 1.0, 1.0 + 0.02 * i) for i, p in enumerate(plans, 1)]
    for run in middling:
        run.repeats_s = [run.measured_s * 0.98, run.measured_s * 1.02]   # standard error ~2%, steps of 2%
    assert 0.1 < v.spearman_ceiling(middling) < 0.95
    assert "would score a Spearman of about" in v.noise_text(v.compare(middling))
    assert v.spearman_ceiling(middling[:2]) is None
    for run in middling:
        run.repeats_s = [run.measured_s]
    assert v.spearman_ceiling(middling) is None


def test_noise_says_which_pairs_the_runs_resolve():
    """Layouts 1 and 2 lie within two standard errors of each other (unresolved); 3 is apart from both. The
    planner orders (1, 3) as measured and ties (2, 3); with no repeats there is nothing to say."""
    plans = _plans()[:3]
    runs = [_run(1, plans[0], 1.0, 1.02), _run(2, plans[1], 1.2, 1.04), _run(3, plans[2], 1.2, 1.30)]
    for run, times in zip(runs, [[1.00, 1.04], [1.02, 1.06], [1.29, 1.31]]):
        run.repeats_s = times
    assert v.standard_error(runs[0]) == pytest.approx(0.02)          # stdev 0.0283 / sqrt(2)
    assert v.difference_error(runs[0], runs[1]) == pytest.approx(0.02 * 2 ** 0.5)
    got = v.compare(runs)
    assert got["pairs"] == 3 and got["resolved_pairs"] == 2
    assert (got["resolved_agree"], got["resolved_tied"], got["resolved_reversed"]) == (1, 1, 0)
    assert got["run_spread_max"] == pytest.approx(0.04 / 1.02)
    assert got["measured_span"] == pytest.approx(1.30 / 1.02 - 1)
    assert got["runs_per_layout"] == 2
    assert "pairs the runs resolve (2 standard errors apart): 2 of 3" in v.noise_text(got)
    assert "ranks noise" not in v.noise_text(got)
    close = [_run(i, p, 1.0 + i / 100, 1.0 + i / 100) for i, p in enumerate(plans, 1)]
    for run in close:
        run.repeats_s = [run.measured_s * 0.97, run.measured_s * 1.03]
    assert v.compare(close)["resolved_pairs"] == 0 and "ranks noise" in v.noise_text(v.compare(close))
    # more runs of the same spread narrow the standard error: then the same gaps resolve
    for run in close:
        run.repeats_s = [run.measured_s * f for f in (0.999, 1.001) * 8]
    assert v.compare(close)["resolved_pairs"] == 3
    for run in runs:
        run.repeats_s = [run.measured_s]
    assert "resolved_pairs" not in v.compare(runs) and v.noise_text(v.compare(runs)) == ""
    # a calibration's new first choice is judged within the wider of SAME_WITHIN and 2 standard errors
    assert v.same_within(runs[0], runs[1]) == v.SAME_WITHIN
    runs[0].repeats_s, runs[1].repeats_s = [0.90, 1.14], [1.02, 1.06]
    assert v.same_within(runs[0], runs[1]) == pytest.approx(2 * (0.12 ** 2 + 0.02 ** 2) ** 0.5 / 1.02)


def test_repeated_runs_report_their_mean(monkeypatch, tmp_path):
    """--repeats: the measured time is the mean of the runs' medians (not the fastest), a failed run is left
    out, and the record keeps every run's time and the largest memory."""
    plans = _plans()[:2]
    times = iter([1.0, 2.0, 2.2, None, 1.3, 2.4])      # launch order: plans 1, 2; then 2, 1; then 1, 2
    gib = iter([0.5, 0.6, 0.9, 0.7, 0.4, 0.6])

    def fake_launch(plan, plan_path, steps, work, index, attempt=0):
        run = v.Run(index, plan, str(plan_path), 1.0, 0.1)
        run.measured_s, run.measured_gib = next(times), next(gib)
        if run.measured_s is None:
            run.error, run.measured_gib = "exit 1", None
        return run

    monkeypatch.setattr(v, "launch_plan", fake_launch)
    first, second = v.measure_plans(plans, 3, tmp_path, repeats=3)
    # the second round runs in reverse order (plan 2 first): its failure belongs to plan 1 all the same
    assert first.repeats_s == [1.0, None, 1.3] and second.repeats_s == [2.0, 2.2, 2.4]
    # rounds 1 and 3 are complete: blocked by them, round 3 runs 1.3 / sqrt(1.3 * 2.4) of its level
    g1, g3 = (1.0 * 2.0) ** 0.5, (1.3 * 2.4) ** 0.5
    overall = (g1 * g3) ** 0.5
    assert first.normalized_s == pytest.approx([1.0 / g1 * overall, 1.3 / g3 * overall])
    assert first.measured_s == pytest.approx((1.0 / g1 + 1.3 / g3) / 2 * overall)
    assert first.measured_gib == 0.5 and second.measured_gib == 0.9


def test_blocking_by_round_cancels_what_the_machine_did_to_a_round():
    """Three layouts 1.00 : 1.03 : 1.06 apart, measured in four rounds while the machine's speed drifts by 30%
    and a little noise is left: the plain means do not resolve the layouts, the blocked ones do, in order."""
    plans = _plans()[:3]
    drift, jitter = [1.0, 1.3, 1.1, 1.2], [[0.0, 0.004, -0.004, 0.0], [0.004, -0.004, 0.0, 0.0],
                                          [-0.004, 0.0, 0.004, 0.0]]
    runs = []
    for i, (plan, base) in enumerate(zip(plans, [1.00, 1.03, 1.06]), 1):
        run = _run(i, plan, base, None)
        run.repeats_s = [base * d * (1 + e) for d, e in zip(drift, jitter[i - 1])]
        runs.append(run)
    plain = [statistics.fmean(r.repeats_s) for r in runs]
    for run in runs:
        run.measured_s = statistics.fmean(run.repeats_s)
    assert v.compare(runs)["resolved_pairs"] == 0                     # the drift swamps 3% steps
    v.block_rounds(runs)
    assert [r.measured_s for r in runs] == sorted(r.measured_s for r in runs)
    assert runs[1].measured_s / runs[0].measured_s == pytest.approx(1.03, abs=0.006)
    got = v.compare(runs)
    assert got["resolved_pairs"] == 3 and got["resolved_agree"] == 3 and got["spearman"] == pytest.approx(1.0)
    assert got["round_drift"] == pytest.approx(0.3, abs=0.01)
    assert "the rounds' levels by 30" in v.noise_text(got)
    assert statistics.fmean(r.measured_s for r in runs) == pytest.approx(statistics.fmean(plain), rel=0.01)
    # a round with a failed run does not block; with one complete round left the plain mean stays
    runs[0].repeats_s[1:] = [None, None, None]
    v.block_rounds(runs)
    assert runs[0].normalized_s == [] and runs[0].measured_s == pytest.approx(1.0)


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


def test_undo_calibration_gives_back_the_profile():
    cluster = load_cluster("localhost:2")
    profile = {**cluster.to_dict(), "measured": {"compute": {"matmul_table": [[1e6, 0.02], [1e8, 0.04]],
                                                             "attention_tflops": 0.01, "memory_gbps": 4.0}}}
    once = v.apply_calibration(profile, cluster, 2.0, 4.0, {"compute_scale": 2.0, "comm_scale": 4.0})
    # a rejected attempt is recorded but its rates were never written: undo must skip it
    once["measured"]["calibration"].append({"compute_scale": 9.0, "comm_scale": 9.0, "applied": False})
    twice = v.apply_calibration(once, cluster, 0.5, 1.5, {"compute_scale": 0.5, "comm_scale": 1.5})
    undone = v.undo_calibration(twice, cluster)
    assert "calibration" not in undone["measured"]
    for (f, r), (f0, r0) in zip(undone["measured"]["compute"]["matmul_table"],
                                profile["measured"]["compute"]["matmul_table"]):
        assert f == f0 and r == pytest.approx(r0)
    assert undone["measured"]["compute"]["memory_gbps"] == pytest.approx(4.0)
    assert undone["intra_node"]["bandwidth_gbps"] == pytest.approx(cluster.intra_node.bandwidth_gbps)
    assert undone["intra_node"]["latency_us"] == pytest.approx(cluster.intra_node.latency_us)
    assert "calibration" in twice["measured"]                              # the input is not modified


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


@pytest.mark.slow   # torchrun jobs of two layouts and the recalibrated first choice
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


def test_gpu_benchmark_checks_memory_only_where_it_is_max_memory_allocated():
    """benchmarks/profile_validate_gpu.py: time within 15% and memory within 10% per layout;
    a CPU smoke run's peak RSS is shown but not judged; a failed layout counts for nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_validate_gpu.py"
    spec = importlib.util.spec_from_file_location("profile_validate_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [{"index": 1, "layout": "a", "predicted_s": 1.0, "measured_s": 1.10, "predicted_gib": 10.0,
             "measured_gib": 10.9, "memory_kind": "max_memory_allocated"},
            {"index": 2, "layout": "b", "predicted_s": 1.0, "measured_s": 1.20, "predicted_gib": 10.0,
             "measured_gib": 8.0, "memory_kind": "max_memory_allocated"},
            {"index": 3, "layout": "c", "predicted_s": 1.0, "measured_s": 0.90, "predicted_gib": 1.0,
             "measured_gib": 3.0, "memory_kind": "peak RSS"},
            {"index": 4, "layout": "d", "predicted_s": 1.0, "measured_s": None, "predicted_gib": 1.0}]
    rows, counts = bench.verdicts(runs)
    assert counts == {"measured": 3, "time_ok": 2, "memory_checked": 2, "memory_ok": 1}
    assert [row[5] for row in rows] == ["yes", "NO", "yes", "-"]
    assert [row[9] for row in rows] == ["yes", "NO", "-", "-"]


def test_a_new_first_choice_is_measured_beside_the_old_one(tmp_path, monkeypatch):
    """After calibration a first choice that was not validated is launched together with the old first
    choice, in the same rounds, and judged against that fresh measurement, not the old one."""
    plans = v.distinct_layouts(_plans(), 2)
    runs = [_run(1, plans[0], 1.0, 1.0)]
    seen = []

    def fake_measure(chosen, steps, work, repeats):
        seen.append([v.layout_key(p) for p in chosen])
        return [_run(1, chosen[0], 1.0, 1.50), _run(2, chosen[1], 1.0, 1.20)]

    monkeypatch.setattr(v, "measure_plans", fake_measure)
    monkeypatch.setattr(v, "distinct_layouts", lambda found, top: [plans[1]])   # the calibrated planner's pick
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump(load_cluster("localhost:2").to_dict()))
    out = v.after_calibration(MODEL_PRESETS["tiny-llama"], cluster, TrainSpec(4, 64, "fp32"), {}, runs, 3, tmp_path, 2, 2)
    assert seen == [[v.layout_key(plans[0]), v.layout_key(plans[1])]]
    assert out["first_before_s"] == 1.50 and out["first_after_s"] == 1.20 and out["verdict"] == "better"


def test_calibration_scales_what_the_profile_timed_whole():
    """The head + loss, optimizer and pipeline-op timings move with the compute scale; meetings and the
    data-parallel reduction table with the communication scale; undo gives them back. A record without
    ``measured_seconds_scaled`` leaves them alone when undone."""
    cluster = load_cluster("localhost:2")
    measured = {"compute": {"matmul_table": [[1e6, 0.02]], "attention_tflops": 0.01, "memory_gbps": 4.0,
                            "vocab": [{"head_s": 0.01, "loss_s": 0.02, "embedding_s": 0.001,
                                       "chunked_head_loss_s": 0.03, "tokens": 256}],
                            "optimizer": [{"tp": 1, "step_s": 0.004, "seconds_per_param": 5e-9, "params": 8e5}]},
                "host": {"pipeline": {"op_overhead_s": 0.003}, "meeting": {"base_s": 0.004, "per_segment": 0.08,
                                                                     "curve": [{"segment_s": 0.5, "penalty_s": 0.05}]}},
                "links": {"reduction": {"samples": [{"collective": "all_reduce", "ranks": 2, "stride": 1,
                                                     "bytes": 2**20, "seconds": 0.01, "rounds_s": [0.01]}]}}}
    profile = {**cluster.to_dict(), "measured": measured}
    once = v.apply_calibration(profile, cluster, 2.0, 4.0, {"compute_scale": 2.0, "comm_scale": 4.0})
    m = once["measured"]
    assert m["compute"]["vocab"][0]["chunked_head_loss_s"] == pytest.approx(0.06)
    assert m["compute"]["vocab"][0]["tokens"] == 256
    assert m["compute"]["optimizer"][0]["seconds_per_param"] == pytest.approx(1e-8)
    assert m["compute"]["optimizer"][0]["params"] == 8e5
    assert m["host"]["pipeline"]["op_overhead_s"] == pytest.approx(0.006)
    assert m["host"]["meeting"]["base_s"] == pytest.approx(0.016) and m["host"]["meeting"]["per_segment"] == 0.32
    assert m["host"]["meeting"]["curve"] == [{"segment_s": 0.5, "penalty_s": pytest.approx(0.2)}]
    row = m["links"]["reduction"]["samples"][0]
    assert row["seconds"] == pytest.approx(0.04) and row["rounds_s"] == [0.01]   # the rounds stay as measured
    assert m["calibration"][-1]["measured_seconds_scaled"] is True
    undone = v.undo_calibration(once, cluster)["measured"]
    assert undone["compute"]["vocab"][0]["chunked_head_loss_s"] == pytest.approx(0.03)
    assert undone["links"]["reduction"]["samples"][0]["seconds"] == pytest.approx(0.01)
    assert undone["host"]["meeting"]["per_segment"] == pytest.approx(0.08)
    assert undone["host"]["meeting"]["curve"][0]["penalty_s"] == pytest.approx(0.05)
    # an older file: its calibration scaled only the rates
    old = v.apply_calibration(profile, cluster, 2.0, 4.0, {"compute_scale": 2.0, "comm_scale": 4.0},
                              measured_seconds=False)
    assert "measured_seconds_scaled" not in old["measured"]["calibration"][-1]
    undone = v.undo_calibration(old, cluster)["measured"]
    assert undone["compute"]["optimizer"][0]["step_s"] == pytest.approx(0.004)
    assert undone["compute"]["matmul_table"][0][1] == pytest.approx(0.02)
