"""Fitting measured samples into the figures the planner reads (pure Python): the one home of every fit, used
by the profiler (``profiler/cluster_file.py`` writes the cluster file with them), the planner (the core count of
a host whose ranks share cores) and ``meshplan validate`` (the calibration).

* :func:`fit_alpha_beta`: a collective's time ``t = alpha * steps + volume / busbw`` by least squares on
  relative error, where ``steps`` (:func:`latency_steps`) and ``volume`` (:func:`volume_factor`) are the
  alpha-beta law's factors the planner prices collectives with (``planner/comm.py``), so the fitted ``busbw`` and
  ``alpha`` plug straight into :class:`meshplan.spec.LinkSpec`.
* :func:`rate_table`: achieved rate against operation size, sorted and merged, for the planner to interpolate
  (``planner/compute.py: interpolate_rate``).
* :func:`fit_memory_rate`: the memory-bound rate that explains what the block time leaves after its GEMMs and
  attention (least squares through the origin).
* :func:`fit_micro_batch_line`: a block's time against its micro-batch, ``fixed + per_sequence * mb``, by least
  squares on relative error.
* :func:`fit_shared_cores`: the core count whose processor-sharing law (:func:`sharing_speed`) fits a measured
  ``busy_speedup`` table.
* :func:`fit_two_scales`: the calibration of predicted compute and communication against measured steps.
* :func:`spearman`: Spearman's rank correlation with average ranks for ties.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


def volume_factor(collective: str, ranks: int) -> float:
    """Bytes each rank moves per byte of the message, nccl-tests PERFORMANCE.md (busbw = algbw * factor):
    all-reduce 2(n-1)/n; all-gather, reduce-scatter and all-to-all (n-1)/n; point-to-point 1."""
    if collective == "p2p":
        return 1.0
    if ranks <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2.0 * (ranks - 1) / ranks
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (ranks - 1) / ranks
    raise ValueError(f"unknown collective {collective!r}")


def latency_steps(collective: str, ranks: int) -> float:
    """Latency terms the planner charges: one for p2p, ``ceil(log2 n)`` for a collective (planner/comm.py)."""
    if collective == "p2p":
        return 1.0
    return float(math.ceil(math.log2(ranks))) if ranks > 1 else 0.0


@dataclass(frozen=True)
class LinkFit:
    """An alpha-beta fit: ``busbw`` in bytes/s (nccl-tests convention), ``alpha`` in seconds per latency
    step, the number of samples and the median relative error of the fit on them."""

    busbw: float
    alpha: float
    samples: int
    median_rel_error: float

    def predict(self, collective: str, ranks: int, nbytes: float) -> float:
        return self.alpha * latency_steps(collective, ranks) + volume_factor(collective, ranks) * nbytes / self.busbw

    def to_dict(self) -> dict:
        return {"bandwidth_gbps": self.busbw / 1e9, "latency_us": self.alpha * 1e6, "samples": self.samples,
                "median_rel_error": self.median_rel_error}


def relative_least_squares(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """``(a, b)`` minimising ``sum(((a * x1 + b * x2 - t) / t) ** 2)`` over ``(x1, x2, t)`` rows (relative
    error: weights ``1 / t**2``), with ``a >= 0``: a negative ``a`` (a fixed cost hidden in noise) is clamped
    to 0 and ``b`` refitted alone; ``b`` is kept above 0."""
    s11 = sum(x1 * x1 / t / t for x1, _, t in rows)
    s12 = sum(x1 * x2 / t / t for x1, x2, t in rows)
    s22 = sum(x2 * x2 / t / t for _, x2, t in rows)
    r1 = sum(x1 / t for x1, _, t in rows)
    r2 = sum(x2 / t for _, x2, t in rows)
    det = s11 * s22 - s12 * s12
    a, b = 0.0, 0.0
    if det > 0 and len(rows) >= 2:
        a = (r1 * s22 - r2 * s12) / det
        b = (s11 * r2 - s12 * r1) / det
    if a < 0 or b <= 0 or det <= 0:
        a = max(0.0, a) if b > 0 else 0.0
        b = max(1e-30, (r2 - a * s12) / s22) if s22 > 0 else 1e-30
    return a, b


def fit_alpha_beta(samples: Iterable[tuple[str, int, float, float]]) -> LinkFit:
    """Fit ``t = alpha * steps(c, n) + factor(c, n) * S / busbw`` to ``(collective, ranks, bytes, seconds)``
    samples, minimising the sum of squared *relative* errors (weights 1/t^2), so 4 KiB and 64 MiB messages
    count alike. A negative alpha (latency hidden in noise) is clamped to 0 and busbw refitted alone."""
    rows = [(latency_steps(c, n), volume_factor(c, n) * s, t) for c, n, s, t in samples if t > 0 and s > 0]
    if not rows:
        raise ValueError("no samples to fit")
    alpha, inv_bw = relative_least_squares(rows)
    fit = LinkFit(busbw=1.0 / inv_bw, alpha=alpha, samples=len(rows), median_rel_error=0.0)
    errors = [abs(alpha * x1 + x2 * inv_bw - t) / t for x1, x2, t in rows]
    return LinkFit(fit.busbw, fit.alpha, len(rows), statistics.median(errors))


def rate_table(points: Iterable[tuple[float, float]]) -> list[list[float]]:
    """``[[size, rate], ...]`` sorted by size; points of the same size are merged by their median rate."""
    by_size: dict[float, list[float]] = {}
    for size, rate in points:
        if size > 0 and rate > 0:
            by_size.setdefault(float(size), []).append(float(rate))
    return [[size, statistics.median(rates)] for size, rates in sorted(by_size.items())]


def fit_memory_rate(residual_seconds: Sequence[float], bytes_moved: Sequence[float]) -> float | None:
    """Bytes/s that best explains ``residual = bytes / rate`` (least squares through the origin on
    ``1/rate``); ``None`` when the residuals are not positive on balance (the GEMMs and attention already
    explain the block time, within noise)."""
    num = sum(b * r for b, r in zip(bytes_moved, residual_seconds))
    den = sum(b * b for b in bytes_moved)
    if num <= 0 or den <= 0:
        return None
    return den / num


def fit_micro_batch_line(micro_batches: Sequence[float], seconds: Sequence[float]) -> tuple[float, float] | None:
    """``(fixed_s, per_sequence_s)`` of ``t = fixed + per_sequence * micro_batch`` through the points, by least
    squares on relative error (weights ``1 / t**2``: a 10% miss weighs alike at every micro-batch); a block's
    forward + backward is a per-call cost (op dispatch, kernel launches) plus work in proportion to its
    tokens. A negative ``fixed`` is noise, not a cost: the line is then refitted through the origin. ``None``
    with fewer than two distinct micro-batches or a non-positive time."""
    points = [(float(x), float(y)) for x, y in zip(micro_batches, seconds)]
    if len({x for x, _ in points}) < 2 or min(y for _, y in points) <= 0:
        return None
    fixed, per_sequence = relative_least_squares([(1.0, x, y) for x, y in points])
    return fixed, per_sequence


def ranks_with_ties(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the tie-averaged ranks (nan for < 2 points or
    a constant series)."""
    if len(a) != len(b) or len(a) < 2:
        return float("nan")
    ra, rb = ranks_with_ties(a), ranks_with_ties(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)


# Relative standard deviation of one plan's measured step time: two 14-step runs of a layout agree within about
# 3% on a shared 2-core CPU machine (benchmarks/validate_cpu.py); GPUs are steadier.
RUN_NOISE = 0.03
# A scale is fitted on its own only when the runs pin it down: its standard error below this share of it.
IDENTIFIED_WITHIN = 0.25


def fit_two_scales(compute: Sequence[float], comm: Sequence[float], other: Sequence[float],
                   measured: Sequence[float], noise: float = RUN_NOISE) -> tuple[float, float]:
    """Calibration of ``measured ~ a * compute + b * comm + other`` on relative error (weights 1/measured^2).
    ``compute`` and ``comm`` are the planner's predicted seconds per plan; returns ``(a, b)``. Falls back to
    one shared scale when the two are not separable: no communication, a singular or negative solution, or
    one the runs do not determine -- a scale whose standard error (``noise`` times the square root of its
    diagonal entry of the inverse normal matrix) exceeds IDENTIFIED_WITHIN of it. Eight layouts that all spend
    3% of their step communicating cannot tell a communication scale of 0.3 from 1.3."""
    rows = [(c, m, o, t) for c, m, o, t in zip(compute, comm, other, measured) if t > 0]
    if not rows:
        raise ValueError("no measured plans to calibrate on")
    s11 = sum(c * c / t / t for c, _, _, t in rows)
    s12 = sum(c * m / t / t for c, m, _, t in rows)
    s22 = sum(m * m / t / t for _, m, _, t in rows)
    r1 = sum(c * (t - o) / t / t for c, _, o, t in rows)
    r2 = sum(m * (t - o) / t / t for _, m, o, t in rows)
    det = s11 * s22 - s12 * s12
    if det > 1e-12 * max(s11 * s22, 1e-300) and len(rows) >= 3:
        a = (r1 * s22 - r2 * s12) / det
        b = (s11 * r2 - s12 * r1) / det
        error_a, error_b = noise * math.sqrt(s22 / det), noise * math.sqrt(s11 / det)
        if a > 0 and b > 0 and error_a <= IDENTIFIED_WITHIN * a and error_b <= IDENTIFIED_WITHIN * b:
            return a, b
    # One scale for all predicted time but the fixed part.
    den = sum((c + m) ** 2 / t / t for c, m, _, t in rows)
    num = sum((c + m) * (t - o) / t / t for c, m, o, t in rows)
    scale = num / den if den > 0 and num > 0 else 1.0
    return scale, scale


def sharing_speed(ranks: int, cores: float, busy: float) -> float:
    """Processor sharing: ``ranks`` processes on ``cores`` cores, ``busy`` of them computing, each gets
    ``min(1, cores / busy)`` of a core; relative to all ``ranks`` busy that is ``ranks / max(busy, cores)``
    (``cores`` at most ``ranks``). The operating system's time slicing, averaged over an op (Kleinrock,
    *Queueing Systems* vol. 2, ch. 4: the processor-sharing discipline)."""
    return ranks / max(busy, min(cores, ranks))


@functools.lru_cache(maxsize=64)
def fit_shared_cores(table: tuple[tuple[int, float], ...]) -> float:
    """The core count ``C`` (between 1 and the host's ranks, to 0.01) whose :func:`sharing_speed` law fits a
    measured ``busy_speedup`` table best, by least squares on log speed. One parameter for four noisy points:
    profiles of a 2-core machine measure two busy ranks of four at x1.69-2.28 (the law: x2 for any ``C <= 2``);
    their fits, 1.36-2.00 cores, move only the lone-rank entry (docs/profiler.md)."""
    ranks = max(busy for busy, _ in table)

    def misfit(cores: float) -> float:
        return sum((math.log(speed) - math.log(sharing_speed(ranks, cores, busy))) ** 2 for busy, speed in table)

    candidates = [c / 100 for c in range(100, 100 * ranks + 1)]
    return min(candidates, key=lambda c: (round(misfit(c), 12), -c))
