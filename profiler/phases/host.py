"""The host phases, on CPU ranks only (a GPU is one device per rank; each returns nothing there): sharing (how
much faster a rank computes while others idle), meeting (how far ranks computing side by side drift apart
between collectives) and pipeline ops (what one op of torch.distributed.pipelining's 1F1B costs beyond its
compute); and their sizes: a fixed time, taken out of the budget before the other phases' shares."""

from __future__ import annotations

from dataclasses import dataclass
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from meshplan.profiler.phases.links import OVERLAP_GEMM, collective_call, first_level_group
from meshplan.profiler.phases.timing import all_ranks_time, slowest
from meshplan.profiler.progress import Progress

SHARING_WINDOW_S = 0.25   # per round: ~250 GEMMs of OVERLAP_GEMM["cpu"], many scheduler time slices (~ms)
SHARING_ROUNDS = 5   # each a window per busy count, side by side (sharing_phase)


def host_phases_seconds(device, nproc: int, sizes: "HostPhaseSizes | None" = None) -> float:
    """What the sharing and meeting phases take (CPU ranks; nothing on GPUs), kept out of the link sweep's
    share of the budget: the sharing windows, the meeting rounds, a fifth more for barriers and the timing of
    the GEMM and the all-reduce alone, and the pipeline phase's steps."""
    if device.type == "cuda":
        return 0.0
    sizes = sizes or FULL_HOST_PHASES
    sharing = nproc * sizes.sharing_rounds * sizes.sharing_window_s
    meeting = sizes.meeting_runs * sizes.meeting_run_s
    return 1.2 * (sharing + meeting) + 1.0 + sizes.pipeline_reserve_s


def sharing_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: in each of SHARING_ROUNDS rounds, for each k = 1 .. ranks per host, the first k local ranks
    of every host run square GEMMs for SHARING_WINDOW_S while the others sleep; a window's rate is the busy
    ranks' mean GEMMs per second. Every count is measured in every round, next to each other, so a round's
    ratio rate(k) / rate(all busy) is taken within a second and the machine's own drift (a shared machine's
    speed moves by several percent from one second to the next) cancels from it; ``busy_speedup`` (in
    ``cluster_file.fit_sharing``) is the median of the rounds' ratios: about ranks / k (up to one core per
    rank) where the ranks share fewer cores. Nothing on GPUs (a device per rank; the planner then assumes a
    speed of 1 whatever the others do)."""
    if device.type == "cuda":
        return {}
    nproc = int(cfg["nproc_per_node"])
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % nproc))
    side = OVERLAP_GEMM["cpu"]
    a = torch.randn(side, side)
    c = torch.empty_like(a)
    torch.mm(a, a, out=c)
    sizes = host_phase_sizes(cfg)
    rounds: dict[int, list[float]] = {k: [] for k in range(1, nproc + 1)}
    for round_ in range(sizes.sharing_rounds):
        for k in range(1, nproc + 1):
            dist.barrier()
            rate = 0.0
            if local < k:
                calls, begin = 0, time.perf_counter()
                while time.perf_counter() - begin < sizes.sharing_window_s:
                    torch.mm(a, a, out=c)
                    calls += 1
                rate = calls / (time.perf_counter() - begin)
            else:
                time.sleep(sizes.sharing_window_s)
            rates = [torch.zeros(1) for _ in range(dist.get_world_size())]
            dist.all_gather(rates, torch.tensor([rate]))
            busy = [float(x) for x in rates if float(x) > 0]
            rounds[k].append(sum(busy) / len(busy))
        if progress:
            progress.update(round_ + 1, sizes.sharing_rounds, f"round {round_ + 1}: 1 to {nproc} ranks busy")
    rows = [{"busy": k, "gemms_per_s": sorted(r)[len(r) // 2], "rounds": r} for k, r in rounds.items()]
    return {"gemm_side": side, "window_s": sizes.sharing_window_s, "samples": rows}


MEETING_SEGMENTS_S = (0.01, 0.04, 0.16, 0.5, 1.0, 2.0)   # computing between collectives: a layer's pass .. a step
MEETING_RUN_S = 2.2           # one run: every rank computes this long without meeting (past the longest segment)
MEETING_RUNS = 6              # runs, each from a barrier; the figure is the median of the runs
MEETING_BYTES = 64 * 1024     # the lined-up all-reduce timed for reference: the latency side, not bandwidth


def last_after_mean(arrivals: torch.Tensor) -> torch.Tensor:
    """Per meeting (columns), the last rank's arrival after the ranks' mean arrival (rows: ranks): what the
    mean rank waits there, and what the meeting adds to the step, which ends with the last rank's path."""
    return arrivals.max(0).values - arrivals.mean(0)


def drift_windows(marks: torch.Tensor, gemms: int) -> torch.Tensor:
    """Per window of ``gemms`` GEMMs (disjoint, from the run's start), the last rank's time for it after the
    ranks' mean time (``last_after_mean`` of the windows' durations): what a collective at the window's end
    would cost beyond its lined-up time had the ranks left one at its start together. ``marks``: [rank, GEMMs
    done + 1], each rank's ``perf_counter`` at its start and after every GEMM."""
    ends = torch.arange(gemms, marks.shape[1], gemms)
    if len(ends) == 0:
        return torch.empty(0, dtype=marks.dtype)
    durations = marks[:, ends] - marks[:, ends - gemms]
    return last_after_mean(durations)


def meeting_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: how far the first level's ranks (inside a node) drift apart while they compute, as a
    function of how long they compute between two collectives. In each of MEETING_RUNS runs every rank
    leaves a barrier and runs square GEMMs for MEETING_RUN_S, noting ``time.perf_counter`` (one clock per
    host) after each; the runs' marks are gathered. For each segment of MEETING_SEGMENTS_S the run is cut
    into disjoint windows of that many GEMMs' time and each window's penalty is the last rank's duration after
    the mean duration (``drift_windows``): the wait a collective at the window's end costs the mean rank.
    ``penalty_s`` per segment is the median over runs of a run's mean window; ``segment_s`` the windows'
    mean duration. On shared cores the operating system time-slices the ranks and they drift apart; on GPUs
    the ranks are not time-sliced: skipped.

    One run gives every segment length at once, the step-long ones included, so the planner reads a step's
    drift off the measurement instead of extrapolating it. Raw files without ``timing: drift`` hold one
    sample per segment and are fitted as a line (``cluster_file.fit_meeting``)."""
    if device.type == "cuda":
        return {}
    first = first_level_group(cfg["nproc_per_node"])
    if first is None:
        return {}
    level, group, members = first
    side = OVERLAP_GEMM["cpu"]
    a = torch.randn(side, side)
    c = torch.empty_like(a)
    call, nbytes = collective_call("all_reduce", MEETING_BYTES, len(members), group, device)
    collective_s = all_ranks_time(call, device, cfg["reps"], agree_count=True)
    one_gemm = all_ranks_time(lambda: torch.mm(a, a, out=c), device, cfg["reps"])
    sizes = host_phase_sizes(cfg)
    gemms = int(slowest([float(math.ceil(sizes.meeting_run_s / one_gemm))], device)[0])
    runs: list[list[tuple[float, float, int]]] = [[] for _ in MEETING_SEGMENTS_S]   # (penalty, segment, windows)
    for run in range(sizes.meeting_runs):
        marks = [0.0] * (gemms + 1)
        dist.barrier()
        marks[0] = time.perf_counter()
        for k in range(gemms):
            torch.mm(a, a, out=c)
            marks[k + 1] = time.perf_counter()
        mine = torch.tensor(marks, dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in members]
        dist.all_gather(every, mine, group=group)
        table = torch.stack(every)                                   # [rank, mark]
        per_gemm = (table[:, -1] - table[:, 0]).mean().item() / gemms
        for i, segment_s in enumerate(MEETING_SEGMENTS_S):
            width = min(gemms, max(1, round(segment_s / per_gemm)))
            penalties = drift_windows(table, width)
            runs[i].append((penalties.mean().item(), width * per_gemm, len(penalties)))
        if progress:
            progress.update(run + 1, sizes.meeting_runs, f"{level}: {len(members)} ranks computing "
                            f"{sizes.meeting_run_s:.1f} s without meeting, run {run + 1}")
    rows = []
    for i, samples in enumerate(runs):
        rows.append({"segment_s": statistics.median(s for _, s, _ in samples),
                     "penalty_s": statistics.median(p for p, _, _ in samples),
                     "rounds_s": [p for p, _, _ in samples], "windows": sum(n for _, _, n in samples),
                     "collective_s": collective_s})
    return {"level": level, "ranks": len(members), "bytes": nbytes, "gemm_side": side, "timing": "drift",
            "run_s": sizes.meeting_run_s, "samples": rows}


PIPELINE_MICROBATCHES = (4, 16)   # the op cost comes from the slope between the two: fixed costs cancel
PIPELINE_STEPS = 5
PIPELINE_TOKENS, PIPELINE_WIDTH, PIPELINE_LAYERS = 256, 256, 4   # a stage op of a few ms on a CPU core
PIPELINE_RESERVE_S = 6.0           # 2 x 6 steps of up to 16 micro-batches, the module alone, building stages


@dataclass(frozen=True)
class HostPhaseSizes:
    """How long the host phases (sharing, meeting, pipeline; CPU ranks only) measure: rounds and windows."""

    sharing_rounds: int
    sharing_window_s: float
    meeting_runs: int
    meeting_run_s: float
    pipeline_steps: int
    pipeline_reserve_s: float


FULL_HOST_PHASES = HostPhaseSizes(SHARING_ROUNDS, SHARING_WINDOW_S, MEETING_RUNS, MEETING_RUN_S, PIPELINE_STEPS,
                                  PIPELINE_RESERVE_S)
# The quick profile (`meshplan plan --cluster localhost:N` on first use, about 30 s in all): two rounds of each
# and meeting runs of a second, which cover the steps of the small jobs a first plan on one machine runs.
QUICK_HOST_PHASES = HostPhaseSizes(2, 0.15, 2, 1.1, 3, 2.0)


def host_phase_sizes(cfg: dict) -> HostPhaseSizes:
    """The quick rounds for the quick profile and for a budget too short for the full ones
    (``quick_host``, profiler/cli.py: measure); the full rounds otherwise."""
    return QUICK_HOST_PHASES if cfg.get("quick") or cfg.get("quick_host") else FULL_HOST_PHASES


def median_schedule_step(schedule, position: int, x: torch.Tensor, target: torch.Tensor, steps: int, group) -> float:
    """This rank's median seconds per ``schedule.step`` of a two-rank pipeline over ``steps`` steps after one
    warm-up step (``position`` 0 feeds ``x``, 1 computes the loss against ``target``), the pair lined up by a
    barrier before each step."""
    samples = []
    for step in range(steps + 1):
        dist.barrier(group)
        begin = time.perf_counter()
        if position == 0:
            schedule.step(x)
        else:
            schedule.step(target=target, losses=[])
        if step:
            samples.append(time.perf_counter() - begin)
    return sorted(samples)[len(samples) // 2]


def pipeline_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: every host's ranks in pairs (0-1, 2-3, ...; all pairs at once, an odd one out idles), each
    pair a two-stage ``Schedule1F1B`` (torch.distributed.pipelining, what the runtime's pipelines run) whose
    stage is PIPELINE_LAYERS linears on [PIPELINE_TOKENS, PIPELINE_WIDTH], timed at both micro-batch counts of
    PIPELINE_MICROBATCHES (the slowest rank's median of PIPELINE_STEPS steps after a warm-up); and the same
    module's forward + backward alone, every rank at once. In 1F1B's steady state each micro-batch more adds
    one forward and one backward op on each stage, so ``op_overhead_s`` = (slope per micro-batch - forward +
    backward alone) / 2: what an op costs beyond its compute -- the schedule's bookkeeping, its send/recv,
    and the wait for the neighbour to be scheduled when ranks time-slice shared cores. GPUs: the host's
    bookkeeping runs ahead of the device's queue; not measured."""
    world, rank = dist.get_world_size(), dist.get_rank()
    nproc = int(cfg["nproc_per_node"])
    if device.type == "cuda" or nproc < 2:
        return {}
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    def module() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(PIPELINE_WIDTH, PIPELINE_WIDTH) for _ in range(PIPELINE_LAYERS)])

    alone_module = module()
    x_alone = torch.randn(1, PIPELINE_TOKENS, PIPELINE_WIDTH, requires_grad=True)

    def fwd_bwd() -> None:
        alone_module(x_alone).sum().backward()

    alone_s = all_ranks_time(fwd_bwd, device, cfg["reps"])
    pairs = [[node * nproc + i, node * nproc + i + 1] for node in range(world // nproc) for i in range(0, nproc - 1, 2)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    pair = next((p for p in pairs if rank in p), None)
    times = {}
    for i, m in enumerate(PIPELINE_MICROBATCHES):
        step_s = 0.0
        if pair is not None:
            position = pair.index(rank)
            stage = PipelineStage(module(), position, 2, device, group=group)
            schedule = Schedule1F1B(stage, m, loss_fn=lambda out, target: (out - target).pow(2).mean())
            x = torch.randn(m, PIPELINE_TOKENS, PIPELINE_WIDTH)
            target = torch.randn(m, PIPELINE_TOKENS, PIPELINE_WIDTH)
            step_s = median_schedule_step(schedule, position, x, target, host_phase_sizes(cfg).pipeline_steps,
                                          group)
        times[m] = slowest([step_s], device)[0]
        if progress:
            progress.update(i + 1, len(PIPELINE_MICROBATCHES), f"1F1B over pairs, {m} micro-batches")
    low, high = PIPELINE_MICROBATCHES
    per_microbatch = (times[high] - times[low]) / (high - low)
    return {"pairs": len(pairs), "tokens": PIPELINE_TOKENS, "width": PIPELINE_WIDTH, "layers": PIPELINE_LAYERS,
            "step_s": {str(m): t for m, t in times.items()}, "fwd_bwd_alone_s": alone_s,
            "per_microbatch_s": per_microbatch, "op_overhead_s": max(0.0, (per_microbatch - alone_s) / 2)}
