"""``meshplan check`` of mixture-of-experts plans: each rank built by the runtime on fake tensors over a fake
process group, its parameter bytes equal to the count by hand (its stage's dense weights sharded over dp x cp,
plus ``experts / ep`` experts per MoE block sharded over the expert-data-parallel ranks), from the tiny model
to Mixtral 8x22B on 128 ranks and a DeepSeek-V3-sized model on 2048."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from meshplan.plan import Plan, StagePlan
from meshplan.spec import MODEL_PRESETS, ModelSpec, TrainSpec, load_cluster
from runtime_helpers import make_plan

pytest.importorskip("torch")
from meshplan.launcher.check import check_rank, parse_ranks  # noqa: E402  (after the torch skip)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from moe_block_bytes import block_plan  # noqa: E402  (the benchmark's plans: one MoE block of width 1024)

FP32 = 4   # sharded parameters are fp32 masters in every plan (FSDP2 mixed precision computes in bf16)
# DeepSeek-V3's layout with grouped-query attention in place of multi-head latent attention.
DEEPSEEK_V3_GQA = ModelSpec(name="deepseek-v3-gqa", layers=61, hidden=7168, heads=128, kv_heads=128, ffn_hidden=18432,
                            vocab=129280, moe=dict(experts=256, top_k=8, expert_ffn_hidden=2048, shared_experts=1,
                                                   shared_ffn_hidden=2048, layers=list(range(3, 61)),
                                                   router_score="sigmoid"))


def gpu_plan(model: ModelSpec, *, dp: int, pp: int, ep: int, zero: int, cluster: str, seq: int = 4096) -> Plan:
    """A bf16 GPU plan pinned by hand (tp 1, micro-batch 1, pp micro-batches, full recompute, even stages)."""
    bounds = [round(i * model.layers / pp) for i in range(pp + 1)]
    stages = tuple(StagePlan((bounds[i], bounds[i + 1]), {"full": bounds[i + 1] - bounds[i]}) for i in range(pp))
    return Plan(dp=dp, tp=1, pp=pp, cp=1, ep=ep, micro_batch=1, num_microbatches=pp, stages=stages, model=model,
                cluster=load_cluster(cluster), train=TrainSpec(dp * pp, seq, precision="bf16"),
                sequence_parallel=False, zero=zero)


def _shard(shape: tuple[int, ...], ranks: int, dim: int = 0) -> int:
    """Elements one rank stores of a ``shape`` parameter sharded on ``dim`` over ``ranks`` (FSDP2 pads the
    dimension to a multiple of the ranks)."""
    return math.ceil(shape[dim] / ranks) * math.prod(shape) // shape[dim]


def expected_parameter_bytes(plan: Plan, stage: int) -> int:
    """Parameter bytes of one rank of pipeline stage ``stage`` (tp 1), by hand: Llama-style weights, each
    dense one sharded over dp*cp (ZeRO >= 1), each MoE block's ``experts / ep`` experts over the
    expert-data-parallel ranks (by expert where they divide, else by their second dimension)."""
    m, first, end = plan.model, *plan.stages[stage].layers
    dense_ranks = plan.dp * plan.cp if plan.zero else 1
    expert_ranks = plan.expert_dp if plan.zero else 1
    hd, kv = m.head_dim, m.kv_heads
    shapes = []
    if stage == 0:
        shapes.append((m.vocab, m.hidden))
    if stage == len(plan.stages) - 1:
        shapes += [(m.hidden,), (m.vocab, m.hidden)]
    expert_elems = 0
    for layer in range(first, end):
        shapes += [(m.hidden,), (m.hidden,), (m.heads * hd, m.hidden), (kv * hd, m.hidden), (kv * hd, m.hidden),
                   (m.hidden, m.heads * hd)]
        if not m.is_moe_layer(layer):
            shapes += [(m.ffn_hidden, m.hidden), (m.hidden, m.ffn_hidden), (m.ffn_hidden, m.hidden)]
            continue
        moe, local = m.moe, m.moe.experts // plan.ep
        shapes.append((moe.experts, m.hidden))
        if moe.shared_experts:
            shapes += [(moe.shared_ffn_hidden, m.hidden), (m.hidden, moe.shared_ffn_hidden),
                       (moe.shared_ffn_hidden, m.hidden)]
        dim = 0 if local % expert_ranks == 0 else 1
        for shape in ((local, moe.expert_ffn_hidden, m.hidden), (local, m.hidden, moe.expert_ffn_hidden),
                      (local, moe.expert_ffn_hidden, m.hidden)):
            expert_elems += _shard(shape, expert_ranks, dim)
    return FP32 * (sum(_shard(s, dense_ranks) for s in shapes) + expert_elems)


@pytest.mark.parametrize("kw", [dict(dp=2, ep=2), dict(dp=4, ep=2, zero=1), dict(dp=2, pp=2, ep=2, zero=3),
                                dict(dp=2, ep=2, zero=1, recompute="selective")],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_tiny_moe_rank_holds_its_experts_exactly(kw):
    plan = make_plan(model=MODEL_PRESETS["tiny-moe"], **kw)
    for rank in parse_ranks(None, plan):
        checked = check_rank(plan, rank)
        stage = checked.coords["pp"]
        assert checked.measured["parameters"] == expected_parameter_bytes(plan, stage), (kw, rank)
        assert checked.measured["gradients"] == checked.measured["parameters"]
        assert checked.measured["activations"] > 0


def test_expert_bytes_scale_with_ep():
    """ep 4 holds half the experts ep 2 does: the parameter bytes differ by exactly one expert per block."""
    model = MODEL_PRESETS["tiny-moe"]
    two, four = (check_rank(make_plan(model=model, dp=4, ep=ep), 0).measured["parameters"] for ep in (2, 4))
    per_expert = FP32 * 3 * model.hidden * model.moe.expert_ffn_hidden
    assert two - four == model.moe_layer_count * per_expert


@pytest.mark.slow   # one rank of a 128-rank Mixtral 8x22B plan on fake tensors: about 15 s
def test_mixtral_8x22b_on_128_ranks():
    """pp8 x dp16 x ep8, ZeRO-1: each rank one expert per block, split in two by its width over the
    expert-data-parallel pair; 7 blocks per stage."""
    plan = gpu_plan(MODEL_PRESETS["mixtral-8x22b"], dp=16, pp=8, ep=8, zero=1, cluster="dgx-h100:16")
    assert plan.world_size == 128 and plan.expert_dp == 2
    checked = check_rank(plan, parse_ranks("pp:1", plan)[0])
    m = plan.model
    experts = 7 * 1 * 3 * m.hidden * m.moe.expert_ffn_hidden * FP32 // 2
    assert checked.measured["parameters"] == expected_parameter_bytes(plan, 1)
    assert checked.measured["parameters"] > experts > 0.9 * checked.measured["parameters"]
    assert checked.measured["peak"] > checked.measured["parameters"] + checked.measured["optimizer"]


@pytest.mark.slow   # one rank of a 2048-rank plan on fake tensors: about 30 s
def test_deepseek_v3_sized_at_its_published_scale():
    """DeepSeek-V3's published layout (DeepSeek-AI 2024, section 3.2: 2048 H800s, 16-way pipeline, 64-way
    expert parallel, ZeRO-1 data parallel): pp16 x dp128 x ep64, 4 of the 256 experts per block on each EP rank,
    2 of them on each rank of the expert-data-parallel pair; pipeline rank 1 holds blocks 4..7, all MoE."""
    plan = gpu_plan(DEEPSEEK_V3_GQA, dp=128, pp=16, ep=64, zero=1, cluster="dgx-h100:256")
    assert plan.world_size == 2048 and plan.expert_dp == 2
    assert plan.stages[1].layers == (4, 8)
    checked = check_rank(plan, parse_ranks("pp:1", plan)[0])
    m = plan.model
    experts = 4 * 4 * 3 * m.hidden * m.moe.expert_ffn_hidden * FP32 // 2
    assert checked.measured["parameters"] == expected_parameter_bytes(plan, 1)
    assert checked.measured["parameters"] > experts


def test_planner_predicts_each_deepseek_stages_parameters_exactly():
    """Every pipeline rank of DeepSeek-V3's layout, the first of 3 dense blocks and 1 MoE block, is predicted
    at the bytes counted by hand (the planner prices each rank's own blocks, not the model's mean block)."""
    from meshplan.planner.replay import predicted_rank_memory

    plan = gpu_plan(DEEPSEEK_V3_GQA, dp=128, pp=16, ep=64, zero=1, cluster="dgx-h100:256")
    predicted = predicted_rank_memory(plan)
    for stage in range(plan.pp):
        assert predicted[stage]["parameters"] == pytest.approx(expected_parameter_bytes(plan, stage), rel=1e-6)


@pytest.mark.parametrize("tp,shared", [(1, False), (2, True)])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_planner_moe_block_activation_bytes_equal_the_runtime(tp, shared, mode):
    """One MoE block's bytes kept for backward (two blocks minus one) against the planner's
    (block.block_activation_bytes with the experts over ep 2, even routing as ``check`` runs it)."""
    from meshplan.planner.block import ExpertLayout, block_activation_bytes

    one, two = (check_rank(block_plan(n, tp, mode, shared, 2048), 0).activations_per_microbatch[0] for n in (1, 2))
    measured = two - one
    predicted = block_activation_bytes(block_plan(2, tp, mode, shared, 2048).model, 2048, 1, tp, 1, 2, True, mode,
                                       experts=ExpertLayout(ep=2))
    # full recompute keeps the block input (4 MiB at tp 1, 2 MiB at tp 2); the runtime holds 0.5 MiB more per
    # block at either tp (hidden/4 bytes a token, found outside the planner's terms; 1 MiB of a Mixtral 8x7B
    # block's 33 MiB at seq 4096)
    slack = 2**19 if mode == "full" else 0
    assert abs(predicted - measured) <= 0.03 * measured + slack, (tp, shared, mode, predicted / 2**20,
                                                                  measured / 2**20)


@pytest.mark.slow   # one rank of a 64-rank Mixtral 8x7B plan on fake tensors: about a minute
def test_planned_mixtral_on_64_h100s_checks_within_five_percent():
    """Issue 29, done when 3: the meshplan-engine plan for Mixtral 8x7B on 64 H100s (global batch 256,
    sequence 4096) built on fake tensors: its measured peak within 5% of the predicted one."""
    from meshplan.planner.search import search
    from meshplan.launcher.check import check_plan

    plan = search(MODEL_PRESETS["mixtral-8x7b"], load_cluster("dgx-h100:8"), TrainSpec(256, 4096, "bf16"),
                  top=1, engine="meshplan").plans[0]
    assert plan.ep > 1
    (checked,) = check_plan(plan, [0]).ranks
    measured, predicted = checked.measured["peak"], checked.predicted["peak"]
    assert abs(predicted - measured) <= 0.05 * measured, (plan.fields_for_fix(), predicted / 2**30, measured / 2**30)
