"""``meshplan report``: a Markdown (+ HTML) report of a plan, with pictures made by matplotlib.

The report shows the inputs, the chosen plan and its alternatives, why rejected families lost, memory per
pipeline rank against device memory, the iteration time broken down, the pipeline schedule as a timeline,
the layer partition and recompute per stage, and (given a launcher metrics file) measured next to predicted.
``compare`` adds what changed against an older plan.

matplotlib is imported lazily (inside the drawing functions), so importing this module is cheap; it is the
optional extra ``meshplan[report]``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from meshplan import units
from meshplan.errors import InputError
from meshplan.plan import Plan

MEMORY_KEYS = ("parameters", "gradients", "optimizer", "activations", "logits", "buffers", "margin")
TIME_KEYS = ("compute", "recompute", "tp_comm", "cp_comm", "pp_comm", "dp_comm", "vocab_comm", "bubble", "optimizer")
TIME_LABELS = {"compute": "compute", "recompute": "recompute", "tp_comm": "exposed TP comm",
               "cp_comm": "exposed CP comm", "pp_comm": "exposed PP comm (P2P)", "dp_comm": "exposed DP comm",
               "vocab_comm": "exposed vocab-parallel comm", "bubble": "pipeline bubble", "optimizer": "optimizer step"}
PICTURES = ("memory", "time", "schedule", "stages")


# ----------------------------------------------------------------------------------------------
# a tiny document model rendered to both Markdown and HTML
# ----------------------------------------------------------------------------------------------

@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list[Any]], align: str | None = None) -> None:
        self.blocks.append(("table", headers, [[_cell(c) for c in r] for r in rows], align))

    def img(self, path: str, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        out: list[str] = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in block[1]))
            elif kind == "table":
                _, headers, rows, align = block
                align = align or ("l" + "r" * (len(headers) - 1))
                sep = ["---:" if a == "r" else "---" for a in align]
                lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body: list[str] = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                _, headers, rows, align = block
                align = align or ("l" + "r" * (len(headers) - 1))
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in headers)
                trs = "".join("<tr>" + "".join(
                    f"<td class=\"{'num' if a == 'r' else ''}\">{_inline_html(c)}</td>" for c, a in zip(r, align))
                    + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                body.append(f"<p><img src=\"{html.escape(block[1])}\" alt=\"{html.escape(block[2])}\"></p>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0}"
                 "th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}td.num{text-align:right}"
                 "img{max-width:100%}code{background:#f3f3f3;padding:1px 4px;border-radius:3px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


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


# ----------------------------------------------------------------------------------------------
# inputs: metrics files and plan facts
# ----------------------------------------------------------------------------------------------

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


@dataclass
class Measured:
    steps: int
    excluded: int
    step_time_s: float | None
    tokens_per_s: float | None
    peak_memory_gib: float | None
    mfu: float | None
    series: list[tuple[float, float]]          # (step, step_time_s)
    memory_series: list[tuple[float, float]]   # (step, peak_memory_gib)


def summarize_metrics(rows: list[dict[str, Any]]) -> Measured:
    """Median step time / tokens/s / MFU and max peak memory; the first step is left out as warm-up when
    there are at least three."""
    def num(r: Mapping, k: str) -> float | None:
        v = r.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    timed = [r for r in rows if num(r, "step_time_s") is not None]
    excluded = 1 if len(timed) >= 3 else 0
    steady = timed[excluded:]

    def med(k: str) -> float | None:
        vals = [num(r, k) for r in steady if num(r, k) is not None]
        return statistics.median(vals) if vals else None

    mems = [num(r, "peak_memory_gib") for r in rows if num(r, "peak_memory_gib") is not None]
    series = [(num(r, "step") if num(r, "step") is not None else i, num(r, "step_time_s"))
              for i, r in enumerate(timed)]
    mem_series = [(num(r, "step") if num(r, "step") is not None else i, num(r, "peak_memory_gib"))
                  for i, r in enumerate(rows) if num(r, "peak_memory_gib") is not None]
    return Measured(len(steady), excluded, med("step_time_s"), med("tokens_per_s"), max(mems) if mems else None,
                    med("mfu"), series, mem_series)


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


# ----------------------------------------------------------------------------------------------
# pipeline schedule simulation (for the timeline picture)
# ----------------------------------------------------------------------------------------------

@dataclass
class Op:
    rank: int
    kind: str          # "F" or "B"
    micro: int
    chunk: int         # virtual stage index on the rank (global stage = chunk * pp + rank)
    start: float = 0.0
    end: float = 0.0


def _rank_order(schedule: str, pp: int, v: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """The order of (F/B, micro-batch, chunk) ops on one pipeline rank.

    GPipe: all forwards, then all backwards (Huang et al. 2019). 1F1B: ``pp - rank - 1`` warm-up forwards,
    then one forward / one backward, then the remaining backwards (Narayanan et al. 2021, PipeDream-Flush).
    Interleaved 1F1B: micro-batches in groups of ``pp`` sweep the rank's ``v`` chunks; warm-up
    ``(pp - rank - 1) * 2 + (v - 1) * pp`` forwards (Megatron-LM's schedule).
    """
    if schedule == "gpipe" or pp == 1 and schedule != "1f1b":
        fw = [("F", i, c) for c in range(v) for i in range(m)]
        bw = [("B", i, c) for c in reversed(range(v)) for i in range(m)]
        return fw + bw if pp > 1 else [op for i in range(m) for op in (("F", i, 0), ("B", i, 0))]
    groups = [list(range(g, min(g + pp, m))) for g in range(0, m, pp)]
    fw = [("F", i, c) for grp in groups for c in range(v) for i in grp]
    bw = [("B", i, c) for grp in groups for c in reversed(range(v)) for i in grp]
    warm = min(len(fw), (pp - rank - 1) * 2 + (v - 1) * pp if v > 1 else pp - rank - 1)
    order = fw[:warm]
    f_i, b_i = warm, 0
    while f_i < len(fw):
        order.append(fw[f_i])
        f_i += 1
        order.append(bw[b_i])
        b_i += 1
    order += bw[b_i:]
    return order


def simulate_pipeline(plan: Plan, max_micro: int = 64) -> tuple[list[Op], float, int]:
    """Simulate the plan's schedule; returns (ops, unit seconds or 0 when unknown, micro-batches shown).

    Forward time of a stage is proportional to its blocks; backward is twice the forward plus the stage's
    share of recompute. Times are scaled so that the busiest rank's compute matches the prediction."""
    pp, v = plan.pp, max(1, plan.virtual_stages)
    schedule = plan.schedule if pp > 1 else "1f1b"
    if schedule != "interleaved":
        v = 1 if pp > 1 else v
    m = min(plan.num_microbatches, max_micro)
    n_stages = len(plan.stages)
    layers = [max(s.num_layers, 0) for s in plan.stages]
    rc_weight = [s.recompute_layers.get("full", 0) + 0.25 * s.recompute_layers.get("selective", 0)
                 for s in plan.stages]
    per_rank_layers = [sum(layers[j] for j in range(n_stages) if j % pp == r) for r in range(pp)]
    per_rank_rc = [sum(rc_weight[j] for j in range(n_stages) if j % pp == r) for r in range(pp)]
    tb = _time_breakdown(plan)
    busiest = max(per_rank_layers) or 1
    unit = tb["compute"] / (3 * plan.num_microbatches * busiest) if tb["compute"] > 0 else 0.0
    base = unit if unit > 0 else 1.0
    rc_busiest = max(per_rank_rc) or 1.0
    rc_unit = tb["recompute"] / (plan.num_microbatches * rc_busiest) if tb["recompute"] > 0 else base * 0.0

    def stage_of(rank: int, chunk: int) -> int:
        return chunk * pp + rank if pp > 1 else min(chunk, n_stages - 1)

    def dur(kind: str, s: int) -> float:
        f = base * max(layers[s], 0.5)
        if kind == "F":
            return f
        return 2 * f + (rc_unit * rc_weight[s] if rc_unit else base * rc_weight[s])

    orders = [[Op(r, k, i, c) for k, i, c in _rank_order(schedule, pp, v if pp > 1 else 1, m, r)]
              for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    idx = [0] * pp
    total = sum(len(o) for o in orders)
    scheduled = 0
    while scheduled < total:
        progress = False
        for r in range(pp):
            while idx[r] < len(orders[r]):
                op = orders[r][idx[r]]
                s = stage_of(r, op.chunk)
                deps = []
                if op.kind == "F" and s > 0 and pp > 1:
                    deps.append(("F", op.micro, s - 1))
                if op.kind == "B":
                    deps.append(("F", op.micro, s))
                    if s < n_stages - 1 and pp > 1:
                        deps.append(("B", op.micro, s + 1))
                if any(d not in done for d in deps):
                    break
                op.start = max([free[r]] + [done[d] for d in deps])
                op.end = op.start + dur(op.kind, s)
                free[r] = op.end
                done[(op.kind, op.micro, s)] = op.end
                idx[r] += 1
                scheduled += 1
                progress = True
        if not progress:      # an order this simulator cannot run; draw what it has
            break
    ops = [op for o in orders for op in o if op.end > 0]
    return ops, unit, m


# ----------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
    except ImportError:
        raise InputError("report", "matplotlib is not installed", "pip install 'meshplan[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 10,
                         "figure.dpi": 110, "savefig.dpi": 110, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


_COLORS = {"parameters": "#4C72B0", "gradients": "#55A868", "optimizer": "#C44E52", "activations": "#DD8452",
           "logits": "#8172B3", "buffers": "#937860", "margin": "#BBBBBB"}
_TIME_COLORS = {"compute": "#4C72B0", "recompute": "#DD8452", "tp_comm": "#55A868", "cp_comm": "#64B5CD",
                "pp_comm": "#8172B3", "dp_comm": "#C44E52", "vocab_comm": "#DA8BC3", "bubble": "#BBBBBB",
                "optimizer": "#937860"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# A device line more than this many times the tallest bar would flatten the bars; it is named in the title.
DEVICE_LINE_MAX_RATIO = 20


def draw_memory(plan: Plan, path: Path) -> Path:
    plt = _plt()
    rows = stage_memory(plan)
    device = plan.cluster.gpu.memory_gib
    totals = [sum(b.values()) if b else peak for _, b, peak in rows]
    show_device = device <= DEVICE_LINE_MAX_RATIO * max(totals + [1e-9])
    unit, factor = units.memory_column(totals + ([device] if show_device else []))
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(rows) + 4), 5.5))
    keys = [k for k in MEMORY_KEYS] + sorted({k for _, b, _ in rows if b for k in b} - set(MEMORY_KEYS))
    x = list(range(len(rows)))
    bottoms = [0.0] * len(rows)
    for k in keys:
        vals = [(b or {}).get(k, 0.0) * factor for _, b, _ in rows]
        if not any(vals):
            continue
        ax.bar(x, vals, bottom=bottoms, color=_COLORS.get(k), label=k, width=0.6, edgecolor="white", linewidth=0.5)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    no_break = [(i, peak * factor) for i, (_, b, peak) in enumerate(rows) if b is None]
    if no_break:
        ax.bar([i for i, _ in no_break], [p for _, p in no_break], color="#999999", width=0.6, hatch="//",
               edgecolor="white", label="peak (no breakdown)")
    for i, total in enumerate(totals):
        near = show_device and abs(total - device) < 0.05 * max(device, total)
        ax.text(i, total * factor * (0.985 if near else 1.0), f"{total * factor:,.1f}", ha="center",
                va="top" if near else "bottom", fontsize=10, fontweight="bold" if near else "normal")
    if show_device:
        ax.axhline(device * factor, color="#C00000", linestyle="--", linewidth=1.5,
                   label=f"device memory ({units.human_memory(device)})")
    ax.set_xticks(x, [label for label, _, _ in rows])
    rank = units.rank_word(plan.cluster.gpu.kind)
    ax.set_ylabel(f"memory per {rank} ({unit})")
    ax.set_xlabel("pipeline rank" if plan.pp > 1 else "")
    ax.set_ylim(0, max(totals + ([device] if show_device else [])) * factor * 1.15)
    device_note = "" if show_device else f"; each {rank} has {units.human_memory(device)}"
    ax.set_title(f"Predicted peak memory per {rank}: {plan.model.name}, dp={plan.dp} tp={plan.tp} pp={plan.pp} "
                 f"cp={plan.cp}, ZeRO-{plan.zero}{device_note}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def draw_time(plan: Plan, path: Path, measured: Measured | None = None) -> Path:
    plt = _plt()
    tb = _time_breakdown(plan)
    total = plan.predicted.iteration_s if plan.predicted else sum(tb.values())
    use_ms = total < 1.0
    scale, unit = (1e3, "ms") if use_ms else (1.0, "s")
    keys = [k for k in tb if k in TIME_KEYS] + [k for k in tb if k not in TIME_KEYS]
    keys = [k for k in keys if tb[k] or k == "compute"]
    labels = [TIME_LABELS.get(k, k.replace("_", " ")) for k in keys]
    vals = [tb[k] * scale for k in keys]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(keys) + 2.2))
    y = list(range(len(keys)))[::-1]
    ax.barh(y, vals, color=[_TIME_COLORS.get(k, "#777777") for k in keys], height=0.6)
    vmax = max(vals + [1e-9])
    for yi, v in zip(y, vals):
        share = v / (total * scale) * 100 if total else 0
        ax.text(v + vmax * 0.01, yi, f"{v:.3g} {unit} ({share:.0f}%)", va="center", fontsize=10)
    ax.set_yticks(y, labels)
    ax.set_xlabel(f"time per iteration ({unit})")
    ax.set_xlim(0, vmax * 1.3)
    title = f"Predicted iteration time {total * scale:.3g} {unit}"
    if measured and measured.step_time_s:
        title += f"; measured median {measured.step_time_s * scale:.3g} {unit}"
    ax.set_title(title + "\n(communication: only what is not overlapped with compute)", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def draw_schedule(plan: Plan, path: Path) -> Path:
    plt = _plt()
    from matplotlib.patches import Patch

    pp = plan.pp
    m = plan.num_microbatches
    # Legible: draw a few rounds of micro-batches; the bubble share is from the full simulation.
    draw_m = m if m <= max(8, 2 * pp) else max(8, 2 * pp)
    if draw_m < m and draw_m % pp and pp > 1:
        draw_m = min(m, (draw_m // pp + 1) * pp)
    ops, unit, shown = simulate_pipeline(plan, max_micro=draw_m)
    full_ops, _, full_m = simulate_pipeline(plan, max_micro=256) if draw_m < m else (ops, unit, shown)
    v = max(1, plan.virtual_stages) if plan.schedule == "interleaved" and pp > 1 else 1
    makespan = max((o.end for o in ops), default=1.0)
    if unit:      # op times are seconds
        scale, xunit = (1e3, "ms") if makespan < 1.0 else (1.0, "s")
    else:
        scale, xunit = 1.0, "units of one block's forward time"
    k = scale
    labelled = False
    fw_cols = ["#4C72B0", "#7FA6D9", "#2E4A7A", "#A8C4E8"]
    bw_cols = ["#DD8452", "#F0B27A", "#A0522D", "#F5CBA7"]
    fig, ax = plt.subplots(figsize=(12, 0.55 * pp + 2.4))
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}   # one broken_barh per (row, colour): fast
    for op in ops:
        color = (fw_cols if op.kind == "F" else bw_cols)[op.chunk % 4]
        y = pp - 1 - op.rank
        bars.setdefault((y, color), []).append((op.start * k, (op.end - op.start) * k))
        if (op.end - op.start) / makespan > 0.012:
            labelled = True
            ax.text((op.start + op.end) / 2 * k, y, str(op.micro + 1), ha="center", va="center", fontsize=8,
                    color="white" if op.kind == "F" else "black")
    for (y, color), spans in bars.items():
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.4)
    tail = 0.0
    if pp == 1 and plan.predicted:
        tb = _time_breakdown(plan)
        tail = tb.get("dp_comm", 0.0) + tb.get("optimizer", 0.0) if unit else 0.0
        if tail > 0:
            ax.broken_barh([(makespan * k, tail * k)], (-0.4, 0.8), facecolors="#937860", edgecolor="white")
    full_span = max((o.end for o in full_ops), default=1.0)
    busy = sum(o.end - o.start for o in full_ops)
    bubble = 1 - busy / (pp * full_span) if full_span else 0.0
    ax.set_yticks(range(pp), [f"rank {r}" for r in reversed(range(pp))] if pp > 1 else ["every rank"])
    ax.set_ylabel("pipeline rank" if pp > 1 else "")
    ax.set_xlabel(f"time ({xunit})")
    ax.set_xlim(0, (makespan + tail) * k * 1.01)
    sched = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": f"interleaved 1F1B, {v} chunks per rank"}
    if pp > 1:
        title = (f"Pipeline schedule: {sched.get(plan.schedule, plan.schedule)}, pp={pp}, "
                 f"{m} micro-batches; idle (bubble) {bubble * 100:.0f}% of rank time"
                 + (f" (simulated over {full_m})" if full_m < m else ""))
    else:
        title = (f"One rank's iteration: {plan.num_microbatches} micro-batches of {plan.micro_batch} "
                 "(gradient accumulation), no pipeline")
    if shown < m:
        title += f"\nfirst {shown} of {m} micro-batches drawn, as if the iteration had {shown}"
    ax.set_title(title, fontsize=12)
    handles = [Patch(color=fw_cols[c], label=f"forward{f' (chunk {c})' if v > 1 else ''}") for c in range(min(v, 4))]
    handles += [Patch(color=bw_cols[c], label=f"backward{f' (chunk {c})' if v > 1 else ''}")
                for c in range(min(v, 4))]
    if tail > 0:
        handles.append(Patch(color="#937860", label="exposed DP comm + optimizer"))
    if pp > 1:
        handles.append(Patch(facecolor="white", edgecolor="#999999", label="idle (bubble)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    if labelled:
        ax.text(0, -0.12, "numbers in the boxes are micro-batch indices", transform=ax.transAxes, fontsize=9,
                color="#555555", va="top")
    return _save(fig, path)


def draw_stages(plan: Plan, path: Path) -> Path:
    plt = _plt()
    n = len(plan.stages)
    fig, ax = plt.subplots(figsize=(10, 0.42 * n + 2.0))
    y = list(range(n))[::-1]
    colors = {"full": "#C44E52", "selective": "#DD8452", "none": "#55A868"}
    left = [0.0] * n
    for mode in ("full", "selective", "none"):
        vals = [s.recompute_layers.get(mode, 0) for s in plan.stages]
        if any(vals):
            ax.barh(y, vals, left=left, color=colors[mode], height=0.6,
                    label={"full": "full recompute", "selective": "selective recompute",
                           "none": "activations kept"}[mode])
            left = [a + b for a, b in zip(left, vals)]
    for yi, s in zip(y, plan.stages):
        mem = f", peak {units.human_memory(s.peak_memory_gib)}" if s.peak_memory_gib else ""
        ax.text(s.num_layers + 0.1, yi, f"blocks {s.layers[0]}-{s.layers[1] - 1}{mem}", va="center", fontsize=9)
    ax.set_yticks(y, [f"stage {j} (rank {plan.pipeline_rank_of_stage(j)})" for j in range(n)])
    ax.set_xlabel("transformer blocks in the stage")
    ax.set_xlim(0, max(s.num_layers for s in plan.stages) * 1.45 + 1)
    ax.set_title(f"Layer partition and recompute per {'virtual ' if plan.virtual_stages > 1 else ''}stage "
                 f"({plan.model.layers} blocks)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def draw_alternatives(plan: Plan, path: Path) -> Path | None:
    alts = _alternatives(plan)
    if not alts or not plan.predicted:
        return None
    plt = _plt()
    rows = [("chosen: " + _fix_label(plan.fields_for_fix()), plan.predicted.tokens_per_s,
             plan.predicted.peak_memory_gib)]
    rows += [(_fix_label(a["fix"]), float(a["predicted"].get("tokens_per_s", 0) or 0),
              float(a["predicted"].get("peak_memory_gib", 0) or 0)) for a in alts]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 2.0))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r[1] for r in rows], color=["#4C72B0"] + ["#A0A0A0"] * (len(rows) - 1), height=0.6)
    vmax = max(r[1] for r in rows) or 1
    for yi, r in zip(y, rows):
        ax.text(r[1] + vmax * 0.01, yi, f"{r[1]:,.0f} tok/s, {units.human_memory(r[2])}", va="center", fontsize=9)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=9)
    ax.set_xlabel("predicted throughput (tokens/s, whole job)")
    ax.set_xlim(0, vmax * 1.35)
    ax.set_title("Chosen plan and the runners-up")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def draw_measured(plan: Plan, measured: Measured, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = [s for s, _ in measured.series]
    a1.plot(xs, [t for _, t in measured.series], marker="o", markersize=3, color="#4C72B0", label="measured")
    if plan.predicted:
        a1.axhline(plan.predicted.iteration_s, color="#C44E52", linestyle="--",
                   label=f"predicted ({plan.predicted.iteration_s:.3g} s)")
    if measured.step_time_s:
        a1.axhline(measured.step_time_s, color="#4C72B0", linestyle=":",
                   label=f"measured median ({measured.step_time_s:.3g} s)")
    from matplotlib.ticker import MaxNLocator

    a1.xaxis.set_major_locator(MaxNLocator(integer=True))
    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("step")
    a1.set_ylabel("step time (s)")
    a1.set_ylim(bottom=0)
    a1.set_title("Step time")
    a1.legend(frameon=False)
    a1.grid(alpha=0.3)
    device = plan.cluster.gpu.memory_gib
    peaks = [m for _, m in measured.memory_series] + ([plan.predicted.peak_memory_gib] if plan.predicted else [])
    show_device = device <= DEVICE_LINE_MAX_RATIO * max(peaks + [1e-9])
    unit, factor = units.memory_column(peaks + ([device] if show_device else []))
    if measured.memory_series:
        a2.plot([s for s, _ in measured.memory_series], [m * factor for _, m in measured.memory_series],
                marker="o", markersize=3, color="#4C72B0", label="measured peak")
    if plan.predicted:
        a2.axhline(plan.predicted.peak_memory_gib * factor, color="#C44E52", linestyle="--",
                   label=f"predicted ({units.human_memory(plan.predicted.peak_memory_gib)})")
    if show_device:
        a2.axhline(device * factor, color="#333333", linestyle="-", linewidth=1,
                   label=f"device ({units.human_memory(device)})")
    a2.set_xlabel("step")
    a2.set_ylabel(f"peak memory per {units.rank_word(plan.cluster.gpu.kind)} ({unit})")
    a2.set_ylim(bottom=0)
    a2.set_title("Peak memory")
    a2.legend(frameon=False)
    a2.grid(alpha=0.3)
    return _save(fig, path)


def draw_compare(new: Plan, old: Plan, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    tn, to = _time_breakdown(new), _time_breakdown(old)
    keys = [k for k in dict.fromkeys(list(to) + list(tn)) if tn.get(k) or to.get(k)]
    total = max(sum(tn.values()), sum(to.values()))
    scale, unit = (1e3, "ms") if total < 1 else (1.0, "s")
    x = list(range(len(keys)))
    a1.bar([i - 0.2 for i in x], [to.get(k, 0) * scale for k in keys], width=0.4, color="#A0A0A0", label="old")
    a1.bar([i + 0.2 for i in x], [tn.get(k, 0) * scale for k in keys], width=0.4, color="#4C72B0", label="new")
    a1.set_xticks(x, [TIME_LABELS.get(k, k).replace("exposed ", "") for k in keys], rotation=30, ha="right")
    a1.set_ylabel(f"time per iteration ({unit})")
    a1.set_title("Iteration time breakdown")
    a1.legend(frameon=False)
    a1.grid(axis="y", alpha=0.3)
    mn = _memory_breakdown(new.predicted.memory_breakdown_gib if new.predicted else None)
    mo = _memory_breakdown(old.predicted.memory_breakdown_gib if old.predicted else None)
    mkeys = [k for k in dict.fromkeys(list(mo) + list(mn)) if mn.get(k) or mo.get(k)]
    x = list(range(len(mkeys)))
    munit, mfactor = units.memory_column(list(mo.values()) + list(mn.values()))
    a2.bar([i - 0.2 for i in x], [mo.get(k, 0) * mfactor for k in mkeys], width=0.4, color="#A0A0A0", label="old")
    a2.bar([i + 0.2 for i in x], [mn.get(k, 0) * mfactor for k in mkeys], width=0.4, color="#4C72B0", label="new")
    a2.set_xticks(x, mkeys, rotation=30, ha="right")
    a2.set_ylabel(f"memory, worst rank ({munit})")
    a2.set_title("Memory breakdown")
    a2.legend(frameon=False)
    a2.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# comparing plans
# ----------------------------------------------------------------------------------------------

_COMPARED = ("dp", "tp", "pp", "cp", "cp_kind", "sequence_parallel", "vocab_parallel", "micro_batch",
             "num_microbatches", "schedule", "virtual_stages", "zero", "recompute", "tp_overlap", "compile")


def _field_changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every top-level field of two dataclasses that differs."""
    return [(f.name, getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def compare_plans(new: Plan, old: Plan) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: choices, inputs and predicted changes in percent."""
    changes = []
    for key in _COMPARED:
        a, b = getattr(old, key) if key != "recompute" else old.recompute, getattr(new, key)
        if a != b:
            changes.append((key, a, b))
    if [s.layers for s in old.stages] != [s.layers for s in new.stages]:
        changes.append(("layer partition", [s.num_layers for s in old.stages], [s.num_layers for s in new.stages]))
    if tuple(old.mesh_order) != tuple(new.mesh_order):
        changes.append(("mesh_order", list(old.mesh_order), list(new.mesh_order)))
    inputs = []
    if old.model.name != new.model.name or old.model != new.model:
        fields = [f"{k} {a} -> {b}" for k, a, b in _field_changes(old.model, new.model) if k != "name"]
        inputs.append(f"the plans are for different models ({old.model.name} vs {new.model.name}"
                      + (f": {', '.join(fields)}" if fields else "") + "); per-token comparisons still hold, "
                      "per-iteration ones compare different work")
    if old.cluster.name != new.cluster.name or old.cluster.world_size != new.cluster.world_size:
        inputs.append(f"cluster changed: {old.cluster.name} "
                      f"({units.rank_count(old.cluster.gpu.kind, old.cluster.world_size)}) -> {new.cluster.name} "
                      f"({units.rank_count(new.cluster.gpu.kind, new.cluster.world_size)})")
    if old.train != new.train:
        inputs.append(f"batch changed: {old.train.global_batch} x {old.train.seq_len} -> "
                      f"{new.train.global_batch} x {new.train.seq_len} ({old.train.precision} -> "
                      f"{new.train.precision})")
    predicted = []
    if old.predicted and new.predicted:
        for label, key, better in (("throughput (tokens/s)", "tokens_per_s", "up"),
                                   ("iteration time (s)", "iteration_s", "down"),
                                   ("peak memory (GiB)", "peak_memory_gib", "down"),
                                   ("MFU", "mfu", "up"),
                                   (f"TFLOP/s per {units.rank_word(new.cluster.gpu.kind)}", "tflops_per_gpu", "up")):
            a, b = getattr(old.predicted, key), getattr(new.predicted, key)
            predicted.append((label, a, b, _pct(b, a)))
    return {"changes": changes, "inputs": inputs, "predicted": predicted}


def compare_summary(new: Plan, old: Plan) -> list[str]:
    """A few lines for a terminal."""
    c = compare_plans(new, old)
    lines = list(c["inputs"])
    if c["changes"]:
        lines.append("changed: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in c["changes"]))
    else:
        lines.append("no parallelism choice changed")
    for label, a, b, pct in c["predicted"]:
        if label.startswith(("throughput", "peak")):
            lines.append(f"predicted {label}: {_num(a)} -> {_num(b)} ({pct})")
    return lines


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

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


def _why_lost(plan: Plan, alt_pred: Mapping[str, Any]) -> str:
    """The components that make an alternative slower than the chosen plan (largest first)."""
    if not plan.predicted:
        return ""
    mine = _time_breakdown(plan)
    theirs = alt_pred.get("time_breakdown_s") or {}
    diffs = sorted(((float(theirs.get(k, 0) or 0) - mine.get(k, 0), k) for k in set(mine) | set(theirs)),
                   reverse=True)
    worse = [f"{TIME_LABELS.get(k, k)} +{_seconds(d)}" for d, k in diffs[:2] if d > 0]
    it = alt_pred.get("iteration_s")
    if not theirs and isinstance(it, (int, float)) and it > plan.predicted.iteration_s:
        worse.append(f"iteration +{_seconds(it - plan.predicted.iteration_s)} (no breakdown recorded)")
    peak = float(alt_pred.get("peak_memory_gib", 0) or 0)
    if peak > plan.cluster.gpu.memory_gib:
        worse.insert(0, f"OOM by {peak - plan.cluster.gpu.memory_gib:.1f} GiB")
    return ", ".join(worse)


@dataclass
class ReportFiles:
    markdown: Path
    html: Path | None
    pictures: dict[str, Path]


def write_report(plan: Plan, out_dir: str | Path, *, compare: Plan | None = None,
                 metrics: list[dict[str, Any]] | None = None, html_page: bool = True,
                 fmt: str = "png", plan_path: str | None = None, compare_path: str | None = None) -> ReportFiles:
    """Write README.md (and report.html) plus pictures into ``out_dir``; returns what was written."""
    if fmt not in ("png", "svg"):
        raise InputError("--format", f"unknown picture format {fmt!r}", "choose png or svg")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("--out", f"cannot create {out}: {exc.strerror}", "give a writable folder") from None
    measured = summarize_metrics(metrics) if metrics else None

    pics: dict[str, Path] = {}
    pics["memory"] = draw_memory(plan, out / f"memory.{fmt}")
    pics["time"] = draw_time(plan, out / f"time.{fmt}", measured)
    pics["schedule"] = draw_schedule(plan, out / f"schedule.{fmt}")
    pics["stages"] = draw_stages(plan, out / f"stages.{fmt}")
    alt = draw_alternatives(plan, out / f"alternatives.{fmt}")
    if alt:
        pics["alternatives"] = alt
    if measured:
        pics["measured"] = draw_measured(plan, measured, out / f"measured.{fmt}")
    if compare is not None:
        pics["compare"] = draw_compare(plan, compare, out / f"compare.{fmt}")

    doc = build_document(plan, pics, measured=measured, compare=compare, plan_path=plan_path,
                         compare_path=compare_path)
    md = out / "README.md"
    md.write_text(doc.markdown())
    page = None
    if html_page:
        page = out / "report.html"
        page.write_text(doc.html(f"meshplan report: {plan.model.name} on {plan.cluster.name}"))
    return ReportFiles(md, page, pics)


def build_document(plan: Plan, pics: Mapping[str, Path], *, measured: Measured | None = None,
                   compare: Plan | None = None, plan_path: str | None = None,
                   compare_path: str | None = None) -> Doc:
    m, c, t, pred = plan.model, plan.cluster, plan.train, plan.predicted
    rank, ranks = units.rank_word(c.gpu.kind), units.rank_count(c.gpu.kind, plan.world_size)
    d = Doc()
    d.h(1, f"meshplan report: {m.name} on {c.name}")
    src = f" (`{plan_path}`)" if plan_path else ""
    if pred:
        d.p(f"**Plan{src}:** dp={plan.dp} × tp={plan.tp} × pp={plan.pp} × cp={plan.cp} on {ranks}. "
            f"**Predicted:** {_seconds(pred.iteration_s)} per iteration, {pred.tokens_per_s:,.0f} tokens/s, "
            f"{units.human_rate(pred.tflops_per_gpu)} per {rank} (MFU {pred.mfu * 100:.1f}%), peak memory "
            f"{units.human_memory(pred.peak_memory_gib)} of {units.human_memory(c.gpu.memory_gib)}.")
    else:
        d.p(f"**Plan{src}:** dp={plan.dp} × tp={plan.tp} × pp={plan.pp} × cp={plan.cp} on {ranks} "
            "(the file holds no prediction).")

    if compare is not None:
        _compare_section(d, plan, compare, pics, compare_path)

    d.h(2, "Inputs")
    d.table(["model", "value"], [
        ["name", m.name], ["layers", m.layers], ["hidden", m.hidden],
        ["attention heads / KV heads", f"{m.heads} / {m.kv_heads}"], ["FFN hidden", m.ffn_hidden],
        ["vocabulary", m.vocab], ["MLP / norm / position", f"{m.mlp} / {m.norm} / {m.position}"],
        ["tied embeddings", m.tied_embeddings]], "ll")
    d.table(["cluster", "value"], [
        ["name", c.name], [units.rank_word(c.gpu.kind, 2),
                           f"{c.nodes:,} nodes × {c.gpus_per_node} = {c.world_size:,}"],
        ["device", c.gpu.name], ["device memory", units.human_memory(c.gpu.memory_gib)],
        ["peak (16-bit dense)" if c.gpu.kind != "cpu" else "peak (fp32)",
         units.human_rate(c.gpu.peak_tflops if c.gpu.kind != "cpu" else c.gpu.peak_flops("fp32") / 1e12)],
        ["intra-node link", f"{c.intra_node.bandwidth_gbps:g} GB/s, {c.intra_node.latency_us:g} µs"],
        ["inter-node link", f"{c.inter_node.bandwidth_gbps:g} GB/s, {c.inter_node.latency_us:g} µs"],
        ["measured profile", "yes" if c.measured else "no (documented defaults)"]], "ll")
    d.table(["training", "value"], [
        ["global batch", f"{t.global_batch} sequences"], ["sequence length", f"{t.seq_len} tokens"],
        ["tokens per iteration", f"{t.tokens:,}"], ["precision", t.precision], ["optimizer", t.optimizer]], "ll")

    d.h(2, "Chosen plan")
    sched = "n/a (no pipeline)" if plan.pp == 1 else (
        f"{plan.schedule}" + (f", {plan.virtual_stages} virtual stages per rank" if plan.virtual_stages > 1 else ""))
    d.table(["choice", "value"], [
        ["data / tensor / pipeline / context parallel", f"{plan.dp} / {plan.tp} / {plan.pp} / {plan.cp}"],
        ["mesh order (outermost first)", " → ".join(plan.mesh_order)],
        ["micro batch × micro-batches per rank", f"{plan.micro_batch} × {plan.num_microbatches}"],
        ["pipeline schedule", sched],
        ["ZeRO stage", f"{plan.zero}" + (" (FSDP)" if plan.zero == 3 else "")],
        ["sequence parallel", plan.sequence_parallel if plan.tp > 1 else "n/a (tp = 1)"],
        ["context parallel kind", plan.cp_kind if plan.cp > 1 else "n/a (cp = 1)"],
        ["vocabulary parallel", plan.vocab_parallel], ["recompute", plan.recompute],
        ["TP comm overlap", plan.tp_overlap], ["torch.compile", plan.compile],
        ["kernels", ", ".join(f"{k}: {v}" for k, v in plan.kernels.items())]], "ll")
    if pred:
        d.table(["prediction", "value"], [
            ["iteration time", _seconds(pred.iteration_s)], ["throughput", f"{pred.tokens_per_s:,.0f} tokens/s"],
            [f"model FLOP/s per {rank}", units.human_rate(pred.tflops_per_gpu)], ["MFU", f"{pred.mfu * 100:.1f}%"],
            ["peak memory (worst rank)",
             f"{units.human_memory(pred.peak_memory_gib)} of {units.human_memory(c.gpu.memory_gib)}"]], "ll")
    if plan.notes:
        d.p("**Notes from the planner:**")
        d.items(plan.notes)

    _search_section(d, plan, pics)

    d.h(2, f"Memory per {rank}")
    d.img(pics["memory"].name, "stacked bar chart of predicted memory per pipeline rank against device memory")
    rows = stage_memory(plan)
    keys = [k for k in MEMORY_KEYS if any((b or {}).get(k) for _, b, _ in rows)]
    unit, factor = units.memory_column([sum(b.values()) if b else peak for _, b, peak in rows])
    d.table(["rank"] + keys + [f"total ({unit})"],
            [[label] + [f"{(b or {}).get(k, 0) * factor:,.2f}" if b else "" for k in keys] +
             [f"{(sum(b.values()) if b else peak) * factor:,.2f}"] for label, b, peak in rows])
    if not (isinstance(plan.search.get("stage_memory_gib"), list)) and plan.pp > 1:
        d.p("The plan file has no per-rank breakdown; the stacked bar is the worst rank's, the other bars are the "
            "per-rank peaks.")

    d.h(2, "Iteration time")
    d.img(pics["time"].name, "bar chart of the predicted iteration time by component")
    if pred:
        tb = _time_breakdown(plan)
        d.table(["component", "time", "share of iteration"],
                [[TIME_LABELS.get(k, k), _seconds(v), f"{v / pred.iteration_s * 100:.1f}%" if pred.iteration_s else ""]
                 for k, v in tb.items() if v] + [["**iteration**", f"**{_seconds(pred.iteration_s)}**", "100%"]])
        rest = pred.iteration_s - sum(tb.values())
        if abs(rest) > 0.01 * pred.iteration_s:
            d.p(f"The components add up to {_seconds(sum(tb.values()))}; the difference of {_seconds(rest)} is "
                "time the cost model counts elsewhere (overlap credit or terms it does not break out).")
        d.p("Communication is the part left exposed after overlap with compute.")

    d.h(2, "Pipeline schedule")
    d.img(pics["schedule"].name, "timeline of micro-batches per pipeline rank")
    if plan.pp > 1:
        d.p("Simulated from the plan's schedule and layer partition (forward time proportional to blocks, backward "
            "twice forward plus recompute); white space is pipeline bubble.")
    else:
        d.p("No pipeline: each rank runs its micro-batches one after another and then reduces gradients.")
    d.img(pics["stages"].name, "layer partition and recompute per stage")
    stage_unit, stage_factor = units.memory_column([s.peak_memory_gib for s in plan.stages])
    d.table(["stage", "pipeline rank", "blocks", "recompute (full / selective / none)",
             f"peak memory ({stage_unit})"],
            [[j, plan.pipeline_rank_of_stage(j), f"{s.layers[0]}–{s.layers[1] - 1} ({s.num_layers})",
              f"{s.recompute_layers.get('full', 0)} / {s.recompute_layers.get('selective', 0)} / "
              f"{s.recompute_layers.get('none', 0)}",
              f"{s.peak_memory_gib * stage_factor:,.2f}" if s.peak_memory_gib else ""]
             for j, s in enumerate(plan.stages)], "rrlll")

    if measured:
        _measured_section(d, plan, measured, pics)
    d.p("---")
    d.p("Written by `meshplan report`. Export this plan with `meshplan export PLAN --to megatron|torchtitan|deepspeed`.")
    return d


def _search_section(d: Doc, plan: Plan, pics: Mapping[str, Path]) -> None:
    s = plan.search if isinstance(plan.search, Mapping) else {}
    alts = _alternatives(plan)
    rejected = s.get("rejected")
    if not (alts or rejected or "seconds" in s or "evaluated" in s):
        return
    d.h(2, "Alternatives and why they lost")
    facts = []
    if "evaluated" in s:
        facts.append(f"{s['evaluated']:,} configurations evaluated" if isinstance(s["evaluated"], int)
                     else f"evaluated: {s['evaluated']}")
    if "seconds" in s:
        facts.append(f"search took {float(s['seconds']):.2f} s")
    if facts:
        d.p("; ".join(facts) + ".")
    if alts and plan.predicted:
        base = plan.predicted
        rows = [["chosen", _fix_label(plan.fields_for_fix()), _seconds(base.iteration_s),
                 f"{base.tokens_per_s:,.0f}", units.human_memory(base.peak_memory_gib), "", ""]]
        for i, a in enumerate(alts, 1):
            p = a["predicted"]
            it = float(p.get("iteration_s", 0) or 0)
            tps = float(p.get("tokens_per_s", 0) or 0)
            rows.append([i, _fix_label(a["fix"]), _seconds(it) if it else "", f"{tps:,.0f}",
                         units.human_memory(float(p.get('peak_memory_gib', 0) or 0)), _pct(tps, base.tokens_per_s),
                         _why_lost(plan, p)])
        d.table(["#", "plan", "iteration", "tokens/s", "peak memory", "throughput vs chosen", "slower because"], rows,
                "llrrrrl")
        if "alternatives" in pics:
            d.img(pics["alternatives"].name, "throughput of the chosen plan and the runners-up")
    if isinstance(rejected, Mapping) and rejected:
        d.p("**Rejected during the search**, by reason:")
        rows = []
        for reason, value in sorted(rejected.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float))
                                    else 0):
            if isinstance(value, Mapping):
                rows.append([str(reason), ", ".join(f"{k}: {v}" for k, v in value.items())])
            else:
                rows.append([str(reason), f"{value:,}" if isinstance(value, int) else str(value)])
        d.table(["reason", "configurations"], rows)
    elif isinstance(rejected, list) and rejected:
        d.p("**Rejected during the search:**")
        d.items(str(r) for r in rejected)


def _measured_section(d: Doc, plan: Plan, ms: Measured, pics: Mapping[str, Path]) -> None:
    d.h(2, "Measured next to predicted")
    note = f" (first step left out as warm-up)" if ms.excluded else ""
    d.p(f"From the run's metrics: medians over {ms.steps} steps{note}; peak memory is the maximum.")
    pred = plan.predicted
    rows = []

    def row(label, measured, predicted, fmt):
        err = _pct(measured, predicted) if measured is not None and predicted else ""
        rows.append([label, fmt(predicted) if predicted is not None else "", fmt(measured) if measured is not None
                     else "", err])

    row("step time", ms.step_time_s, pred.iteration_s if pred else None, _seconds)
    row("tokens/s", ms.tokens_per_s, pred.tokens_per_s if pred else None, lambda x: f"{x:,.0f}")
    row("peak memory", ms.peak_memory_gib, pred.peak_memory_gib if pred else None, units.human_memory)
    if ms.mfu is not None:
        row("MFU", ms.mfu, pred.mfu if pred else None, lambda x: f"{x * 100:.1f}%")
    d.table(["quantity", "predicted", "measured", "measured vs predicted"], rows)
    if "measured" in pics:
        d.img(pics["measured"].name, "measured step time and peak memory per step against the prediction")


def _compare_section(d: Doc, new: Plan, old: Plan, pics: Mapping[str, Path], old_path: str | None) -> None:
    c = compare_plans(new, old)
    d.h(2, "What changed" + (f" since `{old_path}`" if old_path else ""))
    d.items(c["inputs"])
    if c["changes"]:
        d.table(["choice", "old", "new"], [[k, _cell(a), _cell(b)] for k, a, b in c["changes"]], "lll")
    else:
        d.p("No parallelism choice changed.")
    if c["predicted"]:
        d.table(["predicted", "old", "new", "change"], [[label, _num(a), _num(b), pct]
                                                         for label, a, b, pct in c["predicted"]])
    if "compare" in pics:
        d.img(pics["compare"].name, "old and new plan: time and memory breakdowns")
