"""The profiling job every torchrun rank runs at once (so contention is real):

    python -m torch.distributed.run --nproc-per-node 4 -m meshplan.profiler.worker --config job.json

``meshplan profile`` writes ``job.json`` (:func:`meshplan.profiler.cli.job_config`) and starts this. Eight
phases, each inside its share of the time budget; rank 0 decides whether the next measurement fits and
broadcasts the decision, so every rank stays in step:

1. compute: forward + backward of the runtime's own ``Block`` (``launcher/runtime/model.py``) with its
   projections cut to the per-rank widths of each tensor-parallel degree, for each micro-batch; the same
   GEMMs alone (``F.linear``), causal attention alone, the LM-head GEMM and the embedding; and the bytes
   one block holds for backward under none / selective / full recompute (the runtime's ``apply_ac``), as the
   net growth of live tensor bytes (``kernels/measure.py: peak_tracked_bytes``).
2. sharing (CPU ranks only): a GEMM loop on k of each host's ranks at once, the others asleep, for k = 1 ..
   ranks per host: how much faster a rank computes when others idle (``busy_speedup``; a rank idle in a
   pipeline bubble hands its share of the cores to the busy ones). GPUs are one device per rank: skipped.
3. meeting (CPU ranks only): every rank computes GEMMs for 2.2 s from a barrier, noting the time after each;
   cut into windows of 10 ms to 2 s, how far behind the mean the last rank is at a window's end: what a
   collective costs beyond its lined-up time when ranks come to it from computing, time-sliced on shared
   cores (``meeting``).
4. pipeline ops (CPU ranks only): torch.distributed.pipelining's 1F1B over pairs of ranks at two micro-batch
   counts, against the stage's module alone: what one forward or backward op of a schedule costs beyond its
   compute (the schedule's bookkeeping, its send/recv, the wait for a time-sliced neighbour),
   ``op_overhead_s``.
   These three run before the link sweep: after it, CPU ranks drift apart several times further than in a
   training job, while the sharing rates and the pipeline op cost do not move.
5. links: all-reduce, all-gather, reduce-scatter, all-to-all and point-to-point over message sizes, inside
   a node (one group per node) and across nodes (one group per local rank), all groups at once.
6. reduction: all-reduce, reduce-scatter and all-gather at the sizes of the runtime's gradient units, over
   every data-parallel group shape (size, stride) the world allows, all groups of a shape at once, in
   rounds: what the planner prices data-parallel traffic from where it was measured.
7. overlap: one message size of all-reduce, all-gather and reduce-scatter alone, a GEMM loop of about the
   same length alone, and the two together (the collective started asynchronously, the GEMMs run, then
   waited for): how much of a collective still shows beside compute (``exposed_fraction``).
8. pairs: point-to-point bandwidth between every pair of ranks (round-robin rounds, all pairs of a round at
   once), the matrix that shows a slow link.

Each phase lives in :mod:`meshplan.profiler.phases` (``compute.py``: 1; ``host.py``: 2-4; ``links.py``: 5-8;
``timing.py``: the helpers they share); this module runs them in order. Rank 0 writes the raw samples as JSON;
the CLI fits them (``fit.py``) and writes the cluster YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from meshplan.profiler.phases.compute import compute_phase
from meshplan.profiler.phases.host import (host_phase_sizes, host_phases_seconds, meeting_phase, pipeline_phase,
                                           sharing_phase)
from meshplan.profiler.phases.links import links_phase, overlap_phase, pairs_phase, reduction_phase
from meshplan.profiler.phases.timing import init
from meshplan.profiler.progress import Progress
from meshplan.spec import ModelSpec

# Names tests and benchmarks import from the job's module.
from meshplan.profiler.phases.compute import layer_memory, time_block  # noqa: F401
from meshplan.profiler.phases.host import (FULL_HOST_PHASES, MEETING_RUNS, MEETING_SEGMENTS_S,  # noqa: F401
                                           PIPELINE_LAYERS, PIPELINE_TOKENS, PIPELINE_WIDTH, QUICK_HOST_PHASES,
                                           HostPhaseSizes, drift_windows, last_after_mean, median_schedule_step)
from meshplan.profiler.phases.links import layout_groups, reduction_layouts, sweep_order  # noqa: F401
from meshplan.profiler.phases.timing import lower_quartile  # noqa: F401

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(cfg: dict) -> dict | None:
    warnings.filterwarnings("ignore", category=UserWarning)   # gloo's deprecation notes on every rank
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = init(cfg["device"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg["nnodes"] * cfg["nproc_per_node"]:
        raise SystemExit(f"error: torchrun started {world} ranks, the job asked for "
                         f"{cfg['nnodes']} x {cfg['nproc_per_node']}")
    torch.manual_seed(1234 + rank)
    spec = ModelSpec.from_dict(cfg["model"])
    dtype = DTYPES[cfg["precision"]] if device.type == "cuda" else torch.float32
    deadline = float(cfg["deadline"])
    begin = time.time()
    total = max(1.0, deadline - begin)
    # The host checks take a fixed time (host_phases_seconds); the shares are of what they leave, so that a
    # short budget still ends the link sweep after the compute phase and the worker inside its budget.
    host_s = host_phases_seconds(device, cfg["nproc_per_node"], host_phase_sizes(cfg))
    flexible = max(0.0, total - host_s)
    compute_deadline = begin + cfg["compute_share"] * flexible
    pairs_reserve = cfg["pairs_share"] * flexible   # the host phases run before the sweep, its end is after them
    # the command's start and whole budget, as announced: the bars count from there, the file records both
    since, budget_shown = cfg.get("start", begin), cfg.get("budget_s", total)
    hosts = [None] * world
    dist.all_gather_object(hosts, {"host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", 0)),
                                   "local_rank": int(os.environ.get("LOCAL_RANK", 0))})
    show = rank == 0 and cfg.get("progress", True)
    raw: dict[str, Any] = {"ranks": hosts, "device": describe_device(device), "torch": torch.__version__,
                           "world": world, "nnodes": cfg["nnodes"], "nproc_per_node": cfg["nproc_per_node"],
                           "precision": cfg["precision"] if device.type == "cuda" else "fp32",
                           "model": cfg["model"], "budget_s": budget_shown,
                           "startup_s": begin - since}
    # the block rounds' floor (MIN_BLOCK_ROUNDS) may take up to half of the link sweep's time
    sweep_s = max(0.0, deadline - pairs_reserve - host_s - compute_deadline)
    with Progress("compute", budget_shown, enabled=show, start=since) as progress:
        raw["compute"] = compute_phase(cfg, spec, device, dtype, compute_deadline, progress,
                                       rounds_deadline=compute_deadline + 0.5 * sweep_s)
    # The host phases run before the link sweep: after it, ranks computing side by side drift apart several
    # times further than before it or inside a training job, while the sharing rates and the pipeline op
    # cost do not move.
    with Progress("sharing", budget_shown, enabled=show and device.type != "cuda", start=since) as progress:
        raw["sharing"] = sharing_phase(cfg, device, progress)
    with Progress("meeting", budget_shown, enabled=show and device.type != "cuda", start=since) as progress:
        raw["meeting"] = meeting_phase(cfg, device, progress)
    with Progress("pipeline", budget_shown, enabled=show and device.type != "cuda", start=since) as progress:
        raw["pipeline"] = pipeline_phase(cfg, device, progress)
    links_end = deadline - pairs_reserve
    with Progress("links", budget_shown, enabled=show, start=since) as progress:
        # half of what the compute phase left to the sweep; the reduction phase has the rest (and what the
        # sweep did not use)
        raw["links"] = links_phase(cfg, device, time.time() + 0.5 * max(0.0, links_end - time.time()), progress)
    with Progress("reduction", budget_shown, enabled=show, start=since) as progress:
        raw["reduction"] = reduction_phase(cfg, device, links_end, progress)
    with Progress("overlap", budget_shown, enabled=show, start=since) as progress:
        raw["overlap"] = overlap_phase(cfg, device, dtype, progress)
    with Progress("pairs", budget_shown, enabled=show, start=since) as progress:
        raw["pairs"] = pairs_phase(cfg, device, progress)
    raw["elapsed_s"] = time.time() - begin
    dist.barrier()
    dist.destroy_process_group()
    return raw if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshplan.profiler.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="job JSON written by `meshplan profile`")
    args = p.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    raw = run(cfg)
    if raw is not None:
        out = Path(cfg["raw_out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
