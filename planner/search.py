"""The search: enumerate valid configurations, prune with lower bounds, evaluate, keep the top K, and count
why the rest lost.

1. Degrees: dp*tp*pp*cp = world; tp divides heads, and kv_heads (or kv heads are replicated: tp a multiple of
   kv_heads); tp stays inside a node; seq divisible by tp*cp (ring: by 2*cp for load-balanced causal chunks;
   Ulysses: heads divisible by tp*cp); pp <= layers; dp divides the global batch.
2. For each degree family and micro batch, a lower bound on the iteration time (the work of the slowest
   conceivable balanced pipeline, no bubble, no data-parallel or optimizer time) orders the families; a
   family whose bound is no better than the current K-th best is pruned without evaluation.
3. Each surviving family is evaluated for every schedule / virtual stages / ZeRO stage / vocab-parallel /
   CP kind; ``evaluate`` partitions the blocks and chooses recomputation per rank.
4. The finalists are re-solved with the joint partition + recompute ILP (PuLP/CBC) and re-evaluated.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from meshplan.engines import MESHPLAN, Engine, get_engine
from meshplan.errors import InputError, NoFeasiblePlan
from meshplan.plan import (ATTENTIONS, CP_KINDS, DEFAULT_MESH_ORDER, FUSED_IMPLS, RECOMPUTE_MODES, SCHEDULES, Plan,
                           expert_layout_problem, schedule_problem)
from meshplan.spec import ClusterSpec, ModelSpec, TrainSpec, _as_bool, _as_choice, _as_float, _as_int
from meshplan.units import human_memory
from meshplan.planner import memory
from meshplan.planner.block import config_layer_cost
from meshplan.planner.evaluate import Evaluation, evaluate, to_plan
from meshplan.planner.inputs import Config, Context, Rejection
from meshplan.planner.kernels import KERNEL_OPS
from meshplan.planner.vocab import vocab_cost
from meshplan.planner.layout import activation_capacity
from meshplan.planner.recompute import solve_partition_ilp
from meshplan.planner.step import step_of

MAX_MICRO_BATCH = 32
MAX_VIRTUAL_STAGES = 4

# --fix keys and their parsers
FIX_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "dp": lambda v, w: _as_int(v, w, 1),
    "tp": lambda v, w: _as_int(v, w, 1),
    "pp": lambda v, w: _as_int(v, w, 1),
    "cp": lambda v, w: _as_int(v, w, 1),
    "cp_kind": lambda v, w: _as_choice(v, w, CP_KINDS),
    "micro_batch": lambda v, w: _as_int(v, w, 1),
    "schedule": lambda v, w: _as_choice(v, w, SCHEDULES),
    "virtual_stages": lambda v, w: _as_int(v, w, 1),
    "recompute": lambda v, w: _as_choice(v, w, RECOMPUTE_MODES),
    "zero": lambda v, w: _as_int(v, w, 0, 3),
    "vocab_parallel": lambda v, w: _as_bool(v, w),
    "tp_overlap": lambda v, w: _as_bool(v, w),
    "compile": lambda v, w: _as_bool(v, w),
    "fused_kernels": lambda v, w: _as_bool(v, w),
    "sequence_parallel": lambda v, w: _as_bool(v, w),
    "attention": lambda v, w: _as_choice(v, w, ATTENTIONS),
    "ep": lambda v, w: _as_int(v, w, 1),
    "expert_tp": lambda v, w: _as_int(v, w, 1),
    "moe_imbalance": lambda v, w: _as_float(v, w, 1.0, strict=False),
    # the implementation of one fused op (plan ``kernels``; planner/kernels.py): meshplan's or liger-kernel's
    **{f"{op}_kernel": (lambda v, w: _as_choice(v, w, FUSED_IMPLS)) for op in KERNEL_OPS},
}


def parse_fixes(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["tp=8", "pp=4"]`` (or a dict) into typed pins; one-line errors for unknown keys or bad values."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else []
    if not isinstance(items, dict):
        parsed = []
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise InputError("--fix", f"{item!r} is not KEY=VALUE", "write e.g. --fix tp=8")
            parsed.append((key.strip().replace("-", "_"), value.strip()))
        pairs = parsed
    fixes: dict[str, Any] = {}
    for key, value in pairs:
        if key not in FIX_KEYS:
            raise InputError(f"--fix {key}", "unknown key", f"pin one of: {', '.join(FIX_KEYS)}")
        fixes[key] = FIX_KEYS[key](value, f"--fix {key}")
    return fixes


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class SearchResult:
    plans: list[Plan]
    seconds: float
    evaluated: int
    rejected: dict[str, int]
    closest_oom: tuple[float, Config] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"plans": [p.to_dict(with_inputs=False) for p in self.plans],
                "search": {"seconds": round(self.seconds, 3), "evaluated": self.evaluated},
                "rejected": dict(sorted(self.rejected.items(), key=lambda kv: -kv[1]))}


def degree_problems(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, dp: int, tp: int, pp: int, cp: int,
                    cp_kind: str | None = None, engine: Engine = MESHPLAN) -> str | None:
    """Why these degrees cannot run, as a short reason (None when valid). One place for divisibility rules."""
    if dp * tp * pp * cp != cluster.world_size:
        return "degrees: dp*tp*pp*cp != world size"
    if model.heads % tp:
        return "divisibility: heads % tp"
    if model.kv_heads % tp and (tp % model.kv_heads or not engine.kv_head_replication):
        return "divisibility: kv_heads % tp"
    if tp > cluster.gpus_per_node:
        return "placement: tp spans nodes"
    if train.seq_len % (tp * cp):
        return "divisibility: seq_len % (tp*cp)"
    if cp > 1:
        if cp_kind == "ulysses" and (model.heads // tp) % cp:
            return "divisibility: heads/tp % cp (ulysses)"
        if cp_kind == "ring" and train.seq_len % (2 * cp * tp):
            return "divisibility: seq_len % (2*cp*tp) (ring)"
    if pp > model.layers:
        return "divisibility: pp > layers"
    if train.global_batch % dp:
        return "divisibility: global_batch % dp"
    return None


def _variants(ctx: Context, dp: int, tp: int, pp: int, cp: int, b: int, fixes: dict[str, Any]) -> list[Config]:
    """Every schedule / ZeRO / vocab-parallel / CP-kind / overlap variant of one degree family that the
    engine runs."""
    gpu, engine = ctx.cluster.gpu.kind == "gpu", ctx.engine
    if fixes.get("attention") == "unfused" and cp > 1:
        return []                       # unfused attention has no context-parallel form
    num_mb = ctx.train.global_batch // (dp * b)
    schedules: list[tuple[str, int]] = []
    if pp == 1:
        schedules = [(fixes.get("schedule", "1f1b"), 1)]
    else:
        for sched in (list(engine.schedules) if "schedule" not in fixes else [fixes["schedule"]]):
            if schedule_problem(sched, pp, num_mb):
                continue
            if sched == "interleaved":
                vs = [fixes["virtual_stages"]] if "virtual_stages" in fixes else range(2, MAX_VIRTUAL_STAGES + 1)
                for v in vs:
                    if v >= 2 and pp * v <= ctx.model.layers:
                        schedules.append((sched, v))
            else:
                schedules.append((sched, 1))
    zeros = [fixes["zero"]] if "zero" in fixes else (list(engine.zero_stages) if dp > 1 else [0])
    vocab = ([fixes["vocab_parallel"]] if "vocab_parallel" in fixes
             else [False, True] if pp > 1 and engine.vocab_parallel else [False])
    cp_kinds = ([fixes["cp_kind"]] if "cp_kind" in fixes
                else list(engine.cp_kinds) if cp > 1 else [engine.cp_kinds[0]])
    compiled = fixes.get("compile", gpu and engine.compile)
    sequence_parallel = fixes.get("sequence_parallel", True)
    # async TP / TP comm overlap decompose sequence parallel's all-gathers and reduce-scatters: SP only
    overlap = ([fixes["tp_overlap"]] if "tp_overlap" in fixes
               else [gpu and tp > 1 and sequence_parallel and engine.tp_overlap
                     and (compiled or not engine.tp_overlap_needs_compile)])
    fused = fixes.get("fused_kernels", gpu and engine.fused_kernels)
    cp_kinds = [kind for kind in cp_kinds
                if not degree_problems(ctx.model, ctx.cluster, ctx.train, dp, tp, pp, cp, kind, engine)]
    experts = expert_layouts(ctx, dp, tp, cp, fixes)
    out = []
    for sched, v in schedules:
        for z in zeros:
            for vp in vocab:
                for kind in cp_kinds:
                    for ov in overlap:
                        for ep, etp in experts:
                            out.append(Config(dp=dp, tp=tp, pp=pp, cp=cp, micro_batch=b, schedule=sched,
                                              virtual_stages=v, zero=z, vocab_parallel=vp, cp_kind=kind,
                                              tp_overlap=ov, compile=compiled, fused_kernels=fused,
                                              recompute=fixes.get("recompute"), mesh_order=DEFAULT_MESH_ORDER,
                                              sequence_parallel=sequence_parallel,
                                              attention=fixes.get("attention", "flash"), ep=ep, expert_tp=etp,
                                              moe_imbalance=fixes.get("moe_imbalance")))
    return out


def expert_layouts(ctx: Context, dp: int, tp: int, cp: int, fixes: dict[str, Any]) -> list[tuple[int, int]]:
    """The (ep, expert_tp) pairs a degree family offers: for a model with experts every ep dividing dp*cp and
    the experts (plan.expert_layout_problem), each expert whole (1) or split over tp where the engine runs it;
    (1, 1) for a dense model. Routed experts take the sequence-parallel shard of the tokens, so tp > 1 needs
    sequence parallel (as Megatron-Core requires it for MoE with tensor parallel)."""
    model = ctx.model
    if model.moe is None:
        return [(1, 1)]
    if tp > 1 and not fixes.get("sequence_parallel", True):
        return []
    eps = [fixes["ep"]] if "ep" in fixes else divisors(dp * cp)
    etps = ([fixes["expert_tp"]] if "expert_tp" in fixes
            else [1, tp] if tp > 1 and ctx.engine.expert_tensor_parallel else [1])
    return [(ep, etp) for ep in eps for etp in etps
            if expert_layout_problem(model, dp, tp, cp, ep, etp) is None]


def _lower_bound(ctx: Context, cfg: Config) -> float:
    """No plan of this configuration is faster than its work spread perfectly over the pipeline ranks,
    plus the smallest fill/drain its schedule allows ((p - 1)/v micro-batch slots)."""
    lc = config_layer_cost(ctx, cfg)
    vc = vocab_cost(ctx, cfg)
    num_mb = ctx.train.global_batch // (cfg.dp * cfg.micro_batch)
    work = ctx.model.layers * (lc.fwd + lc.bwd) + vc.first_time + vc.last_time + vc.each_time * cfg.pp
    per_slot = work / cfg.pp
    return per_slot * (num_mb + (cfg.pp - 1) / cfg.virtual_stages)


def _family_bound(ctx: Context, variants: list[Config]) -> float:
    """The least :func:`_lower_bound` of a family's variants, an interleaved one at the most virtual stages.
    The bound reads the block and vocabulary costs and the number of virtual stages, not the ZeRO stage or
    the schedule's name: variants differing only there are bounded once."""
    bounds = {}
    for c in variants:
        v = MAX_VIRTUAL_STAGES if c.schedule == "interleaved" else c.virtual_stages
        key = (v, c.vocab_parallel, c.cp_kind, c.tp_overlap, c.ep, c.expert_tp)
        if key not in bounds:
            bounds[key] = _lower_bound(ctx, c if v == c.virtual_stages else replace(c, virtual_stages=v))
    return min(bounds.values())


def _memory_lower_bound(ctx: Context, cfg: Config) -> float:
    """The least memory any variant of this family needs on its first pipeline rank: fully sharded
    training state (ZeRO-3) and full recompute with the fewest micro-batches in flight (1F1B)."""
    lc = config_layer_cost(ctx, cfg)
    num_mb = ctx.train.global_batch // (cfg.dp * cfg.micro_batch)
    layers = ctx.model.layers / cfg.pp
    b = memory.state_bytes(ctx.train.precision, ctx.train.optimizer)
    # sharded over dp x cp; the routed experts over their own group
    states = (b.param + b.grad + b.optimizer) * layers * (lc.dense_params / (cfg.dp * cfg.cp)
                                                          + lc.expert_params / cfg.expert_dp)
    in_flight = min(cfg.pp, num_mb)
    return states + in_flight * layers * lc.act["full"]


def search(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixes: dict[str, Any] | None = None,
           top: int = 3, refine: bool = True, progress: Callable[[int, int], None] | None = None,
           engine: str | Engine = "meshplan",
           memory_headroom: float = memory.DEFAULT_MEMORY_HEADROOM) -> SearchResult:
    """Find the ``top`` fastest plans that fit, among what ``engine`` runs (meshplan/engines.py), priced as it
    behaves, each leaving ``memory_headroom`` of the device memory unreserved. Raises NoFeasiblePlan (with what
    would fit) when none does."""
    start = time.perf_counter()
    fixes = dict(fixes or {})
    ctx = Context(model, cluster, train, engine if isinstance(engine, Engine) else get_engine(engine),
                  memory_headroom)
    model.check_sequence(train.seq_len)
    _check_fixes(ctx, fixes)
    ctx = pin_kernels(ctx, fixes)
    rejected: Counter[str] = Counter()
    families, closest_oom = _degree_families(ctx, fixes, rejected)
    best, evaluated, closest_oom = _evaluate_families(ctx, families, fixes, top, rejected, closest_oom, progress)
    if not best:
        raise NoFeasiblePlan(_nothing_fits_message(ctx, fixes, rejected, closest_oom))

    # 4. refine finalists with the joint partition + recompute ILP
    finalists = best[: top * 2]
    if refine:
        finalists = [_refine(ctx, ev) for ev in finalists]
        finalists.sort(key=plan_order)
    chosen = finalists[:top]
    rejected["slower than the top plans"] += len(best) - len(chosen)
    seconds = time.perf_counter() - start
    plans = []
    alternatives = [_alternative(ev) for ev in chosen]
    for rank, ev in enumerate(chosen):
        notes = _why(ev, chosen[0], rank)
        search_info = {"seconds": round(seconds, 3), "evaluated": evaluated, "rank": rank + 1,
                       "rejected": dict(rejected), "alternatives": alternatives}
        plans.append(to_plan(ev, ctx, notes, search_info))
    return SearchResult(plans, seconds, evaluated, dict(rejected), closest_oom)


def _degree_families(ctx: Context, fixes: dict[str, Any], rejected: Counter) -> tuple[list, tuple | None]:
    """1. Degree families x micro batch that pass the divisibility rules and the memory lower bound, each with
    its time lower bound, sorted by it; and the family that missed memory by the least."""
    model, cluster, train = ctx.model, ctx.cluster, ctx.train
    world = cluster.world_size
    closest_oom: tuple[float, Config] | None = None
    families = []
    for tp in ([fixes["tp"]] if "tp" in fixes else divisors(world)):
        for cp in ([fixes["cp"]] if "cp" in fixes else divisors(world // tp) if world % tp == 0 else []):
            rest = world // (tp * cp) if world % (tp * cp) == 0 else 0
            if not rest:
                continue
            for pp in ([fixes["pp"]] if "pp" in fixes else divisors(rest)):
                if rest % pp:
                    continue
                dp = rest // pp
                if "dp" in fixes and fixes["dp"] != dp:
                    continue
                problem = degree_problems(model, cluster, train, dp, tp, pp, cp, engine=ctx.engine)
                if problem:
                    rejected[problem] += 1
                    continue
                closest_oom = _micro_batch_families(ctx, fixes, dp, tp, pp, cp, rejected, families, closest_oom)
    families.sort()
    return families, closest_oom


def _micro_batch_families(ctx: Context, fixes: dict[str, Any], dp: int, tp: int, pp: int, cp: int,
                          rejected: Counter, families: list, closest_oom):
    """Append the degrees' families, one per micro batch, to ``families``; returns the closest OOM so far."""
    per_dp = ctx.train.global_batch // dp
    bs = [fixes["micro_batch"]] if "micro_batch" in fixes else [d for d in divisors(per_dp) if d <= MAX_MICRO_BATCH]
    for b in bs:
        if per_dp % b:
            rejected["divisibility: global_batch % (dp*micro_batch)"] += 1
            continue
        variants = _variants(ctx, dp, tp, pp, cp, b, fixes)
        if not variants:
            rejected["divisibility: no valid schedule / CP kind"] += 1
            continue
        need = _memory_lower_bound(ctx, variants[0])
        if need > ctx.reserved_capacity_bytes:
            rejected["OOM"] += len(variants)
            over = need - ctx.reserved_capacity_bytes
            if closest_oom is None or over < closest_oom[0]:
                closest_oom = (over, replace(variants[0], zero=3, recompute="full"))
            continue
        families.append((_family_bound(ctx, variants), dp, tp, pp, cp, b))
    return closest_oom


def _evaluate_families(ctx: Context, families: list, fixes: dict[str, Any], top: int, rejected: Counter,
                       closest_oom, progress) -> tuple[list[Evaluation], int, tuple | None]:
    """2-3. Evaluate the families' variants in bound order, pruning those whose lower bound is no better than
    the current top; keeps twice ``top`` (spares for the ILP refinement)."""
    best: list[Evaluation] = []
    evaluated = 0
    total = len(families)
    for index, (bound, dp, tp, pp, cp, b) in enumerate(families):
        if progress:
            progress(index, total)
        if len(best) >= top and bound >= best[top - 1].iteration_s:
            rejected["pruned: lower bound slower than the top plans"] += total - index
            break
        for cfg in _variants(ctx, dp, tp, pp, cp, b, fixes):
            if len(best) >= top and _lower_bound(ctx, cfg) >= best[top - 1].iteration_s:
                rejected["pruned: lower bound slower than the top plans"] += 1
                continue
            evaluated += 1
            result = evaluate(cfg, ctx)
            if isinstance(result, Rejection):
                rejected[result.reason] += 1
                if result.reason == "OOM" and (closest_oom is None or result.over_bytes < closest_oom[0]):
                    closest_oom = (result.over_bytes, cfg)
                continue
            best.append(result)
            best.sort(key=plan_order)
            dropped = best[top * 2:]
            del best[top * 2:]
            rejected["slower than the top plans"] += len(dropped)
    if progress:
        progress(total, total)
    return best, evaluated, closest_oom


def plan_order(ev: Evaluation) -> tuple[float, float]:
    """How the top plans are ranked: by predicted step time, and where two are predicted equal (GPipe and 1F1B
    have one makespan; to the nanosecond) by peak memory, lower first -- the same speed with more headroom.
    The second key keeps such ties out of evaluation order, which a calibration could flip."""
    return round(ev.iteration_s, 9), ev.peak_bytes


def _alternative(ev: Evaluation) -> dict[str, Any]:
    """One top plan as the JSON/YAML ``search.alternatives`` entry: its pins, its iteration time, where that
    time goes (the keys of ``predicted.time_breakdown_s``) and its peak memory, so a report can say why it
    lost to plan 1 term by term."""
    return {"fix": _fix_of(ev.config), "iteration_s": round(ev.iteration_s, 6),
            "time_breakdown_s": {k: round(v, 6) for k, v in ev.time_breakdown.items()},
            "peak_memory_gib": round(ev.peak_bytes / memory.GIB, 3)}


def _fix_of(cfg: Config) -> dict[str, Any]:
    pins = {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "cp": cfg.cp, "micro_batch": cfg.micro_batch,
            "schedule": cfg.schedule, "virtual_stages": cfg.virtual_stages, "zero": cfg.zero,
            "vocab_parallel": cfg.vocab_parallel, "cp_kind": cfg.cp_kind}
    if cfg.tp > 1 and not cfg.sequence_parallel:
        pins["sequence_parallel"] = False
    if cfg.attention != "flash":
        pins["attention"] = cfg.attention
    if cfg.ep > 1 or cfg.expert_tp > 1:
        pins.update(ep=cfg.ep, expert_tp=cfg.expert_tp)
    return pins


def _refine(ctx: Context, ev: Evaluation) -> Evaluation:
    """Re-solve the blocks per rank and their recomputation jointly with the ILP; keep it if faster."""
    cfg = ev.config
    if cfg.virtual_stages > 1:
        return ev     # chunks of a rank are split evenly; the per-rank enumeration is already exact there
    pinned = cfg.recompute
    if pinned is None and not ctx.engine.mixed_recompute:
        # one mode for the whole model: the ILP may move blocks, not change the mode (Megatron's block method,
        # N full blocks on every rank, is left as evaluate chose it: the ILP would vary N per rank)
        modes = {m for counts in ev.rank_counts for m, n in counts.items() if n}
        if len(modes) != 1:
            return ev
        pinned = modes.pop()
    s = step_of(ctx, cfg)
    lc = s.lc
    p = cfg.pp
    num_mb = ctx.train.global_batch // (cfg.dp * cfg.micro_batch)
    in_flight = [memory.microbatches_in_flight(cfg.schedule, p, r, num_mb, 1) for r in range(p)]
    # the same memory model as evaluate(): static bytes linear in blocks, with room for one re-materialised block
    static = [base for base, _ in ev.rank_static]
    per_block = [slope for _, slope in ev.rank_static]
    capacity = activation_capacity(s)
    solved = solve_partition_ilp(ctx.model.layers, num_mb, lc.fwd + lc.bwd, _rank_extras(ctx, cfg), static,
                                 per_block, in_flight, lc.act, lc.recompute, capacity, pinned)
    if solved is None:
        return ev
    partition, counts = solved
    better = evaluate(cfg, ctx, partition=partition, recompute_counts=counts)
    if isinstance(better, Evaluation) and better.iteration_s < ev.iteration_s - 1e-12:
        better.notes.append("layer partition and recomputation solved jointly by the ILP (CBC)")
        return better
    return ev


def _rank_extras(ctx: Context, cfg: Config) -> list[float]:
    """Per-rank fixed compute seconds per micro-batch: embedding, head + loss, vocab-parallel share (the
    same rank times evaluate() feeds pipeline_makespan; the p2p is counted apart, on the critical path)."""
    return [_stage_time(ctx, cfg, r) for r in range(cfg.pp)]


def _stage_time(ctx: Context, cfg: Config, rank: int) -> float:
    vc = vocab_cost(ctx, cfg)
    extra = 0.0
    if cfg.vocab_parallel:
        extra += vc.each_time
    if rank == 0:
        extra += vc.first_time
    if rank == cfg.pp - 1:
        extra += vc.last_time
    return extra


def _why(ev: Evaluation, best: Evaluation, rank: int) -> list[str]:
    """Plain-language notes: what dominates the time, what bound memory."""
    notes = list(ev.notes)
    tb = ev.time_breakdown
    total = ev.iteration_s
    top_terms = sorted(((v, k) for k, v in tb.items() if v > 0), reverse=True)[:3]
    notes.append("time goes to " + ", ".join(f"{k} {v / total:.0%}" for v, k in top_terms))
    mem = ev.rank_detail(ev.worst_rank)
    biggest = max(mem, key=mem.get)
    notes.append(f"peak memory {human_memory(ev.peak_bytes / memory.GIB)} (pipeline rank {ev.worst_rank}), "
                 f"mostly {biggest} ({human_memory(mem[biggest] / memory.GIB)})")
    if rank > 0:
        notes.append(f"{(ev.iteration_s / best.iteration_s - 1):.1%} slower than plan 1")
    return notes


def pin_kernels(ctx: Context, fixes: dict[str, Any]) -> Context:
    """The context with the ``--fix <op>_kernel`` pins over the profile's choice (planner/kernels.py), and the
    pins they imply: fused kernels, and for liger's loss a whole head (tp 1, no vocabulary parallelism). A pin
    that cannot hold is an input error naming it."""
    pins = {op: fixes[f"{op}_kernel"] for op in KERNEL_OPS if f"{op}_kernel" in fixes}
    if not pins:
        return ctx
    named = f"--fix {next(iter(pins))}_kernel"
    if ctx.engine.name != MESHPLAN.name:
        raise InputError(named, f"a kernel per op is meshplan's runtime's choice; {ctx.engine.title} runs its own",
                         "drop the pin, or plan with --engine meshplan")
    if ctx.cluster.gpu.kind != "gpu":
        raise InputError(named, "the fused and liger-kernel kernels run on GPUs", "drop the pin on CPU clusters")
    if fixes.get("fused_kernels") is False:
        raise InputError(named, "a kernel pin runs fused kernels, and --fix fused_kernels=false turns them off",
                         "drop one of the two")
    fixes["fused_kernels"] = True
    if pins.get("loss") == "liger":
        if fixes.get("tp", 1) != 1 or fixes.get("vocab_parallel"):
            raise InputError("--fix loss_kernel", "liger-kernel's loss computes a whole head: tp 1, the "
                             "vocabulary not split over pipeline ranks", "drop --fix loss_kernel=liger, or the "
                             "tp / vocab_parallel pin")
        fixes["tp"], fixes["vocab_parallel"] = 1, False
    return replace(ctx, kernels=tuple(pins.items()))


def _check_fixes(ctx: Context, fixes: dict[str, Any]) -> None:
    """Pins that can never work are input errors (exit 2), named with the fix."""
    ctx.engine.check({k: v for k, v in fixes.items() if ctx.engine.supported_values(k) is not None})
    if ctx.train.precision not in ctx.engine.precisions:
        raise InputError("--precision", f"{ctx.engine.title} does not train in {ctx.train.precision} (it runs "
                         f"{', '.join(ctx.engine.precisions)})", "pick one of those, or another --engine")
    if fixes.get("fused_kernels") and ctx.cluster.gpu.kind != "gpu":
        raise InputError("--fix fused_kernels", "the fused norm, SwiGLU and RoPE kernels run on GPUs",
                         "drop the pin on CPU clusters")
    world = ctx.cluster.world_size
    for key in ("dp", "tp", "pp", "cp"):
        if key in fixes and world % fixes[key]:
            raise InputError(f"--fix {key}", f"{fixes[key]} does not divide the world size {world}",
                             f"pick one of {divisors(world)[:12]}")
    product = 1
    for key in ("dp", "tp", "pp", "cp"):
        product *= fixes.get(key, 1)
    if world % product:
        raise InputError("--fix", f"pinned degrees multiply to {product}, which does not divide {world} ranks",
                         "make dp*tp*pp*cp equal the cluster's GPU count")
    if all(k in fixes for k in ("dp", "tp", "pp", "cp")) and product != world:
        raise InputError("--fix", f"dp*tp*pp*cp = {product} but the cluster has {world} ranks",
                         "make dp*tp*pp*cp equal the cluster's GPU count")
    m, t = ctx.model, ctx.train
    if "tp" in fixes:
        tp = fixes["tp"]
        if m.heads % tp:
            raise InputError("--fix tp", f"{tp} does not divide the model's {m.heads} heads", "pick a divisor of heads")
        if m.kv_heads % tp and (tp % m.kv_heads or not ctx.engine.kv_head_replication):
            if ctx.engine.kv_head_replication:
                raise InputError("--fix tp", f"{tp} neither divides nor is a multiple of the model's {m.kv_heads} "
                                 "key/value heads", "pick tp dividing kv_heads, or a multiple of it")
            raise InputError("--fix tp", f"{tp} does not divide the model's {m.kv_heads} key/value heads "
                             f"({ctx.engine.title} shards them, it does not replicate them)",
                             "pick tp dividing kv_heads")
        if tp > ctx.cluster.gpus_per_node:
            raise InputError("--fix tp", f"{tp} is more than the {ctx.cluster.gpus_per_node} GPUs of a node",
                             "keep tensor parallel inside a node")
    if "pp" in fixes and fixes["pp"] > m.layers:
        raise InputError("--fix pp", f"{fixes['pp']} stages for {m.layers} layers", f"use pp <= {m.layers}")
    if "dp" in fixes and t.global_batch % fixes["dp"]:
        raise InputError("--fix dp", f"{fixes['dp']} does not divide the global batch {t.global_batch}",
                         "pick dp dividing --global-batch")
    if "micro_batch" in fixes:
        b = fixes["micro_batch"]
        if t.global_batch % b:
            raise InputError("--fix micro_batch", f"{b} does not divide the global batch {t.global_batch}",
                             "pick a divisor of --global-batch")
        if "dp" in fixes and (t.global_batch // fixes["dp"]) % b:
            raise InputError("--fix micro_batch", f"{b} does not divide the per-replica batch "
                             f"{t.global_batch // fixes['dp']}", "pick a divisor of global_batch/dp")
    tp_cp = fixes.get("tp", 1) * fixes.get("cp", 1)
    if t.seq_len % tp_cp:
        raise InputError("--fix cp", f"seq_len {t.seq_len} is not divisible by tp*cp = {tp_cp}",
                         "pick tp and cp whose product divides --seq-len")
    if "virtual_stages" in fixes and fixes["virtual_stages"] > 1:
        pp = fixes.get("pp")
        if fixes.get("schedule", "interleaved") != "interleaved":
            raise InputError("--fix virtual_stages", "virtual stages need the interleaved schedule",
                             "add --fix schedule=interleaved or drop virtual_stages")
        if pp and pp * fixes["virtual_stages"] > m.layers:
            raise InputError("--fix virtual_stages", f"pp*virtual_stages = {pp * fixes['virtual_stages']} "
                             f"exceeds {m.layers} layers", "use fewer virtual stages")
    if fixes.get("schedule") == "interleaved" and fixes.get("virtual_stages", 2) == 1 and fixes.get("pp", 2) > 1:
        raise InputError("--fix schedule", "interleaved needs virtual_stages >= 2", "add --fix virtual_stages=2")
    if fixes.get("tp_overlap") and ctx.cluster.gpu.kind != "gpu":
        raise InputError("--fix tp_overlap", "async tensor parallel needs GPUs", "drop the pin on CPU clusters")
    if fixes.get("tp_overlap") and fixes.get("sequence_parallel") is False:
        raise InputError("--fix tp_overlap", "TP communication overlap decomposes sequence parallel's collectives",
                         "drop sequence_parallel=false or tp_overlap=true")
    if fixes.get("attention") == "unfused" and fixes.get("cp", 1) > 1:
        raise InputError("--fix attention", "unfused attention runs without context parallel",
                         "add --fix cp=1, or drop attention=unfused")
    _check_expert_fixes(ctx, fixes)
    if fixes.get("tp_overlap") and ctx.engine.tp_overlap_needs_compile and fixes.get("compile") is False:
        raise InputError("--fix tp_overlap", f"{ctx.engine.title} runs async tensor parallel only on compiled blocks",
                         "drop --fix compile=false")


def _check_expert_fixes(ctx: Context, fixes: dict[str, Any]) -> None:
    """Pins of the expert layout: a model with experts, ep dividing them, expert_tp 1 or the pinned tp; and a
    model's capacity factor only for an engine that drops tokens."""
    moe = ctx.model.moe
    if moe is not None and not moe.dropless and not ctx.engine.token_dropping:
        raise InputError("model.moe.capacity_factor", f"{moe.capacity_factor:g}: {ctx.engine.title} computes every "
                         "routed token (dropless) and drops none", "set capacity_factor: 0, or plan with --engine "
                         "megatron")
    pinned = [k for k in ("ep", "expert_tp", "moe_imbalance") if k in fixes]
    if not pinned:
        return
    if moe is None:
        raise InputError(f"--fix {pinned[0]}", f"the model {ctx.model.name!r} has no experts",
                         "drop the pin, or give a model with a moe section")
    if "ep" in fixes and moe.experts % fixes["ep"]:
        raise InputError("--fix ep", f"{fixes['ep']} does not divide the {moe.experts} experts",
                         f"pick one of {divisors(moe.experts)}")
    if "ep" in fixes and ctx.cluster.world_size % fixes["ep"]:
        raise InputError("--fix ep", f"{fixes['ep']} does not divide the world size {ctx.cluster.world_size}",
                         "pick ep dividing dp*cp")
    etp = fixes.get("expert_tp", 1)
    if etp > 1:
        ctx.engine.check({"expert_tensor_parallel": True})
        if "tp" in fixes and etp != fixes["tp"]:
            raise InputError("--fix expert_tp", f"{etp} is neither 1 nor tp={fixes['tp']}", "set it to 1 or to tp")


def _nothing_fits_message(ctx: Context, fixes: dict[str, Any], rejected: Counter, closest) -> str:
    from meshplan.planner import flops
    params = flops.total_params(ctx.model, ctx.train.seq_len)
    capacity = ctx.reserved_capacity_bytes
    state = 16 * params      # fp32 params + grads + Adam, fully sharded: the least any split keeps
    min_gpus = math.ceil(state / capacity)
    gpn = ctx.cluster.gpus_per_node
    min_nodes = math.ceil(min_gpus / gpn)
    reasons = ", ".join(f"{k} x{v}" for k, v in rejected.most_common(3))
    device = "GPU" if ctx.cluster.gpu.kind == "gpu" else "process"
    text = f"no configuration fits ({reasons})"
    if closest is not None:
        over, cfg = closest
        text += (f"; closest: dp={cfg.dp} tp={cfg.tp} pp={cfg.pp} cp={cfg.cp} micro_batch={cfg.micro_batch} "
                 f"zero={cfg.zero}" + (f" misses by {over / memory.GIB:.1f} GiB per {device}" if over > 0 else ""))
    devices = f"{min_gpus} {device}{'es' if device == 'process' else 's'}"
    text += (f"; the model's training state alone needs {state / memory.GIB:,.0f} GiB, so at least {devices} of "
             f"{ctx.cluster.gpu.memory_gib:.3g} GiB ({min_nodes} nodes of {gpn})")
    if fixes:
        text += "; or drop some --fix pins"
    text += "; shorter --seq-len or fewer layers also help"
    return text


def evaluate_pinned(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, fixes: dict[str, Any],
                    engine: str | Engine = "meshplan") -> Plan:
    """The best plan consistent with ``fixes`` (exactly that configuration when everything is pinned)."""
    return search(model, cluster, train, fixes, top=1, engine=engine).plans[0]
