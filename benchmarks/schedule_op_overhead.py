"""What one op of each torch.distributed.pipelining schedule costs beyond its compute, on CPU ranks in pairs
(the profiler measures it for 1F1B only: ``profiler/worker.py: pipeline_phase``; this asks whether GPipe and
the interleaved schedule cost the same per op).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node=4 benchmarks/schedule_op_overhead.py [--repeats 2]

Every pair of ranks runs a two-rank pipeline of 4 linears on [256, 256] (the profiler's stage), as 1F1B, GPipe
(one stage each) and interleaved 1F1B (two stages of 2 linears each), at 4 and 16 micro-batches; the slope
between the two, less the stage's forward + backward alone, over the ops a micro-batch adds per rank (2, or 4
interleaved), is the per-op overhead. Prints one line per schedule and repeat (rank 0).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from meshplan.profiler.worker import PIPELINE_LAYERS as LAYERS
from meshplan.profiler.worker import PIPELINE_TOKENS as TOKENS
from meshplan.profiler.worker import PIPELINE_WIDTH as WIDTH
from meshplan.profiler.worker import median_schedule_step

MICROBATCHES = (4, 16)
STEPS = 6


def module(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


def step_time(kind: str, m: int, position: int, group, device) -> float:
    """The slowest rank's median step of ``kind`` at ``m`` micro-batches."""
    if kind == "interleaved":
        stages = [PipelineStage(module(LAYERS // 2), position + 2 * chunk, 4, device, group=group) for chunk in range(2)]
        schedule = ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)
    else:
        stage = PipelineStage(module(LAYERS), position, 2, device, group=group)
        schedule = (Schedule1F1B if kind == "1f1b" else ScheduleGPipe)(stage, m, loss_fn=loss_fn)
    x, target = torch.randn(m, TOKENS, WIDTH), torch.randn(m, TOKENS, WIDTH)
    median = torch.tensor(median_schedule_step(schedule, position, x, target, STEPS, group))
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    pairs = [[r, r + 1] for r in range(0, world - 1, 2)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    position = next(p for p in pairs if rank in p).index(rank)
    alone_module, x_alone = module(LAYERS), torch.randn(1, TOKENS, WIDTH, requires_grad=True)
    dist.barrier()
    samples = []
    for _ in range(8):
        begin = time.perf_counter()
        alone_module(x_alone).sum().backward()
        samples.append(time.perf_counter() - begin)
    alone = torch.tensor(sorted(samples)[len(samples) // 4])
    dist.all_reduce(alone, op=dist.ReduceOp.MAX)
    low, high = MICROBATCHES
    for repeat in range(args.repeats):
        for kind, ops in (("1f1b", 2), ("gpipe", 2), ("interleaved", 4)):
            t_low, t_high = step_time(kind, low, position, group, device), step_time(kind, high, position, group, device)
            slope = (t_high - t_low) / (high - low)
            if rank == 0:
                print(f"repeat {repeat + 1} {kind:12s} step {low} mb {t_low:.3f}s, {high} mb {t_high:.3f}s; per micro-batch "
                      f"{slope * 1e3:.1f} ms, stage alone {alone.item() * 1e3:.1f} ms -> "
                      f"{(slope - alone.item()) / ops * 1e3:.2f} ms per op", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
