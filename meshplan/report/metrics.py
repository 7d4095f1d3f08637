"""A run's metrics for the report: the launcher's JSON lines (:func:`load_metrics`) and their summary, the
rule the runtime's own end-of-run summary uses (meshplan/metrics_summary.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshplan.errors import InputError
from meshplan.metrics_summary import MetricsSummary as Measured
from meshplan.metrics_summary import summarize as summarize_metrics

__all__ = ["Measured", "load_metrics", "summarize_metrics"]


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read the launcher's metrics JSON lines (``step, loss, step_time_s, tokens_per_s, peak_memory_gib``
    and optional ``mfu``). Blank lines are skipped; anything else that is not a JSON object is an error."""
    p = Path(path)
    if not p.is_file():
        raise InputError("--metrics", f"no such file: {p}", "give the metrics .jsonl a launch wrote")
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError("--metrics", f"{p} line {n} is not JSON", "give one JSON object per line") from None
        if not isinstance(row, dict):
            raise InputError("--metrics", f"{p} line {n} is not a JSON object", "give one JSON object per line")
        rows.append(row)
    if not any("step_time_s" in r for r in rows):
        raise InputError("--metrics", f"{p} has no step_time_s values", "give the metrics .jsonl a launch wrote")
    return rows
