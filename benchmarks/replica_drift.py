"""How far ranks that time-slice shared cores drift apart between two collectives, with nothing but GEMMs in
between: each rank runs ``segment`` seconds of 256 x 256 GEMMs, notes the wall time, and all-reduces a 64 KiB
tensor within its group (pairs {0,1}, {2,3}, then all four ranks); the gap printed is, per meeting, the last
arrival minus the mean arrival in the group (what the average rank waits), averaged over the meetings.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 benchmarks/replica_drift.py

Compare benchmarks/dp_reduce_wait.py, which measures the same gap between two pipeline replicas inside real
training steps.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

SEGMENTS_S = (0.01, 0.04, 0.16, 0.6, 1.2)
SECONDS_PER_SEGMENT_LENGTH = 4.8   # meetings per segment length: this many seconds of it


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 4:
        raise SystemExit("replica_drift: run it with --nproc-per-node=4")
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    a, x = torch.randn(256, 256), torch.ones(16384)
    c = torch.empty_like(a)
    dist.barrier()
    begin = time.perf_counter()
    for _ in range(200):
        torch.mm(a, a, out=c)
    one = torch.tensor([(time.perf_counter() - begin) / 200])
    dist.all_reduce(one, op=dist.ReduceOp.MAX)
    for name, group, members in (("pairs", pairs[rank // 2], [[0, 1], [2, 3]]),
                                 ("all four", dist.group.WORLD, [[0, 1, 2, 3]])):
        for segment in SEGMENTS_S:
            gemms, meetings = round(segment / one.item()), max(4, round(SECONDS_PER_SEGMENT_LENGTH / segment))
            arrivals = []
            dist.barrier()
            for _ in range(meetings):
                for _ in range(gemms):
                    torch.mm(a, a, out=c)
                arrivals.append(time.time())
                dist.all_reduce(x, group=group)
            gathered = [torch.zeros(meetings, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(gathered, torch.tensor(arrivals, dtype=torch.float64))
            if rank == 0:
                table = torch.stack(gathered)
                gap = statistics.fmean((table[m].max(0).values - table[m].mean(0)).mean().item() for m in members)
                print(f"{name:8s} segment {segment:5.2f} s x {meetings:3d}: last arrival - mean arrival "
                      f"{gap * 1e3:6.1f} ms ({100 * gap / segment:4.1f}% of the segment)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
