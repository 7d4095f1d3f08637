"""The report's pictures, drawn with matplotlib: memory per pipeline rank, the iteration time by component,
the pipeline schedule the planner priced, the layer partition per stage, the runners-up, measured against
predicted, and two plans side by side.

matplotlib is imported inside :func:`_plt`, when a picture is drawn: it is the optional extra
``meshplan[report]``.
"""

from __future__ import annotations

from pathlib import Path

from meshplan import units
from meshplan.errors import InputError
from meshplan.plan import Plan
from meshplan.report.facts import (MEMORY_KEYS, TIME_KEYS, TIME_LABELS, _alternatives, _fix_label, _memory_breakdown,
                                   _time_breakdown, stage_memory)
from meshplan.report.metrics import Measured
from meshplan.report.schedule import plan_schedule


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
    """The timeline of each pipeline rank's ops as the planner prices them (schedule.plan_schedule)."""
    plt = _plt()
    from matplotlib.patches import Patch

    pp = plan.pp
    m = plan.num_microbatches
    # Legible: draw a few rounds of micro-batches; the bubble share is from the schedule over up to 256.
    draw_m = m if m <= max(8, 2 * pp) else max(8, 2 * pp)
    if draw_m < m and draw_m % pp and pp > 1:
        draw_m = min(m, (draw_m // pp + 1) * pp)
    drawn = plan_schedule(plan, max_micro=draw_m)
    full = plan_schedule(plan, max_micro=256) if draw_m < m else drawn
    ops, shown, full_ops, full_m = drawn.ops, drawn.micro_batches, full.ops, full.micro_batches
    v = max(1, plan.virtual_stages) if plan.schedule == "interleaved" and pp > 1 else 1
    makespan = max((o.end for o in ops), default=1.0)
    if drawn.seconds:
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
        tail = tb.get("dp_comm", 0.0) + tb.get("optimizer", 0.0) if drawn.seconds else 0.0
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
    if not drawn.priced:
        title += "\nthe cost model rejects this plan: op times proportional to each rank's blocks"
    if not drawn.complete:
        title += f"\nthe {plan.schedule} op order does not complete {shown} micro-batches on {pp} ranks"
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
