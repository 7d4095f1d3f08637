"""What the report reads off a plan, and how it writes numbers: the breakdowns it shows, the memory per
pipeline rank, the runners-up of the search, and the formats of seconds, percentages and table cells."""

from __future__ import annotations

import math
from typing import Any, Mapping

from meshplan.plan import Plan

MEMORY_KEYS = ("parameters", "gradients", "optimizer", "activations", "logits", "buffers", "margin")
TIME_KEYS = ("compute", "recompute", "tp_comm", "cp_comm", "pp_comm", "dp_comm", "vocab_comm", "bubble", "optimizer")
TIME_LABELS = {"compute": "compute", "recompute": "recompute", "tp_comm": "exposed TP comm",
               "cp_comm": "exposed CP comm", "pp_comm": "exposed PP comm (P2P)", "dp_comm": "exposed DP comm",
               "vocab_comm": "exposed vocab-parallel comm", "bubble": "pipeline bubble", "optimizer": "optimizer step"}
PICTURES = ("memory", "time", "schedule", "stages")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _num(x: float, digits: int = 3) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - 1 - int(math.log10(abs(x))), 0)}f}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if abs(s) < 1 else f"{s:.3f} s"


def _pct(new: float, old: float) -> str:
    if not old:
        return "n/a"
    return f"{(new - old) / old * 100:+.1f}%"



def _time_breakdown(plan: Plan) -> dict[str, float]:
    raw = dict(plan.predicted.time_breakdown_s) if plan.predicted else {}
    out = {k: float(raw.get(k, 0.0) or 0.0) for k in TIME_KEYS}
    out.update({k: float(v or 0.0) for k, v in raw.items() if k not in out and isinstance(v, (int, float))})
    return out


def _memory_breakdown(data: Mapping[str, Any] | None) -> dict[str, float]:
    data = dict(data or {})
    out = {k: float(data.get(k, 0.0) or 0.0) for k in MEMORY_KEYS}
    out.update({k: float(v or 0.0) for k, v in data.items() if k not in out and isinstance(v, (int, float))})
    return out


def reserved_memory(plan: Plan) -> tuple[float, float] | None:
    """(reserved, NCCL) GiB of the plan's prediction: what the worst rank's CUDA caching allocator reserves
    and NCCL's buffers beside it; None for a plan without a prediction or written before reserved existed."""
    pred = plan.predicted
    if pred is None or pred.reserved_memory_gib is None:
        return None
    return pred.reserved_memory_gib, pred.nccl_memory_gib or 0.0


def stage_memory(plan: Plan) -> list[tuple[str, dict[str, float] | None, float]]:
    """(label, breakdown or None, peak GiB) per pipeline rank; the worst rank's breakdown when the plan
    has no per-rank breakdowns."""
    per_rank = plan.search.get("stage_memory_gib") if isinstance(plan.search, Mapping) else None
    if isinstance(per_rank, list) and per_rank and all(isinstance(d, Mapping) for d in per_rank):
        return [(f"rank {r}" if plan.pp > 1 else "every rank", _memory_breakdown(d),
                 sum(_memory_breakdown(d).values())) for r, d in enumerate(per_rank)]
    worst = _memory_breakdown(plan.predicted.memory_breakdown_gib if plan.predicted else None)
    peak = plan.predicted.peak_memory_gib if plan.predicted else sum(worst.values())
    rows: list[tuple[str, dict[str, float] | None, float]] = [
        ("worst rank" if plan.pp > 1 else "every rank", worst, peak)]
    if plan.pp > 1:
        peaks: dict[int, float] = {}
        for j, s in enumerate(plan.stages):
            peaks[plan.pipeline_rank_of_stage(j)] = max(peaks.get(plan.pipeline_rank_of_stage(j), 0.0),
                                                       s.peak_memory_gib)
        if any(peaks.values()):
            rows += [(f"rank {r}", None, peaks[r]) for r in sorted(peaks)]
    return rows


def _fix_label(fix: Mapping[str, Any]) -> str:
    short = {"dp": "dp", "tp": "tp", "pp": "pp", "cp": "cp", "micro_batch": "mb", "virtual_stages": "v",
             "zero": "ZeRO-", "recompute": "rc ", "schedule": "", "cp_kind": "", "vocab_parallel": "vocab-par "}
    parts = []
    for k, v in fix.items():
        if k == "cp_kind" and fix.get("cp", 1) in (1, "1"):
            continue
        if k == "virtual_stages" and v in (1, "1"):
            continue
        if k == "vocab_parallel":
            if v:
                parts.append("vocab-par")
            continue
        if k == "schedule" and fix.get("pp", 1) in (1, "1"):
            continue
        parts.append(f"{short.get(k, k + '=')}{v}")
    return " ".join(parts)



def _alternatives(plan: Plan) -> list[dict[str, Any]]:
    """The runners-up as ``{"fix", "predicted"}``; predictions may also sit flat beside ``fix``. The entry that
    is the chosen plan itself is left out."""
    alts = plan.search.get("alternatives") if isinstance(plan.search, Mapping) else None
    if not isinstance(alts, list):
        return []
    mine = plan.fields_for_fix()
    out = []
    for a in alts:
        if not isinstance(a, Mapping) or not isinstance(a.get("fix"), Mapping):
            continue
        pred = dict(a["predicted"]) if isinstance(a.get("predicted"), Mapping) else {
            k: v for k, v in a.items() if k != "fix"}
        it = pred.get("iteration_s")
        if not pred.get("tokens_per_s") and isinstance(it, (int, float)) and it > 0:
            pred["tokens_per_s"] = plan.train.tokens / it
        if all(mine.get(k, v) == v for k, v in a["fix"].items()):
            continue
        out.append({"fix": dict(a["fix"]), "predicted": pred})
    return out
