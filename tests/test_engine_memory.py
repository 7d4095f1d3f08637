"""Memory as each engine holds it (meshplan/engines.py), and what a job reserves: every behaviour against the
formula it implies. Fast, no torch."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.engines import MEGATRON, MESHPLAN, TORCHTITAN
from meshplan.errors import NoFeasiblePlan
from meshplan.plan import Prediction
from meshplan.planner import memory
from meshplan.planner.block import block_activation_bytes
from meshplan.planner.evaluate import Config, Context, Evaluation, evaluate
from meshplan.planner.rank_memory import rank_memory_phases
from meshplan.planner.search import search
from meshplan.planner.step import step_of
from meshplan.spec import CLUSTER_PRESETS, ClusterSpec, DeviceSpec, ModelSpec, TrainSpec, load_cluster, load_model

RUNS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "public-runs.yaml"
GIB = 2**30

# Korthikanti et al. 2022's GPT block: GELU with f = 4h, multi-head attention, LayerNorm, 1-byte dropout masks
GPT = ModelSpec(name="gpt-k", layers=4, hidden=4096, heads=32, vocab=51200, mlp="gelu", norm="layernorm",
                position="learned", bias=True, dropout=0.1)


def korthikanti(t: int, sp: bool, recompute: str = "none", flash: bool = False) -> float:
    """memory.activation_bytes_per_layer of the paper's block, as Megatron-Core keeps it (sharded SP inputs)."""
    return memory.activation_bytes_per_layer(GPT, 2048, 2, tp=t, sp=sp, act_bytes=2, flash=flash,
                                             recompute=recompute, fused_norm=True, gathered_linear_inputs=False,
                                             selective="core_attention")


def paper_formulas() -> dict[str, str]:
    if RUNS.exists():
        return yaml.safe_load(RUNS.read_text())["activation_memory_per_layer_bytes"]
    return {"no_parallelism": "s*b*h*(34 + 5*a*s/h)", "tp": "s*b*h*(10 + 24/t + 5*a*s/(h*t))",
            "tp_sp": "s*b*h/t*(34 + 5*a*s/h)", "tp_sp_selective_recompute": "34*s*b*h/t",
            "full_recompute": "2*s*b*h (layer input only)"}


@pytest.mark.parametrize("t", [2, 4, 8])
def test_megatron_activations_are_korthikantis_per_layer_bytes(t):
    f = paper_formulas()
    symbols = {"s": 2048, "b": 2, "h": 4096, "a": 32, "t": t}
    formula = {k: eval(f[k].split(" (")[0], {}, dict(symbols))
               for k in ("no_parallelism", "tp", "tp_sp", "tp_sp_selective_recompute", "full_recompute")}
    assert korthikanti(1, False) == pytest.approx(formula["no_parallelism"])
    assert korthikanti(t, False) == pytest.approx(formula["tp"])
    assert korthikanti(t, True) == pytest.approx(formula["tp_sp"])
    assert korthikanti(t, True, "selective") == pytest.approx(formula["tp_sp_selective_recompute"])
    assert korthikanti(1, False, "full") == pytest.approx(formula["full_recompute"])
    assert korthikanti(t, True, "full") == pytest.approx(formula["full_recompute"] / t)   # the sharded input


def test_megatron_selective_with_flash_attention_saves_only_the_logsumexp():
    s, b, a, t = 2048, 2, 32, 4
    saved = korthikanti(t, True, "none", flash=True) - korthikanti(t, True, "selective", flash=True)
    assert saved == pytest.approx(4.0 * a * s * b / t)


@pytest.mark.parametrize("tp", [2, 8])
def test_dtensor_keeps_the_gathered_linear_inputs_megatron_their_shard(tp):
    model = load_model("llama3-8b")
    args = (model, 8192, 1, tp, 1, 2, False, "none")
    gathered = block_activation_bytes(*args, sp_saved_input="gathered")
    sharded = block_activation_bytes(*args, sp_saved_input="sharded")
    sbh = 8192 * model.hidden
    assert gathered - sharded == pytest.approx(2 * 2 * sbh * (1 - 1 / tp))    # wq/wk/wv and w1/w3 inputs


def test_torchtitan_op_policy_keeps_w2_and_the_reduce_scatter_outputs():
    model = load_model("llama3-8b")
    sbh = 8192 * model.hidden
    for tp in (1, 4):
        ours = block_activation_bytes(model, 8192, 1, tp, 1, 2, False, "selective")
        titan = block_activation_bytes(model, 8192, 1, tp, 1, 2, False, "selective", "gathered", "op_policy")
        assert titan - ours == pytest.approx(2 * sbh + (2 * 2 * sbh / tp if tp > 1 else 0))


def step(engine, cluster="dgx-h100:2", model="llama3-8b", headroom=memory.DEFAULT_MEMORY_HEADROOM, **fields):
    ctx = Context(load_model(model), load_cluster(cluster), TrainSpec(64, 4096, "bf16", "adamw"), engine, headroom)
    return ctx, Config(**{"dp": 8, "tp": 1, "pp": 1, "cp": 1, "micro_batch": 1, **fields})


@pytest.mark.parametrize("dp", [2, 8, 16])
def test_megatron_distributed_optimizer_takes_6_plus_12_over_d_bytes_per_parameter(dp):
    b = memory.engine_state_bytes("distributed_optimizer", "bf16", "adam")
    stage = memory.engine_sharding_stage("distributed_optimizer", 1)
    assert sum(memory.model_state_bytes(1.0, stage, dp, b).values()) == pytest.approx(6 + 12 / dp)
    assert sum(memory.model_state_bytes(1.0, 0, dp, b).values()) == pytest.approx(18)   # Megatron's table
    ctx, cfg = step(MEGATRON, dp=dp, zero=1)
    s = step_of(ctx, cfg)
    ph = rank_memory_phases(s, 0, 32, True)
    params = 32 * s.lc.params + s.vc.first_params + s.vc.last_params
    states = ph.common["parameters"] + ph.common["gradients"] + ph.common["optimizer"]
    assert states == pytest.approx((6 + 12 / dp) * params)      # the gradient buffer is kept all step
    assert ph.persistent >= states


@pytest.mark.parametrize("v", [1, 2])
def test_pipeline_receive_buffers_per_engine(v):
    """torch.distributed.pipelining (meshplan, torchtitan) keeps a receive buffer per micro-batch and stage
    all step; Megatron allocates one per transfer: two boundary tensors in transit on every rank."""
    fields = dict(dp=2, pp=4, micro_batch=1, schedule="interleaved" if v > 1 else "1f1b", virtual_stages=v)
    held = {}
    for engine in (MESHPLAN, TORCHTITAN, MEGATRON):
        ctx, cfg = step(engine, **fields)
        s = step_of(ctx, cfg)
        assert s.num_mb == 32
        phases = [rank_memory_phases(s, r, 2, False) for r in range(4)]
        idle = [rank_memory_phases(replace(s, boundary_bytes=0.0), r, 2, False) for r in range(4)]
        held[engine.name] = [(ph.common["buffers"] - no.common["buffers"]) / s.boundary_bytes
                             for ph, no in zip(phases, idle)]
    stages = 4 * v
    expected = [32 * sum((j * 4 + r > 0) + (j * 4 + r < stages - 1) for j in range(v)) for r in range(4)]
    assert held["meshplan"] == held["torchtitan"] == pytest.approx(expected)
    assert held["megatron"] == pytest.approx([2, 2, 2, 2])


def test_meshplan_zero_1_holds_what_zero_2_holds():
    for fields in ({"dp": 8}, {"dp": 4, "pp": 2}):
        one, two = (evaluate(step(MESHPLAN, **fields, zero=z)[1], step(MESHPLAN, **fields, zero=z)[0])
                    for z in (1, 2))
        assert isinstance(one, Evaluation) and isinstance(two, Evaluation)
        assert one.rank_details == two.rank_details and one.rank_reserved == two.rank_reserved


def test_torchtitan_zero_3_reshards_and_holds_less_than_zero_2():
    two, three = (evaluate(step(TORCHTITAN, zero=z)[1], step(TORCHTITAN, zero=z)[0]) for z in (2, 3))
    assert three.rank_details[0]["buffers"] < two.rank_details[0]["buffers"]


@pytest.mark.parametrize("engine", [MESHPLAN, MEGATRON, TORCHTITAN])
def test_one_recompute_mode_for_engines_that_run_one(engine):
    model, cluster = load_model("llama3-70b"), load_cluster("dgx-h100:4")
    result = search(model, cluster, TrainSpec(128, 8192, "bf16", "adamw"), {"tp": 8, "pp": 4}, top=3, engine=engine)
    for plan in result.plans:
        counts = [s.recompute_layers for s in plan.stages]
        modes = {m for c in counts for m, n in c.items() if n}
        if engine.mixed_recompute:
            continue
        if engine.block_recompute and modes == {"none", "full"}:     # Megatron's block method: same N per rank
            per_rank = {}
            for j, c in enumerate(counts):
                per_rank[j % plan.pp] = per_rank.get(j % plan.pp, 0) + c["full"]
            assert len(set(per_rank.values())) == 1, counts
        else:
            assert len(modes) == 1, counts


@pytest.mark.parametrize("engine", [MESHPLAN, MEGATRON, TORCHTITAN])
def test_reserved_is_at_least_allocated_and_equal_on_cpu(engine):
    for fields in ({"dp": 8, "zero": 2}, {"dp": 2, "tp": 4, "zero": 0}, {"dp": 4, "pp": 2, "zero": 3}):
        ctx, cfg = step(engine, **fields)
        ev = evaluate(cfg, ctx)
        assert isinstance(ev, Evaluation)
        for r in range(cfg.pp):
            assert ev.rank_reserved[r] >= ev.rank_peak_before_margin(r)
        assert ev.nccl_bytes == memory.nccl_buffer_bytes([cfg.dp, cfg.tp, cfg.pp, 1]) > 0
    cpu = ClusterSpec("cpu:4", 1, 4, DeviceSpec("cpu", 16.0, 0.05, 20.0, peak_tflops_fp32=0.05, kind="cpu"),
                      *CLUSTER_PRESETS["dgx-h100"][1:])
    tiny = ModelSpec(name="tiny", layers=2, hidden=256, heads=4, vocab=1024)
    ctx = Context(tiny, cpu, TrainSpec(8, 256, "fp32", "adamw"), MESHPLAN)
    ev = evaluate(Config(dp=4, tp=1, pp=1, cp=1, micro_batch=1), ctx)
    assert ev.rank_reserved[0] == pytest.approx(ev.rank_peak_before_margin(0)) and ev.nccl_bytes == 0


def torchtitan_8b_on_8_gpus(headroom: float):
    """torchtitan's Llama 3 8B run on 8 H100 96GB (benchmarks/fidelity.py torchtitan_cases), pinned."""
    device, intra, inter = CLUSTER_PRESETS["dgx-h100"]
    h100_96 = DeviceSpec("H100-96GB", 95830 / 1024, device.peak_tflops, 2400.0)
    cluster = ClusterSpec("h100-96gb:1", 1, 8, h100_96, intra, inter)
    fixes = {"dp": 8, "tp": 1, "pp": 1, "cp": 1, "zero": 3, "recompute": "selective", "micro_batch": 2}
    return search(load_model("llama3-8b"), cluster, TrainSpec(16, 8192, "bf16", "adamw"), fixes, top=1,
                  engine="torchtitan", memory_headroom=headroom).plans[0]


def test_headroom_rejects_a_plan_that_fits_allocated_but_not_reserved():
    plan = torchtitan_8b_on_8_gpus(0.05)
    pred, device = plan.predicted, plan.cluster.gpu.memory_gib
    assert pred.reserved_memory_gib > pred.allocated_peak_gib + 5
    headroom = 1 - (pred.reserved_memory_gib + pred.nccl_memory_gib) / device + 0.02   # reserved misses by 2%
    assert pred.peak_memory_gib < device * (1 - headroom) - memory.CUDA_CONTEXT_GIB      # allocated still fits
    with pytest.raises(NoFeasiblePlan):
        torchtitan_8b_on_8_gpus(headroom)


@pytest.mark.skipif(not RUNS.exists(), reason=f"{RUNS} not present")
def test_torchtitan_reserved_memory_matches_the_published_max_reserved():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fidelity

    for case in (c for c in fidelity.load_cases(RUNS) if c.engine == "torchtitan"):
        plan = search(case.model, case.cluster, case.train, {**case.fixes, **case.env}, top=1,
                      engine=case.engine, refine=False).plans[0]
        error = plan.predicted.reserved_memory_gib / case.measured_memory_gib - 1
        assert -0.05 <= error <= 0.10, (case.name, error)


def test_prediction_round_trips_reserved_and_loads_older_files():
    pred = Prediction(1.0, 2.0, 3.0, 0.4, 50.0, {}, {"activations": 47.6, "margin": 2.4}, 55.5, 0.5)
    again = Prediction.from_dict(yaml.safe_load(yaml.safe_dump(pred.to_dict())))
    assert again.reserved_memory_gib == pytest.approx(55.5) and again.nccl_memory_gib == pytest.approx(0.5)
    assert again.allocated_peak_gib == pytest.approx(47.6)
    old = {k: v for k, v in pred.to_dict().items() if k not in ("reserved_memory_gib", "nccl_memory_gib")}
    assert Prediction.from_dict(old).reserved_memory_gib is None


def test_allocator_rounding_and_nccl_buffers():
    assert memory.allocator_block_bytes(1) == 2 * 2**20                 # small pool: 2 MiB segments
    assert memory.allocator_block_bytes(3 * 2**20) == 20 * 2**20        # 1-10 MiB: 20 MiB segments
    assert memory.allocator_block_bytes(11 * 2**20 + 1) == 12 * 2**20   # larger: rounded up to 2 MiB
    assert memory.nccl_buffer_bytes([8, 1, 2]) == 2 * 32 * 2 * 4 * 2**20
    assert memory.reserved_bytes(10.0, 3.0, 4.0, caching=False) == 10.0


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1", "nan"])
def test_bad_memory_headroom_is_one_line_and_exit_2(value):
    result = CliRunner().invoke(app, ["plan", "--memory-headroom", value])
    assert result.exit_code == 2, result.output
    err = [line for line in result.stderr.strip().splitlines() if not line.startswith("assuming ")]
    assert len(err) == 1 and err[0].startswith("error: --memory-headroom"), result.stderr


def test_cli_headroom_default_is_the_planners():
    import inspect

    from meshplan.plan_cli import plan_command

    assert inspect.signature(plan_command).parameters["memory_headroom"].default.default == \
        memory.DEFAULT_MEMORY_HEADROOM


def test_megatron_block_method_recomputes_the_same_n_blocks_on_every_rank():
    fixes = {"tp": 4, "pp": 4, "zero": 1, "micro_batch": 1}
    plan = search(load_model("llama3-70b"), load_cluster("dgx-h100:4"), TrainSpec(128, 8192, "bf16", "adamw"),
                  fixes, top=1, engine="megatron").plans[0]
    full = [s.recompute_layers["full"] for s in plan.stages]
    assert len(set(full)) == 1 and full[0] > 0
    assert all(s.recompute_layers["selective"] == 0 and s.recompute_layers["none"] > 0 for s in plan.stages)
