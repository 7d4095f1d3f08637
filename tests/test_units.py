"""Numbers a person can read: a 4-process CPU job in MiB and GFLOP/s, named processes; a 16,384-GPU job in GiB and
TFLOP/s with thousands separated -- in the plan table, the report and the run summary."""

from __future__ import annotations

import pytest

from meshplan import units
from meshplan.planner.search import search
from meshplan.spec import TrainSpec, load_cluster, load_model


def test_human_units_pick_the_unit_that_fits():
    assert units.human_memory(71.3) == "71.3 GiB"
    assert units.human_memory(0.004) == "4.10 MiB"
    assert units.human_memory(2e-4) == "210 KiB"
    assert units.human_rate(412.3) == "412 TFLOP/s"
    assert units.human_rate(0.0161) == "16.1 GFLOP/s"
    assert units.human_rate(1500) == "1.50 PFLOP/s"
    assert units.rank_count("cpu", 4) == "4 processes" and units.rank_count("gpu", 16384) == "16,384 GPUs"
    assert units.rank_count("gpu", 1) == "1 GPU"
    assert units.memory_column([0.004, 0.0002]) == ("MiB", 1024)
    assert units.memory_column([70.0, 0.5]) == ("GiB", 1.0)


@pytest.fixture(scope="module")
def cpu_result():
    return search(load_model("tiny-llama"), load_cluster("localhost:4"), TrainSpec(8, 64, "fp32"), {}, top=2)


@pytest.fixture(scope="module")
def gpu_result():
    return search(load_model("llama3-405b"), load_cluster("dgx-h100:2048"), TrainSpec(2048, 8192), {}, top=2)


def test_plan_table_for_cpu_processes_reads_in_mib_and_gflops(cpu_result):
    from meshplan.plan_cli import render_text

    text = render_text(cpu_result)
    assert "(4 processes, " in text and "GFLOP/s/process" in text and "allocated MiB" in text and "reserved MiB" in text
    peak_column = text.splitlines()[4].split()[-1]
    assert float(peak_column) > 1, "a CPU process's peak must not read 0"
    assert "0.0 GiB" not in text and "GPU" not in text


def test_plan_table_for_16384_gpus(gpu_result):
    from meshplan.plan_cli import render_text

    text = render_text(gpu_result)
    assert "16,384 x H100" in text and "TFLOP/s/GPU" in text and "allocated GiB" in text and "reserved GiB" in text


def test_report_for_cpu_processes(cpu_result):
    pytest.importorskip("matplotlib")
    from meshplan.report import build_document

    plan = cpu_result.plans[0]
    doc = build_document(plan, {name: __import__("pathlib").Path(f"{name}.png") for name in
                                ("memory", "time", "schedule", "stages", "alternatives")})
    text = doc.markdown() if hasattr(doc, "markdown") else str(doc)
    assert "on 4 processes" in text and "GFLOP/s per process" in text and " MiB of " in text
    assert "0.0 TFLOP/s" not in text and "0.0 of" not in text and "Memory per process" in text


def test_run_summary_reads_in_mib():
    from meshplan.launcher.runtime.metrics import summary_table

    class Plan:
        predicted = type("P", (), {"iteration_s": 0.03, "tokens_per_s": 16000.0, "mfu": 0.1,
                                   "peak_memory_gib": 0.0045})()

    records = [{"step": i, "loss": 5.0, "step_time_s": 0.03, "tokens_per_s": 16000.0, "peak_memory_gib": 0.005}
               for i in (1, 2, 3)]
    text = summary_table(Plan(), records)
    assert "5.12 MiB" in text and "4.61 MiB" in text and "10.0%" in text and "16,000" in text
