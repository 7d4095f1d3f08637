"""Per-step metrics (JSON lines) and the end-of-run summary: measured next to the plan's predictions.

Each line: ``step``, ``loss``, ``step_time_s``, ``tokens_per_s``, ``lr`` (the step's learning rate),
``grad_norm`` (the global gradient norm before clipping), ``eval_loss`` after the steps that evaluated on
the held-out file, and on GPU ``peak_memory_gib`` (the worst
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


def format_duration(seconds: float) -> str:
    """``3h05m``, ``42m10s`` or ``7s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLine:
    """Rank 0's progress line every ``every`` steps (and the run's first and last step)::

        step   120/5000  loss 2.3451  lr 3.00e-04  grad norm 0.912  12,345 tok/s  0.52 s/step  ETA 42m10s

    plus ``eval 2.4102`` when the step evaluated and ``MFU 41.2%`` on GPUs. The ETA is the median time of the
    last :attr:`WINDOW` steps times the steps left (evaluation time not included)."""

    WINDOW = 20

    def __init__(self, total_steps: int, every: int):
        self.total, self.every = total_steps, max(1, every)
        self.times: list[float] = []
        self.first = True

    def line(self, record: dict) -> str | None:
        import statistics

        step = record["step"]
        self.times = (self.times + [record["step_time_s"]])[-self.WINDOW:]
        due = self.first or step == self.total or step % self.every == 0
        self.first = False
        if not due:
            return None
        per_step = statistics.median(self.times)
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}", f"loss {record['loss']:.4f}"]
        if "eval_loss" in record:
            parts.append(f"eval {record['eval_loss']:.4f}")
        parts += [f"lr {record['lr']:.2e}", f"grad norm {record['grad_norm']:.3g}",
                  f"{record['tokens_per_s']:,.0f} tok/s", f"{record['step_time_s']:.3g} s/step"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"ETA {format_duration(per_step * (self.total - step))}")
        return "  ".join(parts)


class TensorBoardLog:
    """Every numeric field of every metrics record as a TensorBoard scalar (``train/loss``, ``eval/loss``,
    ``train/lr`` ...) at its step, through ``torch.utils.tensorboard`` (the ``tensorboard`` extra)."""

    def __init__(self, directory: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from meshplan.errors import InputError
            raise InputError("--tensorboard", "needs the tensorboard package",
                             "pip install 'meshplan[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=directory)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLog:
    """Where a run's metrics go, on the reporting rank (elsewhere nothing): the JSON-lines file, the progress
    line on stdout and TensorBoard."""

    def __init__(self, metrics_out: str | None, tensorboard: str | None, resume_after: int, total_steps: int,
                 log_every: int, reporter: bool):
        self.reporter = reporter
        self.metrics = MetricsWriter(metrics_out if reporter else None, resume_after=resume_after)
        self.progress = ProgressLine(total_steps, log_every)
        self.tensorboard = TensorBoardLog(tensorboard) if tensorboard and reporter else None

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        if not self.reporter:
            return
        line = self.progress.line(record)
        if line is not None:
            print(line, flush=True)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def close(self) -> None:
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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
