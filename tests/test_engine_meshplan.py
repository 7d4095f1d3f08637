"""meshplan's engine is its runtime: every plan field value the planner can emit for ``--engine meshplan`` is one
the runtime builds and runs, and every other value is refused in one line naming the field.

The walk derives its values from the engine profiles (meshplan/engines.py) and the search's own options
(planner/search.py), not from a list here: for each field and each value any engine runs (and each value of the
planner's other choices), the value is pinned with ``--fix`` on a CPU cluster and a GPU cluster, and either the
planner refuses the pin (it never emits the value) or the runtime builds the plan it emits on fake tensors
(``meshplan check``); where a value shows only when a step runs (the schedule, recompute, ZeRO, the
context-parallel kind, vocabulary parallel), the plan also runs one training step. A value added to MESHPLAN
without runtime support fails here, and so does a value the planner offers that the runtime refuses.
"""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from meshplan.engines import ENGINES, MESHPLAN
from meshplan.errors import InputError
from meshplan.plan import RECOMPUTE_MODES, Plan, StagePlan
from meshplan.planner.search import FIX_KEYS, MAX_VIRTUAL_STAGES, degree_problems, divisors, parse_fixes, search
from meshplan.spec import PRECISIONS, ModelSpec, TrainSpec, load_cluster

torch = pytest.importorskip("torch")

from meshplan.launcher.check import check_builds, check_rank, check_structure  # noqa: E402  (after the torch skip)
from meshplan.launcher.check import _first_rank_per_pipeline_rank  # noqa: E402
from meshplan.launcher.checks import RUNTIME_PRECISIONS, RUNTIME_VALUES, check_supported  # noqa: E402

# 8 blocks (pp=2 with up to 4 virtual stages), 8 query heads over 4 key/value heads (tp up to 4), tiny widths so a
# fake-tensor build takes a fraction of a second.
MODEL = ModelSpec(name="walk-llama", layers=8, hidden=32, heads=8, kv_heads=4, ffn_hidden=64, vocab=128)
GLOBAL_BATCH, SEQ_LEN = 4, 32
CLUSTERS = {"cpu": "localhost:4", "gpu": "dgx-h100:1"}
# What makes a field matter: a pipeline for the schedule, virtual stages and vocabulary parallel, a
# context-parallel group for its kind, a tensor-parallel group for its overlap, data parallel for ZeRO.
CONTEXT = {"schedule": {"pp": 2}, "virtual_stages": {"pp": 2, "schedule": "interleaved"}, "vocab_parallel": {"pp": 2},
           "recompute": {"pp": 2}, "cp_kind": {"cp": 2}, "tp_overlap": {"tp": 2}, "zero": {"dp": 2},
           "sequence_parallel": {"tp": 2}}
# Fields whose value shows only when a step runs: the plan runs one training step on fake tensors.
STEPPED = ("schedule", "virtual_stages", "zero", "cp_kind", "vocab_parallel", "recompute")
# Values the planner emits for meshplan that its runtime refuses, each waiting on a planner-side refusal.
PLANNER_GAPS: dict[tuple, str] = {}


def engine_fields() -> list[str]:
    """The --fix keys an engine profile restricts (Engine.supported_values)."""
    return [key for key in FIX_KEYS if MESHPLAN.supported_values(key) is not None]


def domain(field: str, world: int) -> list:
    """Every value of ``field`` worth pinning: what any engine runs, or the search's own range."""
    if field in engine_fields():
        values = {v for engine in ENGINES.values() for v in engine.supported_values(field)}
        return sorted(values, key=str)
    return {"virtual_stages": list(range(2, MAX_VIRTUAL_STAGES + 1)), "recompute": list(RECOMPUTE_MODES),
            "tp": divisors(world)}[field]


def precisions(kind: str) -> list[str]:
    """``meshplan plan`` refuses a precision other than fp32 on CPU clusters (plan_cli); GPUs take every one."""
    return ["fp32"] if kind == "cpu" else list(PRECISIONS)


def walk() -> list:
    """(cluster kind, field, value) for every value of every field the walk pins."""
    cases = []
    for kind, cluster in CLUSTERS.items():
        world = load_cluster(cluster).world_size
        for field in [*engine_fields(), "virtual_stages", "recompute", "tp"]:
            cases += [(kind, field, value) for value in domain(field, world)]
        cases += [(kind, "precision", p) for p in precisions(kind)]
    return [pytest.param(*case, id=f"{case[0]}-{case[1]}={case[2]}",
                         marks=[pytest.mark.xfail(reason=PLANNER_GAPS[case], strict=False)] if case in PLANNER_GAPS
                         else []) for case in cases]


def planned(kind: str, fixes: dict, precision: str | None = None) -> Plan:
    """The planner's best meshplan plan with ``fixes`` pinned (InputError where it refuses a pin)."""
    train = TrainSpec(GLOBAL_BATCH, SEQ_LEN, precision or ("fp32" if kind == "cpu" else "bf16"))
    return search(MODEL, load_cluster(CLUSTERS[kind]), train, fixes, top=1, engine="meshplan").plans[0]


def runs(plan: Plan, step: bool) -> None:
    """The runtime builds ``plan`` (first and last pipeline ranks) on fake tensors; with ``step`` the last
    pipeline rank (the loss, the last stage's recompute) also runs one training step."""
    if not step:
        check_builds(plan)
        return
    check_structure(plan)
    firsts = _first_rank_per_pipeline_rank(plan)
    if len(firsts) > 1:
        check_rank(plan, firsts[0], measure=False)
    check_rank(plan, firsts[-1])


def pinned_value(plan: Plan, field: str):
    """The plan's value of a pinned field (``fused_kernels``: whether its kernels are fused)."""
    if field == "fused_kernels":
        return any(impl == "fused" for impl in plan.kernels.values())
    if field == "precision":
        return plan.train.precision
    return getattr(plan, field) if field != "recompute" else plan.recompute


def emitted(kind: str, field: str, value) -> bool:
    """Whether the planner offers ``value`` for meshplan: a value the engine profile lists (async TP on GPUs
    only), a tp some degree family passes the planner's divisibility rules with, any value of the search's
    other choices."""
    if field in ("tp_overlap", "fused_kernels") and value and kind == "cpu":
        return False                        # GPU-only (search._check_fixes)
    if field in engine_fields() or field == "precision":
        return value in MESHPLAN.supported_values(field)
    if field == "tp":
        cluster, train = load_cluster(CLUSTERS[kind]), TrainSpec(GLOBAL_BATCH, SEQ_LEN)
        rest = cluster.world_size // value
        return any(degree_problems(MODEL, cluster, train, rest // (cp * pp), value, pp, cp, engine=MESHPLAN) is None
                   for cp in divisors(rest) for pp in divisors(rest // cp))
    return True


def plan_with(kind: str, field: str, value) -> Plan:
    if field == "precision":
        return planned(kind, {}, precision=value)
    return planned(kind, {**CONTEXT.get(field, {}), field: value})


@pytest.mark.slow
@pytest.mark.parametrize("kind,field,value", walk())
def test_every_value_the_planner_emits_runs(kind, field, value):
    """The planner refuses the pin of a value it does not offer, in one line; the plan it emits for any other
    value carries it, and the runtime builds it and runs a step where the value shows only then."""
    if not emitted(kind, field, value):
        with pytest.raises(InputError) as refusal:
            plan_with(kind, field, value)
        assert "\n" not in str(refusal.value)
        return
    plan = plan_with(kind, field, value)
    assert pinned_value(plan, field) == value
    runs(plan, step=field in STEPPED)


def _mixed(plan: Plan) -> Plan:
    """``plan`` with each stage's blocks mixed: the first stage fully, selectively and not recomputed, the
    others selectively and not, as the planner's per-rank recompute choice writes it."""
    stages = []
    for j, stage in enumerate(plan.stages):
        n = stage.num_layers
        counts = {"full": 1, "selective": 1, "none": n - 2} if j == 0 else {"full": 0, "selective": n // 2,
                                                                             "none": n - n // 2}
        stages.append(StagePlan(stage.layers, counts, stage.peak_memory_gib))
    return dataclasses.replace(plan, stages=tuple(stages))


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CLUSTERS))
def test_mixed_recompute_per_stage_runs(kind):
    """Recompute mixed within a stage and differing between stages (the planner's per-rank choice)."""
    plan = _mixed(planned(kind, {"pp": 2, "recompute": "full"}))
    assert plan.recompute == "mixed"
    runs(plan, step=True)


@pytest.mark.slow
def test_a_mesh_order_the_planner_does_not_emit_runs():
    """A hand-written mesh order (dp and cp apart, dp innermost) runs too: the runtime reads mesh_order as
    written (parallelize.build_mesh flattens dp x cp for the gradients wherever the two sit)."""
    plan = planned("cpu", {"dp": 2, "cp": 2})
    runs(dataclasses.replace(plan, mesh_order=("cp", "tp", "pp", "dp")), step=True)


def test_meshplan_lists_only_what_the_runtime_reads():
    """MESHPLAN's values of every field it restricts are values the runtime reads (launcher/checks.py
    RUNTIME_VALUES, each at the function that reads it): a value added to the profile alone fails here."""
    fields = set(engine_fields()) | set(planned("gpu", {"tp": 2, "pp": 2, "cp": 2}).engine_fields())
    for field in fields:
        assert field in RUNTIME_VALUES, f"launcher/checks.py RUNTIME_VALUES does not say how the runtime reads {field}"
        assert set(MESHPLAN.supported_values(field)) <= set(RUNTIME_VALUES[field]), field


def test_the_walk_covers_every_value_meshplan_lists():
    """Every value of every field MESHPLAN restricts is walked on both clusters, so a value added to the
    profile is built before the planner may offer it."""
    walked = {tuple(p.values) for p in walk()}
    for kind in CLUSTERS:
        for field in engine_fields():
            for value in MESHPLAN.supported_values(field):
                assert (kind, field, value) in walked


def test_the_planner_emits_the_default_mesh_order_only():
    """Every plan of the walk's clusters has the one mesh order the runtime's tests build."""
    orders = {planned(kind, {}).mesh_order for kind in CLUSTERS}
    orders |= {planned("gpu", {"tp": 2, "pp": 2, "cp": 2}).mesh_order}
    assert len(orders) == 1


# ----------------------------------------------------------------------------------------------
# refusals: one line naming the field
# ----------------------------------------------------------------------------------------------

def _with(plan: Plan, field: str, value) -> Plan:
    if field == "fused_kernels":
        return dataclasses.replace(plan, kernels={k: "fused" if value else "reference" for k in plan.kernels})
    return dataclasses.replace(plan, **{field: value})


def _refused(plan: Plan, field: str) -> InputError:
    with pytest.raises(InputError) as error:
        check_supported(plan)
    text = str(error.value)
    assert "\n" not in text and field in error.value.field, text
    return error.value


def test_values_outside_the_profile_are_refused():
    """Every engine field's value MESHPLAN does not list (attention: unfused today) is refused by the runtime's
    check and by Plan.validate, in one line naming the field."""
    base = planned("gpu", {"tp": 2, "pp": 2, "cp": 2})
    outside = [(f, v) for f in engine_fields() for v in domain(f, base.world_size)
               if v not in MESHPLAN.supported_values(f)]
    assert ("attention", "unfused") in outside
    for field, value in outside:
        plan = _with(base, field, value)
        _refused(plan, f"plan.{field}")
        with pytest.raises(InputError, match=field):
            Plan.from_dict(plan.to_dict())


@pytest.mark.parametrize("kind", list(CLUSTERS))
def test_precisions_the_runtime_does_not_compute_in_are_refused(kind):
    base = planned(kind, {})
    for precision in PRECISIONS:
        plan = dataclasses.replace(base, train=dataclasses.replace(base.train, precision=precision))
        if precision in RUNTIME_PRECISIONS[kind]:
            check_supported(plan)
        else:
            _refused(plan, "plan.train.precision")


def test_values_the_runtime_would_run_as_another_are_refused(monkeypatch):
    """Each value the runtime reads but would silently replace: fused norm/SwiGLU/RoPE on CPU ranks without
    Triton's interpreter (the reference would run), async TP on CPU ranks or without compiled blocks, tensor
    parallel without sequence parallel (not priced; the optimizer step fails without dp x cp), virtual stages
    without the interleaved schedule (interleaved 1F1B would run)."""
    cpu = planned("cpu", {"tp": 2, "pp": 2, "schedule": "interleaved", "virtual_stages": 2})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("norm", "swiglu", "rope"):
        fused = dataclasses.replace(cpu, kernels={**cpu.kernels, name: "fused"})
        _refused(fused, f"plan.kernels.{name}")
        monkeypatch.setenv("TRITON_INTERPRET", "1")         # the interpreter runs them on CPU ranks
        check_supported(fused)
        monkeypatch.delenv("TRITON_INTERPRET")
    check_supported(dataclasses.replace(cpu, kernels={**cpu.kernels, "loss": "fused"}))   # the chunked loss runs
    _refused(dataclasses.replace(cpu, tp_overlap=True, compile=True), "plan.tp_overlap")
    gpu = planned("gpu", {"tp": 2})
    assert gpu.tp_overlap and gpu.compile
    _refused(dataclasses.replace(gpu, compile=False), "plan.tp_overlap")
    _refused(dataclasses.replace(cpu, sequence_parallel=False), "plan.sequence_parallel")
    for schedule in ("gpipe", "1f1b"):
        _refused(dataclasses.replace(cpu, schedule=schedule), "plan.virtual_stages")


@pytest.mark.parametrize("engine", [name for name in ENGINES if name != "meshplan"])
def test_launch_refuses_another_engines_plan(engine, tmp_path):
    from meshplan.launcher.__main__ import app

    path = tmp_path / f"{engine}.yaml"
    search(MODEL, load_cluster(CLUSTERS["gpu"]), TrainSpec(GLOBAL_BATCH, SEQ_LEN, "bf16"), {}, top=1,
           engine=engine).plans[0].save(path)
    result = CliRunner().invoke(app, [str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "plan.engine" in lines[0] and f"meshplan export PLAN --to {engine}" in lines[0]


# ----------------------------------------------------------------------------------------------
# tp and the key/value heads
# ----------------------------------------------------------------------------------------------

TWO_KV_HEADS = dataclasses.replace(MODEL, name="walk-llama-kv2", kv_heads=2)


def test_the_planner_offers_tp_above_the_key_value_heads_replicating_them():
    """meshplan's runtime replicates a key/value head over ``tp / kv_heads`` ranks: on 8 GPUs a model with 2 of
    them may take tp 4 and 8 (each rank a copy of the head its query heads use); a tp that neither divides nor
    is a multiple of the key/value heads stays a one-line error."""
    cluster = load_cluster(CLUSTERS["gpu"])
    train = TrainSpec(GLOBAL_BATCH, SEQ_LEN, "bf16")
    assert MESHPLAN.kv_head_replication
    for tp in (4, 8):
        assert degree_problems(TWO_KV_HEADS, cluster, train, 8 // tp, tp, 1, 1, engine=MESHPLAN) is None
        plan = search(TWO_KV_HEADS, cluster, train, parse_fixes([f"tp={tp}"]), top=1, engine="meshplan").plans[0]
        assert plan.tp == tp
        check_supported(plan)
    twelve_heads = dataclasses.replace(MODEL, name="walk-llama-12-over-8", hidden=48, heads=12, kv_heads=4)
    assert degree_problems(twelve_heads, cluster, train, 1, 6, 1, 1, engine=MESHPLAN) is not None
    with pytest.raises(InputError) as error:
        search(twelve_heads, load_cluster("localhost:6"), train, parse_fixes(["tp=6"]), top=1, engine="meshplan")
    assert "\n" not in str(error.value) and error.value.field == "--fix tp" and "multiple" in str(error.value)
    plan = search(twelve_heads, load_cluster("localhost:4"), TrainSpec(GLOBAL_BATCH, SEQ_LEN, "fp32"),
                  parse_fixes(["tp=4"]), top=1).plans[0]
    with pytest.raises(InputError) as error:        # a hand-edited plan file: tp 6 over 4 key/value heads
        check_supported(dataclasses.replace(plan, tp=6, cluster=load_cluster("localhost:6")))
    assert error.value.field == "plan.tp" and "kv_heads=4" in str(error.value)
