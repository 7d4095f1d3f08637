"""``meshplan plan``: search for the fastest split that fits, print it, write it."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from meshplan.errors import InputError, MeshplanError

DEFAULT_MODEL = "llama3-8b"
DEFAULT_CLUSTER = "dgx-h100:1"
DEFAULT_GLOBAL_BATCH = 64
DEFAULT_SEQ_LEN = 8192


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"
    markdown = "markdown"


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)


def plan_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset name, model YAML, or Hugging Face config.json "
                                        f"or model directory [default: {DEFAULT_MODEL}]"),
    cluster: Optional[str] = typer.Option(None, "--cluster", "-c", help="PRESET:NODES (dgx-a100, dgx-h100, dgx-h200), "
                                          f"localhost:N, or a cluster YAML [default: {DEFAULT_CLUSTER}]"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", "-b", help="Sequences per optimizer step "
                                               f"[default: {DEFAULT_GLOBAL_BATCH}]"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", "-s", help=f"Tokens per sequence [default: {DEFAULT_SEQ_LEN}]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp16 | fp32 | fp8 [default: bf16 on "
                                            "GPUs, fp32 on CPU ranks]"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adam | sgd"),
    fix: List[str] = typer.Option([], "--fix", help="Pin a plan field, KEY=VALUE (repeatable): dp, tp, pp, cp, cp_kind, "
                                  "micro_batch, schedule, virtual_stages, recompute, zero, vocab_parallel, tp_overlap, "
                                  "compile, fused_kernels, sequence_parallel, attention (flash | unfused); norm_kernel, "
                                  "swiglu_kernel, rope_kernel, loss_kernel (fused | liger: meshplan's or liger-kernel's); "
                                  "for a mixture of experts ep, expert_tp, moe_imbalance"),
    engine: str = typer.Option("meshplan", "--engine", "-e", help="The engine that will run the plan: meshplan "
                               "(meshplan launch), megatron (Megatron-Core) or torchtitan; the search offers what it "
                               "runs and prices it as it behaves"),
    top: int = typer.Option(3, "--top", "-k", help="How many plans to show"),
    # the default is planner.memory.DEFAULT_MEMORY_HEADROOM (tests/test_engine_memory.py holds them equal)
    memory_headroom: float = typer.Option(0.05, "--memory-headroom", help="Share of each device's memory a plan "
                                          "leaves unused: a plan fits when what the CUDA caching allocator reserves, "
                                          "NCCL's buffers and the CUDA context stay under (1 - headroom) x memory "
                                          "(0 <= headroom < 1)"),
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="Output format"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the best plan here (YAML, or JSON for .json)"),
    no_refine: bool = typer.Option(False, "--no-refine", help="Skip the final partition + recompute ILP"),
    check: bool = typer.Option(False, "--check", help="Build each top plan on fake tensors (meshplan check, one "
                               "rank per pipeline rank; needs torch) and drop those whose measured peak does not fit"),
    no_profile: bool = typer.Option(False, "--no-profile", envvar="MESHPLAN_NO_PROFILE",
                                    help="With --cluster localhost:N, plan from the documented defaults instead of "
                                    "measuring this machine (a quick profile on first use, cached in the user "
                                    "cache directory, MESHPLAN_CACHE_DIR to move it)"),
) -> None:
    """Find the fastest way to split training that fits, and predict its time and memory."""
    from meshplan.cli import fail
    from meshplan.engines import get_engine
    from meshplan.planner.search import parse_fixes, search
    from meshplan.spec import TrainSpec, load_cluster, load_model

    try:
        assumed = []
        if model is None:
            assumed.append(f"--model {DEFAULT_MODEL}")
        if cluster is None:
            assumed.append(f"--cluster {DEFAULT_CLUSTER}")
        if global_batch is None:
            assumed.append(f"--global-batch {DEFAULT_GLOBAL_BATCH}")
        if seq_len is None:
            assumed.append(f"--seq-len {DEFAULT_SEQ_LEN}")
        if assumed:
            typer.echo(f"assuming {' '.join(assumed)} (pass them to plan your own job)", err=True)
        if top < 1:
            raise InputError("--top", f"must be >= 1, got {top}", "give --top 1 or more")
        check_memory_headroom(memory_headroom)
        engine_profile = get_engine(engine)
        model_spec = load_model(model or DEFAULT_MODEL)
        cluster_spec = load_cluster(cluster or DEFAULT_CLUSTER)
        precision = precision or cluster_spec.default_precision
        train = TrainSpec(global_batch if global_batch is not None else DEFAULT_GLOBAL_BATCH,
                          seq_len if seq_len is not None else DEFAULT_SEQ_LEN, precision, optimizer)
        if cluster_spec.gpu.kind == "cpu" and train.precision != "fp32":
            raise InputError("--precision", f"{train.precision} on CPU ranks",
                             "leave --precision out or give --precision fp32: CPU ranks train in fp32")
        fixes = parse_fixes(fix)
        if is_localhost(cluster) and not no_profile:
            # what a measurement cannot change is answered before one runs: a --fix the model refuses, or a
            # model no split fits in this machine's memory (the quick profile times compute and links only)
            unmeasured = cluster_spec
            cluster_spec = measure_this_machine(unmeasured, model_spec, train, before_measuring=lambda: search(
                model_spec, unmeasured, train, fixes, top=1, refine=False, engine=engine_profile,
                memory_headroom=memory_headroom))
        progress = _progress_bar() if sys.stderr.isatty() else None
        try:
            result = search(model_spec, cluster_spec, train, fixes, top=top, refine=not no_refine,
                            progress=progress, engine=engine_profile, memory_headroom=memory_headroom)
        finally:
            if progress is not None:
                progress.close()
        if check:
            result = check_top_plans(result)
        if out is not None:
            try:
                result.plans[0].save(out)
            except OSError as exc:
                raise InputError("--out", f"cannot write {out}: {exc.strerror}", "give a writable path") from None
    except MeshplanError as error:
        fail(error)
        return

    if output_format is OutputFormat.json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif output_format is OutputFormat.yaml:
        typer.echo(yaml.safe_dump(result.to_dict(), sort_keys=False))
    else:
        typer.echo(render_text(result, markdown=output_format is OutputFormat.markdown))
    if out is not None:
        typer.echo(f"wrote {out}", err=True)


def check_memory_headroom(headroom: float) -> None:
    """``--memory-headroom``: a share of device memory, 0 <= headroom < 1 (an :class:`InputError` otherwise)."""
    if not 0.0 <= headroom < 1.0 or headroom != headroom:
        raise InputError("--memory-headroom", f"must be a share of device memory in [0, 1), got {headroom:g}",
                         "give e.g. --memory-headroom 0.05 to leave 5% unused")


def is_localhost(source: str | None) -> bool:
    """``localhost:N`` (and not a file of that name)."""
    return bool(source) and source.startswith("localhost:") and not Path(source).exists()


def measure_this_machine(cluster_spec, model_spec, train, before_measuring=lambda: None):
    """``localhost:N`` measured: the cached quick profile of this machine, or a new one (profiler.host_cache),
    with ``before_measuring`` run first when a new one is about to start."""
    try:
        from meshplan.profiler.host_cache import measured_localhost
    except ImportError:   # an install without the profiler stage: the documented defaults
        return cluster_spec
    return measured_localhost(cluster_spec, model_spec, train.seq_len, train.precision,
                              echo=lambda line: typer.echo(line, err=True), before_measuring=before_measuring)


class _progress_bar:
    """A small stderr progress bar over degree families (only on a terminal)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and total > 200:
            self.bar = typer.progressbar(length=total, label="searching", file=sys.stderr)
            self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def check_top_plans(result):
    """``--check``: run ``meshplan check`` on every top plan, note its measured peak on the plan, and drop the
    plans whose measured peak (with the allocator margin) exceeds the device."""
    import dataclasses

    from meshplan.errors import NoFeasiblePlan
    from meshplan.launcher.check import check_plan

    kept, dropped = [], []
    for i, plan in enumerate(result.plans, 1):
        checked = check_plan(plan)
        worst = checked.worst
        line = (f"meshplan check: worst rank {worst.rank} measured {worst.measured['peak'] / 2**30:.2f} GiB, "
                f"predicted {worst.predicted.get('peak', 0.0) / 2**30:.2f} GiB (allocated, before the margin)")
        typer.echo(f"checked plan {i}: {line}", err=True)
        if checked.fits():
            kept.append(dataclasses.replace(plan, notes=tuple(plan.notes) + (line,)))
        else:
            dropped.append(f"plan {i} ({line}) does not fit {checked.capacity_bytes / 2**30:.2f} GiB")
    for text in dropped:
        typer.echo(f"dropped {text}", err=True)
    if not kept:
        raise NoFeasiblePlan("every top plan's measured peak exceeds the device (" + "; ".join(dropped) +
                             "): plan with more GPUs, a smaller micro-batch, or --fix recompute=full")
    return dataclasses.replace(result, plans=kept, notes=list(result.notes) + dropped)


def engine_title(name: str) -> str:
    from meshplan.engines import get_engine

    return get_engine(name).title


def reserved_gib(prediction) -> float:
    """The prediction's reserved memory; a plan written before it existed shows its peak with the margin."""
    reserved = prediction.reserved_memory_gib
    return prediction.peak_memory_gib if reserved is None else reserved


def memory_line(prediction, device_gib: float) -> str:
    """One line: the allocated peak, what the caching allocator reserves and NCCL's buffers, of the device."""
    from meshplan import units

    text = (f"plan 1 memory per device: allocated peak {units.human_memory(prediction.allocated_peak_gib)}, "
            f"reserved {units.human_memory(reserved_gib(prediction))}")
    if prediction.nccl_memory_gib:
        text += f" + NCCL {units.human_memory(prediction.nccl_memory_gib)}"
    return text + f" of {units.human_memory(device_gib)}"


def render_text(result, markdown: bool = False) -> str:
    from tabulate import tabulate

    from meshplan import units

    fmt = "github" if markdown else "simple"
    best = result.plans[0]
    m, c, t = best.model, best.cluster, best.train
    mem_unit, mem_factor = units.memory_column([reserved_gib(p.predicted) for p in result.plans])
    rate_unit, rate_factor = units.rate_unit(max(p.predicted.tflops_per_gpu for p in result.plans))
    rows = []
    for i, p in enumerate(result.plans, 1):
        pr = p.predicted
        sched = "-" if p.pp == 1 else (p.schedule + (f" v{p.virtual_stages}" if p.virtual_stages > 1 else ""))
        experts = [p.ep if p.expert_tp == 1 else f"{p.ep} (etp {p.expert_tp})"] if m.moe is not None else []
        rows.append([i, p.dp, p.tp, p.pp, p.cp if p.cp == 1 else f"{p.cp} {p.cp_kind}", *experts, p.micro_batch,
                     p.num_microbatches, sched, p.zero, p.recompute, "yes" if p.vocab_parallel else "no",
                     f"{pr.iteration_s:.4g}", f"{pr.tokens_per_s:,.0f}", f"{pr.tflops_per_gpu * rate_factor:.3g}",
                     f"{pr.mfu:.1%}", f"{pr.allocated_peak_gib * mem_factor:,.1f}",
                     f"{reserved_gib(pr) * mem_factor:,.1f}"])
    per_rank = units.rank_word(c.gpu.kind)
    headers = ["#", "dp", "tp", "pp", "cp", *(["ep"] if m.moe is not None else []), "micro", "n_micro", "schedule",
               "zero", "recompute", "vocab par", "iter s", "tokens/s", f"{rate_unit}/{per_rank}", "MFU",
               f"allocated {mem_unit}", f"reserved {mem_unit}"]
    lines = []
    ranks = (units.rank_count("cpu", c.world_size) if c.gpu.kind == "cpu" else f"{c.world_size:,} x {c.gpu.name}")
    head = (f"{m.name} on {c.name} ({ranks}, {units.human_memory(c.gpu.memory_gib)} each), "
            f"global batch {t.global_batch} x {t.seq_len} tokens, {t.precision}, for {engine_title(best.engine)}")
    lines.append(f"## {head}" if markdown else head)
    lines.append("")
    lines.append(tabulate(rows, headers=headers, tablefmt=fmt))
    lines.append("")
    stage_unit, stage_factor = units.memory_column([s.peak_memory_gib for s in best.stages])
    stages = [[i, f"[{s.layers[0]}, {s.layers[1]})", s.recompute,
               ", ".join(f"{k} {v}" for k, v in s.recompute_layers.items() if v),
               f"{s.peak_memory_gib * stage_factor:,.1f}"]
              for i, s in enumerate(best.stages)]
    if len(stages) > 1:
        if len(stages) > 12:
            stages = stages[:6] + [["...", "", "", "", ""]] + stages[-3:]
        lines.append("plan 1 stages:")
        lines.append(tabulate(stages, headers=["stage", "layers", "recompute", "blocks", f"peak {stage_unit}"],
                              tablefmt=fmt))
        lines.append("")
    tb = best.predicted.time_breakdown_s
    lines.append("plan 1 time: " + ", ".join(f"{k} {v:.3g}s" for k, v in tb.items() if v > 0))
    mb = best.predicted.memory_breakdown_gib
    lines.append("plan 1 memory (worst rank): " + ", ".join(f"{k} {units.human_memory(v)}" for k, v in mb.items()
                                                          if v > 0))
    lines.append(memory_line(best.predicted, c.gpu.memory_gib))
    if len(set(best.kernels.values())) > 1 or "liger" in best.kernels.values():   # not one kind for all ops
        lines.append("plan 1 kernels: " + ", ".join(f"{op} {impl}" for op, impl in best.kernels.items()))
    for note in best.notes:
        lines.append(f"note: {note}")
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(result.rejected.items(), key=lambda kv: -kv[1]))
    lines.append(f"searched {result.evaluated} configurations in {result.seconds:.2f}s; rejected: {rejected}")
    pins = " ".join(f"--fix {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in best.fields_for_fix().items())
    lines.append(f"reproduce plan 1: {pins}")
    return "\n".join(lines)
