"""meshplan export: each target is parsed back (argparse / tomllib / json) and must reproduce the plan's
degrees, micro batch, schedule, layer partition and recompute; what a target cannot express is warned; megatron
and torchtitan take only a plan priced for them. tests/test_export_torchtitan.py parses the torchtitan 0.3
arguments with torchtitan's own ConfigManager."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import tomllib

import pytest
import typer
from typer.testing import CliRunner

from meshplan.export import export_plan, recompute_kind, to_deepspeed_config, to_megatron_args
from meshplan.export_torchtitan import to_torchtitan_toml
from meshplan.plan import Plan, Prediction, StagePlan
from meshplan.spec import MODEL_PRESETS, RopeScaling, TrainSpec, load_cluster


def _stages(counts, full=None, selective=None, peak=60.0):
    out, start = [], 0
    for j, n in enumerate(counts):
        f = (full or [0] * len(counts))[j]
        s = (selective or [0] * len(counts))[j]
        out.append(StagePlan((start, start + n), {"full": f, "selective": s, "none": n - f - s}, peak))
        start += n
    return tuple(out)


FUSED = {"norm": "fused", "swiglu": "fused", "rope": "fused", "loss": "fused"}


def _pred():
    return Prediction(iteration_s=9.8, tokens_per_s=53500.0, tflops_per_gpu=410.0, mfu=0.41, peak_memory_gib=71.0,
                      time_breakdown_s={"compute": 8.0, "bubble": 0.7, "tp_comm": 0.4},
                      memory_breakdown_gib={"parameters": 9.0, "gradients": 9.0, "optimizer": 26.0,
                                            "activations": 22.0})


def pipeline_plan(**kw) -> Plan:
    """llama3-70b on 32 H100s for Megatron-Core: dp2 tp4 pp4, interleaved with 2 chunks per rank, uneven layers."""
    args = dict(dp=2, tp=4, pp=4, cp=1, micro_batch=1, num_microbatches=32,
                stages=_stages([9, 10, 10, 10, 10, 10, 11, 10], full=[9, 10, 10, 10, 10, 10, 11, 10]),
                model=MODEL_PRESETS["llama3-70b"], cluster=load_cluster("dgx-h100:4"),
                train=TrainSpec(global_batch=64, seq_len=8192), schedule="interleaved", virtual_stages=2, zero=1,
                engine="megatron", kernels=dict(FUSED), predicted=_pred())
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


def flat_plan(**kw) -> Plan:
    """llama3-8b on 8 H100s: dp4 tp2, no pipeline, selective recompute."""
    args = dict(dp=4, tp=2, pp=1, cp=1, micro_batch=2, num_microbatches=4,
                stages=_stages([32], selective=[32]), model=MODEL_PRESETS["llama3-8b"],
                cluster=load_cluster("dgx-h100:1"), train=TrainSpec(global_batch=32, seq_len=8192), zero=0,
                predicted=_pred())
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


# ----------------------------------------------------------------------------------------------
# Megatron-LM: parse with an argparse parser declaring the options as Megatron-LM declares them
# ----------------------------------------------------------------------------------------------

def megatron_parser() -> argparse.ArgumentParser:
    """Every option the export writes, declared as megatron/training/arguments.py declares it (NVIDIA/Megatron-LM
    main, commit d98e8a64ddf3); an option Megatron-LM does not know fails the parse."""
    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for name in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups",
                 "seq-length", "max-position-embeddings", "vocab-size", "tensor-model-parallel-size",
                 "pipeline-model-parallel-size", "context-parallel-size", "micro-batch-size", "global-batch-size",
                 "num-layers-per-virtual-pipeline-stage", "num-virtual-stages-per-pipeline-rank",
                 "decoder-first-pipeline-num-layers", "decoder-last-pipeline-num-layers", "recompute-num-layers",
                 "kv-channels"):
        p.add_argument(f"--{name}", type=int)
    for name in ("attention-dropout", "hidden-dropout", "norm-epsilon", "rope-scaling-factor", "rotary-percent"):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--rotary-base", type=int)
    p.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "yarn", "mrope", "relative",
                                                          "none"])
    p.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    p.add_argument("--recompute-granularity", choices=["full", "selective"])
    p.add_argument("--recompute-method", choices=["uniform", "block"])
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--fp8-format", choices=["e4m3", "hybrid"])
    p.add_argument("--cp-comm-type", nargs="+")
    p.add_argument("--pipeline-model-parallel-layout")
    p.add_argument("--data-parallel-sharding-strategy", choices=["no_shard", "optim", "optim_grads",
                                                                  "optim_grads_params"])
    p.add_argument("--recompute-modules", nargs="*")
    p.add_argument("--ckpt-format", choices=["torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"])
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine", "inference_optimized"])
    p.add_argument("--attention-backend", choices=["flash", "fused", "unfused", "local", "auto"])
    p.add_argument("--cross-entropy-fusion-impl", choices=["native", "te"])
    for name in ("group-query-attention", "qk-layernorm", "swiglu", "untie-embeddings-and-output-weights", "disable-bias-linear",
                 "bf16", "fp16", "sequence-parallel", "use-distributed-optimizer", "use-megatron-fsdp",
                 "use-tp-pp-dp-mapping", "tp-comm-overlap", "cross-entropy-loss-fusion", "overlap-grad-reduce",
                 "overlap-param-gather", "no-bias-swiglu-fusion", "no-bias-gelu-fusion", "no-rope-fusion", "add-qkv-bias",
                 "use-rope-scaling"):
        p.add_argument(f"--{name}", action="store_true")
    return p


def _layout_counts(layout: str) -> list[int]:
    """Parse Megatron's layout string the way PipelineParallelLayerLayout.parse_str_to_list does."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    assert stages[0].startswith("E") and stages[-1].endswith("L") and text.count("E") == text.count("L") == 1
    return [s.count("t") for s in stages]


def megatron_stage_counts(ns, layers: int, pp: int) -> list[int]:
    if ns.pipeline_model_parallel_layout:
        return _layout_counts(ns.pipeline_model_parallel_layout)
    if ns.decoder_first_pipeline_num_layers is not None:
        first, last = ns.decoder_first_pipeline_num_layers, ns.decoder_last_pipeline_num_layers
        mid = (layers - first - last) // max(pp - 2, 1) if pp > 2 else 0
        return [first] + [mid] * (pp - 2) + [last]
    per = ns.num_layers_per_virtual_pipeline_stage or layers // pp
    return [per] * (layers // per)


def test_megatron_round_trips_pipeline_plan():
    plan = pipeline_plan()
    warnings: list[str] = []
    args = to_megatron_args(plan, warnings)
    ns = megatron_parser().parse_args(args)
    world = plan.world_size
    assert (ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size, ns.context_parallel_size) == (4, 4, 1)
    assert world // (ns.tensor_model_parallel_size * ns.pipeline_model_parallel_size * ns.context_parallel_size) \
        == plan.dp
    assert ns.micro_batch_size == plan.micro_batch and ns.global_batch_size == plan.train.global_batch
    assert ns.global_batch_size // (ns.micro_batch_size * plan.dp) == plan.num_microbatches
    counts = megatron_stage_counts(ns, ns.num_layers, ns.pipeline_model_parallel_size)
    assert counts == [s.num_layers for s in plan.stages]
    assert len(counts) // ns.pipeline_model_parallel_size == plan.virtual_stages     # interleaved, v = 2
    assert ns.recompute_granularity == "full" and ns.recompute_method == "uniform" and ns.recompute_num_layers == 1
    assert ns.sequence_parallel and ns.use_distributed_optimizer and ns.bf16 and ns.swiglu
    assert ns.num_query_groups == 8 and ns.group_query_attention
    assert ns.overlap_grad_reduce and ns.overlap_param_gather and not ns.use_megatron_fsdp
    assert ns.transformer_impl == "transformer_engine" and ns.attention_backend == "fused"      # cuDNN (TE)
    assert ns.cross_entropy_loss_fusion and ns.cross_entropy_fusion_impl == "native"
    assert not ns.no_rope_fusion and not ns.no_bias_swiglu_fusion and not ns.tp_comm_overlap
    assert ns.rotary_base == 500000 and ns.use_rope_scaling and ns.rope_scaling_factor == 8.0      # Llama 3.1
    assert ns.norm_epsilon == 1e-5 and not ns.add_qkv_bias
    assert warnings == []
    ns = megatron_parser().parse_args(to_megatron_args(pipeline_plan(tp_overlap=True)))
    assert ns.tp_comm_overlap and ns.sequence_parallel


def test_megatron_model_numerics_qkv_bias_and_rope_scaling_it_cannot_express():
    qwen = dataclasses.replace(MODEL_PRESETS["qwen2.5-7b"], layers=32)
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(model=qwen)))
    assert ns.add_qkv_bias and ns.disable_bias_linear and ns.rotary_base == 1000000 and ns.norm_epsilon == 1e-6
    assert not ns.use_rope_scaling
    odd = dataclasses.replace(MODEL_PRESETS["llama3-8b"], rope_scaling=RopeScaling(8.0, 1.0, 4.0, 4096))
    warnings: list[str] = []
    to_megatron_args(flat_plan(model=odd), warnings)
    assert any("original_max_position_embeddings 4096" in w for w in warnings), warnings


def test_megatron_model_with_wide_heads_and_qk_norms():
    """Qwen3-32B: 64 heads of 128 over hidden 5120 (``--kv-channels``, Megatron's default being hidden/heads)
    and a norm over each q and k head (``--qk-layernorm``); a Llama model gets neither."""
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(model=MODEL_PRESETS["qwen3-32b"],
                                                                   stages=_stages([64], selective=[64]))))
    assert ns.kv_channels == 128 and ns.qk_layernorm and ns.num_attention_heads == 64 and ns.hidden_size == 5120
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan()))
    assert ns.kv_channels is None and not ns.qk_layernorm


def test_megatron_even_interleaved_and_first_last_and_block_recompute():
    even = pipeline_plan(stages=_stages([10] * 8, full=[3] * 8))
    ns = megatron_parser().parse_args(to_megatron_args(even))
    assert ns.num_layers_per_virtual_pipeline_stage == 10 and ns.pipeline_model_parallel_layout is None
    assert (ns.recompute_granularity, ns.recompute_method, ns.recompute_num_layers) == ("full", "block", 3)
    assert recompute_kind(even) == "full_block"

    uneven = pipeline_plan(schedule="1f1b", virtual_stages=1, stages=_stages([19, 21, 21, 19]))
    ns = megatron_parser().parse_args(to_megatron_args(uneven))
    assert (ns.decoder_first_pipeline_num_layers, ns.decoder_last_pipeline_num_layers) == (19, 19)
    assert megatron_stage_counts(ns, 80, 4) == [19, 21, 21, 19]
    assert ns.recompute_granularity is None and ns.num_layers_per_virtual_pipeline_stage is None


def test_megatron_flat_plan_selective_and_warnings():
    plan = flat_plan(cp=1, zero=3, compile=True)
    warnings: list[str] = []
    ns = megatron_parser().parse_args(to_megatron_args(plan, warnings))
    assert ns.pipeline_model_parallel_size == 1 and ns.tensor_model_parallel_size == 2
    assert ns.recompute_granularity == "selective" and ns.recompute_method is None
    assert ns.recompute_modules == ["core_attn"]                     # Megatron's selective: core attention
    assert ns.use_megatron_fsdp and ns.data_parallel_sharding_strategy == "optim_grads_params"
    assert ns.use_distributed_optimizer and ns.ckpt_format == "fsdp_dtensor"     # what Megatron FSDP needs
    assert ns.overlap_grad_reduce and ns.overlap_param_gather
    assert ns.no_rope_fusion and ns.no_bias_swiglu_fusion and not ns.cross_entropy_loss_fusion   # reference
    assert any("compile" in w for w in warnings) and any("norm" in w for w in warnings)
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(zero=2)))
    assert ns.data_parallel_sharding_strategy == "optim_grads"
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(zero=0, dp=1, tp=8, micro_batch=2,
                                                                 num_microbatches=16)))
    assert not ns.use_distributed_optimizer and not ns.overlap_grad_reduce and not ns.overlap_param_gather
    one = flat_plan(engine="megatron", tp=1, dp=8, micro_batch=1, tp_overlap=True, kernels=dict(FUSED))
    assert "--tp-comm-overlap" not in to_megatron_args(one)      # Megatron refuses it where tp = 1 turns SP off


def test_megatron_warns_what_it_cannot_express():
    plan = pipeline_plan(schedule="gpipe", virtual_stages=1, vocab_parallel=True,
                         stages=_stages([20] * 4, full=[2, 0, 0, 0], selective=[0, 5, 5, 5]),
                         mesh_order=("dp", "cp", "pp", "tp"), engine="meshplan")
    warnings: list[str] = []
    ns = megatron_parser().parse_args(to_megatron_args(plan, warnings))
    text = "\n".join(warnings)
    assert "GPipe" in text and "vocabulary" in text and "mesh order" in text and "recompute (full blocks" in text
    assert ns.recompute_method == "block" and ns.recompute_num_layers == 5     # conservative: covers 2 and 5


def test_megatron_cp_kinds():
    plan = flat_plan(dp=2, cp=2, cp_kind="ring", micro_batch=4)
    ns = megatron_parser().parse_args(to_megatron_args(plan))
    assert ns.context_parallel_size == 2 and ns.cp_comm_type == ["p2p"]
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(dp=2, cp=2, micro_batch=4)))
    assert ns.cp_comm_type == ["a2a"]


# ----------------------------------------------------------------------------------------------
# torchtitan
# ----------------------------------------------------------------------------------------------

def _titan_counts(fqns: list[list[str]]) -> list[int]:
    return [sum(1 for n in part if n.startswith("layers.")) for part in fqns]


def titan_plan(**kw) -> Plan:
    """pipeline_plan priced for torchtitan (ZeRO 3, no fused kernels)."""
    return pipeline_plan(**{"engine": "torchtitan", "zero": 3, "kernels": {k: "reference" for k in FUSED}, **kw})


def test_torchtitan_toml_round_trips_pipeline_plan():
    plan = titan_plan()
    warnings: list[str] = []
    cfg = tomllib.loads(to_torchtitan_toml(plan, warnings))
    par, tr = cfg["parallelism"], cfg["training"]
    dp = par["data_parallel_replicate_degree"] * par["data_parallel_shard_degree"]
    assert (dp, par["tensor_parallel_degree"], par["pipeline_parallel_degree"], par["context_parallel_degree"]) \
        == (2, 4, 4, 1)
    assert par["data_parallel_shard_degree"] == 2 and par["fsdp_reshard_after_forward"] == "always"   # ZeRO-3
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert par["pipeline_parallel_microbatch_size"] == plan.micro_batch
    assert tr["local_batch_size"] // par["pipeline_parallel_microbatch_size"] == plan.num_microbatches
    assert tr["global_batch_size"] == plan.train.global_batch and tr["seq_len"] == plan.train.seq_len
    fqns = par["module_fqns_per_model_part"]
    assert _titan_counts(fqns) == [s.num_layers for s in plan.stages]
    assert len(fqns) // par["pipeline_parallel_degree"] == plan.virtual_stages
    assert fqns[0][0] == "tok_embeddings" and fqns[-1][-2:] == ["norm", "output"]
    layers = [n for part in fqns for n in part if n.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(plan.model.layers)]
    assert cfg["activation_checkpoint"]["mode"] == "full"
    assert cfg["model"] == {"name": "llama3", "flavor": "70B"}
    assert cfg["compile"] == {"enable": False, "components": ["model", "loss"]}
    assert warnings == []


def test_torchtitan_toml_flat_plan():
    plan = flat_plan()
    cfg = tomllib.loads(to_torchtitan_toml(plan))
    par, tr = cfg["parallelism"], cfg["training"]
    assert par["data_parallel_replicate_degree"] == 4 and par["data_parallel_shard_degree"] == 1   # ZeRO-0: DDP
    assert par["pipeline_parallel_degree"] == 1 and "module_fqns_per_model_part" not in par
    assert tr["local_batch_size"] == plan.micro_batch
    dp = par["data_parallel_replicate_degree"] * par["data_parallel_shard_degree"]
    assert tr["global_batch_size"] // (tr["local_batch_size"] * dp) == plan.num_microbatches   # grad accumulation
    assert cfg["activation_checkpoint"] == {"mode": "selective", "selective_ac_option": "op"}


def test_torchtitan_toml_warnings():
    # a plan made for an engine that runs what torchtitan does not (Ulysses, ZeRO-1, fp16): each is a warning
    plan = flat_plan(engine="megatron", dp=2, cp=2, cp_kind="ulysses", micro_batch=4, zero=1,
                     model=MODEL_PRESETS["gpt2"],
                     stages=_stages([12], full=[6]), train=TrainSpec(global_batch=32, seq_len=1024, precision="fp16"))
    warnings: list[str] = []
    cfg = tomllib.loads(to_torchtitan_toml(plan, warnings))
    text = "\n".join(warnings)
    for needle in ("Ulysses", "ZeRO-1", "not a torchtitan flavor", "Llama-shaped", "fp16", "recompute (full blocks"):
        assert needle in text, needle
    assert cfg["parallelism"]["context_parallel_degree"] == 2
    assert cfg["activation_checkpoint"]["mode"] == "full"
    assert cfg["parallelism"]["fsdp_reshard_after_forward"] == "never"


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------

def test_deepspeed_round_trips():
    plan = pipeline_plan(schedule="1f1b", virtual_stages=1, stages=_stages([20] * 4, full=[20] * 4))
    warnings: list[str] = []
    cfg = json.loads(json.dumps(to_deepspeed_config(plan, warnings)))
    tp = cfg["tensor_parallel"]["autotp_size"]
    pp = cfg["pipeline"]["stages"]
    cp = cfg.get("sequence_parallel_size", 1)
    dp = cfg["train_batch_size"] // (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"])
    assert (dp, tp, pp, cp) == (plan.dp, plan.tp, plan.pp, plan.cp)
    assert dp * tp * pp * cp == plan.world_size
    assert cfg["train_micro_batch_size_per_gpu"] == plan.micro_batch
    assert cfg["gradient_accumulation_steps"] == plan.num_microbatches
    assert cfg["zero_optimization"]["stage"] == plan.zero
    assert cfg["pipeline"]["activation_checkpoint_interval"] == 1 and cfg["pipeline"]["partition"] == "uniform"
    assert cfg["bf16"] == {"enabled": True}
    assert warnings and all("sequence parallel" in w for w in warnings)   # AutoTP has no SP


def test_deepspeed_flat_plan_and_warnings():
    plan = flat_plan(tp=1, dp=4, cp=2, cp_kind="ring", micro_batch=2, num_microbatches=4,
                     cluster=load_cluster("dgx-h100:1"), stages=_stages([32], full=[8]),
                     train=TrainSpec(global_batch=32, seq_len=8192))
    warnings: list[str] = []
    cfg = to_deepspeed_config(plan, warnings)
    assert "pipeline" not in cfg and "tensor_parallel" not in cfg
    assert cfg["sequence_parallel_size"] == 2
    assert cfg["activation_checkpointing"]["number_checkpoints"] == 8
    text = "\n".join(warnings)
    assert "ring" in text and "model code" in text

    bad = pipeline_plan(zero=2)
    warnings = []
    to_deepspeed_config(bad, warnings)
    text = "\n".join(warnings)
    assert "ZeRO-2" in text and "interleaved" in text and "uneven" in text


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def app():
    from meshplan.report_cli import register

    application = typer.Typer()
    register(application)
    return application


def test_cli_export_each_target(app, tmp_path):
    path = tmp_path / "plan.yaml"
    pipeline_plan().save(path)
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(path), "--to", "megatron"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    ns = megatron_parser().parse_args(shlex.split(res.stdout.replace("\\\n", " ")))
    assert ns.pipeline_model_parallel_size == 4
    res = runner.invoke(app, ["export", str(path), "--to", "deepspeed"])
    assert res.exit_code == 0 and json.loads(res.stdout)["zero_optimization"]["stage"] == 1
    assert "warning: deepspeed: DeepSpeed is not an engine meshplan prices" in res.stderr
    res = runner.invoke(app, ["export", str(path), "--to", "json"])
    assert res.exit_code == 0 and Plan.from_dict(json.loads(res.stdout)) == Plan.load(path)
    out = tmp_path / "ds.json"
    res = runner.invoke(app, ["export", str(path), "--to", "DeepSpeed", "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text())["train_batch_size"] == 64

    titan = tmp_path / "titan.yaml"
    titan_plan().save(titan)
    res = runner.invoke(app, ["export", str(titan), "--to", "torchtitan"])
    assert res.exit_code == 0, res.output
    args = shlex.split(res.stdout.replace("\\\n", " "))
    assert args[:4] == ["--module", "llama3", "--config", "llama3_70b"] and args[-1] == "activation-checkpoint:full"
    res = runner.invoke(app, ["export", str(titan), "--to", "torchtitan-toml"])
    assert res.exit_code == 0 and tomllib.loads(res.stdout)["parallelism"]["tensor_parallel_degree"] == 4


@pytest.mark.parametrize("engine,target", [("megatron", "torchtitan"), ("megatron", "torchtitan-toml"),
                                           ("meshplan", "megatron"), ("torchtitan", "megatron")])
def test_cli_export_refuses_another_engines_plan(app, tmp_path, engine, target):
    path = tmp_path / "plan.yaml"
    plan = titan_plan(engine=engine) if engine != "megatron" else pipeline_plan()
    plan.save(path)
    res = CliRunner().invoke(app, ["export", str(path), "--to", target])
    want = target.split("-")[0]
    assert res.exit_code == 2 and res.stdout == "" and "Traceback" not in res.output
    assert res.stderr.strip() == (f"error: --to: {path} is priced for {engine}, not {want} (re-plan with "
                                  f"`meshplan plan --model llama3-70b --cluster dgx-h100:4 --global-batch 64 "
                                  f"--seq-len 8192 --engine {want}`)")


def test_replan_command_for_inputs_given_as_files():
    from meshplan.export import replan_command

    custom = dataclasses.replace(MODEL_PRESETS["llama3-8b"], name="my-model")
    assert replan_command(flat_plan(model=custom), "torchtitan") == "meshplan plan ... --engine torchtitan"
    fp8 = flat_plan(engine="megatron", train=TrainSpec(global_batch=32, seq_len=8192, precision="fp8",
                                                       optimizer="sgd"))
    assert replan_command(fp8, "megatron").endswith("--precision fp8 --optimizer sgd --engine megatron")


def test_cli_export_errors(app, tmp_path):
    runner = CliRunner()
    path = tmp_path / "plan.yaml"
    flat_plan().save(path)
    res = runner.invoke(app, ["export", str(path), "--to", "jax"])
    assert res.exit_code == 2 and res.stderr.startswith("error: --to: unknown export target")
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "missing.yaml"), "--to", "megatron"])
    assert res.exit_code == 2 and "no such file" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("dp: [1, 2\n")
    res = runner.invoke(app, ["export", str(bad), "--to", "megatron"])
    assert res.exit_code == 2 and "not valid YAML" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_export_plan_unknown_target():
    from meshplan.errors import InputError

    with pytest.raises(InputError):
        export_plan(flat_plan(), "nemo")
