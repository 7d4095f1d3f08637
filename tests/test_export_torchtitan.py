"""meshplan export --to torchtitan, parsed by torchtitan 0.3.0's own ConfigManager (the parser ``torchtitan.train``
runs): every degree, batch size, schedule, layer split, recompute policy, compile and precision field of the job
it builds must be the plan's. Skipped where torchtitan 0.3.0 and the packages its llama3 config registry imports
are not installed (scripts/test.sh installs them)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shlex
import sys

import pytest

from meshplan.errors import InputError
from meshplan.export import export_plan
from meshplan.export_torchtitan import to_torchtitan_args
from meshplan.plan import Plan, StagePlan
from meshplan.spec import MODEL_PRESETS, TrainSpec, load_cluster

# Importing torchtitan's llama3 config registry takes seconds (datasets, tensorboard, the trainer).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def torchtitan():
    """torchtitan 0.3.0's config classes, or a skip where torchtitan cannot be installed."""
    pytest.importorskip("torchtitan.models.llama3.config_registry",
                        reason="needs torchtitan 0.3.0 with tyro, spmd_types, torchdata, tokenizers, datasets and "
                               "tensorboard (the install line in scripts/test.sh)")
    version = importlib.metadata.version("torchtitan")
    if version != "0.3.0":
        pytest.skip(f"reads torchtitan 0.3.0's command line, found torchtitan {version}")
    from torchtitan.config import ConfigManager
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    TITAN.update(ConfigManager=ConfigManager, full=FullAC.Config, selective=SelectiveAC.Config)
    return TITAN


TITAN: dict = {}


def config_manager():
    return TITAN["ConfigManager"]()


def _stages(counts, full=None, selective=None):
    out, start = [], 0
    for j, n in enumerate(counts):
        f = (full or [0] * len(counts))[j]
        s = (selective or [0] * len(counts))[j]
        out.append(StagePlan((start, start + n), {"full": f, "selective": s, "none": n - f - s}, 60.0))
        start += n
    return tuple(out)


def titan_plan(**kw) -> Plan:
    """llama3-70b on 32 H100s priced for torchtitan: dp2 tp4 pp4, interleaved, 2 chunks per rank, uneven layers."""
    args = dict(engine="torchtitan", dp=2, tp=4, pp=4, cp=1, micro_batch=1, num_microbatches=32,
                stages=_stages([9, 10, 10, 10, 10, 10, 11, 10], full=[9, 10, 10, 10, 10, 10, 11, 10]),
                model=MODEL_PRESETS["llama3-70b"], cluster=load_cluster("dgx-h100:4"),
                train=TrainSpec(global_batch=64, seq_len=8192), schedule="interleaved", virtual_stages=2, zero=3)
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


def flat_plan(**kw) -> Plan:
    """llama3-8b on 8 H100s priced for torchtitan: dp4 tp2, no pipeline, selective recompute, compiled, async TP."""
    args = dict(engine="torchtitan", dp=4, tp=2, pp=1, cp=1, micro_batch=2, num_microbatches=4,
                stages=_stages([32], selective=[32]), model=MODEL_PRESETS["llama3-8b"],
                cluster=load_cluster("dgx-h100:1"), train=TrainSpec(global_batch=32, seq_len=8192), zero=0,
                compile=True, tp_overlap=True)
    args.update(kw)
    plan = Plan(**args)
    plan.validate()
    return plan


def parse(plan: Plan, config: str | None = None):
    """The job torchtitan builds from the export's text, as ``meshplan export`` prints it."""
    text, _warnings = export_plan(plan, "torchtitan", torchtitan_config=config)
    return config_manager().parse_args(shlex.split(text.replace("\\\n", " ")))


def stage_counts(fqns: list[list[str]]) -> list[int]:
    return [sum(1 for name in part if name.startswith("layers.")) for part in fqns]


def assert_job_is_plan(job, plan: Plan) -> None:
    """Every degree, batch and recompute field of torchtitan's job against the plan."""
    par, tr = job.parallelism, job.training
    dp = par.data_parallel_replicate_degree * par.data_parallel_shard_degree
    assert (dp, par.tensor_parallel_degree, par.pipeline_parallel_degree, par.context_parallel_degree) == \
        (plan.dp, plan.tp, plan.pp, plan.cp)
    if plan.zero == 0:
        assert par.data_parallel_shard_degree == 1                      # replicated: ZeRO 0
    else:
        assert par.data_parallel_replicate_degree == 1
        assert par.fsdp_reshard_after_forward == ("always" if plan.zero == 3 else "never")
    assert par.enable_sequence_parallel == (plan.sequence_parallel or plan.tp == 1)
    assert tr.global_batch_size == plan.train.global_batch and tr.seq_len == plan.train.seq_len
    if plan.pp > 1:           # the schedule splits the local batch into all of the plan's micro-batches
        assert par.pipeline_parallel_microbatch_size == plan.micro_batch
        assert tr.local_batch_size // par.pipeline_parallel_microbatch_size == plan.num_microbatches
        assert tr.global_batch_size // (tr.local_batch_size * dp) == 1
        assert stage_counts(par.module_fqns_per_model_part) == [s.num_layers for s in plan.stages]
        assert len(par.module_fqns_per_model_part) == plan.pp * plan.virtual_stages
        schedule = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}[plan.schedule]
        assert par.pipeline_parallel_schedule == schedule
    else:                     # torchtitan accumulates global / (local * dp) micro-batches
        assert tr.local_batch_size == plan.micro_batch
        assert tr.global_batch_size // (tr.local_batch_size * dp) == plan.num_microbatches
    ac = {"full": TITAN["full"], "selective": TITAN["selective"]}.get(plan.recompute)
    assert (job.activation_checkpoint is None) if ac is None else type(job.activation_checkpoint) is ac
    assert job.compile.enable == plan.compile
    assert job.compile.enable_async_tensor_parallel == (plan.tp_overlap and plan.tp > 1)
    assert tr.mixed_precision_param == ("float32" if plan.train.precision == "fp32" else "bfloat16")
    model = job.model_spec.model
    assert (len(model.layers), model.dim, model.vocab_size) == (plan.model.layers, plan.model.hidden, plan.model.vocab)


def test_pipeline_plan_is_the_job():
    plan = titan_plan()
    job = parse(plan)
    assert_job_is_plan(job, plan)
    fqns = job.parallelism.module_fqns_per_model_part
    assert fqns[0][0] == "tok_embeddings" and fqns[-1][-2:] == ["norm", "lm_head"]
    assert [n for part in fqns for n in part if n.startswith("layers.")] == [f"layers.{i}" for i in range(80)]
    assert job.training.disable_cuda_graphs              # torchtitan refuses CUDA graphs under a pipeline


@pytest.mark.parametrize("kw", [
    {},                                                                       # DDP, selective, compile + async TP
    {"zero": 2, "compile": False, "tp_overlap": False, "stages": _stages([32])},        # FSDP never, no AC
    {"zero": 3, "dp": 2, "cp": 2, "cp_kind": "ring", "micro_batch": 4, "stages": _stages([32], full=[32]),
     "sequence_parallel": False, "tp_overlap": False,     # async TP decomposes SP's collectives: SP only
     "train": TrainSpec(global_batch=32, seq_len=8192, precision="fp32")},
], ids=["ddp-selective-compiled", "zero2-no-recompute", "zero3-cp-full-fp32-no-sp"])
def test_flat_plans_are_the_job(kw):
    plan = flat_plan(**kw)
    assert_job_is_plan(parse(plan), plan)


def test_pipeline_schedules_and_zero2():
    for plan in (titan_plan(schedule="1f1b", virtual_stages=1, zero=2, stages=_stages([19, 21, 21, 19])),
                 titan_plan(schedule="gpipe", virtual_stages=1, stages=_stages([20] * 4, selective=[20] * 4))):
        assert_job_is_plan(parse(plan), plan)


def test_partial_recompute_exports_a_policy_that_covers_it():
    plan = titan_plan(schedule="1f1b", virtual_stages=1, stages=_stages([20] * 4, selective=[5] * 4))
    warnings: list[str] = []
    args = to_torchtitan_args(plan, warnings)
    job = config_manager().parse_args(args)
    assert type(job.activation_checkpoint) is TITAN["selective"]          # selective on every block
    assert any("at least as much as planned" in w for w in warnings)
    mixed = titan_plan(schedule="1f1b", virtual_stages=1, stages=_stages([20] * 4, full=[2] * 4, selective=[5] * 4))
    assert type(config_manager().parse_args(to_torchtitan_args(mixed)).activation_checkpoint) is TITAN["full"]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-32b", "qwen3-30b-a3b"])
def test_qwen3_presets_are_torchtitans_own(name):
    """The job of a Qwen3 preset builds torchtitan's Qwen3 of the same shape: blocks, width, heads of head_dim,
    q/k norms, the MLP or the experts."""
    m = MODEL_PRESETS[name]
    layers = m.layers
    plan = flat_plan(model=m, tp=1, dp=8, num_microbatches=2, tp_overlap=False,
                     stages=_stages([layers], selective=[layers]), ep=8 if m.moe else 1)
    job = config_manager().parse_args(to_torchtitan_args(plan))
    assert_job_is_plan(job, plan)
    attention = job.model_spec.model.layers[0].attention
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (m.heads, m.kv_heads, m.head_dim)
    assert attention.qk_norm is not None and attention.qk_norm.normalized_shape == m.head_dim
    block = job.model_spec.model.layers[0]
    if m.moe is None:
        assert block.feed_forward.w1.out_features == m.ffn_hidden
    else:
        experts = block.moe.routed_experts.inner_experts
        assert (experts.num_experts, experts.hidden_dim, block.moe.router.top_k, block.moe.router.route_norm) == \
            (m.moe.experts, m.moe.expert_ffn_hidden, m.moe.top_k, m.moe.normalize_top_k)
        assert block.moe.shared_experts is None and job.training.disable_cuda_graphs      # all-to-all dispatch


def test_model_that_is_no_preset_needs_a_config_function(tmp_path, monkeypatch):
    custom = dataclasses.replace(MODEL_PRESETS["llama3-8b"], name="my-llama")
    plan = flat_plan(model=custom)
    with pytest.raises(InputError, match="not a torchtitan 0.3.0 preset.*--torchtitan-config MODULE:FUNCTION"):
        export_plan(plan, "torchtitan")
    with pytest.raises(InputError, match="--torchtitan-config"):
        export_plan(plan, "torchtitan", torchtitan_config="no_colon")
    package = tmp_path / "my_titan_configs.py"
    package.write_text("from torchtitan.models.llama3.config_registry import llama3_8b\n\n\n"
                       "def my_llama():\n    return llama3_8b()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    warnings: list[str] = []
    args = to_torchtitan_args(plan, warnings, "my_titan_configs:my_llama")
    assert args[:4] == ["--module", "my_titan_configs", "--config", "my_llama"]
    assert any("must have the plan's shape" in w for w in warnings)
    assert_job_is_plan(config_manager().parse_args(args), plan)
    sys.modules.pop("my_titan_configs", None)
