"""Unfused attention (``--fix attention=unfused``) and tensor parallel without sequence parallel
(``--fix sequence_parallel=false``): priced where an engine runs them, each term against its formula, refused
in one line elsewhere, carried by the plan file and the Megatron export."""

import dataclasses

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.engines import MEGATRON, MESHPLAN, TORCHTITAN
from meshplan.errors import InputError
from meshplan.plan import Plan
from meshplan.planner import block, comm, compute, memory
from meshplan.planner.block import BlockCompute
from meshplan.planner.host import host_model
from meshplan.planner.search import parse_fixes, search
from meshplan.spec import ModelSpec, TrainSpec, load_cluster, load_model

H100 = load_cluster("dgx-h100:4")
# Korthikanti et al. 2022's GPT block: GELU with f = 4h, multi-head attention, LayerNorm, dropout
GPT = ModelSpec(name="gpt-k", layers=8, hidden=4096, heads=32, vocab=51200, mlp="gelu", norm="layernorm",
                position="learned", bias=True, dropout=0.1)
S, B, H, A = 2048, 2, 4096, 32


@pytest.mark.parametrize("t", [2, 4, 8])
def test_megatron_block_bytes_are_the_papers_with_and_without_sequence_parallel(t):
    """Table 2 of the paper (no flash, 16-bit): TP alone s*b*h*(10 + 24/t + 5*a*s/(h*t)), TP + SP
    s*b*h/t*(34 + 5*a*s/h), as Megatron keeps them (sharded SP inputs)."""
    def kept(sp):
        return block.block_activation_bytes(GPT, S, B, t, 1, 2, False, "none", MEGATRON.sp_saved_input,
                                            MEGATRON.selective_recompute, sp, False)
    sbh = S * B * H
    assert kept(False) == pytest.approx(sbh * (10 + 24 / t + 5 * A * S / (H * t)))
    assert kept(True) == pytest.approx(sbh / t * (34 + 5 * A * S / H))


def test_unfused_scores_without_dropout_keep_only_the_softmax_output():
    no_dropout = dataclasses.replace(GPT, dropout=0.0)
    flash, unfused = (memory.activation_bytes_per_layer(no_dropout, S, B, tp=4, sp=True, flash=f) for f in (True, False))
    lse = 4.0 * A * S * B / 4
    assert unfused - (flash - lse) == pytest.approx(2 * A * S * S * B / 4)


def test_unfused_attention_time_is_its_gemms_and_score_passes():
    """Forward: QK^T and PV over the full (masked, not skipped) square; backward: 4 GEMMs; the score passes
    at the memory rate (2 + 2.5 with dropout forward, 3 + 2.5 backward)."""
    rates = compute.achieved_rates(H100, "bf16")
    tp = 4
    rows = B * A / tp * S
    gemm = compute.matmul_time(rows, GPT.head_dim, S, rates)
    score = rows * S * 2 / rates.memory
    fwd, bwd = compute.unfused_attention_time(GPT, B, S, tp, rates, 2)
    assert fwd == pytest.approx(2 * gemm + 4.5 * score)
    assert bwd == pytest.approx(4 * gemm + 5.5 * score)
    flash_fwd, _ = compute.attention_time(GPT, B, S, tp, 1, rates)
    assert fwd > flash_fwd            # twice the FLOPs (no causal skip) and the scores' traffic


def test_tp_without_sp_all_reduces_and_megatron_hides_the_backward_ones():
    link = comm.group_link(H100, 8, 1)
    c = BlockCompute(1e-3, 0.0, 0.0, 0.0, 1.0, 5e-4)
    activation = 64e6
    ar = comm.allreduce_time(activation, link)
    host = host_model(H100)
    fwd, bwd = block.tp_allreduce_time(activation, 8, link, 1e-3, c, H100, host, MESHPLAN)
    assert fwd == pytest.approx(2 * ar) and bwd == pytest.approx(2 * ar)      # GPUs: no meeting penalty
    _, bwd_async = block.tp_allreduce_time(activation, 8, link, 1e-3, c, H100, host, MEGATRON)
    shown = comm.overlap_exposed_fraction(H100)
    assert bwd_async == pytest.approx(comm.exposed_time(2 * ar, c.column_fwd, shown)) and bwd_async < bwd
    assert block.tp_allreduce_time(activation, 1, link, 1e-3, c, H100, host, MEGATRON) == (0.0, 0.0)


def _plan(engine, *fixes, model="llama3-8b", cluster="dgx-h100:2"):
    return search(load_model(model), load_cluster(cluster), TrainSpec(64, 4096, "bf16", "adam"),
                  parse_fixes(["tp=8", *fixes]), top=1, engine=engine).plans[0]


def test_sequence_parallel_off_costs_memory_and_time_and_turns_overlap_off():
    on, off = (_plan("megatron", "pp=1", "micro_batch=1", "recompute=none", *extra)
               for extra in ([], ["sequence_parallel=false"]))
    assert on.sequence_parallel and not off.sequence_parallel and not off.tp_overlap and on.tp_overlap
    assert off.predicted.memory_breakdown_gib["activations"] > on.predicted.memory_breakdown_gib["activations"]
    assert off.predicted.time_breakdown_s["tp_comm"] > on.predicted.time_breakdown_s["tp_comm"]
    assert off.fields_for_fix()["sequence_parallel"] is False and "sequence_parallel" not in on.fields_for_fix()


def test_unfused_attention_keeps_the_scores_and_takes_longer():
    flash, unfused = (_plan("megatron", "pp=1", "micro_batch=1", "recompute=none", *extra)
                      for extra in ([], ["attention=unfused"]))
    assert unfused.attention == "unfused" and flash.attention == "flash"
    assert unfused.predicted.iteration_s > flash.predicted.iteration_s
    scores = 2 * 32 * 4096 * 4096 / 8 * 32 / 2**30      # a*s^2*b/t * 2 bytes per block, 32 blocks (no dropout)
    extra = unfused.predicted.memory_breakdown_gib["activations"] - flash.predicted.memory_breakdown_gib["activations"]
    lse = 4.0 * 32 * 4096 / 8 * 32 / 2**30
    assert extra == pytest.approx(scores - lse, rel=1e-6)


@pytest.mark.parametrize("engine,fix", [(MESHPLAN, "attention=unfused"), (TORCHTITAN, "attention=unfused"),
                                        (MESHPLAN, "sequence_parallel=false")])
def test_an_engine_that_does_not_run_it_refuses_the_pin(engine, fix):
    with pytest.raises(InputError) as error:
        _plan(engine.name, fix)
    assert f"{engine.title} does not run {fix.split('=')[0]}" in str(error.value)


@pytest.mark.parametrize("fixes,field", [(["attention=unfused", "cp=2"], "--fix attention"),
                                         (["sequence_parallel=false", "tp_overlap=true"], "--fix tp_overlap")])
def test_pins_that_cannot_go_together(fixes, field):
    with pytest.raises(InputError) as error:
        _plan("megatron", *fixes)
    assert error.value.field == field


def test_plan_file_and_megatron_export_carry_both_fields(tmp_path):
    runner = CliRunner()
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100:2", "--global-batch", "64",
                                 "--seq-len", "4096", "--engine", "megatron", "--fix", "tp=8",
                                 "--fix", "sequence_parallel=false", "--fix", "attention=unfused",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    assert data["sequence_parallel"] is False and data["attention"] == "unfused"
    plan = Plan.load(out)
    assert not plan.sequence_parallel and plan.attention == "unfused"
    exported = runner.invoke(app, ["export", str(out), "--to", "megatron"])
    assert exported.exit_code == 0, exported.output
    assert "--attention-backend unfused" in exported.output and "--sequence-parallel" not in exported.output
    # an older plan file without the field is a flash-attention plan
    del data["attention"]
    out.write_text(yaml.safe_dump(data))
    assert Plan.load(out).attention == "flash"


def test_megatron_export_of_a_flash_plan_names_its_fused_backend(tmp_path):
    runner = CliRunner()
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["plan", "--model", "llama3-8b", "--cluster", "dgx-h100:2", "--global-batch", "64",
                                 "--seq-len", "4096", "--engine", "megatron", "--fix", "tp=8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = runner.invoke(app, ["export", str(out), "--to", "megatron"])
    assert "--attention-backend fused" in exported.output and "--sequence-parallel" in exported.output
