"""Where one training step's time goes: the runtime (`meshplan launch`'s train loop) with `torch.profiler` around
one step on rank 0, printing the ops and regions (collectives, FSDP hooks, GEMMs) by total CPU time.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node=4 \\
        benchmarks/profile_step.py --plan plan.yaml --steps 5 [--profile-step 4] [--rows 40]

Every other argument goes to the runtime (`python -m meshplan.launcher.runtime.train --help`). It shows, for
one, whether gloo's collectives (FSDP's reduce-scatters run as `gloo:all_reduce`) hide under compute.
"""

from __future__ import annotations

import argparse
import os
import sys

import meshplan.launcher.runtime.train as train


def main() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--profile-step", type=int, default=4)
    p.add_argument("--rows", type=int, default=40)
    ours, rest = p.parse_known_args()
    original, seen = train.train_step, [0]

    def profiled_step(trainer, inputs, targets, *rest):
        seen[0] += 1
        if seen[0] != ours.profile_step or int(os.environ.get("RANK", 0)) != 0:
            return original(trainer, inputs, targets, *rest)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = original(trainer, inputs, targets, *rest)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=ours.rows), flush=True)
        return out

    train.train_step = profiled_step
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
