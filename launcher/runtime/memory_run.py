"""Measure a real training step's memory on every rank, the way ``meshplan check`` measures its fake one:

    python -m torch.distributed.run --nproc-per-node 4 -m meshplan.launcher.runtime.memory_run \\
        --plan plan.yaml --out memory/

Each rank builds the plan with ``train.build`` (real weights, real gloo/NCCL groups), runs one step of real
data through ``train_step`` under the same live-bytes tracker as ``check`` (``check.measure_trainer``), and
writes ``memory/rank<R>.json``: the tracker's figures, plus two measurements that do not rely on it --
the allocator's own events for one more forward per stage (``torch.profiler``'s ``[memory]`` events: bytes
allocated minus freed over the call, on CPU or CUDA), and on CUDA ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` over the step. ``check`` is right when its fake figures equal these.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from meshplan.launcher.check import LiveBytes, measure_trainer, stage_forwards
from meshplan.launcher.runtime import train as rt
from meshplan.launcher.runtime.data import Slice, make_source
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes
from meshplan.plan import Plan

# Between a stage's warm-up forward and its measured one: time for gloo's worker thread to let go of the last
# collective's tensors (check.measure_trainer); many scheduler quanta on a loaded CPU.
SETTLE_S = 0.2


def measure(plan_path: str, out: Path, seed: int = 0) -> dict:
    plan = Plan.load(plan_path)
    device, device_type = rt.init_distributed(plan)
    config = rt.RunConfig(plan_path=plan_path, seed=seed)
    trainer = rt.build(plan, config, device, device_type)
    coords = trainer.meshes.coords
    data = make_source(plan.model.vocab, seed, None, None)
    batch = data.batch(1, plan.train.global_batch, plan.train.seq_len + 1)
    inputs, targets = Slice.of_rank(plan, coords).take(batch)
    inputs, targets = inputs.to(device), targets.to(device)
    hidden_dtype = rt.hidden_dtype(plan, trainer.meshes, device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with LiveBytes() as tracker:
        measured, per_stage, totals = measure_trainer(trainer, tracker, inputs, targets, hidden_dtype,
                                                      settle=lambda: time.sleep(SETTLE_S))
    record = {"rank": dist.get_rank(), "coords": coords, "measured": measured,
              "activations_per_microbatch": {str(j): b for j, b in per_stage.items()},
              "forward_totals": {str(j): b for j, b in totals.items()}}
    if device_type == "cuda":
        record["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
        record["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
    # The allocator's view of one more forward per stage (independent of the tracker).
    allocator = {}
    for j, _, run in stage_forwards(trainer, inputs, targets, hidden_dtype):
        _, net, result = peak_tracked_bytes(run)
        del result
        allocator[str(j)] = net
    record["forward_totals_allocator"] = allocator
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshplan.launcher.runtime.memory_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    measure(args.plan, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
