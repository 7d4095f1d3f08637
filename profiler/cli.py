"""``meshplan profile``, registered by ``meshplan.cli`` through :func:`register`.

Torch-free at import time: ``profile`` starts a torchrun job of :mod:`meshplan.profiler.worker` and fits what
it measured (``fit.py``, ``cluster_file.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import InputError, MeshplanError

# Defaults per device kind. Message sizes: nccl-tests' default sweep starts at a few KiB; on CPU processes
# over gloo 16 MiB already takes tens of milliseconds, on GPUs 256 MiB reaches NVLink's plateau.
DEFAULT_SEQ = {"cpu": 256, "gpu": 2048}
DEFAULT_MODEL = {"cpu": "tiny-llama", "gpu": "llama3-8b"}
DEFAULT_MAX_MESSAGE = {"cpu": 16 * 2**20, "gpu": 256 * 2**20}
MIN_MESSAGE = 4 * 2**10
PAIR_MESSAGE = {"cpu": 4 * 2**20, "gpu": 64 * 2**20}
# Budget shares: compute (blocks, GEMMs, memory) first, then the link sweep, with a tenth kept for the pairs.
COMPUTE_SHARE = 0.45
# The quick profile (`plan --cluster localhost:N` on first use) gives the blocks more: a first plan's choice of
# micro-batch and tensor-parallel degree rests on their ratios, and its links are one host's.
QUICK_COMPUTE_SHARE = 0.7
PAIRS_SHARE = 0.10
# torchrun start-up and the final fit, paid out of the budget before the worker's clock starts.
STARTUP_RESERVE_S = 3.0
MIN_BUDGET_S = 10.0
# CPU ranks' host checks (sharing, meeting, pipeline ops) take a fixed time; they run their full rounds when
# that is at most half of the budget, so compute and links keep the other half, and the quick rounds otherwise.
HOST_BUDGET_FACTOR = 2.0


def register(app: typer.Typer) -> None:
    app.command("profile", help="Measure this cluster (compute, memory, links) and write a cluster YAML.")(profile)


# ----------------------------------------------------------------------------------------------
# argument parsing (pure)
# ----------------------------------------------------------------------------------------------

def parse_duration(text: str, where: str = "--budget") -> float:
    """``120``, ``120s``, ``2m``, ``1.5h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not match:
        raise InputError(where, f"cannot read {text!r} as a duration", "write e.g. 120s, 5m or 1h")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value < MIN_BUDGET_S:
        raise InputError(where, f"{value:g}s is too short to measure anything",
                         f"give at least {MIN_BUDGET_S:g}s")
    return value


def parse_int_list(text: str, where: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4] (positive integers)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(where, f"cannot read {text!r}", "give comma-separated whole numbers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise InputError(where, f"{text!r} needs positive whole numbers", "give e.g. 1,2,4")
    return sorted(set(values))


def parse_bytes(text: str, where: str) -> int:
    """``16M``, ``64MiB``, ``4096`` -> bytes (powers of two)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise InputError(where, f"cannot read {text!r} as a size", "write e.g. 16M or 256MiB")
    value = int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    if value < MIN_MESSAGE:
        raise InputError(where, f"{value} bytes is below the smallest message ({MIN_MESSAGE})",
                         "give at least 4K")
    return value


def message_sizes(max_bytes: int) -> list[int]:
    """4 KiB, 16 KiB, ... up to ``max_bytes`` (x4 steps, the maximum always included)."""
    sizes, size = [], MIN_MESSAGE
    while size < max_bytes:
        sizes.append(size)
        size *= 4
    sizes.append(max_bytes)
    return sizes


def parse_localhost(cluster: str | None) -> int | None:
    """``localhost:N`` -> N; ``None`` when not given."""
    if cluster is None:
        return None
    preset, _, count = cluster.partition(":")
    if preset != "localhost" or not count.isdigit() or int(count) < 1:
        raise InputError("--cluster", f"{cluster!r}: profile measures the machine it runs on",
                         "write localhost:N (N ranks here), with --nnodes/--node-rank/--master-addr for more nodes")
    return int(count)


def tp_degrees(heads: int, kv_heads: int, ffn: int, ranks: int) -> list[int]:
    """Tensor-parallel degrees the runtime can run inside ``ranks``: divisors of the rank count that divide
    heads, kv_heads and the MLP width (launcher/checks.py)."""
    return [t for t in range(1, ranks + 1) if ranks % t == 0 and not heads % t and not kv_heads % t and not ffn % t]


def device_kind() -> str:
    """``gpu`` when this machine has NVIDIA GPUs (meshplan.spec's nvidia-smi probe), else ``cpu``."""
    from meshplan.spec import _local_gpus

    return "gpu" if _local_gpus() else "cpu"


# The reduction phase (profiler/phases/links.py: reduction_phase): its largest message (a unit past it is priced along the last
# measured segment) and how many sizes at most (its time grows with sizes x group shapes x 3 collectives).
MAX_REDUCTION_MESSAGE = {"cpu": 64 * 2**20, "gpu": 1024 * 2**20}
MAX_REDUCTION_SIZES = 6


def reduction_sizes(model, seq_len: int, tps: list[int], kind: str) -> list[int]:
    """Message sizes the reduction phase times: powers of two bracketing the gradient bytes of one of the
    runtime's communication units (``parallelize.apply_dp`` reduces each block, and the root -- embedding,
    final norm and head -- on its own): from one block at the widest tensor-parallel degree in 16-bit
    gradients (fp32 on CPU ranks) to the larger of one block and the whole root at tp 1 in fp32; at most
    MAX_REDUCTION_SIZES (thinned evenly, both ends kept) and at least three, none above
    MAX_REDUCTION_MESSAGE."""
    from meshplan.planner import flops

    block = flops.params_per_layer(model)
    root = flops.embedding_params(model, seq_len) + flops.head_params(model)
    low = block * (4 if kind == "cpu" else 2) / max(tps or [1])
    high = min(max(block, root) * 4, MAX_REDUCTION_MESSAGE[kind])
    hi_exp = max(14, math.floor(math.log2(high)) if high >= MAX_REDUCTION_MESSAGE[kind] else math.ceil(math.log2(high)))
    # at least three sizes (a slope to price past the ends), from 4 KiB up
    lo_exp = max(12, min(math.floor(math.log2(max(low, 1))), hi_exp - 2))
    exps = list(range(lo_exp, hi_exp + 1))
    if len(exps) > MAX_REDUCTION_SIZES:
        step = (len(exps) - 1) / (MAX_REDUCTION_SIZES - 1)
        exps = sorted({exps[round(i * step)] for i in range(MAX_REDUCTION_SIZES)})
    return [2 ** e for e in exps]


def job_config(*, model, seq_len: int, micro_batches: list[int], ranks_per_node: int, nnodes: int, kind: str,
               precision: str, deadline: float, max_message: int, reps: int, raw_out: str,
               progress: bool = True) -> dict:
    """The JSON the worker reads: shapes to time, message sizes, the deadline and where to write."""
    world = ranks_per_node * nnodes
    return {
        "model": model.to_dict(), "seq_len": seq_len, "micro_batches": micro_batches,
        "tps": tp_degrees(model.heads, model.kv_heads, model.ffn_hidden, min(world, ranks_per_node)),
        "precision": precision, "device": kind, "deadline": deadline, "compute_share": COMPUTE_SHARE,
        "pairs_share": PAIRS_SHARE, "sizes": message_sizes(max_message),
        "reduction_sizes": reduction_sizes(model, seq_len, tp_degrees(model.heads, model.kv_heads, model.ffn_hidden,
                                                                      min(world, ranks_per_node)), kind),
        "pair_bytes": min(PAIR_MESSAGE[kind], max_message), "overlap_bytes": min(PAIR_MESSAGE[kind], max_message),
        "nnodes": nnodes, "nproc_per_node": ranks_per_node,
        "reps": reps, "raw_out": raw_out, "progress": progress,
    }


def torchrun_argv(config_path: str, nnodes: int, nproc: int, node_rank: int | None, master_addr: str,
                  master_port: int, rdzv_id: str, local_addr: str | None = None) -> list[str]:
    """The torchrun command of the profiling job (standalone on one node, c10d rendezvous across nodes,
    as ``meshplan launch`` renders it)."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        argv.append("--standalone")
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            # node 0 hosts the rendezvous store at --master-addr; say so rather than let torchrun guess from
            # the hostname (a guess that fails inside network namespaces and behind NAT)
            argv += [f"--node-rank={node_rank}", f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}"]
        if local_addr:   # the address other nodes reach this one at (else torchrun resolves the hostname)
            argv.append(f"--local-addr={local_addr}")
    return argv + ["-m", "meshplan.profiler.worker", "--config", config_path]


# ----------------------------------------------------------------------------------------------
# meshplan profile
# ----------------------------------------------------------------------------------------------

def profile(
    cluster: Optional[str] = typer.Option(None, "--cluster", help="localhost:N: N ranks on this node (default: "
                                          "its GPUs, or 2 CPU processes)"),
    out: Path = typer.Option(Path("cluster.yaml"), "--out", "-o", help="cluster YAML to write"),
    budget: str = typer.Option("120s", "--budget", help="wall-clock budget, start-up included, e.g. 120s or 5m "
                               "(a budget under what start-up and the fewest rounds take is overrun, and said so)"),
    model: Optional[str] = typer.Option(None, "--model", help="model whose shapes to time (preset, YAML or "
                                        "config.json); default tiny-llama on CPU, llama3-8b on GPU"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="sequence length (default 256 CPU, 2048 GPU)"),
    micro_batches: str = typer.Option("1,2,4", "--micro-batches", help="micro-batch sizes to time"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16|fp16|fp32 (GPU; CPU is fp32)"),
    max_message: str = typer.Option("", "--max-message", help="largest message (default 16M CPU, 256M GPU)"),
    reps: int = typer.Option(5, "--reps", help="timed samples per measurement (lower quartile kept)"),
    nnodes: int = typer.Option(1, "--nnodes", help="nodes; every node runs the same command"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="this node's rank (multi-node)"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="rendezvous host (node 0)"),
    master_port: int = typer.Option(29511, "--master-port", help="rendezvous port"),
    rdzv_id: str = typer.Option("meshplan-profile", "--rdzv-id", help="rendezvous id shared by the nodes"),
    keep_raw: Optional[Path] = typer.Option(None, "--keep-raw", help="also write the worker's raw JSON here"),
    local_addr: Optional[str] = typer.Option(None, "--local-addr", help="this node's address as the others reach "
                                             "it (multi-node; default: torchrun resolves the hostname)"),
) -> None:
    try:
        code = run_profile(cluster, out, budget, model, seq_len, micro_batches, precision, max_message, reps,
                           nnodes, node_rank, master_addr, master_port, rdzv_id, keep_raw, local_addr)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)
    if code:
        raise typer.Exit(code)


def run_profile(cluster, out, budget, model, seq_len, micro_batches, precision, max_message, reps, nnodes,
                node_rank, master_addr, master_port, rdzv_id, keep_raw, local_addr=None) -> int:
    start = time.time()
    budget_s = parse_duration(budget)
    mbs = parse_int_list(micro_batches, "--micro-batches")
    if reps < 1:
        raise InputError("--reps", f"must be >= 1, got {reps}", "give an integer >= 1")
    if nnodes < 1:
        raise InputError("--nnodes", f"must be >= 1, got {nnodes}", "give the number of nodes")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise InputError("--node-rank", f"{node_rank} is not in 0..{nnodes - 1}", "give this node's rank")
    if not out.parent.exists():
        raise InputError("--out", f"folder {out.parent} does not exist", "create it or write elsewhere")
    from meshplan.spec import PRECISIONS, default_precision, load_cluster, load_model

    kind = device_kind()
    ranks = parse_localhost(cluster)
    if ranks is None:
        ranks = len(__import__("meshplan.spec", fromlist=["_local_gpus"])._local_gpus()) if kind == "gpu" else 2
    spec = load_model(model or DEFAULT_MODEL[kind])
    seq = seq_len if seq_len is not None else DEFAULT_SEQ[kind]
    if seq < 1:
        raise InputError("--seq-len", f"must be >= 1, got {seq}", "give the training sequence length")
    prec = (precision or default_precision(kind)).lower()
    if prec not in PRECISIONS or prec == "fp8":
        raise InputError("--precision", f"cannot time {prec!r}", "choose bf16, fp16 or fp32")
    if kind == "cpu" and prec != "fp32":
        raise InputError("--precision", f"CPU processes run fp32, not {prec}", "drop --precision or use fp32")
    max_bytes = parse_bytes(max_message, "--max-message") if max_message else DEFAULT_MAX_MESSAGE[kind]
    profiled = measure(spec, seq, prec, mbs, ranks, budget_s=budget_s, start=start, max_bytes=max_bytes, reps=reps,
                       nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                       rdzv_id=rdzv_id, local_addr=local_addr, keep_raw=keep_raw)
    if profiled is None:
        return 1
    if profiled is NOT_RANK_ZERO:
        typer.echo("meshplan: rank 0 ran on another node; that node writes the cluster file", err=True)
        return 0
    from meshplan.profiler.cluster_file import write_cluster

    write_cluster(profiled, out)
    typer.echo(summary_text(profiled, time.time() - start), err=True)
    overrun = budget_overrun(profiled.measured, time.time() - start)
    if overrun:
        typer.echo(overrun, err=True)
    typer.echo(f"wrote {out}", err=True)
    return 0


NOT_RANK_ZERO = object()   # measure()'s answer on a node whose ranks do not include rank 0


def measure(spec, seq: int, precision: str, micro_batches: list[int], ranks: int, *, budget_s: float,
            start: float | None = None, max_bytes: int | None = None, reps: int = 5, nnodes: int = 1,
            node_rank: int | None = None, master_addr: str = "127.0.0.1", master_port: int = 29511,
            rdzv_id: str = "meshplan-profile", local_addr: str | None = None, keep_raw: Path | None = None,
            quick: bool = False):
    """Run the profiling job on ``ranks`` ranks of this node (of ``nnodes``) within ``budget_s`` from
    ``start`` and return the profiled ClusterSpec; ``None`` when the job failed (its output says why),
    ``NOT_RANK_ZERO`` on a node without rank 0. ``quick`` shortens the CPU host phases (worker
    ``QUICK_HOST_PHASES``)."""
    from meshplan.spec import load_cluster

    start = time.time() if start is None else start
    kind = device_kind()
    max_bytes = max_bytes or DEFAULT_MAX_MESSAGE[kind]
    base = load_cluster(f"localhost:{ranks}")
    work = Path(tempfile.mkdtemp(prefix="meshplan-profile-"))
    raw_path = work / "raw.json"
    deadline = start + budget_s - STARTUP_RESERVE_S
    cfg = job_config(model=spec, seq_len=seq, micro_batches=micro_batches, ranks_per_node=ranks, nnodes=nnodes,
                     kind=kind, precision=precision, deadline=deadline, max_message=max_bytes, reps=reps,
                     raw_out=str(raw_path), progress=sys.stderr.isatty() or not quick)
    cfg["quick"] = quick
    cfg["start"], cfg["budget_s"] = start, budget_s
    if quick:
        cfg["compute_share"] = QUICK_COMPUTE_SHARE
    elif kind == "cpu" and budget_s < (full_rounds_budget := HOST_BUDGET_FACTOR * full_host_seconds(ranks)):
        cfg["quick_host"] = True
        typer.echo(f"meshplan: a budget under {full_rounds_budget:.0f}s times the "
                   "host checks in the quick profile's short rounds", err=True)
    cfg_path = work / "job.json"
    cfg_path.write_text(json.dumps(cfg))
    argv = torchrun_argv(str(cfg_path), nnodes, ranks, node_rank, master_addr, master_port, rdzv_id, local_addr)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "cpu":
        env["OMP_NUM_THREADS"] = "1"   # as `meshplan launch` runs CPU ranks (launcher/render.py)
    typer.echo(f"meshplan: profiling {nnodes} x {ranks} {kind} ranks within {budget_s:.0f}s, start-up included "
               f"(shapes of {spec.name}, seq {seq})", err=True)
    result = subprocess.run(argv, env=env)
    if result.returncode:
        typer.echo(f"error: the profiling job failed (exit {result.returncode}); its output is above", err=True)
        return None
    if not raw_path.exists():
        return NOT_RANK_ZERO
    from meshplan.profiler.cluster_file import build_cluster

    raw = json.loads(raw_path.read_text())
    if keep_raw is not None:
        keep_raw.write_text(json.dumps(raw, indent=1))
    name = f"profiled:{raw['ranks'][0]['host']}:{nnodes}x{ranks}"
    return build_cluster(raw, base, name)


def full_host_seconds(ranks_per_node: int) -> float:
    """What the CPU host checks take in their full rounds (profiler/phases/host.py: host_phases_seconds)."""
    import torch

    from meshplan.profiler.phases.host import host_phases_seconds

    return host_phases_seconds(torch.device("cpu"), ranks_per_node)


# A profile may end this much after its budget before the run says so (the fit, torchrun's exit).
BUDGET_SLACK_S = 5.0


def budget_overrun(measured: dict, elapsed: float) -> str | None:
    """One line when the whole run took more than its budget (and BUDGET_SLACK_S): the start-up (torchrun,
    the ranks' imports, the rendezvous) and each phase's fewest rounds do not shrink with the budget."""
    budget = measured.get("budget_s")
    if budget is None or elapsed <= budget + BUDGET_SLACK_S:
        return None
    return (f"meshplan: the profile took {elapsed:.0f}s, over its {budget:.0f}s budget: start-up took "
            f"{measured.get('startup_s', 0.0):.0f}s and each phase ran its fewest rounds, which no budget "
            f"shortens; give more than {math.ceil(elapsed):.0f}s for the phases to measure beyond them")


def summary_text(cluster, elapsed: float) -> str:
    """A few lines on what was measured."""
    m = cluster.measured
    table = m["compute"]["matmul_table"]
    startup = f" (start-up {m['startup_s']:.0f}s)" if "startup_s" in m else ""
    lines = [f"profile took {elapsed:.0f}s{startup}: {len(m['compute']['block_check'])} block shapes, "
             f"GEMM {min(r for _, r in table):.3g}-{max(r for _, r in table):.3g} TFLOP/s, "
             f"attention {m['compute']['attention_tflops']:.3g} TFLOP/s, "
             f"memory-bound {m['compute'].get('memory_gbps', float('nan')):.3g} GB/s"]
    block_lines = m["compute"].get("block_lines") or []
    if block_lines:
        lines.append("block vs micro-batch: " + "; ".join(
            f"tp{line['tp']} {line['fixed_s'] * 1e3:.3g} ms + {line['per_sequence_s'] * 1e3:.3g} ms a sequence"
            + ("" if line["used"] else " (not used: a shape lies off it)") for line in block_lines))
    kernels = m["compute"].get("kernels") or []
    if kernels:
        lines.append("kernels (forward + backward): " + "; ".join(kernel_summary(row) for row in kernels))
    for level in ("intra_node", "inter_node"):
        fit = m["links"].get(level)
        if fit:
            lines.append(f"{level}: busbw {fit['bandwidth_gbps']:.3g} GB/s, latency {fit['latency_us']:.3g} us "
                         f"(median fit error {fit['median_rel_error']:.0%})")
    reduction = m["links"].get("reduction")
    if reduction:
        largest: dict[tuple[int, int], dict] = {}   # per group shape, its largest all-reduce
        for row in reduction["samples"]:
            key = (row["ranks"], row["stride"])
            if row["collective"] == "all_reduce" and row["bytes"] >= largest.get(key, {"bytes": 0})["bytes"]:
                largest[key] = row
        shapes = [f"{n} ranks {stride} apart {row['bytes'] / 2**20:.3g} MiB in {row['seconds'] * 1e3:.3g} ms"
                  for (n, stride), row in sorted(largest.items())]
        lines.append(f"reduction: {len(reduction['samples'])} points, every group of a shape at once (all-reduce: "
                     + "; ".join(shapes) + ")")
    overlap = m["links"].get("overlap")
    if overlap:
        lines.append(f"overlap: {overlap['exposed_fraction']:.2f} of a collective shows beside compute "
                     f"(0 hidden, 1 no overlap; {overlap['level']}, "
                     f"{overlap['samples'][0]['bytes'] / 2**20:.0f} MiB)")
    host = m.get("host") or {}
    if host.get("busy_speedup"):
        from meshplan.planner.compute import fit_shared_cores, measured_busy_speedup

        speeds = ", ".join(f"{busy} busy x{speed:.2f}" for busy, speed in host["busy_speedup"])
        table = measured_busy_speedup(cluster)
        ranks = max(b for b, _ in table)
        lines.append(f"sharing: a rank's speed when only some of a host's ranks compute ({speeds}): {ranks} ranks "
                     f"as on {fit_shared_cores(table):.2f} cores (the planner's processor-sharing law; pipeline "
                     f"bubbles cost less where ranks share cores)")
    meeting = host.get("meeting")
    if meeting:
        per = ", ".join(f"{s['penalty_s'] * 1e3:.1f} ms after {s['segment_s'] * 1e3:.0f} ms"
                        for s in meeting["samples"])
        lines.append(f"meeting: a collective reached from computing costs its lined-up time plus {per} "
                     f"(the last of {meeting.get('ranks', '?')} ranks after the mean)")
    pipeline = host.get("pipeline")
    if pipeline:
        lines.append(f"pipeline: one schedule op costs {pipeline['op_overhead_s'] * 1e3:.2f} ms beyond its compute "
                     f"(torch.distributed.pipelining 1F1B over {pipeline['pairs']} pair(s) of ranks)")
    return "\n".join(lines)


def kernel_summary(row: dict) -> str:
    """One kernel-table row for the profile's summary: ``norm/liger 0.21 ms (2.1e3 GB/s)``, or why it did
    not run, or its difference from eager where that keeps it from being chosen."""
    from meshplan.planner.kernels import MAX_KERNEL_ERROR

    name = f"{row['op']}/{row['impl']}"
    if row.get("seconds") is None:
        return f"{name} did not run ({row.get('error', 'no time')})"
    text = f"{name} {row['seconds'] * 1e3:.3g} ms" + (f" ({row['gbps']:.3g} GB/s)" if row.get("gbps") else "")
    if (row.get("max_error") or 0.0) > MAX_KERNEL_ERROR:
        text += f", not chosen: differs from eager by {row['max_error']:.2g}"
    return text
