"""Per-step metrics (JSON lines) and the end-of-run summary: measured next to the plan's predictions.

Each line: ``step``, ``loss``, ``step_time_s``, ``tokens_per_s``, ``lr`` (the step's learning rate),
``grad_norm`` (the global gradient norm before clipping), and on GPU ``peak_memory_gib`` (the worst
rank's ``max_memory_allocated``), ``reserved_memory_gib`` (the worst rank's ``max_memory_reserved``: what the
caching allocator holds) and ``mfu`` (model FLOPs per second over the ranks' dense peak). A resumed
run keeps the lines up to the step it resumed from and rewrites the rest, so the file lists each step once.
"""

from __future__ import annotations

import json
from pathlib import Path

from meshplan import flops, metrics_summary
from meshplan.plan import Plan


class MetricsWriter:
    def __init__(self, path: str | None, resume_after: int = 0):
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        self.file = None
        if self.path is None:
            return
        kept: list[dict] = []
        if resume_after > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the crash
                if record.get("step", 0) <= resume_after:
                    kept.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")
        for record in kept:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.records = kept

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def all_records(self) -> list[dict]:
        return list(self.records)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def model_flops_per_token(plan: Plan) -> float:
    """Training FLOPs per token of the plan's model at its sequence length: ``meshplan/flops.py``'s formula,
    the one the planner's MFU prediction uses."""
    return float(flops.model_flops_per_token(plan.model, plan.train.seq_len))


def summarize(records: list[dict]) -> dict:
    """The run's summary as a dict: ``steps`` (records written), ``final_loss``, and the medians of
    ``step_time_s``, ``tokens_per_s`` and ``mfu`` and the maximum ``peak_memory_gib`` over the steps after the
    warm-up (meshplan/metrics_summary.py, the rule ``meshplan report`` reads a run with); ``mfu`` and
    ``peak_memory_gib`` only where the steps recorded them (GPU runs)."""
    summary = metrics_summary.summarize(records)
    out = {"steps": len(records), "final_loss": summary.final_loss, "step_time_s": summary.step_time_s,
           "tokens_per_s": summary.tokens_per_s}
    for key in ("mfu", "peak_memory_gib"):
        if getattr(summary, key) is not None:
            out[key] = getattr(summary, key)
    return out


def summary_table(plan: Plan, records: list[dict]) -> str:
    from tabulate import tabulate

    from meshplan import units

    measured = summarize(records)
    predicted = plan.predicted
    rows = []
    for label, key, pred_key, fmt in [("iteration time (s)", "step_time_s", "iteration_s", "{:.4g}".format),
                                      ("tokens/s", "tokens_per_s", "tokens_per_s", "{:,.0f}".format),
                                      ("MFU", "mfu", "mfu", "{:.1%}".format),
                                      ("peak memory", "peak_memory_gib", "peak_memory_gib", units.human_memory)]:
        m = measured.get(key)
        p = getattr(predicted, pred_key, None) if predicted is not None else None
        ratio = f"{m / p:.2f}" if m is not None and p else "-"
        rows.append([label, fmt(m) if m is not None else "n/a", fmt(p) if p is not None else "n/a", ratio])
    title = f"meshplan run summary: {measured['steps']} steps, final loss {measured['final_loss']:.4f}"
    return title + "\n" + tabulate(rows, headers=["", "measured", "predicted", "measured/predicted"],
                                   disable_numparse=True)
