"""`meshplan check` of a GPU plan with the fused kernels runs where Triton cannot be imported: on fake tensors the
fused Functions allocate what the kernels would and launch nothing (kernels/fused_functions.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

SCRIPT = """
import dataclasses

from meshplan.launcher.check import check_plan
from meshplan.planner.search import search
from meshplan.spec import TrainSpec, load_cluster, load_model

# Llama 3.2 1B's shape with 4 of its blocks (2 per pipeline rank): what is checked is per block
model = dataclasses.replace(load_model("llama3.2-1b"), layers=4)
plan = search(model, load_cluster("dgx-h100:1"), TrainSpec(2, 2048), {"tp": 2, "pp": 2}, top=1).plans[0]
assert plan.kernels["norm"] == "fused" and plan.kernels["swiglu"] == "fused", plan.kernels
# the first and last pipeline rank in two check processes (launcher/check_worker.py), as a large plan is checked
result = check_plan(plan, ranks=[0, plan.world_size - 1], workers=2)
assert all(r.measured["peak"] > 0 for r in result.ranks)
try:
    import triton  # noqa: F401
except ImportError:
    print("ok: checked without triton")
"""


@pytest.mark.slow   # one subprocess of one process
def test_check_of_a_fused_gpu_plan_needs_no_triton(tmp_path):
    # `import triton` raises ImportError, as on an install without it, here and in the processes that check
    # the ranks side by side
    (tmp_path / "triton.py").write_text("raise ImportError('No module named triton')\n")
    path = os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    assert "ok: checked without triton" in done.stdout
    assert "Warning" not in done.stderr, done.stderr
