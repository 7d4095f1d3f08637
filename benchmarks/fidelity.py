"""Fidelity: predict every published run in public-runs.yaml with its published configuration pinned, and
compare with what was measured; then let the planner choose freely on the same setup.

    python benchmarks/fidelity.py [--runs ../shared/benchmarks/public-runs.yaml] [--json out.json]

``--json`` writes ``summary`` and ``runs`` with the command, date and machine (``run_info.wrap``), the input of
docs/results.md.

Nothing here is tuned per run: each entry is translated into meshplan's inputs (model shape, cluster,
batch, pinned degrees) by the same rules, written below, and predicted by the same cost model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from tabulate import tabulate

from meshplan.flops import model_flops_per_iteration
from meshplan.planner.search import search
from meshplan.spec import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, DeviceSpec, LinkSpec, ModelSpec, TrainSpec, load_model

DEFAULT_RUNS = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "public-runs.yaml"


@dataclass
class Case:
    name: str
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    fixes: dict
    env: dict                 # pins that describe the software, not the split (kept in the free search too)
    measured_iteration_s: float
    measured_memory_gib: float | None
    source: str
    engine: str                # the engine that ran it (meshplan/engines.py); the plan is priced for it


def megatron_cases(entry: dict) -> list[Case]:
    """Megatron-Core weak scaling: GPT models (GELU, f = 4h, LayerNorm, MHA as the table gives heads only),
    vocab 131072, seq 4096, bf16, distributed optimizer (ZeRO-1), TP/DP/PP communication overlap on (under a
    pipeline the gradient reduce-scatter overlaps the last micro-batch's backward: ``"overlapped"``),
    Transformer Engine fused kernels; the micro batch is not published and is left to the planner. The published TFLOP/s count
    attention in full; iteration time = Megatron's FLOPs / (TFLOP/s * GPUs), as the file derives it."""
    common = entry["common"]
    device, intra, inter = CLUSTER_PRESETS["dgx-h100"]
    cases = []
    for run in entry["runs"]:
        model = ModelSpec(name=f"megatron-gpt-{run['name']}", layers=run["layers"], hidden=run["hidden"],
                          heads=run["heads"], vocab=common["vocab"], mlp="gelu", norm="layernorm", position="rope",
                          bias=True)
        cluster = ClusterSpec(f"dgx-h100:{run['gpus'] // 8}", run["gpus"] // 8, 8, device, intra, inter)
        train = TrainSpec(run["global_batch"], common["seq_len"], "bf16", "adam")
        fixes = {"dp": run["dp"], "tp": run["tp"], "pp": run["pp"], "cp": 1, "zero": 1, "vocab_parallel": False}
        env = {"tp_overlap": run["tp"] > 1, "compile": False, "fused_kernels": True}
        cases.append(Case(f"megatron {run['name']}", model, cluster, train, fixes, env,
                          run["iteration_s_derived"], None, "Megatron-Core r0.8 H100", "megatron"))
    return cases


def torchtitan_pipeline_microbatches(pp: int, configured: int | None = None) -> int:
    """How many micro-batches torchtitan splits a data-parallel rank's local batch into under pipeline
    parallelism: ``experimental.pipeline_parallel_microbatches`` when set, else the pipeline degree, for every
    schedule (torchtitan 9dec370, the benchmark's commit: ``pipeline_llama_manual_split`` and
    ``build_pipeline_schedule``: ``n_microbatches = pipeline_parallel_microbatches or parallel_dims.pp``).
    The published runs do not set it, so local batch 32 at PP 8 runs 8 micro-batches of 4."""
    return configured or pp


def torchtitan_cases(entry: dict) -> list[Case]:
    """torchtitan Llama 3.1 on H100 96GB HBM2e at 500 W. FSDP is ZeRO-3 without pipeline and ZeRO-2 with it
    (torchtitan does not reshard after forward under PP). Local batch = per data-parallel rank; without PP it is
    one micro-batch, with PP it is split into torchtitan_pipeline_microbatches(pp) micro-batches. float8 runs are
    precision fp8 (fp8 linears), compile runs have fused elementwise ops, asyncTP is tp_overlap. Interleaved 1F1B
    uses 2 virtual stages per rank (torchtitan's ``generate_split_points`` default for multi-stage schedules).
    Device: the H100 die with 95830 MiB (as the 96 GB H100 parts report) and HBM2e at 2400 GB/s; its 500 W cap against the SXM part's 700 W lowers sustained clocks, modelled by the
    cube-root law of dynamic power (P ~ f * V^2 ~ f^3): peaks x (500/700)^(1/3) = 0.894."""
    common = entry["common"]
    _, intra, _ = CLUSTER_PRESETS["dgx-h100"]
    clock = (500 / 700) ** (1 / 3)
    device = DeviceSpec("H100-96GB-HBM2e-500W", 95830 / 1024, 989.4 * clock, 2400.0, peak_tflops_fp32=494.7 * clock,
                        peak_tflops_fp8=1978.9 * clock)
    inter = LinkSpec(47.0, 10.0)   # 400 Gb/s RDMA per GPU
    cases = []
    for run in entry["runs"]:
        model = load_model(run["model"])
        par = run["parallel"]
        dp, tp, pp = par.get("fsdp", 1), par.get("tp", 1), par.get("pp", 1)
        gpus = run["gpus"]
        cluster = ClusterSpec(f"h100-96gb:{gpus // 8}", gpus // 8, 8, device, intra, inter)
        variant = run["variant"]
        precision = "fp8" if "float8" in variant else "bf16"
        local = run["local_batch"]
        train = TrainSpec(local * dp, common["seq_len"], precision, "adamw")
        recompute = "selective" if run["recompute"].startswith("selective") else run["recompute"]
        micro_batch = local // torchtitan_pipeline_microbatches(pp) if pp > 1 else local
        fixes = {"dp": dp, "tp": tp, "pp": pp, "cp": 1, "zero": 2 if pp > 1 else 3, "recompute": recompute,
                 "micro_batch": micro_batch}
        if pp > 1:
            interleaved = "interleaved" in variant
            fixes.update({"schedule": "interleaved" if interleaved else "1f1b",
                          "virtual_stages": 2 if interleaved else 1, "vocab_parallel": False})
        env = {"tp_overlap": "asyncTP" in variant, "compile": "compile" in variant, "fused_kernels": False}
        # tokens per iteration (local batch x data-parallel ranks x seq) over the whole job's tokens/s
        iteration = local * dp * common["seq_len"] / (run["tokens_per_s_per_gpu"] * gpus)
        cases.append(Case(f"torchtitan {run['model']} {gpus}g {variant}", model, cluster, train, fixes, env,
                          iteration, run["memory_gib"], "torchtitan 2024-12 H100", "torchtitan"))
    return cases


def megatron_moe_cases(entry: dict) -> list[Case]:
    """Megatron-Core MoE: Mixtral 8x7B (the preset's shape, checked against the entry's model), bf16,
    distributed optimizer (ZeRO-1), dropless all-to-all dispatch, grouped GEMM, the README's reference
    mapping pinned (tp, ep, pp, virtual stages, micro batch). The published TFLOP/s count the routed experts at
    top-k and attention in full (Megatron-LM's num_floating_point_operations); iteration time = those FLOPs /
    (TFLOP/s * GPUs)."""
    common, cases = entry, []
    device, intra, inter = CLUSTER_PRESETS["dgx-h100"]
    shape = common["model_mixtral_8x7b"]
    model = MODEL_PRESETS["mixtral-8x7b"]
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab"):
        assert getattr(model, key) == shape[key], f"mixtral-8x7b preset {key} differs from the published run"
    assert (model.moe.experts, model.moe.top_k) == (shape["experts"], shape["top_k"])
    for run in entry["runs"]:
        cluster = ClusterSpec(f"dgx-h100:{run['gpus'] // 8}", run["gpus"] // 8, 8, device, intra, inter)
        train = TrainSpec(run["global_batch"], run["seq_len"], "bf16", "adam")
        fixes = {"tp": run["tp"], "pp": run["pp"], "cp": 1, "ep": run["ep"], "expert_tp": 1, "zero": 1,
                 "micro_batch": run["micro_batch"], "schedule": "interleaved",
                 "virtual_stages": run["virtual_stages"], "vocab_parallel": False}
        env = {"compile": False, "fused_kernels": True}
        flops = model_flops_per_iteration(model, run["seq_len"], run["global_batch"], causal_halving=False)
        cases.append(Case(f"megatron {run['model']} {run['gpus']} GPUs", model, cluster, train, fixes, env,
                          flops / (run["tflops_per_gpu"] * 1e12 * run["gpus"]), None, "Megatron-Core v0.9 MoE H100",
                          "megatron"))
    return cases


def load_cases(path: Path) -> list[Case]:
    data = yaml.safe_load(path.read_text())
    return (megatron_cases(data["megatron_core_h100_r0.8"]) + megatron_moe_cases(data["megatron_core_moe_h100_v0.9"])
            + torchtitan_cases(data["torchtitan_llama3_h100_2024_12"]))


def predicted_use_gib(prediction) -> float:
    """What a plan takes of a device: what the caching allocator reserves (torchtitan's published memory is
    this ``max_reserved`` figure, so ``memory error`` compares the two) and NCCL's buffers."""
    return (prediction.reserved_memory_gib or prediction.peak_memory_gib) + (prediction.nccl_memory_gib or 0.0)


def run(path: Path) -> dict:
    rows, errors, out = [], [], []
    for case in load_cases(path):
        pinned = search(case.model, case.cluster, case.train, {**case.fixes, **case.env}, top=1,
                        engine=case.engine).plans[0]
        free = search(case.model, case.cluster, case.train, dict(case.env), top=1, engine=case.engine).plans[0]
        p, f = pinned.predicted, free.predicted
        err = p.iteration_s / case.measured_iteration_s - 1
        errors.append(abs(err))
        fits = predicted_use_gib(p) <= case.cluster.gpu.memory_gib
        reserved = p.reserved_memory_gib
        mem_err = reserved / case.measured_memory_gib - 1 if case.measured_memory_gib else None
        speedup = p.iteration_s / f.iteration_s - 1
        choice = f"dp{free.dp} tp{free.tp} pp{free.pp} cp{free.cp}"
        if free.model.moe is not None:
            choice += f" ep{free.ep}" + (f" etp{free.expert_tp}" if free.expert_tp > 1 else "")
        choice += f" mb{free.micro_batch} z{free.zero}"
        if free.pp > 1:
            choice += f" {free.schedule}" + (f"v{free.virtual_stages}" if free.virtual_stages > 1 else "")
        choice += f" rc={free.recompute}"
        rows.append([case.name, f"{case.measured_iteration_s:.2f}", f"{p.iteration_s:.2f}", f"{err:+.1%}",
                     f"{case.measured_memory_gib:.1f}" if case.measured_memory_gib else "-",
                     f"{p.allocated_peak_gib:.1f}", f"{reserved:.1f}",
                     f"{mem_err:+.1%}" if mem_err is not None else "-",
                     "yes" if fits else "NO", f"{p.mfu:.0%}", choice, f"{speedup:+.1%}"])
        out.append({"name": case.name, "measured_iteration_s": case.measured_iteration_s,
                    "predicted_iteration_s": p.iteration_s, "error": err,
                    "measured_memory_gib": case.measured_memory_gib, "predicted_memory_gib": p.peak_memory_gib,
                    "predicted_allocated_gib": p.allocated_peak_gib, "predicted_reserved_gib": reserved,
                    "memory_error": mem_err, "fits": fits,
                    "planner_choice": free.fields_for_fix(), "planner_iteration_s": f.iteration_s,
                    "planner_fits": predicted_use_gib(f) <= case.cluster.gpu.memory_gib,
                    "planner_notes": list(free.notes)})
    headers = ["run", "measured s/it", "predicted s/it", "error", "measured GiB", "allocated GiB", "reserved GiB",
               "memory error", "fits", "pred. MFU", "planner's own choice", "published vs own"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    summary = {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors), "runs": len(errors)}
    print(f"\nmedian |error| {summary['median_abs_error']:.1%}, max |error| {summary['max_abs_error']:.1%} "
          f"over {len(errors)} runs")
    memory_errors = [r["memory_error"] for r in out if r["memory_error"] is not None]
    if memory_errors:
        summary.update(memory_error_min=min(memory_errors), memory_error_max=max(memory_errors))
        print(f"reserved memory vs published max_reserved: {min(memory_errors):+.1%} to {max(memory_errors):+.1%} "
              f"over {len(memory_errors)} runs")
    return {"summary": summary, "runs": out}


def parse_runs_arguments(description: str, argv: list[str] | None) -> argparse.Namespace | None:
    """``--runs public-runs.yaml`` and ``--json out.json`` for the benchmarks over the published runs; None
    (after one line on stderr) when the runs file does not exist."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.runs.exists():
        print(f"error: --runs: {args.runs} not found (give the path to public-runs.yaml)", file=sys.stderr)
        return None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_runs_arguments(__doc__.splitlines()[0], argv)
    if args is None:
        return 2
    result = run(args.runs)
    if args.json:
        # the result's keys (summary, runs) at the top, with the command, date and machine beside them
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_info import wrap

        command = "python benchmarks/fidelity.py" + ("" if args.runs == DEFAULT_RUNS else " --runs RUNS")
        wrapped = wrap(command, None, runs_file=args.runs.name)
        wrapped.pop("result")
        args.json.write_text(json.dumps({**wrapped, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
