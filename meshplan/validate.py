"""``meshplan validate``: launch the planner's best layouts for a few steps, compare predicted with measured,
and (``--update``) write a calibration back into the cluster file.

A command: it composes the planner (search, rates), the launcher (rendering, the runtime's metrics) and the
profiler's fits, as only commands may (docs/architecture.md); ``meshplan/validate_cli.py`` registers it.

Torch-free: each plan runs as its own torchrun job rendered by the launcher (``launcher/render.py``, the same
command ``meshplan launch`` runs); step times come from the runtime's metrics lines
(``launcher/runtime/metrics.py: summarize``, the median over steps after the first). Memory: the runtime's
``peak_memory_gib`` (``torch.cuda.max_memory_allocated``) on GPUs; on CPU processes the peak resident set
(``VmHWM``) of the worst rank, which also holds the interpreter and torch (a few hundred MiB).

``--repeats R`` launches the plans in R rounds (every layout once a round, every other round in reverse
order) and treats each round as a block: a layout's time in a round is divided by that round's geometric mean
over the layouts, so what the machine did to the whole round (a shared machine's speed drifts by tens of
percent over the half hour of a validate run) cancels out of the ranking; a layout's measured time is the mean
of its normalised runs times the geometric mean of the rounds, with the standard error of that mean. The mean
is used, not the fastest run: on a shared machine one run of a layout spreads widely, and the fastest of a
few runs is a noisier estimate than their blocked mean.

Which plans: the best ``--top`` *distinct layouts* in the planner's order. Plans the runtime executes
identically are one layout: ZeRO 1 and 2 both run FSDP2 without resharding (``parallelize.apply_dp``).

Calibration (:func:`meshplan.profiler.fit.fit_two_scales`): measured ~ a * (compute, recompute, bubble and
optimizer seconds the planner predicted) + b * (its communication seconds); the cluster file's compute rates
are divided by ``a`` and its link bandwidths by ``b`` (latencies multiplied by ``b``). The recalibrated
planner's first choice is then measured; when it is slower than the first choice before (beyond the
run-to-run spread ``SAME_WITHIN``) the file keeps its old rates and only records the attempt: calibration
never leaves the planner picking a worse plan than it did.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import subprocess
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from meshplan.errors import InputError
from meshplan.profiler.fit import fit_two_scales, spearman

COMPUTE_TERMS = ("compute", "recompute", "bubble", "optimizer")
COMM_TERMS = ("tp_comm", "cp_comm", "pp_comm", "vocab_comm", "dp_comm")
RSS_POLL_S = 0.1
# Two runs of one plan differ by this much on a shared machine (benchmarks/validate_cpu.py's repeat runs);
# "better or equal" after calibration is judged within it, or within what the repeated runs resolve.
SAME_WITHIN = 0.05
# Two layouts' mean times count as ordered by the runs when they differ by more than this many standard errors
# of the difference (about 95% confidence for a normal difference; a t quantile would be 2.8 at 2 runs each, so
# with very few repeats this is generous -- the report prints the repeats it had).
RESOLVE_Z = 2.0


def runtime_zero(zero: int) -> str:
    """What the runtime runs for a ZeRO stage (``parallelize.apply_dp``)."""
    return {0: "ddp", 1: "fsdp", 2: "fsdp", 3: "fsdp-reshard"}[zero]


def layout_key(plan) -> tuple:
    """Everything the runtime does differently between plans (ZeRO 1 and 2 are one thing to it)."""
    return (plan.dp, plan.tp, plan.pp, plan.cp, plan.cp_kind if plan.cp > 1 else "-", plan.micro_batch,
            plan.schedule if plan.pp > 1 else "-", plan.virtual_stages, plan.vocab_parallel, runtime_zero(plan.zero),
            tuple((s.layers, tuple(sorted(s.recompute_layers.items()))) for s in plan.stages), plan.sequence_parallel)


def describe(plan) -> str:
    """``dp4 tp1 pp1 cp1 mb4x1 zero1 none``."""
    modes = sorted({m for s in plan.stages for m, n in s.recompute_layers.items() if n})
    text = f"dp{plan.dp} tp{plan.tp} pp{plan.pp} cp{plan.cp}"
    if plan.cp > 1:
        text += f"({plan.cp_kind})"
    text += f" mb{plan.micro_batch}x{plan.num_microbatches} zero{plan.zero}"
    if plan.pp > 1:
        text += f" {plan.schedule}" + (f" v{plan.virtual_stages}" if plan.virtual_stages > 1 else "")
        if plan.vocab_parallel:   # the vocabulary split over the pipeline (with pp = 1 it is plain tp)
            text += " vocab"
    return text + " " + ("+".join(modes) or "none")


def distinct_layouts(plans: list, top: int) -> list:
    """The first ``top`` plans with distinct layouts, in the planner's order."""
    from meshplan.launcher.checks import check_supported

    chosen, seen = [], set()
    for plan in plans:
        key = layout_key(plan)
        if key in seen:
            continue
        try:
            check_supported(plan)
        except InputError:
            continue
        seen.add(key)
        chosen.append(plan)
        if len(chosen) == top:
            break
    return chosen


# ----------------------------------------------------------------------------------------------
# running one plan
# ----------------------------------------------------------------------------------------------

class PeakRss:
    """Polls the peak resident set (``VmHWM``) of every descendant of ``root`` but ``root`` itself (the
    torchrun agent) while a job runs; Linux only (``None`` elsewhere)."""

    def __init__(self, root: int):
        self.root, self.peaks, self.stop = root, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _children(self) -> dict[int, int]:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        return parents

    def _poll(self) -> None:
        if not Path("/proc/self/status").exists():
            return
        while not self.stop.is_set():
            parents = self._children()
            family, grew = {self.root}, True
            while grew:
                new = {p for p, parent in parents.items() if parent in family} - family
                family |= new
                grew = bool(new)
            for pid in family - {self.root}:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) * 1024)
                except OSError:
                    continue
            self.stop.wait(RSS_POLL_S)

    @property
    def peak_gib(self) -> float | None:
        return max(self.peaks.values()) / 2**30 if self.peaks else None


@dataclass
class Run:
    """One launched plan: what the planner said and what the runtime measured."""

    index: int
    plan: Any
    path: str
    predicted_s: float
    predicted_gib: float
    measured_s: float | None = None
    measured_gib: float | None = None
    memory_kind: str = ""
    step_times: list[float] = field(default_factory=list)
    repeats_s: list[float | None] = field(default_factory=list)
    # the runs' times with each round's common drift taken out (:func:`block_rounds`); empty when not blocked
    normalized_s: list[float] = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        bd = self.plan.predicted.time_breakdown_s if self.plan.predicted else {}
        return {"index": self.index, "layout": describe(self.plan), "plan": self.path,
                "predicted_s": self.predicted_s, "measured_s": self.measured_s, "predicted_gib": self.predicted_gib,
                "measured_gib": self.measured_gib, "memory_kind": self.memory_kind, "step_times": self.step_times,
                "breakdown_s": bd, "repeats_s": self.repeats_s, "normalized_s": self.normalized_s,
                "error": self.error}


def launch_plan(plan, plan_path: Path, steps: int, work: Path, index: int, attempt: int = 0) -> Run:
    """Run ``plan`` for ``steps`` steps through the launcher's torchrun command; read its metrics."""
    from meshplan.launcher import render
    from meshplan.launcher.runtime.metrics import summarize

    plan.save(plan_path)
    metrics = work / f"plan{index}.run{attempt}.metrics.jsonl"
    log = work / f"plan{index}.run{attempt}.log"
    nproc = render.nproc_per_node(plan, plan.cluster.nodes)
    cfg = render.LaunchConfig(plan_path=str(plan_path), nnodes=1, train_args=render.train_args(
        steps=steps, seed=0, data=None, data_dtype=None, metrics_out=str(metrics), checkpoint_dir=None,
        checkpoint_every=0, lr=None))
    if plan.cluster.nodes > 1:   # a multi-node plan run on this machine: all agents' ranks here
        cfg = render.LaunchConfig(**{**cfg.__dict__, "nnodes": 1})
    argv = render.torchrun_argv(plan, cfg) if plan.cluster.nodes == 1 else _single_node_argv(plan, cfg)
    env = {**os.environ, **render.environment(plan, nproc)}
    run = Run(index, plan, str(plan_path), plan.predicted.iteration_s, plan.predicted.peak_memory_gib)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        with PeakRss(proc.pid) as rss:
            code = proc.wait()
    if code or not metrics.exists():
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        run.error = f"exit {code}: " + " | ".join(tail)
        return run
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = summarize(records)
    run.measured_s = summary["step_time_s"]
    run.step_times = [r["step_time_s"] for r in records]
    if summary.get("peak_memory_gib") is not None:
        run.measured_gib, run.memory_kind = summary["peak_memory_gib"], "max_memory_allocated"
    else:
        run.measured_gib, run.memory_kind = rss.peak_gib, "peak RSS"
    return run


def _single_node_argv(plan, cfg) -> list[str]:
    """torchrun for a plan whose ranks all run on this machine (one agent, world-size processes)."""
    from meshplan.launcher import render

    argv = [cfg.python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={plan.world_size}",
            "--standalone", "--max-restarts=0", "-m", render.RUNTIME_MODULE, "--plan", cfg.plan_path,
            *cfg.train_args]
    return argv


# ----------------------------------------------------------------------------------------------
# comparing and calibrating
# ----------------------------------------------------------------------------------------------

def compare(runs: list[Run]) -> dict:
    """Spearman of predicted vs measured step time, and how the first choice did against the fastest."""
    ok = [r for r in runs if r.measured_s is not None]
    out: dict[str, Any] = {"plans": len(runs), "measured": len(ok)}
    if not ok:
        return out
    fastest = min(ok, key=lambda r: r.measured_s)
    first = runs[0]
    out["spearman"] = spearman([r.predicted_s for r in ok], [r.measured_s for r in ok])
    out["fastest"] = fastest.index
    out["first_is_fastest"] = first.measured_s is not None and fastest.index == first.index
    if first.measured_s is not None:
        out["first_over_fastest"] = first.measured_s / fastest.measured_s
    out.update(noise(ok))
    return out


def run_times(run: Run) -> list[float]:
    """The median step times of a layout's runs that finished."""
    return [t for t in run.repeats_s if t is not None]


def round_levels(runs: list[Run]) -> dict[int, float]:
    """Each complete round's level: the geometric mean of the layouts' times in it (round index -> seconds).
    Only rounds in which every layout ran count; empty with fewer than two such rounds or two layouts."""
    rounds = min((len(r.repeats_s) for r in runs), default=0)
    complete = [k for k in range(rounds) if all(r.repeats_s[k] is not None for r in runs)]
    if len(runs) < 2 or len(complete) < 2:
        return {}
    return {k: math.exp(statistics.fmean(math.log(r.repeats_s[k]) for r in runs)) for k in complete}


def block_rounds(runs: list[Run]) -> None:
    """Take each round's common drift out of the runs (a randomized-block design: the rounds are the blocks).

    A layout's normalised time in round ``r`` is ``t_ir / g_r * G``, ``g_r`` the round's level
    (:func:`round_levels`), ``G`` the geometric mean of the levels (so the times stay in seconds); its measured
    time is the mean of those. Without two complete rounds the runs keep the plain mean of their times. Sets
    ``measured_s`` and ``normalized_s`` on every run."""
    for run in runs:
        run.normalized_s = []
        if times := run_times(run):
            run.measured_s = statistics.fmean(times)
    levels = round_levels(runs)
    if not levels:
        return
    overall = math.exp(statistics.fmean(math.log(g) for g in levels.values()))
    for run in runs:
        run.normalized_s = [run.repeats_s[k] / g * overall for k, g in levels.items()]
        run.measured_s = statistics.fmean(run.normalized_s)


def standard_error(run: Run) -> float | None:
    """Standard error of a layout's measured time (the mean of its runs, normalised per round where
    :func:`block_rounds` could): stdev / sqrt(runs); None with fewer than two runs."""
    times = run.normalized_s or run_times(run)
    return statistics.stdev(times) / len(times) ** 0.5 if len(times) >= 2 else None


def relative_error(run: Run) -> float | None:
    """:func:`standard_error` as a fraction of the layout's measured time."""
    se = standard_error(run)
    return se / run.measured_s if se is not None and run.measured_s else None


def difference_error(a: Run, b: Run) -> float | None:
    """Standard error of ``a.measured_s - b.measured_s`` (independent runs): sqrt(se_a^2 + se_b^2)."""
    sa, sb = standard_error(a), standard_error(b)
    return (sa * sa + sb * sb) ** 0.5 if sa is not None and sb is not None else None


def same_within(a: Run, b: Run) -> float:
    """How far apart two layouts' times may be (relative to ``a``'s) and still count as equal: SAME_WITHIN, or
    RESOLVE_Z standard errors of their difference where the repeated runs leave it wider."""
    err = difference_error(a, b)
    return max(SAME_WITHIN, RESOLVE_Z * err / a.measured_s if err is not None and a.measured_s else 0.0)


def run_spread(run: Run) -> float | None:
    """Seconds between the slowest and the fastest of a layout's repeated runs (None with fewer than two)."""
    times = run_times(run)
    return max(times) - min(times) if len(times) >= 2 else None


def relative_spread(run: Run) -> float | None:
    """:func:`run_spread` as a fraction of the layout's measured time."""
    spread = run_spread(run)
    return spread / run.measured_s if spread is not None and run.measured_s else None


def noise(runs: list[Run]) -> dict:
    """How far the measurements can rank the layouts at all (needs ``--repeats`` >= 2).

    Two layouts are *resolved* when their mean times differ by more than RESOLVE_Z standard errors of the
    difference (:func:`difference_error`): a second set of runs would very likely order them the same way.
    Spearman over layouts closer than that ranks the machine's noise, not the planner: the report says how
    many of the pairs the runs resolve and how the planner ordered those (as measured / tied / reversed),
    with the runs' spread (slowest over fastest run of one layout) and the standard error of a layout's mean."""
    known = [x for r in runs if (x := relative_spread(r)) is not None]
    if len(known) < 2:
        return {}
    errors = [x for r in runs if (x := relative_error(r)) is not None]
    fastest, slowest = min(r.measured_s for r in runs), max(r.measured_s for r in runs)
    pairs = agree = tied = 0
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            err = difference_error(a, b)
            if err is None or abs(a.measured_s - b.measured_s) <= RESOLVE_Z * err:
                continue
            pairs += 1
            predicted = a.predicted_s - b.predicted_s
            if predicted == 0:
                tied += 1
            elif (predicted > 0) == (a.measured_s > b.measured_s):
                agree += 1
    n = len(runs)
    levels = list(round_levels(runs).values())
    return {"spearman_ceiling": spearman_ceiling(runs),
            "runs_per_layout": statistics.median(len(run_times(r)) for r in runs),
            "round_drift": max(levels) / min(levels) - 1.0 if levels else None,
            "run_spread_median": statistics.median(known), "run_spread_max": max(known),
            "standard_error_median": statistics.median(errors), "measured_span": slowest / fastest - 1.0,
            "pairs": n * (n - 1) // 2, "resolved_pairs": pairs, "resolved_agree": agree, "resolved_tied": tied,
            "resolved_reversed": pairs - agree - tied}


CEILING_DRAWS = 2000   # Monte Carlo draws of the runs' noise for spearman_ceiling (its mean to about +-0.01)


def spearman_ceiling(runs: list[Run], draws: int = CEILING_DRAWS, seed: int = 0) -> float | None:
    """The Spearman a planner that knew every layout's true step time would score against runs this noisy:
    the mean over ``draws`` of spearman(true, true + noise), each layout's noise a normal draw of its
    standard error (:func:`standard_error`). The true times are estimated from the measured means shrunk
    toward their mean by the share of their variance the noise does not explain,
    ``sqrt(max(0, 1 - mean(se^2) / var(means)))`` (the measured means spread more than the true ones by the
    noise itself; without it the ceiling comes out high). None with fewer than three layouts or no
    standard errors. Where this is far below 1 the layouts are closer than the runs resolve, and a low
    Spearman says little about the planner."""
    errors = [standard_error(r) for r in runs]
    if len(runs) < 3 or any(e is None for e in errors):
        return None
    means = [r.measured_s for r in runs]
    center = statistics.fmean(means)
    variance = statistics.pvariance(means)
    if variance <= 0:
        return None
    shrink = math.sqrt(max(0.0, 1.0 - statistics.fmean(e * e for e in errors) / variance))
    if shrink == 0.0:
        return 0.0
    true = [center + shrink * (m - center) for m in means]
    rng = random.Random(seed)
    scores = [spearman(true, [t + e * rng.gauss(0.0, 1.0) for t, e in zip(true, errors)]) for _ in range(draws)]
    return statistics.fmean(x for x in scores if not math.isnan(x))


def noise_text(summary: dict) -> str:
    """One line on what the runs can resolve (empty without repeats)."""
    if "resolved_pairs" not in summary:
        return ""
    drift = summary.get("round_drift")
    line = (f"{summary['runs_per_layout']:g} runs a layout: one run spreads by a median "
            f"{summary['run_spread_median']:.1%} (up to {summary['run_spread_max']:.1%}), "
            + (f"the rounds' levels by {drift:.1%}; blocked by round, " if drift is not None else "")
            + f"a layout's mean is known to +-{summary['standard_error_median']:.1%} (standard error); the layouts span "
            f"{summary['measured_span']:.1%}; pairs the runs resolve ({RESOLVE_Z:g} standard errors apart): "
            f"{summary['resolved_pairs']} of {summary['pairs']}")
    if summary["resolved_pairs"]:
        line += (f", the planner orders {summary['resolved_agree']} as measured, {summary['resolved_tied']} tied, "
                 f"{summary['resolved_reversed']} reversed")
    if summary.get("spearman_ceiling") is not None:
        line += (f"; a planner that knew every layout's true time would score a Spearman of about "
                 f"{summary['spearman_ceiling']:.2f} against runs this noisy")
    if summary["resolved_pairs"] < summary["pairs"] / 2:
        line += (" (most layouts are closer than these runs resolve: Spearman here ranks noise; more --repeats "
                 "narrow it)")
    return line


def split_breakdown(plan) -> tuple[float, float]:
    """(compute-like, communication) seconds of a plan's predicted iteration."""
    bd = plan.predicted.time_breakdown_s
    return sum(bd.get(k, 0.0) for k in COMPUTE_TERMS), sum(bd.get(k, 0.0) for k in COMM_TERMS)


def calibrate(runs: list[Run]) -> tuple[float, float]:
    """``(a, b)``: measured ~ a * compute-like + b * communication (fit.fit_two_scales)."""
    ok = [r for r in runs if r.measured_s is not None]
    parts = [split_breakdown(r.plan) for r in ok]
    return fit_two_scales([c for c, _ in parts], [m for _, m in parts], [0.0] * len(ok), [r.measured_s for r in ok])


# Seconds the profile timed whole, not rates: (place in ``measured``, keys), scaled with their bucket's scale.
MEASURED_COMPUTE_SECONDS = ((("compute", "vocab"), ("head_s", "loss_s", "embedding_s", "chunked_head_loss_s")),
                            (("compute", "optimizer"), ("step_s", "seconds_per_param")),
                            (("host", "pipeline"), ("op_overhead_s",)))
MEASURED_COMM_SECONDS = ((("host", "meeting"), ("base_s", "per_segment")),
                         (("host", "meeting", "curve"), ("penalty_s",)),
                         (("links", "reduction", "samples"), ("seconds",)))


def _scale_seconds(measured: dict, places, scale: float) -> None:
    """Multiply the listed keys of the rows (or the one mapping) at each place in ``measured`` by ``scale``."""
    for path, keys in places:
        node = measured
        for step in path:
            node = node.get(step) if isinstance(node, dict) else None
        for row in node if isinstance(node, list) else [node]:
            if not isinstance(row, dict):
                continue
            for key in keys:
                if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
                    row[key] = row[key] * scale


def apply_calibration(data: dict, cluster, compute_scale: float, comm_scale: float, record: dict,
                      measured_seconds: bool = True) -> dict:
    """The cluster file's mapping with rates divided by the scales; the record appended to
    ``measured.calibration``. Without measured compute tables the current achieved rates are written first.
    ``measured_seconds``: also scale what the profile timed whole rather than as a rate (head + loss,
    optimizer step, pipeline op overhead: compute; meetings and the data-parallel reduction table:
    communication) -- the calibration fits every term of its bucket, so every term moves with it. Records
    written so carry ``measured_seconds_scaled``; :func:`undo_calibration` unscales those seconds only where a
    record carries it."""
    from meshplan.planner.compute import achieved_rates

    out = json.loads(json.dumps(data))
    root = out["cluster"] if isinstance(out.get("cluster"), dict) else out
    measured = root.setdefault("measured", {}) or {}
    root["measured"] = measured
    comp = measured.setdefault("compute", {}) or {}
    measured["compute"] = comp
    if not comp.get("matmul_table") and not comp.get("matmul_tflops"):
        precision = record.get("precision", "bf16")
        rates = achieved_rates(cluster, precision)
        comp["matmul_tflops"] = rates.matmul / 1e12
        comp.setdefault("attention_tflops", rates.attention / 1e12)
        comp.setdefault("memory_gbps", rates.memory / 1e9)
    if comp.get("matmul_table"):
        comp["matmul_table"] = [[f, r / compute_scale] for f, r in comp["matmul_table"]]
    for key in ("matmul_tflops", "attention_tflops", "memory_gbps"):
        if comp.get(key):
            comp[key] = comp[key] / compute_scale
    if not comp.get("attention_tflops"):
        comp["attention_tflops"] = achieved_rates(cluster, record.get("precision", "bf16")).attention / 1e12 / compute_scale
    if not comp.get("memory_gbps"):
        comp["memory_gbps"] = achieved_rates(cluster, record.get("precision", "bf16")).memory / 1e9 / compute_scale
    for level in ("intra_node", "inter_node"):
        if isinstance(root.get(level), dict):
            root[level]["bandwidth_gbps"] = root[level]["bandwidth_gbps"] / comm_scale
            root[level]["latency_us"] = root[level]["latency_us"] * comm_scale
    if measured_seconds:
        _scale_seconds(measured, MEASURED_COMPUTE_SECONDS, compute_scale)
        _scale_seconds(measured, MEASURED_COMM_SECONDS, comm_scale)
        if record:
            record = {**record, "measured_seconds_scaled": True}
    measured.setdefault("calibration", []).append(record)
    return out


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def table_text(runs: list[Run]) -> str:
    from tabulate import tabulate

    ok = [r for r in runs if r.measured_s is not None]
    from meshplan.profiler.fit import ranks_with_ties
    pred_rank = dict(zip([r.index for r in ok], ranks_with_ties([r.predicted_s for r in ok])))
    meas_rank = dict(zip([r.index for r in ok], ranks_with_ties([r.measured_s for r in ok])))
    rows = []
    for r in runs:
        rows.append([r.index, describe(r.plan), f"{r.predicted_s:.3f}",
                     f"{r.measured_s:.3f}" if r.measured_s is not None else "failed",
                     f"+-{x:.1%}" if (x := relative_error(r)) is not None else "-",
                     f"{r.measured_s / r.predicted_s:.2f}" if r.measured_s else "-",
                     f"{pred_rank[r.index]:g}" if r.index in pred_rank else "-",
                     f"{meas_rank[r.index]:g}" if r.index in meas_rank else "-",
                     f"{r.predicted_gib:.2f}", f"{r.measured_gib:.2f}" if r.measured_gib is not None else "n/a"])
    kind = next((r.memory_kind for r in runs if r.memory_kind), "memory")
    return tabulate(rows, headers=["#", "layout", "pred s", "meas s", "std err", "meas/pred", "rank pred",
                                   "rank meas", "pred GiB", f"meas GiB ({kind})"])


def measure_plans(plans: list, steps: int, work: Path, repeats: int) -> list[Run]:
    """Launch every plan once a round for ``repeats`` rounds (every other round in reverse order, so a slow
    trend within a round favours no position), and report per plan its rounds' median step times blocked by
    round (:func:`block_rounds`). ``repeats_s`` keeps each run's own time (None for a failed run); the record,
    logs and step times are the first finished run's; memory the largest any run showed."""
    kept: dict[int, Run] = {}
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(repeats):
        order = list(enumerate(plans, 1))
        for i, plan in (order if attempt % 2 == 0 else order[::-1]):
            begin = time.time()
            run = launch_plan(plan, work / f"plan{i}.yaml", steps, work, i, attempt)
            typer.echo(f"  [{i}/{len(plans)}{f' run {attempt + 1}/{repeats}' if repeats > 1 else ''}] "
                       f"{describe(plan)}: predicted {run.predicted_s:.3f}s, measured "
                       + (f"{run.measured_s:.3f}s" if run.measured_s is not None else f"failed ({run.error})")
                       + f"  ({time.time() - begin:.0f}s, load {os.getloadavg()[0]:.1f})", err=True)
            record = kept.get(i)
            if record is None or (record.measured_s is None and run.measured_s is not None):
                if record is not None:
                    run.repeats_s = record.repeats_s
                kept[i] = record = run
            record.repeats_s.append(run.measured_s)
            if run.measured_gib is not None and run is not record:
                record.measured_gib = max(record.measured_gib or 0.0, run.measured_gib)
    runs = [kept[i] for i in range(1, len(plans) + 1)]
    block_rounds(runs)
    return runs


def run_validate(model, cluster, global_batch, seq_len, precision, top, steps, fix, update, work_dir,
                 out_json, repeats: int = 1) -> int:
    from meshplan.planner.search import parse_fixes, search
    from meshplan.spec import TrainSpec, load_cluster, load_model, load_structured_file

    if top < 2:
        raise InputError("--top", f"must be >= 2 to rank plans, got {top}", "give --top 2 or more")
    if repeats < 1:
        raise InputError("--repeats", f"must be >= 1, got {repeats}", "give --repeats 1 or more")
    if steps < 2:
        raise InputError("--steps", f"must be >= 2 (the first step is warm-up), got {steps}", "give --steps 2 or more")
    cluster_path = Path(cluster)
    if update and not cluster_path.is_file():
        raise InputError("--update", f"{cluster!r} is not a cluster file to write into",
                         "give --cluster cluster.yaml (from `meshplan profile`)")
    model_spec = load_model(model)
    cluster_spec = load_cluster(cluster)
    prec = precision or cluster_spec.default_precision
    train = TrainSpec(global_batch, seq_len, prec)
    fixes = parse_fixes(fix)
    work = Path(work_dir) if work_dir else Path(__import__("tempfile").mkdtemp(prefix="meshplan-validate-"))
    work.mkdir(parents=True, exist_ok=True)

    result = search(model_spec, cluster_spec, train, fixes, top=max(4 * top, 16))
    plans = distinct_layouts(result.plans, top)
    typer.echo(f"meshplan: validating {len(plans)} layouts of {model_spec.name} on {cluster_spec.name}, "
               f"{steps} steps each (work dir {work})", err=True)
    runs = measure_plans(plans, steps, work, repeats)
    summary = compare(runs)
    typer.echo(table_text(runs))
    if summary.get("measured", 0) < 2:
        typer.echo("error: fewer than two plans ran; see the logs in " + str(work), err=True)
        return 1
    typer.echo(f"Spearman rank correlation (predicted vs measured step time): {summary['spearman']:.2f}")
    typer.echo(f"first choice fastest: {'yes' if summary['first_is_fastest'] else 'no'}"
               + (f" (first choice / fastest measured = {summary['first_over_fastest']:.2f})"
                  if "first_over_fastest" in summary else ""))
    if noise_line := noise_text(summary):
        typer.echo(noise_line)
    report: dict[str, Any] = {"summary": summary, "runs": [r.to_dict() for r in runs],
                              "train": train.to_dict(), "cluster": str(cluster)}
    if update:
        a, b = calibrate(runs)
        record = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "compute_scale": a, "comm_scale": b, "precision": prec, "model": model_spec.name,
                  "global_batch": global_batch, "seq_len": seq_len, "spearman": summary["spearman"],
                  "plans": [{"layout": describe(r.plan), "predicted_s": r.predicted_s, "measured_s": r.measured_s}
                            for r in runs]}
        original_text = cluster_path.read_text()
        data = load_structured_file(cluster_path, "--cluster")
        updated = apply_calibration(dict(data), cluster_spec, a, b, record)
        cluster_path.write_text("# written by `meshplan profile`, calibrated by `meshplan validate --update`\n"
                                + yaml.safe_dump(updated, sort_keys=False, width=120))
        typer.echo(f"calibration: compute x{a:.3f}, communication x{b:.3f} -> wrote {cluster_path}")
        outcome = after_calibration(model_spec, cluster_path, train, fixes, runs, steps, work, top, repeats)
        report["calibration"] = outcome
        if outcome.get("verdict") == "worse":
            # never leave a calibration that makes the planner pick a plan measured slower: the file goes
            # back to what it was, with this attempt recorded (not applied) so the evidence is kept
            keep_record(cluster_path, original_text, data, {**record, "applied": False,
                                                            "rejected": "the recalibrated first choice "
                                                                        "measured slower", **outcome})
            outcome["applied"] = False
            typer.echo(f"calibration not applied: the recalibrated first choice measured slower; {cluster_path} "
                       "keeps its rates (the attempt is recorded under measured.calibration)")
        else:
            outcome["applied"] = True
    if out_json is not None:
        Path(out_json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def undo_calibration(data: dict, cluster) -> dict:
    """The cluster file's mapping as the profile wrote it: every calibration ``--update`` applied
    (``measured.calibration`` records not marked ``applied: False``) divided back out, latest first, and the
    records dropped. What re-predicting an earlier validation from its uncalibrated profile needs
    (benchmarks/repredict_validate.py ``--undo-calibration``)."""
    out = json.loads(json.dumps(data, default=str))
    root = out["cluster"] if isinstance(out.get("cluster"), dict) else out
    records = list(((root.get("measured") or {}).get("calibration")) or [])
    for record in reversed(records):
        if record.get("applied") is False:
            continue
        out = apply_calibration(out, cluster, 1.0 / float(record["compute_scale"]),
                                1.0 / float(record["comm_scale"]), {},
                                measured_seconds=bool(record.get("measured_seconds_scaled")))
    root = out["cluster"] if isinstance(out.get("cluster"), dict) else out
    root["measured"].pop("calibration", None)
    return out


def keep_record(cluster_path: Path, original_text: str, data: dict, record: dict) -> None:
    """Write the cluster file back as it was (every rate and link untouched) with ``record`` appended to
    ``measured.calibration``."""
    out = json.loads(json.dumps(data, default=str))
    root = out["cluster"] if isinstance(out.get("cluster"), dict) else out
    measured = root.get("measured") or {}
    root["measured"] = measured
    measured.setdefault("calibration", []).append(json.loads(json.dumps(record, default=str)))
    header = "".join(line + "\n" for line in original_text.splitlines() if line.startswith("#"))
    cluster_path.write_text((header or "# written by `meshplan profile`\n")
                            + yaml.safe_dump(out, sort_keys=False, width=120))


def after_calibration(model_spec, cluster_path: Path, train, fixes, runs: list[Run], steps: int, work: Path,
                      top: int, repeats: int = 1) -> dict:
    """Re-plan with the calibrated file; its first choice against the first choice before, both measured.
    When the new one was not among the validated layouts, the two are launched together in the same rounds
    (blocked like any validation): the old one's time from half an hour earlier is not comparable on a
    machine that drifts by more than the difference asked about."""
    from meshplan.planner.search import search
    from meshplan.spec import load_cluster

    cluster = load_cluster(str(cluster_path))
    new_plans = distinct_layouts(search(model_spec, cluster, train, fixes, top=max(4 * top, 16)).plans, top)
    new = new_plans[0]
    by_key = {layout_key(r.plan): r for r in runs}
    before = runs[0]
    match = by_key.get(layout_key(new))
    if match is None:
        before, match = measure_plans([before.plan, new], steps, work / "calibrated", repeats)
    ok = [r for r in runs if r.measured_s is not None]
    recal = {layout_key(p): p.predicted.iteration_s for p in new_plans}
    pairs = [(recal[layout_key(r.plan)], r.measured_s) for r in ok if layout_key(r.plan) in recal]
    rho_after = spearman([p for p, _ in pairs], [m for _, m in pairs]) if len(pairs) >= 2 else float("nan")
    out = {"first_before": describe(before.plan), "first_before_s": before.measured_s,
           "first_after": describe(new), "first_after_s": match.measured_s,
           "first_after_predicted_s": new.predicted.iteration_s, "spearman_after": rho_after}
    if match.measured_s is not None and before.measured_s is not None:
        ratio = match.measured_s / before.measured_s
        out["after_over_before"] = ratio
        within = same_within(before, match)
        verdict = ("better" if ratio < 1 - within else "equal (within noise)" if ratio <= 1 + within
                   else "worse")
        out["verdict"] = verdict
        typer.echo(f"after calibration the first choice is {describe(new)}: measured {match.measured_s:.3f}s vs "
                   f"{before.measured_s:.3f}s before ({verdict}); Spearman of the recalibrated predictions "
                   f"{rho_after:.2f}")
    return out
