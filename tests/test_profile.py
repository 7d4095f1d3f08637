"""meshplan profile: the fits (pure), the planner's use of measured tables, bad input, and a real profile of
two CPU processes with a small budget whose cluster file `meshplan plan` accepts."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.planner import comm, compute
from meshplan.profiler import fit
from meshplan.profiler.cli import message_sizes, parse_duration, tp_degrees
from meshplan.spec import MODEL_PRESETS, ClusterSpec, DeviceSpec, LinkSpec, load_cluster, load_model

runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# fits
# ----------------------------------------------------------------------------------------------

def test_alpha_beta_fit_recovers_a_known_link():
    busbw, alpha = 12e9, 8e-6
    samples = []
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"):
        for size in message_sizes(64 * 2**20):
            n = 2 if name == "p2p" else 8
            t = alpha * fit.latency_steps(name, n) + fit.volume_factor(name, n) * size / busbw
            samples.append((name, n, size, t))
    got = fit.fit_alpha_beta(samples)
    assert got.busbw == pytest.approx(busbw, rel=1e-6)
    assert got.alpha == pytest.approx(alpha, rel=1e-6)
    assert got.median_rel_error < 1e-9


def test_alpha_beta_fit_clamps_negative_latency():
    samples = [("all_reduce", 2, s, s / 1e9 * (1 - 0.3 * (s < 1e5))) for s in (4096, 65536, 2**20, 2**24)]
    got = fit.fit_alpha_beta(samples)
    assert got.alpha >= 0 and got.busbw > 0


def test_spearman_with_ties_and_degenerate_input():
    assert fit.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fit.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert fit.ranks_with_ties([3, 1, 3]) == [2.5, 1.0, 2.5]
    assert math.isnan(fit.spearman([1], [2]))
    assert math.isnan(fit.spearman([1, 1], [2, 3]))


def test_rate_table_merges_sizes_by_median():
    assert fit.rate_table([(10, 1.0), (10, 3.0), (10, 2.0), (5, 4.0), (0, 9.0)]) == [[5.0, 4.0], [10.0, 2.0]]


def test_two_scale_calibration_recovers_scales():
    compute_s = [1.0, 2.0, 1.5, 0.7]
    comm_s = [0.5, 0.1, 0.9, 0.3]
    measured = [1.3 * c + 2.0 * m for c, m in zip(compute_s, comm_s)]
    a, b = fit.fit_two_scales(compute_s, comm_s, [0.0] * 4, measured)
    assert a == pytest.approx(1.3) and b == pytest.approx(2.0)
    a, b = fit.fit_two_scales([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [2.0, 4.0])   # not separable: one scale
    assert a == b == pytest.approx(2.0)


def test_two_scale_calibration_falls_back_when_the_runs_cannot_tell_the_scales_apart():
    """Eight near-identical layouts, 3% of each step communication (a validate run on 4 CPU ranks): the
    exact solution's communication scale is whatever the noise says, so one shared scale is fitted."""
    compute_s = [1.20, 1.20, 1.21, 1.21, 1.22, 1.23, 1.23, 1.24]
    comm_s = [0.05, 0.05, 0.04, 0.05, 0.05, 0.05, 0.06, 0.06]
    measured = [1.37, 1.375, 1.334, 1.432, 1.41, 1.452, 1.48, 1.424]
    a, b = fit.fit_two_scales(compute_s, comm_s, [0.0] * 8, measured)
    assert a == b and 1.1 < a < 1.2
    # the same layouts with communication spread over a wide range do pin both down
    comm_wide = [0.05, 0.3, 0.1, 0.6, 0.2, 0.9, 0.4, 0.05]
    exact = [1.1 * c + 2.5 * m for c, m in zip(compute_s, comm_wide)]
    a, b = fit.fit_two_scales(compute_s, comm_wide, [0.0] * 8, exact)
    assert a == pytest.approx(1.1) and b == pytest.approx(2.5)


def test_a_profiled_cpu_peak_is_at_least_the_fastest_measured_gemm():
    """MFU on a profiled CPU stays a share of what the machine reaches: the nominal 0.05 TFLOP/s per core is
    raised to the fastest measured GEMM; a slower machine keeps it, and a GPU keeps its vendor's peak."""
    from meshplan.profiler.cluster_file import measured_cpu_peak

    cpu = DeviceSpec("cpu", 8.0, 0.05, 20.0, peak_tflops_fp32=0.05, kind="cpu")     # localhost:N's nominal one
    fast = {"precision": "fp32", "matmul_table": [[1e9, 0.06], [8e9, 0.083]]}
    assert measured_cpu_peak(cpu, fast).peak_flops("fp32") == pytest.approx(0.083e12)
    slow = {"precision": "fp32", "matmul_table": [[1e9, 0.01]]}
    assert measured_cpu_peak(cpu, slow).peak_flops("fp32") == cpu.peak_flops("fp32")
    h100 = load_cluster("dgx-h100:1").gpu
    assert measured_cpu_peak(h100, {"precision": "bf16", "matmul_table": [[1e9, 2000.0]]}) == h100


def test_budget_and_sizes_parsing():
    assert parse_duration("2m") == 120 and parse_duration("90s") == 90 and parse_duration("45") == 45
    assert message_sizes(16 * 2**20)[0] == 4096 and message_sizes(16 * 2**20)[-1] == 16 * 2**20
    assert tp_degrees(4, 2, 176, 4) == [1, 2]


# ----------------------------------------------------------------------------------------------
# the planner reads the measured tables
# ----------------------------------------------------------------------------------------------

def _cluster(measured: dict, nodes: int = 1, gpn: int = 4) -> ClusterSpec:
    device = DeviceSpec("cpu", 4.0, 0.1, 20.0, peak_tflops_fp32=0.1, kind="cpu")
    return ClusterSpec("t", nodes, gpn, device, LinkSpec(2.0, 50.0), LinkSpec(1.0, 80.0), measured)


def test_matmul_table_is_interpolated_in_log_size():
    table = [[1e6, 0.01], [1e8, 0.03]]
    rates = compute.achieved_rates(_cluster({"compute": {"matmul_table": table}}), "fp32")
    assert compute.interpolate_rate(rates.matmul_table, 1e7) == pytest.approx(0.02e12)
    assert compute.interpolate_rate(rates.matmul_table, 1e3) == pytest.approx(0.01e12)   # held at the ends
    assert compute.interpolate_rate(rates.matmul_table, 1e12) == pytest.approx(0.03e12)
    m, k, n = 100, 100, 500   # 2mnk = 1e7
    assert compute.matmul_time(m, k, n, rates) == pytest.approx(1e7 / 0.02e12)
    plain = compute.achieved_rates(_cluster({}), "fp32")
    assert plain.matmul_table == () and compute.matmul_time(m, k, n, plain) != compute.matmul_time(m, k, n, rates)


def test_pair_matrix_slows_groups_over_the_slow_pair():
    fast, slow = 10.0, 1.0
    matrix = [[0.0 if i == j else fast for j in range(4)] for i in range(4)]
    matrix[1][2] = matrix[2][1] = slow            # one slow pair, inside one "node" of 4
    cluster = _cluster({"links": {"pair_bandwidth_gbps": matrix}})
    assert comm.slow_pair_factor(cluster, 4, 1) == pytest.approx(slow / fast)
    assert comm.slow_pair_factor(cluster, 2, 1) == pytest.approx(1.0)     # groups {0,1}, {2,3} avoid it
    assert comm.slow_pair_factor(cluster, 2, 2) == pytest.approx(1.0)   # groups {0,2}, {1,3} avoid it
    base = comm.group_link(_cluster({}), 4, 1).busbw
    assert comm.group_link(cluster, 4, 1).busbw == pytest.approx(base * slow / fast)
    assert comm.slow_pair_factor(_cluster({"links": {"pair_bandwidth_gbps": [[0.0]]}}), 4, 1) == 1.0


def test_planner_stays_torch_free():
    code = ("import sys; import meshplan.planner.search, meshplan.planner.compute, meshplan.planner.comm; "
            "import meshplan.profiler.fit, meshplan.profiler.cli; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the field and the fix, exit 2
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, field", [
    (["--budget", "1s"], "--budget"),
    (["--budget", "soon"], "--budget"),
    (["--cluster", "dgx-h100:2"], "--cluster"),
    (["--micro-batches", "0,2"], "--micro-batches"),
    (["--max-message", "12"], "--max-message"),
    (["--node-rank", "3", "--nnodes", "2"], "--node-rank"),
    (["--model", "no-such-model"], "--model"),
    (["--out", "/no/such/folder/c.yaml"], "--out"),
])
def test_profile_bad_input_is_one_line(args, field):
    result = runner.invoke(app, ["profile", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}") and "(" in lines[0], result.output


def test_a_profile_over_its_budget_says_by_how_much_and_why():
    from meshplan.profiler.cli import BUDGET_SLACK_S, budget_overrun

    measured = {"budget_s": 15.0, "startup_s": 13.2, "elapsed_s": 26.0}
    assert budget_overrun(measured, 15.0 + BUDGET_SLACK_S) is None
    line = budget_overrun(measured, 40.4)
    assert line == ("meshplan: the profile took 40s, over its 15s budget: start-up took 13s and each phase ran "
                    "its fewest rounds, which no budget shortens; give more than 41s for the phases to measure "
                    "beyond them")
    assert budget_overrun({"elapsed_s": 26.0}, 400.0) is None      # a file without the budget: nothing to say


# ----------------------------------------------------------------------------------------------
# a real profile of two CPU processes
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.alone
def test_profile_two_cpu_ranks_writes_a_cluster_plan_accepts(tmp_path):
    out = tmp_path / "cluster.yaml"
    budget = 25
    begin = time.time()
    proc = subprocess.run([sys.executable, "-m", "meshplan.cli", "profile", "--cluster", "localhost:2",
                           "--budget", f"{budget}s", "--model", "tiny-llama", "--seq-len", "64",
                           "--max-message", "1M", "--reps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    elapsed = time.time() - begin
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < budget + 15, f"profile overran its budget: {elapsed:.0f}s"  # torchrun exit + fit slack
    assert "compute" in proc.stderr and "links" in proc.stderr          # progress bars on stderr
    data = yaml.safe_load(out.read_text())
    m = data["measured"]
    # the budget given and the start-up it includes (torchrun, the ranks' imports), before the ranks' measuring
    assert m["budget_s"] == budget and 0 < m["startup_s"] < elapsed and 0 < m["elapsed_s"] < elapsed
    assert f"within {budget}s, start-up included" in proc.stderr
    assert m["compute"]["matmul_table"] and m["compute"]["attention_tflops"] > 0
    assert data["intra_node"]["bandwidth_gbps"] > 0 and data["intra_node"]["latency_us"] >= 0
    assert len(m["links"]["pair_bandwidth_gbps"]) == 2 and m["links"]["pair_bandwidth_gbps"][0][1] > 0
    assert {r["mode"] for r in m["memory"]["per_layer"]} == {"none", "selective", "full"}
    # the head + loss both ways and the runtime's optimizer step, timed at the model's shapes
    vocab = m["compute"]["vocab"]
    assert vocab and all(v["chunked_head_loss_s"] > 0 and v["head_s"] > 0 and v["loss_s"] > 0 for v in vocab)
    assert all(v["tokens"] == v["micro_batch"] * 64 and v["vocab_local"] == -(-256 // v["tp"]) for v in vocab)
    optimizer = m["compute"]["optimizer"]
    assert optimizer and all(o["seconds_per_param"] > 0 and o["tensors"] >= 7 for o in optimizer)
    assert {o["tp"] for o in optimizer} == {v["tp"] for v in vocab}
    assert m["links"]["topology"]["edges"] and m["raw"]["links"]["levels"]["intra_node"]["samples"]
    # the fit has a bandwidth point: the largest message runs whatever the budget (worker.sweep_order)
    assert max(s["bytes"] for s in m["raw"]["links"]["levels"]["intra_node"]["samples"]) >= 2**20 // 2
    # the data-parallel collectives at the gradient units' sizes, over the one group shape two ranks have
    reduction = m["links"]["reduction"]["samples"]
    assert {(r["ranks"], r["stride"]) for r in reduction} == {(2, 1)}
    all_reduce = sorted((r["bytes"], r["seconds"]) for r in reduction if r["collective"] == "all_reduce")
    assert len(all_reduce) >= 2 and all(t > 0 for _, t in all_reduce)
    # the cluster file keeps 6 significant digits (cluster_file.plain): a median of two rounded rounds may differ
    # from the rounded median by up to 1e-5 relative
    assert all(r["seconds"] == pytest.approx(statistics.median(r["rounds_s"]), rel=1e-5) for r in reduction)
    assert "reduction" in proc.stderr
    overlap = m["links"]["overlap"]
    assert {s["collective"] for s in overlap["samples"]} == {"all_reduce", "all_gather", "reduce_scatter"}
    assert {s["round"] for s in overlap["samples"]} == {0, 1, 2}
    assert all(s["collective_s"] > 0 and s["compute_s"] > 0 and s["both_s"] > 0 for s in overlap["samples"])
    # two processes on this machine's cores cannot hide gloo's work under a GEMM loop for free
    assert 0.2 < overlap["exposed_fraction"] < 4, overlap
    assert "overlap" in proc.stderr
    # one rank busy, then both: a rank is never slower alone (two ranks on >= 2 cores: about the same speed)
    speedup = dict((int(k), s) for k, s in m["host"]["busy_speedup"])
    assert set(speedup) == {1, 2} and speedup[2] == pytest.approx(1.0) and 0.7 < speedup[1] < 3, m["host"]
    assert "sharing" in proc.stderr
    meeting = m["host"]["meeting"]
    from meshplan.profiler.phases.host import QUICK_HOST_PHASES
    from meshplan.profiler.worker import MEETING_SEGMENTS_S
    # a 25 s budget is under twice the full host rounds (about 26 s for 2 ranks): the quick rounds run
    assert "short rounds" in proc.stderr
    assert len(meeting["samples"]) == len(MEETING_SEGMENTS_S) and meeting["ranks"] == 2, meeting
    # every segment measured at about its length, each from every run; a segment longer than the quick run
    # is the whole run, which lasts about run_s (its GEMM count is fixed from one timed GEMM beforehand)
    assert meeting["run_s"] == QUICK_HOST_PHASES.meeting_run_s
    for s, target in zip(meeting["samples"], MEETING_SEGMENTS_S):
        expected = min(target, meeting["run_s"])
        assert 0.5 * expected < s["segment_s"] < 1.5 * expected, s
        assert len(s["rounds_s"]) == QUICK_HOST_PHASES.meeting_runs, s
    # the last rank after the mean: never negative, a few ms to tens of ms on shared cores, never a second
    assert all(s["collective_s"] > 0 and 0 <= min(s["rounds_s"]) <= max(s["rounds_s"]) < 1
               for s in meeting["samples"]), meeting
    assert meeting["timing"] == "drift"
    priced = [p["penalty_s"] for p in meeting["curve"]]
    assert priced == sorted(priced) and len(priced) == len(MEETING_SEGMENTS_S), meeting["curve"]
    assert 0 <= m["host"]["pipeline"]["op_overhead_s"] < 0.05, m["host"]["pipeline"]   # ms, not a step
    assert "meeting" in proc.stderr and "pipeline" in proc.stderr
    cluster = load_cluster(str(out))
    assert cluster.world_size == 2 and cluster.gpu.kind == "cpu"
    plan = subprocess.run([sys.executable, "-m", "meshplan.cli", "plan", "--model", "tiny-llama", "--cluster", str(out),
                           "--global-batch", "4", "--seq-len", "64", "--precision", "fp32", "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert '"plans"' in plan.stdout


def test_reduction_phase_covers_every_data_parallel_group_shape_at_unit_sizes():
    """Group shapes as planner/comm.py places them (size ranks stride apart, every rank in one group), and
    message sizes that bracket the runtime's gradient units: one block at the widest tensor-parallel degree
    up to the root (embedding + head) at tp 1, in fp32 on CPU ranks."""
    from meshplan.planner import flops
    from meshplan.profiler.cli import reduction_sizes
    from meshplan.profiler.worker import layout_groups, reduction_layouts

    assert reduction_layouts(4) == [(2, 1), (2, 2), (4, 1)]
    assert reduction_layouts(8) == [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)]
    assert layout_groups(4, 2, 2) == [[0, 2], [1, 3]] and layout_groups(4, 2, 1) == [[0, 1], [2, 3]]
    assert sorted(r for g in layout_groups(8, 2, 2) for r in g) == list(range(8))
    assert len(reduction_layouts(64)) == 12
    small = load_model("tiny-llama")
    sizes = reduction_sizes(small, 64, [1, 2, 4], "cpu")
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes) and 3 <= len(sizes) <= 6
    assert sizes[0] <= 4 * flops.params_per_layer(small) / 4
    assert sizes[-1] >= 4 * (flops.embedding_params(small, 64) + flops.head_params(small))
    big = reduction_sizes(load_model("llama3-8b"), 2048, [1, 2, 4, 8], "gpu")
    assert len(big) == 6 and big[-1] == 2**30                      # capped, thinned, both ends kept
    assert reduction_sizes(load_model("llama3-8b"), 2048, [1], "cpu") == [2**24, 2**25, 2**26]


def test_link_sweep_runs_both_ends_first():
    from meshplan.profiler.worker import sweep_order

    assert sweep_order([4, 16, 64, 256]) == [4, 256, 16, 64]
    assert sweep_order([4, 16]) == [4, 16] and sweep_order([4]) == [4]


def test_a_meeting_costs_the_last_arrival_after_the_mean():
    """The meeting phase's penalty is the last rank after the mean (rows: ranks, columns: meetings); cut
    into windows, a run's marks give each window's durations, and the penalty is taken over those: a rank
    that fell behind before the window does not count against it."""
    import torch

    from meshplan.profiler.worker import drift_windows, last_after_mean

    arrivals = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [5.0, 1.0]], dtype=torch.float64)
    assert last_after_mean(arrivals).tolist() == [3.0, 0.0]
    # two ranks, 4 GEMMs each: rank 1 loses 0.4 s in its first GEMM, then keeps pace until the fourth
    marks = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0],
                          [0.0, 1.4, 2.4, 3.4, 4.8]], dtype=torch.float64)
    assert drift_windows(marks, 1).tolist() == pytest.approx([0.2, 0.0, 0.0, 0.2])
    assert drift_windows(marks, 2).tolist() == pytest.approx([0.2, 0.2])
    assert drift_windows(marks, 4).tolist() == pytest.approx([0.4])
    assert drift_windows(marks, 5).numel() == 0


def test_sharing_is_the_median_of_each_rounds_own_ratio():
    """The sharing phase measures every busy count in every round, side by side; the speedup is the median of
    the rounds' ratios, so a round the whole machine ran fast (round 2 here, twice the speed) does not pull
    one count's rate against another's. A file from before (no aligned rounds) keeps the ratio of medians."""
    from meshplan.profiler.cluster_file import fit_sharing

    raw = {"sharing": {"samples": [{"busy": 1, "gemms_per_s": 26.0, "rounds": [20.0, 40.0, 26.0]},
                                   {"busy": 2, "gemms_per_s": 26.0, "rounds": [20.0, 40.0, 26.0]},
                                   {"busy": 4, "gemms_per_s": 14.0, "rounds": [10.0, 20.0, 14.0]}]}}
    got = dict((k, x) for k, x in fit_sharing(raw)["busy_speedup"])
    assert got[1] == pytest.approx(2.0) and got[4] == pytest.approx(1.0)   # rounds: 2, 2, 1.86 -> 2
    old = {"sharing": {"samples": [{"busy": 1, "gemms_per_s": 26.0}, {"busy": 4, "gemms_per_s": 14.0}]}}
    assert dict(fit_sharing(old)["busy_speedup"])[1] == pytest.approx(26 / 14)


def test_block_times_are_compared_within_rounds():
    """Three shapes 1 : 2 : 4 apart. The first pass caught the smallest in a slow moment (x1.5) -- alone it
    would make micro-batch 1 look 1.5x dearer per token; the rounds (every shape side by side, the machine
    x1.0, x1.3, x0.9 from round to round) give back 1 : 2 : 4. Without two rounds the first pass stands."""
    from meshplan.profiler.cluster_file import blocked_block_seconds

    blocks = [{"block_s": 1.5 * base, "block_rounds_s": [1.5 * base, *(base * d for d in (1.0, 1.3, 0.9))]}
              for base in (0.01, 0.02, 0.04)]
    got = blocked_block_seconds(blocks)
    assert got[1] / got[0] == pytest.approx(2.0) and got[2] / got[0] == pytest.approx(4.0)
    assert got[0] == pytest.approx(0.01 * (1.0 * 1.3 * 0.9) ** (1 / 3))
    for b in blocks:
        b["block_rounds_s"] = b["block_rounds_s"][:2]
    assert blocked_block_seconds(blocks) == [b["block_s"] for b in blocks]


def test_micro_batch_line_fit():
    """fixed + per_sequence * mb recovered exactly from points on a line; a negative fixed cost is refitted
    through the origin; one micro-batch is no line."""
    from meshplan.profiler.fit import fit_micro_batch_line

    fixed, per_sequence = fit_micro_batch_line([1, 2, 4], [0.004 + 0.03 * mb for mb in (1, 2, 4)])
    assert fixed == pytest.approx(0.004) and per_sequence == pytest.approx(0.03)
    fixed, per_sequence = fit_micro_batch_line([1, 2, 4], [0.025, 0.06, 0.12])      # fixed would be < 0
    assert fixed == 0.0 and 0.025 < per_sequence < 0.031
    assert fit_micro_batch_line([2, 2], [0.05, 0.06]) is None


def _rounds(true_s: float, factors) -> dict:
    return {"block_s": true_s, "block_rounds_s": [true_s, *(true_s * f for f in factors)]}


def test_micro_batch_lines_pool_noisy_shapes_and_spare_a_curved_gpu():
    """CPU-like rounds (each shape's figure off by its own 5-10%, one line true underneath: 5 ms + 30 ms a
    sequence) are read off the line; GPU-like rounds (within 0.5%) where micro-batch 1 costs as much as 2
    (an unfilled device) keep their own figures; without rounds nothing changes."""
    from meshplan.profiler.cluster_file import blocked_block_seconds, micro_batch_lines

    noise = {1: (1.08, 0.97, 1.12, 1.01), 2: (0.93, 1.04, 0.90, 0.99), 4: (1.02, 0.95, 1.06, 1.00)}
    blocks = [{"tp": 1, "micro_batch": mb, **_rounds(0.005 + 0.03 * mb, noise[mb])} for mb in (1, 2, 4)]
    shape_s = blocked_block_seconds(blocks)
    got, lines = micro_batch_lines(blocks, shape_s)
    assert lines[0]["used"] and lines[0]["tp"] == 1
    per_sequence = [t / b["micro_batch"] for t, b in zip(got, blocks)]
    # on the line: cost per sequence falls with micro-batch (the fixed cost spreads), as 0.035 / 0.0325 / 0.03125
    assert per_sequence[0] > per_sequence[1] > per_sequence[2]
    assert got[1] / got[0] == pytest.approx(0.065 / 0.035, rel=0.06)
    # the shapes' own figures say micro-batch 2 is 12% cheaper per sequence than 1: noise
    assert shape_s[1] / 2 / shape_s[0] < 0.9

    tight = {mb: tuple(1 + (f - 1) / 20 for f in factors) for mb, factors in noise.items()}    # within 0.6%
    gpu = [{"tp": 1, "micro_batch": mb, **_rounds(t, tight[mb])} for mb, t in ((1, 0.010), (2, 0.0102), (4, 0.02))]
    kept, lines = micro_batch_lines(gpu, blocked_block_seconds(gpu))
    assert not lines[0]["used"] and kept == pytest.approx([0.010, 0.0102, 0.02], rel=0.01)

    for b in blocks:
        b["block_rounds_s"] = b["block_rounds_s"][:2]
    figures = blocked_block_seconds(blocks)
    assert micro_batch_lines(blocks, figures) == (figures, [])


def test_micro_batch_line_not_used_on_the_h200_profile():
    """A profile of one H200 (llama3.2-1b, seq 2048, bf16; ms, first pass then five rounds): micro-batch 1
    costs nearly what 2 does (the device is not filled), the rounds agree within a few percent, and the line
    lies about 6.5 standard errors off micro-batch 2: the shapes keep their own figures."""
    from meshplan.profiler.cluster_file import blocked_block_seconds, micro_batch_lines

    measured_ms = {1: [2.723, 3.601, 3.651, 3.515, 3.548, 4.339], 2: [3.918, 3.904, 4.019, 3.919, 3.893, 4.94],
                   4: [7.472, 7.546, 7.573, 7.527, 7.435, 7.495], 8: [14.663, 14.702, 14.581, 14.67, 14.778, 14.707]}
    blocks = [{"tp": 1, "micro_batch": mb, "block_s": ms[0] / 1e3, "block_rounds_s": [t / 1e3 for t in ms]}
              for mb, ms in measured_ms.items()]
    figures = blocked_block_seconds(blocks)
    got, lines = micro_batch_lines(blocks, figures)
    assert got == figures and not lines[0]["used"] and lines[0]["worst_offset_se"] > 5
