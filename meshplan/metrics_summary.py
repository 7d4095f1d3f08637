"""The summary of a run's metrics: one rule for the run's own end-of-run summary and for ``meshplan report``.

A run writes one JSON object per step (launcher/runtime/metrics.py): ``step``, ``loss``, ``step_time_s``,
``tokens_per_s``, and on GPU ``peak_memory_gib`` and ``mfu``. The summary is the median step time, tokens/s
and MFU and the largest peak memory over the steady steps: the steps with a step time after the first, which
pays for warm-up and compilation (with a single step, that step). Values that are missing, not numbers or not
finite are skipped. Pure Python: the runtime, the report and ``meshplan validate`` read the same figures.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping

# Steps left out at the start of a run as warm-up, when there are more steps than this.
WARMUP_STEPS = 1


def number(row: Mapping[str, Any], key: str) -> float | None:
    """``row[key]`` as a float when it is a finite number (not a bool), else None."""
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class MetricsSummary:
    """What a run measured. ``steps``: the steady steps the medians are over; ``excluded``: the warm-up steps
    left out before them; ``series`` and ``memory_series``: ``(step, step_time_s)`` and ``(step,
    peak_memory_gib)`` for every step that has one, warm-up included (the step's index where it has no
    ``step``)."""

    steps: int
    excluded: int
    step_time_s: float | None
    tokens_per_s: float | None
    peak_memory_gib: float | None
    mfu: float | None
    final_loss: float | None
    series: list[tuple[float, float]]
    memory_series: list[tuple[float, float]]


def summarize(rows: list[Mapping[str, Any]]) -> MetricsSummary:
    """Medians of step time, tokens/s and MFU and the maximum peak memory over the steady steps (the timed
    steps after the first :data:`WARMUP_STEPS`, or every timed step when there are no more than that); the
    final loss is the last one recorded."""
    timed = [r for r in rows if number(r, "step_time_s") is not None]
    excluded = WARMUP_STEPS if len(timed) > WARMUP_STEPS else 0
    steady = timed[excluded:]

    def values(key: str) -> list[float]:
        return [v for v in (number(r, key) for r in steady) if v is not None]

    def median(key: str) -> float | None:
        found = values(key)
        return statistics.median(found) if found else None

    peaks = values("peak_memory_gib")
    losses = [v for v in (number(r, "loss") for r in rows) if v is not None]

    def step_of(i: int, r: Mapping[str, Any]) -> float:
        step = number(r, "step")
        return step if step is not None else i

    return MetricsSummary(
        steps=len(steady), excluded=excluded, step_time_s=median("step_time_s"),
        tokens_per_s=median("tokens_per_s"), peak_memory_gib=max(peaks) if peaks else None, mfu=median("mfu"),
        final_loss=losses[-1] if losses else None,
        series=[(step_of(i, r), number(r, "step_time_s")) for i, r in enumerate(timed)],
        memory_series=[(step_of(i, r), number(r, "peak_memory_gib")) for i, r in enumerate(rows)
                       if number(r, "peak_memory_gib") is not None])
