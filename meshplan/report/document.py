"""The report's document: a small model of headings, paragraphs, lists, tables and pictures rendered to
both Markdown and HTML, and :func:`write_report` / :func:`build_document`, which write a plan's report with it."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from meshplan.engines import get_engine
from meshplan import units
from meshplan.errors import InputError
from meshplan.plan import Plan
from meshplan.report.comparison import compare_section
from meshplan.report.facts import (MEMORY_KEYS, TIME_LABELS, _alternatives, _cell, _fix_label, _pct, _seconds,
                                   _time_breakdown, reserved_memory, stage_memory)
from meshplan.report.metrics import Measured, summarize_metrics
from meshplan.report.pictures import (draw_alternatives, draw_compare, draw_measured, draw_memory, draw_schedule,
                                      draw_stages, draw_time)


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


def run_hint(plan: Plan) -> str:
    """How this plan runs: ``meshplan launch`` for meshplan's engine, ``meshplan export`` to the engine it was
    priced for otherwise."""
    if plan.engine == "meshplan":
        return "Run this plan with `meshplan launch PLAN`."
    return f"Run this plan with {get_engine(plan.engine).title}: `meshplan export PLAN --to {plan.engine}`."


def _inline_html(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


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


def _memory_words(plan: Plan) -> str:
    """The allocated peak, and where the plan predicts it, what the allocator reserves."""
    text = units.human_memory(plan.predicted.allocated_peak_gib) + " allocated"
    reserved = reserved_memory(plan)
    if reserved is not None:
        text += f", {units.human_memory(reserved[0])} reserved"
    return text


def _reserved_rows(plan: Plan) -> list[list[str]]:
    """Prediction rows for the reserved memory and NCCL's buffers (none for plans written before them)."""
    reserved = reserved_memory(plan)
    if reserved is None:
        return []
    rows = [["allocated peak (live tensors, worst rank)", units.human_memory(plan.predicted.allocated_peak_gib)],
            ["reserved by the CUDA caching allocator (worst rank)", units.human_memory(reserved[0])]]
    if reserved[1]:
        rows.append(["NCCL buffers per rank (outside the allocator)", units.human_memory(reserved[1])])
    return rows


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
            f"{_memory_words(plan)} of {units.human_memory(c.gpu.memory_gib)}.")
    else:
        d.p(f"**Plan{src}:** dp={plan.dp} × tp={plan.tp} × pp={plan.pp} × cp={plan.cp} on {ranks} "
            "(the file holds no prediction).")

    if compare is not None:
        compare_section(d, plan, compare, pics, compare_path)

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
        ["engine (what runs the plan, and how it is priced)", get_engine(plan.engine).title],
        ["data / tensor / pipeline / context parallel", f"{plan.dp} / {plan.tp} / {plan.pp} / {plan.cp}"],
        ["mesh order (outermost first)", " → ".join(plan.mesh_order)],
        ["micro batch × micro-batches per rank", f"{plan.micro_batch} × {plan.num_microbatches}"],
        ["pipeline schedule", sched],
        ["ZeRO stage", f"{plan.zero}" + (" (FSDP)" if plan.zero == 3 else "")],
        ["sequence parallel", plan.sequence_parallel if plan.tp > 1 else "n/a (tp = 1)"],
        ["context parallel kind", plan.cp_kind if plan.cp > 1 else "n/a (cp = 1)"],
        *([["experts (routed / per token / per rank)",
            f"{plan.model.moe.experts} / top-{plan.model.moe.top_k} / {plan.model.moe.experts // plan.ep}"],
           ["expert parallel / expert tensor parallel / expert data parallel",
            f"{plan.ep} / {plan.expert_tp} / {plan.expert_dp}"]] if plan.model.moe is not None else []),
        ["vocabulary parallel", plan.vocab_parallel], ["recompute", plan.recompute],
        ["TP comm overlap", plan.tp_overlap], ["torch.compile", plan.compile],
        ["kernels", ", ".join(f"{k}: {v}" for k, v in plan.kernels.items())]], "ll")
    if pred:
        d.table(["prediction", "value"], [
            ["iteration time", _seconds(pred.iteration_s)], ["throughput", f"{pred.tokens_per_s:,.0f} tokens/s"],
            [f"model FLOP/s per {rank}", units.human_rate(pred.tflops_per_gpu)], ["MFU", f"{pred.mfu * 100:.1f}%"],
            ["peak memory (worst rank)",
             f"{units.human_memory(pred.peak_memory_gib)} of {units.human_memory(c.gpu.memory_gib)}"],
            *_reserved_rows(plan)], "ll")
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
        d.p("The planner's own schedule simulation (the op order and op times its makespan is priced on: each "
            "rank's blocks, recompute and stage extras, forward and backward); white space is pipeline bubble.")
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
    d.p("Written by `meshplan report`. " + run_hint(plan))
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
    d.p(f"From the run's metrics: medians over {ms.steps} steps{note}; peak memory is the maximum "
        "over the same steps.")
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
