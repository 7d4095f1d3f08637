"""meshplan report: Markdown + HTML + pictures for pipeline and non-pipeline plans, measured next to
predicted, --compare, and one-line errors."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from meshplan.plan import Plan, Prediction, StagePlan  # noqa: E402
from meshplan.planner import schedule_sim  # noqa: E402
from meshplan.report import (compare_plans, load_metrics, plan_schedule, summarize_metrics,  # noqa: E402
                             write_report)
from meshplan.spec import MODEL_PRESETS, TrainSpec, load_cluster  # noqa: E402


def _stages(counts, full=None, selective=None, peak=0.0):
    out, start = [], 0
    for j, n in enumerate(counts):
        f = (full or [0] * len(counts))[j]
        s = (selective or [0] * len(counts))[j]
        out.append(StagePlan((start, start + n), {"full": f, "selective": s, "none": n - f - s}, peak + j % 4))
        start += n
    return tuple(out)


def pipeline_plan(**kw) -> Plan:
    """llama3-70b, dp2 tp4 pp4 interleaved (2 chunks), uneven partition, mixed recompute, full search record."""
    counts = [9, 10, 10, 10, 10, 10, 11, 10]
    pred = Prediction(iteration_s=9.8, tokens_per_s=53500.0, tflops_per_gpu=410.0, mfu=0.414, peak_memory_gib=71.2,
                      time_breakdown_s={"compute": 7.9, "recompute": 0.6, "tp_comm": 0.35, "pp_comm": 0.08,
                                        "dp_comm": 0.12, "bubble": 0.7, "optimizer": 0.05},
                      memory_breakdown_gib={"parameters": 8.8, "gradients": 8.8, "optimizer": 26.4,
                                            "activations": 22.0, "logits": 0.0, "buffers": 1.2, "margin": 4.0})
    rank = {"parameters": 8.8, "gradients": 8.8, "optimizer": 26.4, "buffers": 1.2, "margin": 4.0}
    search = {"seconds": 3.2, "evaluated": 18234,
              "rejected": {"oom": 9120, "divisibility": 6011, "bubble (dominated)": 3000},
              "alternatives": [
                  {"fix": {"dp": 4, "tp": 8, "pp": 1, "cp": 1, "micro_batch": 1, "recompute": "full", "zero": 3},
                   "predicted": {"iteration_s": 11.2, "tokens_per_s": 46800.0, "peak_memory_gib": 66.0,
                                 "time_breakdown_s": {"compute": 7.9, "recompute": 2.6, "tp_comm": 0.6}}},
                  {"fix": {"dp": 2, "tp": 4, "pp": 4, "cp": 1, "micro_batch": 2, "schedule": "1f1b",
                           "recompute": "none", "zero": 1},
                   "predicted": {"iteration_s": 10.1, "tokens_per_s": 51900.0, "peak_memory_gib": 84.3,
                                 "time_breakdown_s": {"compute": 7.9, "bubble": 1.5}}}],
              "stage_memory_gib": [dict(rank, activations=a) for a in (22.0, 18.0, 14.0, 10.0)]}
    args = dict(dp=2, tp=4, pp=4, cp=1, micro_batch=1, num_microbatches=32,
                stages=_stages(counts, full=[2, 0, 0, 0, 2, 0, 0, 0], selective=[7, 10, 10, 10, 8, 10, 11, 10],
                               peak=60.0),
                model=MODEL_PRESETS["llama3-70b"], cluster=load_cluster("dgx-h100:4"),
                train=TrainSpec(global_batch=64, seq_len=8192), schedule="interleaved", virtual_stages=2, zero=1,
                predicted=pred, notes=("bound by memory on pipeline rank 0",), search=search)
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


def flat_plan(**kw) -> Plan:
    """llama3-8b, dp4 tp2, no pipeline, no search record, no per-stage memory."""
    pred = Prediction(iteration_s=0.52, tokens_per_s=504000.0, tflops_per_gpu=450.0, mfu=0.455,
                      peak_memory_gib=48.3,
                      time_breakdown_s={"compute": 0.44, "tp_comm": 0.03, "dp_comm": 0.04, "optimizer": 0.01,
                                        "mystery_term": 0.002},
                      memory_breakdown_gib={"parameters": 4.0, "gradients": 4.0, "optimizer": 6.0,
                                            "activations": 28.0, "logits": 2.3, "buffers": 1.0, "margin": 3.0})
    args = dict(dp=4, tp=2, pp=1, cp=1, micro_batch=2, num_microbatches=4, stages=_stages([32], peak=48.3),
                model=MODEL_PRESETS["llama3-8b"], cluster=load_cluster("dgx-h100:1"),
                train=TrainSpec(global_batch=32, seq_len=8192), predicted=pred)
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_real_picture(path: Path) -> None:
    """Exists, is a PNG of a sensible size, and has drawing in it (many distinct colours, not blank)."""
    import matplotlib.image as mpimg
    import numpy as np

    w, h = png_size(path)
    assert 500 <= w <= 3000 and 150 <= h <= 2500, (path.name, w, h)
    assert path.stat().st_size > 10_000, path.name
    img = mpimg.imread(path)[::2, ::2, :3]
    rgb = (img * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 20, path.name
    assert (img < 0.9).mean() > 0.02, f"{path.name} is nearly blank"


def assert_links_resolve(md: Path) -> None:
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text()):
        assert (md.parent / target).is_file(), target


def write_metrics(path: Path, n: int = 12) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"step": i + 1, "loss": 3 - 0.01 * i, "step_time_s": 14.0 if i == 0 else 10.0 + 0.1 * (i % 3),
                                 "tokens_per_s": 52000 + 10 * i, "peak_memory_gib": 68 + 0.1 * i, "mfu": 0.4}) + "\n")
            if i == 3:
                fh.write("\n")
    return path


def test_pipeline_report_with_metrics_and_compare(tmp_path):
    plan = pipeline_plan()
    old = pipeline_plan(schedule="1f1b", virtual_stages=1, micro_batch=2, num_microbatches=16,
                        stages=_stages([20] * 4, full=[20] * 4),
                        predicted=Prediction(11.0, 47700.0, 365.0, 0.37, 60.0, {"compute": 7.9, "recompute": 2.5},
                                             {"parameters": 8.8, "activations": 12.0}))
    files = write_report(plan, tmp_path / "r", compare=old, metrics=load_metrics(write_metrics(tmp_path / "m.jsonl")))
    for name in ("memory", "time", "schedule", "stages", "alternatives", "measured", "compare"):
        assert_real_picture(files.pictures[name])
    md = files.markdown.read_text()
    for heading in ("## Inputs", "## Chosen plan", "## Alternatives and why they lost", "## Memory per GPU",
                    "## Iteration time", "## Pipeline schedule", "## Measured next to predicted", "## What changed"):
        assert heading in md, heading
    assert "| oom | 9,120 |" in md and "OOM by 4.7 GiB" in md
    assert "| schedule | 1f1b | interleaved |" in md
    assert "| throughput (tokens/s) | 47,700 | 53,500 | +12.2% |" in md
    assert "| step time | 9.800 s | 10.100 s | +3.1% |" in md         # median after the warm-up step
    assert_links_resolve(files.markdown)
    html = files.html.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<img ") == 7 and "<table>" in html


def test_flat_report_has_the_four_pictures(tmp_path):
    files = write_report(flat_plan(), tmp_path / "r", html_page=False)
    assert set(files.pictures) == {"memory", "time", "schedule", "stages"} and files.html is None
    for path in files.pictures.values():
        assert_real_picture(path)
    md = files.markdown.read_text()
    assert "## Alternatives" not in md and "## Measured" not in md
    assert "mystery_term" in md                       # unknown breakdown keys are shown, not dropped
    assert "No pipeline" in md and "n/a (no pipeline)" in md
    assert_links_resolve(files.markdown)


def test_report_without_prediction_and_svg(tmp_path):
    plan = flat_plan(predicted=None, pp=2, dp=2, num_microbatches=8, schedule="gpipe", stages=_stages([16, 16]))
    files = write_report(plan, tmp_path / "r", fmt="svg")
    assert all(p.suffix == ".svg" and "<svg" in p.read_text()[:2000] for p in files.pictures.values())
    assert "holds no prediction" in files.markdown.read_text()


def test_the_planners_schedule_idles_as_the_textbook_says():
    """Equal stages: 1F1B and GPipe idle (p-1)/(m+p-1); interleaved (p-1)/(v*m+p-1) (Narayanan et al. 2021)."""
    for schedule, v, expect in (("1f1b", 1, 3 / 11), ("gpipe", 1, 3 / 11), ("interleaved", 2, 3 / 19)):
        ops = schedule_sim.schedule_timeline(schedule, [3.0] * 4, 8, v, 1 / 3)
        assert len(ops) == 2 * 8 * 4 * v
        span = max(o.end for o in ops)
        idle = 1 - sum(o.end - o.start for o in ops) / (4 * span)
        assert idle == pytest.approx(expect, abs=1e-9), schedule


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("gpipe", 1), ("interleaved", 2)])
def test_the_schedule_picture_is_what_the_planner_priced(schedule, v):
    """The report draws the planner's own timeline: each rank is busy for the micro-batch times the makespan
    is priced on, and its last op ends at that makespan (GPipe, as the closed form), or before it where the
    closed form's fill and drain assume the slowest rank's time on every rank (1F1B and interleaved with
    uneven ranks)."""
    from meshplan.planner.evaluate import Config, Context, evaluate, to_plan

    ctx = Context(MODEL_PRESETS["llama3-8b"], load_cluster("dgx-h100:1"), TrainSpec(global_batch=16, seq_len=4096))
    ev = evaluate(Config(dp=1, tp=2, pp=4, cp=1, micro_batch=1, schedule=schedule, virtual_stages=v), ctx)
    plan = to_plan(ev, ctx)
    drawn = plan_schedule(plan)
    assert drawn.priced and drawn.seconds and drawn.complete and drawn.micro_batches == 16
    assert len(drawn.ops) == 2 * 16 * 4 * v and all(o.end > o.start >= 0 for o in drawn.ops)
    span = max(o.end for o in drawn.ops)
    rank_busy = [sum(o.end - o.start for o in drawn.ops if o.rank == r) for r in range(4)]
    priced_makespan = max(rank_busy) + ev.time_breakdown["bubble"]     # bubble = makespan - m * T_max
    assert span <= priced_makespan * (1 + 1e-12)
    if schedule == "gpipe":
        assert span == pytest.approx(priced_makespan, rel=1e-12)
    else:
        assert span == pytest.approx(priced_makespan, rel=0.03)


def test_metrics_summary_and_errors(tmp_path):
    m = summarize_metrics(load_metrics(write_metrics(tmp_path / "m.jsonl")))
    assert m.excluded == 1 and m.steps == 11 and m.step_time_s == pytest.approx(10.1)
    assert m.peak_memory_gib == pytest.approx(69.1) and m.mfu == pytest.approx(0.4)
    from meshplan.errors import InputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "step_time_s": 1.0}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_metrics(bad)


def test_compare_different_models_is_said():
    c = compare_plans(pipeline_plan(), flat_plan())
    assert any("different models" in line for line in c["inputs"])
    assert ("pp", 1, 4) in c["changes"]


@pytest.fixture()
def app():
    from meshplan.report_cli import register

    application = typer.Typer()
    register(application)
    return application


def test_cli_report_and_compare(app, tmp_path):
    new, old = tmp_path / "new.yaml", tmp_path / "old.yaml"
    pipeline_plan().save(new)
    flat_plan().save(old)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(new), "--out", str(tmp_path / "r"), "--compare", str(old),
                              "--metrics", str(write_metrics(tmp_path / "m.jsonl"))])
    assert res.exit_code == 0, res.output
    assert "different models" in res.stdout and "predicted throughput (tokens/s)" in res.stdout
    assert "%" in res.stdout and "wrote" in res.stdout
    assert (tmp_path / "r" / "README.md").is_file() and (tmp_path / "r" / "compare.png").is_file()


def test_cli_report_errors_are_one_line(app, tmp_path):
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    flat_plan().save(plan)
    cases = [
        (["report", str(tmp_path / "nope.yaml")], "no such file"),
        (["report", str(plan), "--compare", str(tmp_path / "old.yaml")], "--compare"),
        (["report", str(plan), "--metrics", str(tmp_path / "none.jsonl")], "--metrics"),
        (["report", str(plan), "--format", "gif", "--out", str(tmp_path / "r")], "--format"),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("dp: 2\n  tp: [\n")
    cases.append((["report", str(bad)], "not valid YAML"))
    for argv, needle in cases:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (argv, res.output)
        assert res.stderr.startswith("error: ") and needle in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
