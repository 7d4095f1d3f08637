"""The collective phases: the links sweep (each collective over message sizes, per level), the reduction (the
data-parallel collectives at the runtime's gradient-unit sizes over every data-parallel group shape), the overlap
(a collective beside GEMMs) and the pairs (point-to-point bandwidth between every two ranks); and the groups and
collective closures they share with the host phases."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from meshplan.profiler.fit import COLLECTIVES
from meshplan.profiler.phases.timing import (SAMPLE_S, agree, all_ranks_time, lower_quartile, slowest,
                                             time_reps)
from meshplan.profiler.progress import Progress

def level_groups(world: int, nproc: int) -> dict[str, list[list[int]]]:
    """Rank lists per level: ``intra_node`` one group per node, ``inter_node`` one group per local rank
    (the same local rank on every node); a level with groups of one rank is left out."""
    nodes = world // nproc
    levels = {}
    if nproc > 1:
        levels["intra_node"] = [list(range(n * nproc, (n + 1) * nproc)) for n in range(nodes)]
    if nodes > 1:
        levels["inter_node"] = [[n * nproc + local for n in range(nodes)] for local in range(nproc)]
    return levels


def first_level_group(nproc: int):
    """``(level, group, members)`` of this rank on the first level of :func:`level_groups` (inside a node when
    there are several ranks per node), every rank creating the level's groups; ``None`` with one rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    levels = level_groups(world, nproc)
    if not levels:
        return None
    level = next(iter(levels))
    group, _ = dist.new_subgroups_by_enumeration(levels[level])
    return level, group, next(g for g in levels[level] if rank in g)


def collective_call(name: str, nbytes: int, n: int, group, device, element: int = 4):
    """A closure running one collective whose message is ``nbytes`` in nccl-tests' convention (all-gather:
    the gathered size; reduce-scatter: the input size; all-to-all: one rank's data); ``closure(async_op=True)``
    returns its work handle."""
    numel = max(n, nbytes // element // n * n)
    if name == "all_reduce":
        x = torch.ones(numel, device=device)
        return lambda async_op=False: dist.all_reduce(x, group=group, async_op=async_op), numel * element
    if name == "all_gather":
        x, y = torch.ones(numel // n, device=device), torch.empty(numel, device=device)
        return (lambda async_op=False: dist.all_gather_into_tensor(y, x, group=group, async_op=async_op),
                numel * element)
    if name == "reduce_scatter":
        x, y = torch.ones(numel, device=device), torch.empty(numel // n, device=device)
        return (lambda async_op=False: dist.reduce_scatter_tensor(y, x, group=group, async_op=async_op),
                numel * element)
    if name == "all_to_all":
        x, y = torch.ones(numel, device=device), torch.empty(numel, device=device)
        return (lambda async_op=False: dist.all_to_all_single(y, x, group=group, async_op=async_op),
                numel * element)
    raise ValueError(name)


def exchange_call(me: int, peer: int, nbytes: int, device, element: int = 4):
    """Both ranks of a pair send ``nbytes`` to each other at once (isend + irecv)."""
    x = torch.ones(max(1, nbytes // element), device=device)
    y = torch.empty_like(x)

    def run() -> None:
        ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]
        if me > peer:
            ops.reverse()
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return run, x.numel() * element


def pair_in_group(members: list[int], rank: int) -> int | None:
    """The p2p partner of ``rank`` in its group: members 0-1, 2-3, ... (the odd one out idles)."""
    i = members.index(rank)
    j = i + 1 if i % 2 == 0 else i - 1
    return members[j] if j < len(members) else None


def sweep_order(sizes: list[int]) -> list[int]:
    """The order the links phase measures ``sizes`` (ascending) in: the smallest, the largest, then the sizes
    between, ascending. The first two always run, and an alpha-beta fit needs both ends: the smallest message
    shows the latency, the largest the bandwidth. Two small messages alone are both latency-bound (about 1 ms
    for 4 and 16 KiB over gloo), and the bandwidth fitted to them is the noise in their difference (0.01-0.03
    GB/s on a link whose 1 MiB pairs run at 0.7-1.1 GB/s, tests/test_profile_netns.py's 30 s budget)."""
    return sizes[:1] + sizes[-1:] + sizes[1:-1] if len(sizes) > 2 else list(sizes)


def links_phase(cfg: dict, device, deadline: float, progress: Progress | None) -> dict:
    """Sweep message sizes per level in :func:`sweep_order` (the smallest and the largest always) while rank 0
    expects the next size to fit before ``deadline``, splitting the time evenly between levels; a size between
    the two ends is expected to take the time interpolated linearly in bytes between theirs (alpha-beta)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    levels = level_groups(world, cfg["nproc_per_node"])
    subgroups = {}
    for level, groups in levels.items():   # every rank creates every group, in the same order
        mine, _ = dist.new_subgroups_by_enumeration(groups)
        members = next(g for g in groups if rank in g)
        subgroups[level] = (mine, members)
    results: dict[str, list[dict]] = {level: [] for level in levels}
    skipped: dict[str, list[int]] = {level: [] for level in levels}
    reps = cfg["reps"]
    start = time.time()
    for li, (level, (group, members)) in enumerate(subgroups.items()):
        level_deadline = start + (deadline - start) * (li + 1) / len(subgroups)
        n = len(members)
        sizes = sweep_order(cfg["sizes"])
        ends: list[tuple[int, float]] = []   # (bytes, seconds for all collectives) of the two ends
        for si, size in enumerate(sizes):
            expected = 0.0
            if len(ends) == 2:
                (s0, t0), (s1, t1) = ends
                expected = t0 + (t1 - t0) * (size - s0) / (s1 - s0)
            if not agree(si < 2 or time.time() + expected < level_deadline):
                skipped[level] = sorted(sizes[si:])
                break
            begin = time.time()
            for name in COLLECTIVES:
                if name == "p2p":
                    peer = pair_in_group(members, rank)
                    if n < 2:
                        continue
                    fn, nbytes = exchange_call(rank, peer, size, device) if peer is not None else (lambda: None, size)
                    ranks = 2
                else:
                    fn, nbytes = collective_call(name, size, n, group, device)
                    ranks = n
                times = slowest(time_reps(fn, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S,
                                          agree_count=True), device)
                results[level].append({"collective": name, "ranks": ranks, "bytes": nbytes,
                                       "seconds": lower_quartile(times), "reps": times})
            if si < 2:
                ends.append((size, time.time() - begin))
            if progress:
                progress.update(si + 1, len(sizes), f"{level} {size // 1024} KiB")
    return {"levels": {lvl: {"groups": levels[lvl], "samples": results[lvl], "skipped_bytes": skipped[lvl]}
                       for lvl in levels}}


# The collectives a data-parallel step makes (planner/evaluate.py's data-parallel term): gradients all-reduced
# (ZeRO 0) or reduce-scattered (ZeRO >= 1), weights all-gathered (ZeRO >= 1).
REDUCTION_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")
# Rounds over every (group shape, size, collective): a point's figure is the median of its rounds' lower
# quartiles, so one burst of another tenant moves one round, not the figure (one lower quartile of 5 samples
# can be several times another's on a shared machine).
REDUCTION_ROUNDS = 3
# Group shapes measured at most (smallest groups first): a world of 16 has 10, of 64 already 21.
MAX_REDUCTION_LAYOUTS = 12


def reduction_layouts(world: int) -> list[tuple[int, int]]:
    """``(size, stride)`` of every data-parallel group shape a plan of ``world`` ranks can have -- ``size``
    ranks ``stride`` apart, ``size * stride`` dividing the world (the stride is the product of the inner mesh
    dimensions' degrees, planner/comm.py: group_stride) -- smallest groups first, at most
    MAX_REDUCTION_LAYOUTS."""
    shapes = [(size, stride) for size in range(2, world + 1) if world % size == 0
              for stride in range(1, world // size + 1) if (world // size) % stride == 0]
    return shapes[:MAX_REDUCTION_LAYOUTS]


def layout_groups(world: int, size: int, stride: int) -> list[list[int]]:
    """The groups of a ``(size, stride)`` shape: one per base rank whose coordinate along the dimension is 0,
    ``[base, base + stride, ...]`` -- as planner/comm.py places a mesh dimension's groups; every rank in one."""
    return [[base + i * stride for i in range(size)] for base in range(world) if (base // stride) % size == 0]


def reduction_phase(cfg: dict, device, deadline: float, progress: Progress | None) -> dict:
    """For each data-parallel group shape (:func:`reduction_layouts`), every group of that shape at once --
    the contention of a real step, where each replica set reduces its own gradients -- runs each of
    REDUCTION_COLLECTIVES at each of ``cfg['reduction_sizes']`` (the gradient bytes of one of the runtime's
    communication units, bracketed: ``cli.reduction_sizes``), ``reps`` samples of back-to-back calls, the
    slowest rank's lower quartile kept; all of it in up to REDUCTION_ROUNDS rounds. The planner prices a
    plan's data-parallel traffic from these (planner/comm.py: measured_collective_time) instead of reading
    it off the alpha-beta line, which is fitted over every collective and message size and can miss the
    sizes of a data-parallel step by tens of percent on gloo. A point is started
    only when rank 0 expects it to end before ``deadline`` (its own time in an earlier round, or the last
    point's scaled by the bytes in the first); the first shape's all-reduce at the smallest and the largest
    size runs once whatever the budget."""
    world = dist.get_world_size()
    sizes = sorted(int(s) for s in cfg.get("reduction_sizes") or ())
    if world < 2 or not sizes:
        return {}
    shapes = reduction_layouts(world)
    groups = {}
    for size, stride in shapes:   # every rank creates every group, in the same order
        mine, _ = dist.new_subgroups_by_enumeration(layout_groups(world, size, stride))
        groups[size, stride] = mine
    points = [(shape, nbytes, name) for shape in shapes for nbytes in sizes for name in REDUCTION_COLLECTIVES]
    took: dict[int, float] = {}    # point index -> wall seconds it took in the first round it ran
    rounds: dict[int, list[float]] = {i: [] for i in range(len(points))}
    reps: dict[int, list[list[float]]] = {i: [] for i in range(len(points))}
    sent: dict[int, int] = {}      # point index -> bytes of the message as built (a multiple of the group)
    last = (0.0, 1)                # (seconds, bytes) of the last point run, for the first round's estimates
    total = REDUCTION_ROUNDS * len(points)
    # whatever the budget, the first shape's all-reduce at both ends once: a slope to price from
    always = {(shapes[0], sizes[0], "all_reduce"), (shapes[0], sizes[-1], "all_reduce")}
    for round_ in range(REDUCTION_ROUNDS):
        for i, ((size, stride), nbytes, name) in enumerate(points):
            expected = took.get(i, last[0] * max(1.0, nbytes / last[1]))
            first_time = round_ == 0 and ((size, stride), nbytes, name) in always
            if not agree(first_time or time.time() + expected < deadline):
                continue
            begin = time.time()
            call, actual = collective_call(name, nbytes, size, groups[size, stride], device)
            times = slowest(time_reps(call, device, cfg["reps"], barrier=dist.barrier, sample_seconds=SAMPLE_S,
                                      agree_count=True), device)
            rounds[i].append(lower_quartile(times))
            reps[i].append(times)
            sent[i] = actual
            took.setdefault(i, time.time() - begin)
            last = (time.time() - begin, nbytes)
            if progress:
                progress.update(round_ * len(points) + i + 1, total,
                                f"round {round_ + 1}: {name} {size} ranks x{stride} {nbytes / 2**20:.2g} MiB")
    samples = []
    for i, ((size, stride), nbytes, name) in enumerate(points):
        if rounds[i]:
            samples.append({"collective": name, "ranks": size, "stride": stride, "bytes": sent[i],
                            "rounds_s": rounds[i], "reps": reps[i]})
    return {"world": world, "rounds": REDUCTION_ROUNDS, "samples": samples}


OVERLAP_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
OVERLAP_GEMM = {"cpu": 256, "cuda": 4096}   # square GEMM side: ~1 ms on a CPU core, ~0.1-0.2 ms on an H100
OVERLAP_ROUNDS = 3


def overlap_phase(cfg: dict, device, dtype, progress: Progress | None) -> dict:
    """For each of OVERLAP_COLLECTIVES at one message size on the first level's groups: the collective alone
    (c), k square GEMMs alone with k chosen so they last about as long (w), and both at once (b: the
    collective issued with ``async_op=True``, the GEMMs run, then ``wait()``), all ranks at once, each the
    slowest rank's lower-quartile sample, in OVERLAP_ROUNDS rounds. ``exposed_fraction`` = (b - w) / c: 0
    when the collective hides under the GEMMs (NCCL on its own stream), 1 when they take turns, more when
    they slow each other down (gloo's threads and the GEMMs sharing the same cores). The cluster file keeps
    the median over rounds and collectives: one round's ratio of three noisy times moves from profile to
    profile, and it scales every data-parallel reduction of a CPU plan."""
    first = first_level_group(cfg["nproc_per_node"])
    if first is None:
        return {}
    level, group, members = first
    size = int(cfg["overlap_bytes"])
    side = OVERLAP_GEMM["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(side, side, device=device, dtype=dtype)
    c = torch.empty_like(a)

    def measure(fn) -> float:
        return all_ranks_time(fn, device, cfg["reps"], agree_count=True)

    one_gemm = measure(lambda: torch.mm(a, a, out=c))
    rows = []
    gemm_counts: dict[str, int] = {}
    for round_ in range(OVERLAP_ROUNDS):
        for i, name in enumerate(OVERLAP_COLLECTIVES):
            call, nbytes = collective_call(name, size, len(members), group, device)
            collective_s = measure(call)
            if name not in gemm_counts:   # the first round picks the GEMM count; later rounds keep it
                k = max(1, round(collective_s / one_gemm)) if one_gemm > 0 else 1
                gemm_counts[name] = int(slowest([float(k)], device)[0])
            k = gemm_counts[name]

            def gemms() -> None:
                for _ in range(k):
                    torch.mm(a, a, out=c)

            def both() -> None:
                work = call(async_op=True)
                gemms()
                work.wait()

            compute_s = measure(gemms)
            both_s = measure(both)
            rows.append({"collective": name, "round": round_, "bytes": nbytes, "ranks": len(members), "gemms": k,
                         "collective_s": collective_s, "compute_s": compute_s, "both_s": both_s,
                         "exposed_fraction": (both_s - compute_s) / collective_s if collective_s > 0 else 0.0})
            if progress:
                progress.update(round_ * len(OVERLAP_COLLECTIVES) + i + 1, OVERLAP_ROUNDS * len(OVERLAP_COLLECTIVES),
                                f"{level} {name}, round {round_ + 1}")
    return {"level": level, "gemm_side": side, "samples": rows}


def round_robin(world: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair once (the circle method; a bye when world is odd)."""
    players = list(range(world)) + ([None] if world % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[i], players[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(a, b) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def pairs_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """Per-pair bandwidth (bytes/s, one direction while both directions run) for every pair of ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = cfg["pair_bytes"]
    matrix = [[0.0] * world for _ in range(world)]
    rounds = round_robin(world)
    for ri, pairs in enumerate(rounds):
        peer = next((b if a == rank else a for a, b in pairs if rank in (a, b)), None)
        if peer is None:
            fn, nbytes = (lambda: None), size
        else:
            fn, nbytes = exchange_call(rank, peer, size, device)
        times = time_reps(fn, device, cfg["reps"], barrier=dist.barrier, sample_seconds=SAMPLE_S, agree_count=True)
        seconds = lower_quartile(times)
        on = device if dist.get_backend() == "nccl" else "cpu"   # nccl gathers device tensors only
        row = torch.zeros(world, dtype=torch.float64, device=on)
        if peer is not None:
            row[peer] = nbytes / seconds
        gathered = [torch.zeros(world, dtype=torch.float64, device=on) for _ in range(world)] if rank == 0 else None
        dist.gather(row, gathered, dst=0)
        if rank == 0:
            for i, r in enumerate(gathered):
                for j, bw in enumerate(r.tolist()):
                    if bw > 0:
                        matrix[i][j] = bw
        if progress:
            progress.update(ri + 1, len(rounds), "pairs")
    return {"bytes": size, "bandwidth_bytes_per_s": matrix}
