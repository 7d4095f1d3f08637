"""Comparing two plans: what changed from an older plan to a newer one (choices, inputs, predictions in
percent), as a dict (:func:`compare_plans`), as lines for a terminal (:func:`compare_summary`) and as the
report's "What changed" section (:func:`compare_section`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from meshplan import units
from meshplan.plan import Plan
from meshplan.report.facts import _cell, _num, _pct

if TYPE_CHECKING:
    from meshplan.report.document import Doc


_COMPARED = ("dp", "tp", "pp", "cp", "ep", "expert_tp", "cp_kind", "sequence_parallel", "vocab_parallel", "micro_batch",
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



def compare_section(d: Doc, new: Plan, old: Plan, pics: Mapping[str, Path], old_path: str | None) -> None:
    """The report's "What changed" section: inputs, choices and predictions of ``old`` against ``new``."""
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
