"""Golden predictions: what the planner predicts for a fixed set of jobs, as one byte-exact JSON file.

    python scripts/make_golden_predictions.py            # rewrites tests/golden/predictions.json
    python scripts/make_golden_predictions.py --check    # exit 1 when the planner's predictions differ

The file holds, for every case below: the search's top plans (``Plan.to_dict``, the search's wall-clock
seconds left out), ``evaluate`` of pinned configurations at full float precision (every field of the
:class:`Evaluation` and each pipeline rank's memory breakdown), the report matrix of scripts/ci_reports.py
(searched as ``meshplan plan`` searches it) and benchmarks/fidelity.py's table over tests/golden/public-runs.yaml.
tests/test_golden_predictions.py regenerates it in-process and compares byte for byte: a change to the cost
model that moves any prediction shows up there, named by case and field.

Every input is fixed here: CPU clusters are built from explicit figures (not from the machine running this),
measured profiles are the YAML fixtures in tests/golden/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
OUT = GOLDEN / "predictions.json"
PUBLIC_RUNS = GOLDEN / "public-runs.yaml"

# the explicit CPU cluster: four gloo ranks on one host, with the figures meshplan.spec's localhost:N uses
# for a machine of 2 cores and 64 GiB
CPU_DEVICE = dict(name="cpu", memory_gib=16.0, peak_tflops=0.05, memory_bandwidth_gbps=20.0,
                  peak_tflops_fp32=0.05, kind="cpu")
CPU_LINK = dict(bandwidth_gbps=2.0, latency_us=50.0)
# a two-host CPU cluster with an older profile: the meeting as a line over segments, no per-rank tables
OLD_HOST_PROFILE = {"host": {"busy_speedup": [[1, 2.0], [2, 2.0], [3, 1.3333], [4, 1.0]],
                             "meeting": {"ranks": 4, "base_s": 0.003, "per_segment": 0.02, "segments_s": [0.05, 0.5]},
                             "pipeline": {"op_overhead_s": 0.001}},
                    "links": {"overlap": {"exposed_fraction": 0.8}}}


def cluster(key: str):
    """The cluster a case names: ``cpu:N`` (one host), ``cpu2x4`` (two hosts, older profile), a fixture in
    tests/golden (``cpu-measured``, ``h100-measured``) or a preset (``dgx-h100:8``)."""
    from meshplan.spec import ClusterSpec, DeviceSpec, LinkSpec, load_cluster

    if key.startswith("cpu:"):
        ranks = int(key.split(":")[1])
        return ClusterSpec(key, 1, ranks, DeviceSpec(**CPU_DEVICE), LinkSpec(**CPU_LINK), LinkSpec(**CPU_LINK))
    if key == "cpu2x4":
        return ClusterSpec(key, 2, 4, DeviceSpec(**CPU_DEVICE), LinkSpec(**CPU_LINK), LinkSpec(1.0, 80.0),
                           measured=OLD_HOST_PROFILE)
    if key in ("cpu-measured", "h100-measured"):
        return load_cluster(str(GOLDEN / f"{key}.yaml"))
    return load_cluster(key)


# (name, model, cluster, global batch, sequence length, precision, pins, engine)
SEARCH_CASES = [
    ("tiny-llama cpu4", "tiny-llama", "cpu:4", 8, 256, "fp32", [], "meshplan"),
    ("tiny-gpt cpu4", "tiny-gpt", "cpu:4", 8, 256, "fp32", [], "meshplan"),
    ("tiny-llama cpu4 pp2 1f1b", "tiny-llama", "cpu:4", 16, 256, "fp32", ["pp=2", "schedule=1f1b"], "meshplan"),
    ("tiny-llama cpu4 pp2 gpipe", "tiny-llama", "cpu:4", 16, 256, "fp32", ["pp=2", "schedule=gpipe"], "meshplan"),
    ("tiny-llama cpu4 pp2 interleaved v2", "tiny-llama", "cpu:4", 16, 256, "fp32",
     ["pp=2", "schedule=interleaved", "virtual_stages=2"], "meshplan"),
    ("tiny-llama cpu4 pp4 vocab", "tiny-llama", "cpu:4", 16, 256, "fp32", ["pp=4", "vocab_parallel=true"],
     "meshplan"),
    ("tiny-llama cpu4 cp2 ulysses", "tiny-llama", "cpu:4", 8, 512, "fp32", ["cp=2", "cp_kind=ulysses"],
     "meshplan"),
    ("tiny-llama cpu4 cp2 ring", "tiny-llama", "cpu:4", 8, 512, "fp32", ["cp=2", "cp_kind=ring"], "meshplan"),
    ("tiny-gpt cpu4 dp4 zero1", "tiny-gpt", "cpu:4", 8, 256, "fp32", ["dp=4", "zero=1"], "meshplan"),
    ("tiny-gpt cpu4 dp4 zero3", "tiny-gpt", "cpu:4", 8, 256, "fp32", ["dp=4", "zero=3"], "meshplan"),
    ("tiny-llama measured", "tiny-llama", "cpu-measured", 8, 256, "fp32", [], "meshplan"),
    ("tiny-llama measured pp2 dp2", "tiny-llama", "cpu-measured", 16, 256, "fp32", ["pp=2", "dp=2"],
     "meshplan"),
    ("tiny-llama measured pp2 interleaved vocab", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     ["pp=2", "schedule=interleaved", "virtual_stages=2", "vocab_parallel=true"], "meshplan"),
    ("tiny-gpt measured tp2", "tiny-gpt", "cpu-measured", 8, 256, "fp32", ["tp=2"], "meshplan"),
    ("tiny-llama measured cp2 ring", "tiny-llama", "cpu-measured", 8, 512, "fp32", ["cp=2", "cp_kind=ring"],
     "meshplan"),
    ("tiny-llama measured zero2 overlapped", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     ["zero=2", "pp=2"], "megatron"),
    ("tiny-llama cpu2x4", "tiny-llama", "cpu2x4", 16, 256, "fp32", [], "meshplan"),
    ("tiny-llama cpu2x4 pp2 vocab", "tiny-llama", "cpu2x4", 16, 256, "fp32", ["pp=2", "vocab_parallel=true"],
     "meshplan"),
    ("llama3-8b h100:1", "llama3-8b", "dgx-h100:1", 16, 8192, "bf16", [], "meshplan"),
    ("llama3-8b h100:1 fp8", "llama3-8b", "dgx-h100:1", 16, 8192, "fp8", [], "meshplan"),
    ("llama3-8b h100:1 full recompute", "llama3-8b", "dgx-h100:1", 16, 8192, "bf16", ["recompute=full"],
     "meshplan"),
    ("llama3-8b h100:2 selective tp_overlap megatron", "llama3-8b", "dgx-h100:2", 32, 8192, "bf16",
     ["recompute=selective", "tp=2", "tp_overlap=true", "fused_kernels=true"], "megatron"),
    ("llama3-70b h100:8 pp4 interleaved", "llama3-70b", "dgx-h100:8", 256, 8192, "bf16",
     ["pp=4", "schedule=interleaved", "virtual_stages=2"], "meshplan"),
    ("llama3-70b h100:8 zero3", "llama3-70b", "dgx-h100:8", 256, 8192, "bf16", ["zero=3", "pp=1"],
     "meshplan"),
    ("llama3-70b h100:8 pp4 overlapped", "llama3-70b", "dgx-h100:8", 256, 8192, "bf16", ["pp=4"], "megatron"),
    ("llama3-70b h200:8 cp2 ring", "llama3-70b", "dgx-h200:8", 64, 32768, "bf16", ["cp=2", "cp_kind=ring"],
     "meshplan"),
    ("llama3-70b h200:8 cp4 ulysses", "llama3-70b", "dgx-h200:8", 64, 32768, "bf16",
     ["cp=4", "cp_kind=ulysses"], "meshplan"),
    ("mistral-7b a100:2 gpipe", "mistral-7b", "dgx-a100:2", 64, 4096, "bf16", ["pp=2", "schedule=gpipe"],
     "meshplan"),
    ("llama3-405b h100:64 tp8", "llama3-405b", "dgx-h100:64", 512, 8192, "bf16", ["tp=8"], "meshplan"),
    ("gpt3-175b a100:16 vocab", "gpt3-175b", "dgx-a100:16", 256, 2048, "bf16", ["vocab_parallel=true"],
     "meshplan"),
    ("mistral-7b h100 measured", "mistral-7b", "h100-measured", 64, 4096, "bf16", [], "meshplan"),
    ("llama3-8b h100 measured pp2 zero1", "llama3-8b", "h100-measured", 64, 8192, "bf16", ["pp=2", "zero=1"],
     "meshplan"),
    ("qwen2.5-7b h200:1", "qwen2.5-7b", "dgx-h200:1", 32, 4096, "bf16", [], "meshplan"),
]

# (name, model, cluster, global batch, sequence length, precision, Config fields, engine)
PINNED_CASES = [
    ("tiny-llama cpu4 dp4", "tiny-llama", "cpu:4", 8, 256, "fp32", dict(dp=4, tp=1, pp=1, cp=1, micro_batch=2),
     "meshplan"),
    ("tiny-llama cpu4 pp4 gpipe", "tiny-llama", "cpu:4", 8, 256, "fp32",
     dict(dp=1, tp=1, pp=4, cp=1, micro_batch=1, schedule="gpipe"), "meshplan"),
    ("tiny-llama measured dp2 pp2 interleaved", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     dict(dp=2, tp=1, pp=2, cp=1, micro_batch=2, schedule="interleaved", virtual_stages=2), "meshplan"),
    ("tiny-llama measured dp2 pp2 interleaved partial rounds", "tiny-llama", "cpu-measured", 10, 256, "fp32",
     dict(dp=2, tp=1, pp=2, cp=1, micro_batch=1, schedule="interleaved", virtual_stages=2), "meshplan"),
    ("tiny-llama measured pp2 vocab zero1", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     dict(dp=2, tp=1, pp=2, cp=1, micro_batch=2, vocab_parallel=True, zero=1), "meshplan"),
    ("tiny-llama measured tp2 dp2 zero2", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     dict(dp=2, tp=2, pp=1, cp=1, micro_batch=1, zero=2), "meshplan"),
    ("tiny-llama measured dp4 zero3", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     dict(dp=4, tp=1, pp=1, cp=1, micro_batch=2, zero=3), "meshplan"),
    ("tiny-llama measured pp2 dp2 zero3 overlapped", "tiny-llama", "cpu-measured", 16, 256, "fp32",
     dict(dp=2, tp=1, pp=2, cp=1, micro_batch=2, zero=3), "megatron"),
    ("tiny-gpt measured cp2 ulysses selective", "tiny-gpt", "cpu-measured", 8, 256, "fp32",
     dict(dp=2, tp=1, pp=1, cp=2, micro_batch=1, recompute="selective"), "meshplan"),
    ("tiny-llama measured cp4 ring", "tiny-llama", "cpu-measured", 4, 512, "fp32",
     dict(dp=1, tp=1, pp=1, cp=4, micro_batch=1, cp_kind="ring"), "meshplan"),
    ("tiny-llama cpu2x4 dp2 pp2 tp2 vocab", "tiny-llama", "cpu2x4", 16, 256, "fp32",
     dict(dp=2, tp=2, pp=2, cp=1, micro_batch=1, vocab_parallel=True), "meshplan"),
    ("tiny-llama cpu2x4 dp4 pp2 1f1b", "tiny-llama", "cpu2x4", 16, 256, "fp32",
     dict(dp=4, tp=1, pp=2, cp=1, micro_batch=1, mesh_order=("dp", "pp", "cp", "tp")), "meshplan"),
    ("llama3-8b h100:1 dp8 zero3 fused", "llama3-8b", "dgx-h100:1", 16, 8192, "bf16",
     dict(dp=8, tp=1, pp=1, cp=1, micro_batch=2, zero=3, fused_kernels=True, compile=True), "meshplan"),
    ("llama3-8b h100:1 tp8 oom", "llama3-8b", "dgx-h100:1", 64, 8192, "bf16",
     dict(dp=1, tp=8, pp=1, cp=1, micro_batch=64, recompute="none"), "meshplan"),
    ("llama3-70b h100:8 tp8 pp4 dp2 interleaved v5", "llama3-70b", "dgx-h100:8", 128, 8192, "bf16",
     dict(dp=2, tp=8, pp=4, cp=1, micro_batch=1, schedule="interleaved", virtual_stages=5), "meshplan"),
    ("llama3-70b h100:8 tp8 pp4 dp2 gpipe vocab", "llama3-70b", "dgx-h100:8", 128, 8192, "bf16",
     dict(dp=2, tp=8, pp=4, cp=1, micro_batch=1, schedule="gpipe", vocab_parallel=True), "meshplan"),
    ("llama3-70b h100:8 tp8 pp2 cp4 ring zero1", "llama3-70b", "dgx-h100:8", 32, 32768, "bf16",
     dict(dp=1, tp=8, pp=2, cp=4, micro_batch=1, cp_kind="ring", zero=1), "meshplan"),
    ("llama3-405b h100:64 tp8 pp16 dp4 fp8", "llama3-405b", "dgx-h100:64", 256, 8192, "fp8",
     dict(dp=4, tp=8, pp=16, cp=1, micro_batch=1, schedule="interleaved", virtual_stages=2, tp_overlap=True),
     "megatron"),
    ("mistral-7b h100 measured dp8 tp2 zero2", "mistral-7b", "h100-measured", 64, 4096, "bf16",
     dict(dp=8, tp=2, pp=1, cp=1, micro_batch=2, zero=2), "meshplan"),
    ("gpt3-175b a100:16 tp8 pp8 dp2 1f1b", "gpt3-175b", "dgx-a100:16", 256, 2048, "bf16",
     dict(dp=2, tp=8, pp=8, cp=1, micro_batch=1), "meshplan"),
]


def _without_seconds(plan: dict) -> dict:
    """A plan's dict without the search's wall-clock seconds (the one field that is not a prediction)."""
    search = {k: v for k, v in plan.get("search", {}).items() if k != "seconds"}
    return {**plan, "search": search} if "search" in plan else plan


def search_case(model: str, cluster_key: str, global_batch: int, seq_len: int, precision: str, pins: list[str],
                engine: str) -> dict[str, Any]:
    """The search's top three plans for one case, or the one-line error when nothing fits."""
    from meshplan.errors import MeshplanError
    from meshplan.planner.search import parse_fixes, search
    from meshplan.spec import TrainSpec, load_model

    train = TrainSpec(global_batch, seq_len, precision)
    try:
        result = search(load_model(model), cluster(cluster_key), train, parse_fixes(pins), top=3,
                        engine=engine)
    except MeshplanError as error:
        return {"error": str(error)}
    return {"plans": [_without_seconds(p.to_dict(with_inputs=False)) for p in result.plans],
            "evaluated": result.evaluated, "rejected": dict(sorted(result.rejected.items()))}


def pinned_case(model: str, cluster_key: str, global_batch: int, seq_len: int, precision: str, fields: dict,
                engine: str) -> dict[str, Any]:
    """``evaluate`` of one configuration, every figure at full precision."""
    from meshplan.engines import get_engine
    from meshplan.planner.evaluate import Config, Context, Evaluation, evaluate
    from meshplan.spec import TrainSpec, load_model

    ctx = Context(load_model(model), cluster(cluster_key), TrainSpec(global_batch, seq_len, precision),
                  get_engine(engine))
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    result = evaluate(Config(**fields), ctx)
    if not isinstance(result, Evaluation):
        return {"rejected": {"reason": result.reason, "detail": result.detail, "over_bytes": result.over_bytes}}
    return {"iteration_s": result.iteration_s, "peak_bytes": result.peak_bytes, "partition": result.partition,
            "rank_counts": result.rank_counts, "rank_peaks": result.rank_peaks,
            "rank_static": [list(x) for x in result.rank_static], "time_breakdown": result.time_breakdown,
            "rank_detail": [result.rank_detail(r) for r in range(result.config.pp)],
            "rank_peak_before_margin": [result.rank_peak_before_margin(r) for r in range(result.config.pp)],
            "stages": [s.to_dict() for s in result.stages()], "worst_rank": result.worst_rank,
            "notes": list(result.notes)}


def _load(path: Path, name: str):
    """The script or benchmark at ``path`` as a module (scripts/ and benchmarks/ are not packages)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module       # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def report_matrix() -> dict[str, Any]:
    """scripts/ci_reports.py's matrix, searched as ``meshplan plan`` searches it (bf16, AdamW, top 3)."""
    entries = _load(REPO / "scripts" / "ci_reports.py", "_golden_ci_reports").MATRIX
    return {e.name: search_case(e.model, e.cluster, e.global_batch, e.seq_len, "bf16", [], "meshplan")
            for e in entries}


def fidelity_table() -> dict[str, Any]:
    """benchmarks/fidelity.py's JSON over the public runs in tests/golden/public-runs.yaml."""
    fidelity = _load(REPO / "benchmarks" / "fidelity.py", "_golden_fidelity")
    with contextlib.redirect_stdout(io.StringIO()):
        return fidelity.run(PUBLIC_RUNS)


def golden_sections(fidelity: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every section of the golden file, by name (``fidelity``: :func:`fidelity_table`'s result when the
    caller has it already)."""
    return {
        "search": {name: search_case(*args) for name, *args in SEARCH_CASES},
        "evaluate": {name: pinned_case(*args) for name, *args in PINNED_CASES},
        "report_matrix": report_matrix(),
        "fidelity": fidelity if fidelity is not None else fidelity_table(),
    }


def to_text(data: dict[str, Any]) -> str:
    """The golden file's bytes: sorted keys, one field a line, floats as Python writes them (exact)."""
    return json.dumps(data, sort_keys=True, indent=1) + "\n"


def golden_text(fidelity: dict[str, Any] | None = None) -> str:
    return to_text(golden_sections(fidelity))


def first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The path of the first field where ``old`` and ``new`` differ and both values, or None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{where}/{key}: {'missing before' if key not in old else 'missing now'}"
            found = first_difference(old[key], new[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None if len(old) == len(new) else f"{where}: {len(old)} items before, {len(new)} now"
    return None if old == new and type(old) is type(new) else f"{where}: {old!r} before, {new!r} now"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args(argv)
    text = golden_text()
    if args.check:
        old = OUT.read_text()
        if old == text:
            return 0
        print(f"predictions differ: {first_difference(json.loads(old), json.loads(text))}", file=sys.stderr)
        return 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)} ({len(text)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
