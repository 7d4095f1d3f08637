"""Do the profile's host phases read the same before and after the link sweep? The worker's sharing, meeting
and pipeline phases (``profiler/worker.py``), run on every rank of one host, then the link sweep
(``links_phase``, the all-reduce / all-gather / reduce-scatter / all-to-all / point-to-point sizes a profile
times), then the three phases again, ``--repeats`` times over.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/host_phases_order.py --sweep-seconds 20 --repeats 2

Rank 0 prints one row per pass: the meeting curve (the last rank's time for a window after the mean, at 10 ms
.. 2 s of GEMMs), the pipeline op overhead, and the sharing phase's GEMM rates with 1..n ranks busy: why the
profile runs the host phases before the link sweep (docs/profiler.md, "The phases").
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from tabulate import tabulate

from meshplan.profiler import worker
from meshplan.profiler.cli import DEFAULT_MAX_MESSAGE, message_sizes


def host_row(label: str, cfg: dict, device) -> list | None:
    """One pass of the three host phases; the row rank 0 prints (None elsewhere)."""
    sharing = worker.sharing_phase(cfg, device, None)
    meeting = worker.meeting_phase(cfg, device, None)
    pipeline = worker.pipeline_phase(cfg, device, None)
    if dist.get_rank():
        return None
    curve = " ".join(f"{s['penalty_s'] * 1e3:.0f}" for s in meeting["samples"])
    rates = " ".join(f"{row['gemms_per_s']:.0f}" for row in sharing["samples"])
    return [label, curve, f"{pipeline['op_overhead_s'] * 1e3:.2f}", rates]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep-seconds", type=float, default=20.0, help="the link sweep's time budget per pass")
    p.add_argument("--repeats", type=int, default=2, help="before/after pairs")
    a = p.parse_args()
    device = worker.init("cpu")
    nproc = dist.get_world_size()
    cfg = {"nproc_per_node": nproc, "nnodes": 1, "reps": 5, "sizes": message_sizes(DEFAULT_MAX_MESSAGE["cpu"])}
    rows = []
    for repeat in range(a.repeats):
        rows.append(host_row(f"{repeat + 1}: before the sweep", cfg, device))
        worker.links_phase(cfg, device, time.time() + a.sweep_seconds, None)
        rows.append(host_row(f"{repeat + 1}: after the sweep", cfg, device))
    if dist.get_rank() == 0:
        segments = " / ".join(f"{s:g}" for s in worker.MEETING_SEGMENTS_S)
        print(tabulate(rows, headers=["pass", f"meeting ms after {segments} s", "pipeline op ms",
                                      f"GEMMs/s, 1..{nproc} busy"]))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
