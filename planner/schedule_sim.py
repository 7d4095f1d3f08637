"""Pipeline schedules on ranks that share their compute: a dependency simulation with processor sharing.

The closed forms in ``pipeline.pipeline_makespan`` assume a device per rank: a rank idle in the fill or the
drain of a pipeline is simply idle. Where several ranks share one device (CPU processes on fewer cores than
ranks: the profile's ``measured['host']['busy_speedup']``, :func:`meshplan.planner.host.busy_speedup`),
a rank idle in a bubble hands its share of the cores to the ranks still busy, and they run faster. The
bubble then costs less than the closed form says, down to nothing when the busy ranks alone saturate the
cores (four ranks on two cores: two busy ranks already use both).

The simulation runs each pipeline rank's ops in the schedule's order (:func:`pipeline_ops`, the orders of
torch.distributed.pipelining), an op starting when its dependencies are done (a forward waits for the previous
stage's forward of that micro-batch, a backward for its own forward and the next stage's backward), and
every rank that is running an op progresses at ``speed(busy ranks on its host)``: processor sharing, the
operating system's time slicing averaged over an op. Op times are the all-ranks-busy times the profile
measured, so with every rank busy all the time (no bubble) it gives back ``num_mb * T``, and with a speed of
1 throughout it reproduces ``pipeline_makespan`` exactly (tests/test_measured_costs.py). Under vocabulary
parallelism the head pass of each micro-batch runs on every rank, on a helper thread beside the ops of all but
the last (``vocab_pass``), one more busy thread on its host.

:func:`schedule_timeline` is the simulation and returns every op with its start and end; the makespan
(:func:`shared_makespan`) is its last end, and ``meshplan report`` draws its ops as the pipeline schedule
(:func:`meshplan.planner.pipeline.pipeline_timeline` gives it the rank times and speeds the planner prices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class TimedOp:
    """One op of pipeline rank ``rank``: ``kind`` "F" or "B", its ``chunk`` on the rank (virtual stage =
    chunk * pp + rank), the ``micro`` batch it carries, and its ``start`` and ``end`` in seconds from the
    step's first forward."""

    rank: int
    kind: str
    chunk: int
    micro: int
    start: float
    end: float


def speed_one(busy: list[int]) -> list[float]:
    """Every pipeline rank at its own device's speed, whoever else is busy: the simulation is then the closed
    forms of ``pipeline.pipeline_makespan`` (tests/test_measured_costs.py)."""
    return [1.0] * len(busy)


def pipeline_ops(schedule: str, pp: int, rank: int, num_mb: int, virtual_stages: int = 1) -> list[tuple[str, int, int]]:
    """Pipeline rank ``rank``'s ops in order as ``("F" or "B", stage, micro-batch)``, stage = chunk * pp + rank.

    No pipeline (pp = 1): gradient accumulation, each micro-batch's forward then its backward.
    GPipe: all forwards, then all backwards. 1F1B and interleaved 1F1B (torch's ``Schedule1F1B`` /
    ``ScheduleInterleaved1F1B``, Megatron-LM's orders): micro-batches in rounds of
    ``per_round = m // max(1, m // pp)``; ``min((v - 1) * per_round + 2 * (pp - 1 - rank), m v)`` warm-up
    forwards for interleaved (also at v = 1, as the runtime runs it; ``pp - 1 - rank`` for 1F1B), then one
    forward and one backward alternating, then the remaining backwards; the k-th forward runs chunk
    ``(k // per_round) % v``, the k-th backward chunk ``v - 1 - (k // per_round) % v``
    (``memory.interleaved_1f1b_order`` reads its chunks from here). Interleaved orders are meant for
    ``m % pp == 0`` (what the search generates); with partial rounds the simulation may find them deadlocked."""
    m, v = num_mb, max(1, virtual_stages)
    if pp == 1:
        return [op for i in range(m) for op in (("F", rank, i), ("B", rank, i))]
    if schedule == "gpipe":
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    interleaved = schedule == "interleaved"     # the runtime runs it even at v = 1 (parallelize.build_schedule)
    v = v if interleaved else 1
    per_round = m // max(1, m // pp)
    total = m * v
    warmup = min(total, (v - 1) * per_round + 2 * (pp - 1 - rank) if interleaved else pp - 1 - rank)

    def micro_batch(k: int) -> int:
        return (k // (per_round * v)) * per_round + k % per_round

    def fwd(k: int) -> tuple[str, int, int]:
        return "F", ((k // per_round) % v) * pp + rank, micro_batch(k)

    def bwd(k: int) -> tuple[str, int, int]:
        return "B", (v - 1 - (k // per_round) % v) * pp + rank, micro_batch(k)

    ops = [fwd(k) for k in range(warmup)]
    for k in range(warmup, total):
        ops += [fwd(k), bwd(k - warmup)]
    return ops + [bwd(k) for k in range(total - warmup, total)]


def shared_makespan(schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int,
                    forward_share: float, speed: Callable[[list[int]], list[float]],
                    vocab_pass: float = 0.0) -> float:
    """Seconds from the first forward to the last backward when a thread of pipeline rank r progresses at
    ``speed(busy)[r]`` while ``busy`` (threads running, per pipeline rank) says who is running what: the last
    end of :func:`schedule_timeline`."""
    return _simulate(schedule, rank_time, num_mb, virtual_stages, forward_share, speed, vocab_pass, None)


def schedule_timeline(schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int,
                      forward_share: float, speed: Callable[[list[int]], list[float]] = speed_one,
                      vocab_pass: float = 0.0) -> list[TimedOp]:
    """Every op of the step, in the order each rank runs it, with its start and end (seconds): the simulation
    :func:`shared_makespan` prices.

    ``rank_time[r]``: rank r's forward + backward for one micro-batch over all its chunks, at the rate
    measured with every rank busy; a chunk's forward takes ``forward_share`` of it divided by the chunks, its
    backward the rest. Event-driven: between two completions the busy set, hence every speed, is constant.

    ``vocab_pass``: each rank's share of one micro-batch's head + loss pass under vocabulary parallelism
    (launcher/runtime/vocab_parallel.py), seconds at the all-busy rate. The last stage's forward ends with
    it: the last rank runs its share inside that op, every other rank on a helper thread beside its own ops
    (a second busy thread on the host), and the forward completes when every share is done -- the last stage
    waits for the slowest, which is what a pass costs on cores that are already shared."""
    timeline: list[TimedOp] = []
    _simulate(schedule, rank_time, num_mb, virtual_stages, forward_share, speed, vocab_pass, timeline)
    return timeline


def _simulate(schedule: str, rank_time: list[float], num_mb: int, virtual_stages: int, forward_share: float,
              speed: Callable[[list[int]], list[float]], vocab_pass: float,
              timeline: list[TimedOp] | None) -> float:
    """The simulation of :func:`schedule_timeline`; returns the makespan and appends each finished op to
    ``timeline`` when one is given."""
    p = len(rank_time)
    v = max(1, virtual_stages) if schedule == "interleaved" else 1
    stages = p * v
    last = p - 1                                # the last stage, (p v - 1), is on pipeline rank p - 1
    ops = [pipeline_ops(schedule, p, r, num_mb, v) for r in range(p)]
    work = {"F": forward_share / v, "B": (1.0 - forward_share) / v}
    done: set[tuple[str, int, int]] = set()
    nxt = [0] * p
    left: list[float | None] = [None] * p     # work left of the op rank r's main thread runs (None: waiting)
    began = [0.0] * p                         # when the op rank r's main thread runs started
    passing: int | None = None                # the micro-batch whose head pass the last rank is in
    helper: list[list[float]] = [[] for _ in range(p)]   # pass shares queued on each rank's helper thread
    clock = 0.0

    def complete(r: int, op: tuple[str, int, int]) -> None:
        done.add(op)
        nxt[r] += 1
        if timeline is not None:
            timeline.append(TimedOp(r, op[0], op[1] // p, op[2], began[r], clock))

    while True:
        for r in range(p):
            if left[r] is None and nxt[r] < len(ops[r]) and not (r == last and passing is not None):
                kind, stage, mb = ops[r][nxt[r]]
                if kind == "F":
                    ready = stage == 0 or ("F", stage - 1, mb) in done
                else:
                    ready = ("F", stage, mb) in done and (stage == stages - 1 or ("B", stage + 1, mb) in done)
                if ready:
                    left[r] = rank_time[r] * work[kind]
                    began[r] = clock
        if passing is not None and left[last] is None and not any(helper[r] for r in range(p)):
            complete(last, ops[last][nxt[last]])  # every share of the pass is in: the last forward completes
            passing = None
            continue
        busy = [(x is not None) + bool(helper[r]) for r, x in enumerate(left)]
        if not any(busy):
            if all(nxt[r] == len(ops[r]) for r in range(p)):
                return clock
            raise RuntimeError(f"{schedule} schedule deadlocked in the simulation (p={p}, m={num_mb}, v={v})")
        rates = speed(busy)
        finish = {("main", r): left[r] / rates[r] for r in range(p) if left[r] is not None}
        finish.update({("helper", r): helper[r][0] / rates[r] for r in range(p) if helper[r]})
        step = min(finish.values())
        clock += step
        for (thread, r), t in finish.items():
            ends = t <= step * (1 + 1e-9)       # this job (and any ending at the same instant) completes
            if thread == "helper":
                if ends:
                    helper[r].pop(0)
                else:
                    helper[r][0] -= step * rates[r]
                continue
            if not ends:
                left[r] -= step * rates[r]
                continue
            left[r] = None
            op = ops[r][nxt[r]]
            if vocab_pass > 0 and r == last and op[0] == "F" and op[1] == stages - 1 and passing is None:
                passing = op[2]                 # the forward's compute is done; its head pass starts everywhere
                left[r] = vocab_pass
                for other in range(p - 1):
                    helper[other].append(vocab_pass)
            elif r == last and passing is not None:
                pass                            # the last rank's own share is done; it waits for the others
            else:
                complete(r, op)
