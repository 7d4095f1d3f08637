"""The planner stays readable: no function in planner/ is longer than one screen, and the planner never imports
torch (DESIGN.md: cost-model terms are small pure functions, ``evaluate`` composes them in one screen)."""

from __future__ import annotations

import ast
from pathlib import Path

PLANNER = Path(__file__).resolve().parents[1] / "planner"
MAX_FUNCTION_LINES = 80


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_planner_function_is_longer_than_80_lines():
    too_long = []
    for path in sorted(PLANNER.glob("*.py")):
        for node in _functions(ast.parse(path.read_text(), str(path))):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(too_long)}"


def test_the_planner_never_imports_torch():
    imports = []
    for path in sorted(PLANNER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not imports, f"planner/ imports torch: {', '.join(imports)}"


def test_a_gpu_prediction_never_runs_the_shared_cores_model(monkeypatch):
    """DESIGN.md: the model of CPU ranks that share cores is one object behind one interface (host.HostModel);
    GPU clusters get the null model, so none of the shared-cores terms runs for them."""
    from meshplan.planner import block, comm, compute, evaluate, host, vocab
    from meshplan.planner.search import search
    from meshplan.spec import ClusterSpec, DeviceSpec, LinkSpec, TrainSpec, load_cluster, load_model

    gpu = load_cluster("dgx-h100:2")
    cpu = ClusterSpec("cpu:4", 1, 4, DeviceSpec("cpu", 16.0, 0.05, 20.0, peak_tflops_fp32=0.05, kind="cpu"),
                      LinkSpec(2.0, 50.0), LinkSpec(2.0, 50.0))
    assert host.host_model(gpu) is host.NULL_HOST
    assert isinstance(host.host_model(cpu), host.SharedCoresHost)

    def refuse(*args, **kwargs):
        raise AssertionError("a GPU prediction ran the shared-cores host model")
    for module, name in ((host, "meeting_time"), (host, "pipeline_op_overhead"), (host, "busy_speedup_table"),
                         (host, "shared_host_speed"), (comm, "meeting_time"), (compute, "pipeline_op_overhead")):
        monkeypatch.setattr(module, name, refuse)
    for method in ("meeting", "op_overhead", "pipeline_makespan"):
        monkeypatch.setattr(host.SharedCoresHost, method, refuse)
    block.layer_cost.cache_clear()
    vocab._vocab_cost.cache_clear()
    model, train = load_model("llama3-8b"), TrainSpec(64, 8192, "bf16")
    assert search(model, gpu, train, {"pp": 2}, top=2).plans
    ctx = evaluate.Context(model, gpu, train)
    for fields in (dict(dp=2, tp=2, pp=2, cp=2, cp_kind="ring", zero=1, vocab_parallel=True),
                   dict(dp=2, tp=4, pp=2, schedule="interleaved", virtual_stages=2, zero=3),
                   dict(dp=4, tp=2, pp=1, cp=2, zero=3), dict(dp=4, tp=4, pp=1, zero=0)):
        result = evaluate.evaluate(evaluate.Config(micro_batch=1, **{"cp": 1, **fields}), ctx)
        assert result.iteration_s > 0
