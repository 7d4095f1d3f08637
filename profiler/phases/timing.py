"""Helpers every phase of the profiling job shares: the process group, keeping ranks in step (rank 0's
decision broadcast, the slowest rank's figures) and the timed samples every measurement is made of
(:func:`time_reps`: back-to-back calls for about ``SAMPLE_S`` a sample, the lower quartile kept)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

# One timed sample lasts about this long: several scheduler quanta (~4 ms at Linux's common 250 Hz tick),
# so every sample sees the same fair share of the cores.
SAMPLE_S = 0.025
# A call at least this long is its own sample in the quick profile (``time_reps(single_call_s=...)``): it spans
# some 250 scheduler quanta, forty samples' worth, so a second call would mostly repeat it. On a CPU one call of
# a 128k-vocabulary head takes seconds.
LONG_CALL_S = 1.0


def init(device_kind: str) -> torch.device:
    """The process group: nccl on GPUs, gloo on CPU processes."""
    if device_kind == "gpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agree(decision: bool) -> bool:
    """Rank 0's decision, on every rank."""
    flag = torch.tensor([1 if decision else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, 0)
    return bool(flag.item())


def slowest(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (the slowest rank sets the pace)."""
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def lower_quartile(times: list[float]) -> float:
    """The figure kept from repeated samples: the lower quartile. On a shared machine other tenants' bursts
    inflate the upper half of the samples; the lower quartile repeats from one profile to the next. All
    samples are kept raw."""
    ordered = sorted(times)
    return ordered[(len(ordered) - 1) // 4]


def calls_per_sample(trial_seconds: float, sample_seconds: float, max_calls: int = 1000) -> int:
    """Back-to-back calls in one timed sample so that it lasts about ``sample_seconds``."""
    if trial_seconds <= 0:
        return max_calls
    return int(min(max_calls, max(1, -(-sample_seconds // trial_seconds))))


def time_reps(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1,
              barrier: Callable[[], None] | None = None, sample_seconds: float = 0.0,
              agree_count: bool = False, single_call_s: float | None = None) -> list[float]:
    """Seconds per call of ``fn``, one figure per timed sample, ``reps`` samples after ``warmup`` untimed
    calls. Each sample runs ``fn`` back to back for about ``sample_seconds`` and divides, as nccl-tests and
    ``torch.utils.benchmark`` do: a sample much longer than a scheduler quantum sees the share of the
    machine a rank gets in a real step (all ranks busy at once), not a lucky idle core. ``barrier`` runs
    before each sample; ``agree_count``: every rank uses the slowest rank's trial to pick the number of
    calls, so collectives stay matched. ``single_call_s``: a trial at least this long (the slowest rank's with
    ``agree_count``) is the only sample, and ``reps`` are not run."""
    for _ in range(warmup):
        fn()
    sync(device)
    begin = time.perf_counter()
    fn()
    sync(device)
    trial = time.perf_counter() - begin
    if agree_count:
        trial = slowest([trial], device)[0]
    if single_call_s is not None and trial >= single_call_s:
        return [trial]
    calls = calls_per_sample(trial, sample_seconds)
    times = []
    for _ in range(reps):
        if barrier is not None:
            barrier()
        sync(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - begin) / calls)
    return times


class quiet_stderr:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) on ranks that draw no progress."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            os.dup2(self.saved, 2)
            os.close(self.saved)


def all_ranks_time(fn: Callable[[], Any], device, reps: int, agree_count: bool = False) -> float:
    """Seconds per call of ``fn`` run on every rank at once (a barrier before each sample): the slowest rank's
    lower-quartile sample (``time_reps``; ``agree_count`` for collectives, so every rank makes as many calls)."""
    times = time_reps(fn, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S, agree_count=agree_count)
    return lower_quartile(slowest(times, device))
