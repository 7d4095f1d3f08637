"""Two torchrun agents on this machine (``--nnodes 2``, c10d rendezvous on 127.0.0.1) train one job."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime_helpers import (JOB_TIMEOUT_S, PARITY_RTOL, free_port, job_env, losses, make_plan,
                             max_relative_difference, read_metrics)

pytestmark = pytest.mark.slow


def test_two_agents_train_together(tmp_path, trained):
    baseline = losses(trained("llama-1proc", make_plan()))   # the parity tests' one-process run (conftest.py)
    plan_path = tmp_path / "dp2-tp2.yaml"
    make_plan(dp=2, tp=2).save(plan_path)
    port = str(free_port())
    agents = []
    for node in (0, 1):
        args = [sys.executable, "-m", "meshplan.launcher", str(plan_path), "--nnodes", "2", "--node-rank", str(node),
                "--master-addr", "127.0.0.1", "--master-port", port, "--rdzv-id", f"test-{port}", "--steps", "4",
                "--metrics-out", str(tmp_path / "metrics.jsonl")]   # only global rank 0 writes it
        agents.append(subprocess.Popen(args, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    outputs = [a.communicate(timeout=JOB_TIMEOUT_S)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
    assert "on 4 cpu ranks" in outputs[0] + outputs[1]
    metrics = tmp_path / "metrics.jsonl"
    assert metrics.exists()
    assert max_relative_difference(baseline, losses(read_metrics(metrics))) <= PARITY_RTOL
