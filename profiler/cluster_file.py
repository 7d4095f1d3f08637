"""From the worker's raw samples to a cluster YAML the planner reads (torch-free).

The file is an ordinary ``ClusterSpec`` (``meshplan/spec.py``): ``intra_node`` / ``inter_node`` hold the fitted
alpha-beta of each level (bus bandwidth per rank in nccl-tests' convention, GB/s; latency per step, us), and
``measured`` holds a measured profile (``meshplan/measured.py``, ``schema_version`` 2):

* ``compute``: ``matmul_table`` ([forward FLOPs of one GEMM, achieved TFLOP/s over forward + backward]),
  ``attention_tflops`` (causal FLOPs as the planner counts them), ``memory_gbps`` (fitted to the block time the
  GEMMs and attention leave), ``block_check`` (measured block time next to what the fitted model predicts)
  and ``block_lines`` (per tp, the block's time against its micro-batch, which pools the shapes' figures);
* ``memory``: bytes per layer held for backward per recompute mode and shape (and what the planner predicts);
* ``links``: per level the joint fit and one fit per collective, the per-pair bandwidth matrix
  (``pair_bandwidth_gbps``, world x world), the topology as a networkx node-link graph, ``reduction`` (the
  data-parallel collectives timed at the runtime's gradient-unit sizes over every group shape, all groups at
  once: what the planner prices data-parallel traffic from) and ``overlap`` (how much of a collective shows
  beside compute, ``exposed_fraction``);
* ``host`` (CPU ranks): ``busy_speedup``, how much faster a rank computes when only some of its host's ranks
  are busy ([busy ranks, speed / speed with all busy]), and ``meeting``, what a collective costs beyond its
  lined-up time when ranks come to it from computing (``curve``: penalty per segment), and ``pipeline``
  (``op_overhead_s``: one pipeline-schedule op's cost beyond its compute);
* ``raw``: every sample, so a fit can be redone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import statistics
from typing import Any

import yaml

from meshplan.planner import compute as planner_compute
from meshplan.planner import kernels as planner_kernels
from meshplan.planner import memory as planner_memory
from meshplan.measured import MEASURED_SCHEMA_VERSION, MeasuredProfile
from meshplan.rules import ACT_BYTES
from meshplan.planner.fit import COLLECTIVES, fit_alpha_beta, fit_memory_rate, fit_micro_batch_line, rate_table
from meshplan.spec import ClusterSpec, DeviceSpec, LinkSpec, ModelSpec


def gemm_rate_points(raw: dict) -> list[tuple[float, float]]:
    """``(forward FLOPs, achieved TFLOP/s)`` of every measured GEMM (block GEMMs and LM head); the rate counts
    forward + backward, 3 x 2mnk, over the measured forward + backward seconds."""
    points = []
    for block in raw["compute"]["blocks"]:
        for g in block["gemms"]:
            points.append((g["flops"], 3 * g["flops"] / g["seconds"] / 1e12))
    for vocab in raw["compute"]["vocab"]:
        g = vocab["head_gemm"]
        points.append((g["flops"], 3 * g["flops"] / g["seconds"] / 1e12))
    return points


def attention_flops(spec: ModelSpec, tp: int, mb: int, seq: int) -> float:
    """Forward + backward attention FLOPs as ``planner/compute.py: attention_time`` counts them (causal
    forward 2*b*s*s*h/tp, backward 2.5x)."""
    return 3.5 * 2.0 * mb * seq * seq * spec.hidden / tp


def round_samples(blocks: list[dict]) -> list[list[float]] | None:
    """Each profiled shape's block seconds in the worker's rounds (``block_rounds_s``: the first pass, then two
    or more rounds of every shape side by side, worker ``block_rounds``), the rounds taken as blocks: shape
    ``s``'s time in round ``r`` divided by the round's level (the geometric mean over the shapes) and
    multiplied by the mean level -- what the machine did to a whole round cancels from the shapes' ratios,
    which decide the micro-batch and tensor-parallel choices. ``None`` without two shapes and two rounds."""
    rounds = [b.get("block_rounds_s", [])[1:] for b in blocks]
    count = len(rounds[0]) if rounds else 0
    if len(blocks) < 2 or count < 2 or any(len(r) != count or min(r) <= 0 for r in rounds):
        return None
    levels = [math.exp(statistics.fmean(math.log(r[k]) for r in rounds)) for k in range(count)]
    overall = math.exp(statistics.fmean(math.log(level) for level in levels))
    return [[r[k] / levels[k] * overall for k in range(count)] for r in rounds]


def blocked_block_seconds(blocks: list[dict]) -> list[float]:
    """Each profiled block's forward + backward seconds: the median of its round samples
    (:func:`round_samples`), or without rounds the first pass's ``block_s``."""
    samples = round_samples(blocks)
    if samples is None:
        return [b["block_s"] for b in blocks]
    return [statistics.median(s) for s in samples]


# How far (in standard errors of a shape's figure, from the rounds' scatter) a shape may sit off its tensor-
# parallel degree's micro-batch line before the line is not used for that degree. About 0.3% of shapes that
# lie on the line are that far off by chance.
LINE_MAX_Z = 3.0


def micro_batch_lines(blocks: list[dict], seconds: list[float]) -> tuple[list[float], list[dict]]:
    """Per tensor-parallel degree, a line ``fixed + per_sequence * micro_batch`` through its shapes' figures
    (``fit.fit_micro_batch_line``), and each shape's figure read off the line where the line fits: the block
    times the planner uses, and one record per degree.

    Why: a shape's figure is the median of two to five rounds, and on CPU ranks sharing cores one round's
    micro-batch-2 / micro-batch-1 cost ratio can be tens of percent off another's, so each figure carries an
    error of several percent of its own -- the size of the differences between the layouts the planner
    ranks. One line through every micro-batch pools them.

    The line is used for a degree when every one of its shapes lies within ``LINE_MAX_Z`` standard errors of
    it, the standard error being the rounds' pooled scatter about their shapes' medians over the square root
    of the rounds; otherwise the shapes keep their own figures (a GPU block at micro-batch 1 that does not fill
    the device costs nearly what micro-batch 2 costs, and lies far off the line). Without rounds there
    is no scatter to judge by: the figures stand."""
    samples = round_samples(blocks)
    if samples is None:
        return list(seconds), []
    residuals = [math.log(x / median) for xs, median in zip(samples, seconds) for x in xs]
    dof = len(residuals) - len(samples)
    if dof < 1:
        return list(seconds), []
    standard_error = math.sqrt(sum(r * r for r in residuals) / dof) / math.sqrt(len(samples[0]))
    out, records = list(seconds), []
    for tp in sorted({b["tp"] for b in blocks}):
        shapes = [i for i, b in enumerate(blocks) if b["tp"] == tp]
        line = fit_micro_batch_line([blocks[i]["micro_batch"] for i in shapes], [seconds[i] for i in shapes])
        if line is None:
            continue
        fixed, per_sequence = line
        on_line = [fixed + per_sequence * blocks[i]["micro_batch"] for i in shapes]
        offsets = [math.log(seconds[i] / t) for i, t in zip(shapes, on_line)]
        worst = max(abs(o) for o in offsets) / standard_error if standard_error > 0 else (
            0.0 if max(abs(o) for o in offsets) < 1e-12 else math.inf)
        used = worst <= LINE_MAX_Z
        if used:
            for i, t in zip(shapes, on_line):
                out[i] = t
        records.append({"tp": tp, "fixed_s": fixed, "per_sequence_s": per_sequence, "used": used,
                        "worst_offset_se": worst if math.isfinite(worst) else None})
    return out, records


def fit_compute(raw: dict, spec: ModelSpec) -> dict:
    """The achieved-rate model: GEMM table, attention rate, memory rate fitted to the residual block time,
    and each measured block against the fitted model's prediction."""
    blocks = raw["compute"]["blocks"]
    act_bytes = ACT_BYTES.get(raw["precision"], 4)
    table = rate_table(gemm_rate_points(raw))
    attention = statistics.median(attention_flops(spec, b["tp"], b["micro_batch"], b["seq"]) / b["attention_s"]
                                  for b in blocks) / 1e12
    shape_seconds = blocked_block_seconds(blocks)
    residuals, moved = [], []
    for b, block_s in zip(blocks, shape_seconds):
        tokens = b["micro_batch"] * b["seq"]
        gemm_s = sum(g["seconds"] for g in b["gemms"])
        residuals.append(block_s - gemm_s - b["attention_s"])
        # the profiled block runs without sequence parallel: its norms see every token
        moved.append(3 * planner_compute.elementwise_bytes_per_layer(spec, tokens, b["tp"], False, False, act_bytes))
    memory_rate = fit_memory_rate(residuals, moved)
    out: dict[str, Any] = {"precision": raw["precision"], "matmul_table": table,
                           "attention_tflops": attention}
    if memory_rate is not None:
        out["memory_gbps"] = memory_rate / 1e9
    seconds, lines = micro_batch_lines(blocks, shape_seconds)
    check = []
    for b, ew, block_s, shape_s in zip(blocks, moved, seconds, shape_seconds):
        predicted = sum(g["seconds"] for g in b["gemms"]) + b["attention_s"] + (ew / memory_rate if memory_rate else 0)
        model_gemm = sum(g["flops"] * 3 / (planner_compute.interpolate_rate(
            tuple((f, r * 1e12) for f, r in table), g["flops"])) for g in b["gemms"])
        model = model_gemm + attention_flops(spec, b["tp"], b["micro_batch"], b["seq"]) / (attention * 1e12) \
            + (ew / memory_rate if memory_rate else 0)
        check.append({"tp": b["tp"], "micro_batch": b["micro_batch"], "seq": b["seq"],
                      "measured_s": block_s, "shape_s": shape_s, "parts_s": predicted, "model_s": model,
                      "model_over_measured": model / block_s})
    out["block_check"] = check
    if lines:
        out["block_lines"] = lines
    out["vocab"] = [{"tp": v["tp"], "micro_batch": v["micro_batch"], "head_s": v["head_gemm"]["seconds"],
                     "loss_s": v["loss_s"], "embedding_s": v["embedding_s"],
                     **({"seq": v["seq"], "tokens": v["head_gemm"]["m"], "hidden": v["hidden"],
                         "vocab_local": v["vocab_local"], "chunked_head_loss_s": v["chunked_head_loss_s"]}
                        if "chunked_head_loss_s" in v else {}),
                     **({"embedding_rows": v["embedding_rows"]} if "embedding_rows" in v else {})}
                    for v in raw["compute"]["vocab"]]
    optimizer = [o for o in raw["compute"].get("optimizer") or () if o["params"] > 0 and o["step_s"] > 0]
    if optimizer:
        out["optimizer"] = [{"tp": o["tp"], "params": o["params"], "tensors": o["tensors"], "step_s": o["step_s"],
                             "seconds_per_param": o["step_s"] / o["params"]} for o in optimizer]
    kernels = kernel_table(raw, spec)
    if kernels:
        out["kernels"] = kernels
    if raw["compute"]["skipped"]:
        out["skipped_shapes"] = raw["compute"]["skipped"]
    return out


def kernel_table(raw: dict, spec: ModelSpec) -> list[dict]:
    """The kernel phase's rows, each timed memory-bound op with its rate: the planner's forward + backward
    bytes of the op at the timed shape over the measured seconds (planner/kernels.py)."""
    act_bytes = ACT_BYTES.get(raw["precision"], 4)
    rows = []
    for row in raw["compute"].get("kernels") or ():
        row = dict(row)
        if row.get("seconds") and row["op"] in planner_compute.FUSED_PASSES:
            row["gbps"] = planner_kernels.op_bytes(spec, row["op"], row["tokens"], act_bytes) / row["seconds"] / 1e9
        rows.append(row)
    return rows


def memory_table(raw: dict, spec: ModelSpec) -> list[dict]:
    """Bytes per layer held for backward, per shape and recompute mode, next to the planner's formula
    (``planner/memory.py: activation_bytes_per_layer``, flash attention, no sequence parallel)."""
    act_bytes = ACT_BYTES.get(raw["precision"], 4)
    rows = []
    for m in raw["compute"]["memory"]:
        planner = planner_memory.activation_bytes_per_layer(
            spec, m["seq"], m["micro_batch"], tp=m["tp"], sp=False, cp=1, act_bytes=act_bytes, flash=True,
            recompute=m["mode"], fused_swiglu=False)
        rows.append({**m, "planner_bytes": planner})
    return rows


def fit_links(raw: dict) -> dict[str, dict]:
    """Per level: the joint alpha-beta over all collectives and one fit per collective."""
    fits = {}
    for level, data in raw["links"]["levels"].items():
        samples = [(s["collective"], s["ranks"], s["bytes"], s["seconds"]) for s in data["samples"]]
        if not samples:
            continue
        joint = fit_alpha_beta(samples)
        per = {}
        for name in COLLECTIVES:
            mine = [s for s in samples if s[0] == name]
            if len(mine) >= 2:
                per[name] = fit_alpha_beta(mine).to_dict()
        fits[level] = {**joint.to_dict(), "collectives": per, "groups": data["groups"],
                       "skipped_bytes": data["skipped_bytes"]}
    return fits


def fit_reduction(raw: dict) -> dict | None:
    """The reduction measurement (worker ``reduction_phase``) as the table ``planner/comm.py:
    measured_collective_time`` reads: per collective, group shape (``ranks``, ``stride``) and message size,
    ``seconds`` = the median of the rounds' figures (each the slowest rank's lower quartile), next to
    ``rounds_s``. ``seconds`` is what the planner prices (``validate --update`` rescales it with the
    communication scale); ``rounds_s`` stays as measured."""
    data = raw.get("reduction") or {}
    samples = [s for s in data.get("samples") or () if s.get("rounds_s")]
    if not samples:
        return None
    rows = [{"collective": s["collective"], "ranks": s["ranks"], "stride": s["stride"], "bytes": s["bytes"],
             "seconds": statistics.median(s["rounds_s"]), "rounds_s": s["rounds_s"]} for s in samples]
    return {"world": data.get("world"), "rounds": data.get("rounds"), "samples": rows}


def fit_overlap(raw: dict) -> dict | None:
    """The overlap measurement (worker ``overlap_phase``) with its summary: ``exposed_fraction``, the median
    over collectives of (together - compute alone) / collective alone, read by ``planner/comm.py:
    overlap_exposed_fraction``."""
    data = raw.get("overlap") or {}
    samples = data.get("samples") or []
    if not samples:
        return None
    return {"exposed_fraction": statistics.median(s["exposed_fraction"] for s in samples), **data}


def fit_sharing(raw: dict) -> dict | None:
    """The sharing measurement (worker ``sharing_phase``, CPU ranks) as ``busy_speedup``: [[k, rate with k
    of a host's ranks busy / rate with all busy], ...], read by ``planner/compute.py: busy_speedup_table``."""
    samples = (raw.get("sharing") or {}).get("samples") or []
    if not samples:
        return None
    everyone = max(samples, key=lambda s: s["busy"])
    if everyone["gemms_per_s"] <= 0:
        return None
    rounds = [s.get("rounds") or [] for s in samples]
    if all(len(r) == len(everyone.get("rounds") or []) > 0 for r in rounds) and min(everyone["rounds"]) > 0:
        # every count measured in every round, side by side: the median of the rounds' own ratios
        speedup = [statistics.median(x / y for x, y in zip(s["rounds"], everyone["rounds"])) for s in samples]
    else:   # raw samples without per-round rates: the counts' own rates
        speedup = [s["gemms_per_s"] / everyone["gemms_per_s"] for s in samples]
    return {"busy_speedup": [[s["busy"], x] for s, x in zip(samples, speedup)], **raw["sharing"]}


def nondecreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing sequence nearest ``values`` (pool adjacent violators, equal weights):
    a run of values that falls is replaced by its mean."""
    blocks: list[list[float]] = []          # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def fit_meeting(raw: dict) -> dict | None:
    """The meeting measurement (worker ``meeting_phase``, CPU ranks) in the form ``planner/comm.py:
    meeting_time`` reads (which scales it to a group's size):

    - timed as drift (``timing: drift``, one run gives every segment up to a step's length): ``curve``, the
      samples' penalties made non-decreasing in the segment (:func:`nondecreasing`; ranks do not drift less
      apart over a longer segment, a dip is noise), interpolated between its points;
    - otherwise (one sample per segment, ``timing: arrivals`` or none): a least-squares line through the
      samples, penalty = ``base_s + per_segment * segment_s``, held within the measured segments and grown as
      a square root past them. Penalties are taken as at least 0 and the slope as at least 0 (flat at the
      samples' mean where it fits negative): a sample taken as the difference of two loops can be negative,
      and a line through it would price every meeting at 0."""
    data = raw.get("meeting") or {}
    samples = data.get("samples") or []
    if not samples:
        return None
    xs, ys = [s["segment_s"] for s in samples], [max(0.0, s["penalty_s"]) for s in samples]
    if data.get("timing") == "drift":
        ordered = sorted(zip(xs, ys))
        fitted = nondecreasing([y for _, y in ordered])
        return {"curve": [{"segment_s": x, "penalty_s": y} for (x, _), y in zip(ordered, fitted)],
                "segments_s": [min(xs), max(xs)], **data}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread if spread > 0 else 0.0
    slope = max(0.0, slope)
    return {"timing": "arrivals", "base_s": my - slope * mx, "per_segment": slope,
            "segments_s": [min(xs), max(xs)], **data}


def topology_graph(raw: dict, matrix_gbps: list[list[float]]):
    """A networkx graph: one node per rank (with its node index and host), one edge per measured pair
    weighted by its bandwidth in GB/s."""
    import networkx as nx

    graph = nx.Graph()
    for rank, info in enumerate(raw["ranks"]):
        graph.add_node(rank, node=info["node"], host=info["host"])
    world = len(matrix_gbps)
    for i in range(world):
        for j in range(i + 1, world):
            bw = min(x for x in (matrix_gbps[i][j], matrix_gbps[j][i]) if x > 0) if (matrix_gbps[i][j] or matrix_gbps[j][i]) else 0
            if bw:
                same = raw["ranks"][i]["node"] == raw["ranks"][j]["node"]
                graph.add_edge(i, j, bandwidth_gbps=bw, level="intra_node" if same else "inter_node")
    return graph


def build_cluster(raw: dict, base: ClusterSpec, name: str) -> ClusterSpec:
    """The profiled ClusterSpec: ``base`` (the device figures of ``localhost:N``) with fitted links and the
    measured tables."""
    import networkx as nx

    spec = ModelSpec.from_dict(raw["model"])
    links = fit_links(raw)
    matrix = [[bw / 1e9 for bw in row] for row in raw["pairs"]["bandwidth_bytes_per_s"]]
    graph = topology_graph(raw, matrix)
    intra = links.get("intra_node") or links.get("inter_node")
    inter = links.get("inter_node") or intra
    if intra is None:   # one rank: nothing to fit
        intra_spec, inter_spec = base.intra_node, base.inter_node
    else:
        intra_spec = LinkSpec(intra["bandwidth_gbps"], intra["latency_us"])
        inter_spec = LinkSpec(inter["bandwidth_gbps"], inter["latency_us"])
    measured = {
        "schema_version": MEASURED_SCHEMA_VERSION,
        "tool": "meshplan profile",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": raw["device"], "torch": raw["torch"], "world": raw["world"],
        "budget_s": raw["budget_s"], "startup_s": raw.get("startup_s", 0.0), "elapsed_s": raw["elapsed_s"],
        "shapes_model": spec.name,
        "compute": fit_compute(raw, spec),
        "memory": {"per_layer": memory_table(raw, spec)},
        "links": {**links, "pair_bytes": raw["pairs"]["bytes"], "pair_bandwidth_gbps": matrix,
                  "topology": nx.node_link_data(graph, edges="edges")},
        "raw": {"compute": raw["compute"], "links": raw["links"], "ranks": raw["ranks"],
                **({"reduction": raw["reduction"]} if raw.get("reduction") else {})},
    }
    reduction = fit_reduction(raw)
    if reduction is not None:
        measured["links"]["reduction"] = reduction
    overlap = fit_overlap(raw)
    if overlap is not None:
        measured["links"]["overlap"] = overlap
    host = {**(fit_sharing(raw) or {})}
    meeting = fit_meeting(raw)
    if meeting is not None:
        host["meeting"] = meeting
    if raw.get("pipeline"):
        host["pipeline"] = raw["pipeline"]
    if host:
        measured["host"] = host
    MeasuredProfile.from_dict(measured, "the profile")   # what the planner reads back: checked as it is written
    device = measured_cpu_peak(base.gpu, measured["compute"])
    return ClusterSpec(name=name, nodes=raw["nnodes"], gpus_per_node=raw["nproc_per_node"], gpu=device,
                       intra_node=intra_spec, inter_node=inter_spec, measured=measured)


def measured_cpu_peak(device: DeviceSpec, compute: dict) -> DeviceSpec:
    """A CPU process has no spec-sheet peak: ``localhost:N``'s nominal one (0.05 TFLOP/s per core) is raised to
    the fastest GEMM the profile measured (``compute["matmul_table"]``, in its precision) when that is higher,
    so that MFU stays a share of what this machine reaches. A GPU keeps its vendor's dense peak."""
    rates = [tflops for _, tflops in compute.get("matmul_table") or ()]
    if device.kind != "cpu" or not rates:
        return device
    best = max(rates)
    if compute.get("precision") == "fp32":
        return dataclasses.replace(device, peak_tflops_fp32=max(device.peak_flops("fp32") / 1e12, best))
    return dataclasses.replace(device, peak_tflops=max(device.peak_tflops, best))


def plain(value):
    """Tuples to lists and numbers to plain floats/ints so the YAML is portable (safe_load reads it)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def write_cluster(cluster: ClusterSpec, path) -> None:
    """Write ``cluster`` as YAML (``meshplan plan --cluster path`` reads it back)."""
    from pathlib import Path

    text = "# written by `meshplan profile`; docs/profiler.md explains every field\n"
    text += yaml.safe_dump(plain(cluster.to_dict()), sort_keys=False, width=120)
    Path(path).write_text(text)
