"""Export a Plan for torchtitan: the 0.3 command line, or the TOML job file of the 0.2 releases.

torchtitan 0.3.0 (PyPI) reads no job file. ``torchtitan.train`` calls ``ConfigManager.parse_args``
(``torchtitan/config/manager.py``): ``--module`` names a model package whose ``config_registry`` holds one
function per job (``llama3_8b``, ``llama3_70b``, ``llama3_405b``), ``--config`` names that function, and tyro
parses every other argument as ``--section.key value`` over the dataclasses it returns
(``TrainingConfig``, ``ParallelismConfig``, ``CompileConfig`` in ``torchtitan/config/configs.py``); the Qwen3
package (``qwen3``) has ``qwen3_0_6b``, ``qwen3_32b`` and ``qwen3_30b_a3b``. Activation
checkpointing is a tyro subcommand (``activation-checkpoint:none|full|selective``,
``torchtitan/distributed/activation_checkpoint.py``), which goes last because tyro parses every argument
after it inside the subcommand. The model's shape is ``Trainer.Config.model_spec``, which is suppressed from
the command line (``tyro.conf.Suppress``): it comes from the config function only.

torchtitan 0.2.x reads a TOML job file (``--job.config_file``, ``torchtitan/config/job_config.py`` of 0.2.2);
:func:`to_torchtitan_toml` writes it.
"""

from __future__ import annotations

import json
from typing import Any

from meshplan.errors import InputError
from meshplan.export import describe_recompute, mesh_is_default, recompute_counts, recompute_kind, schedule_name, warn
from meshplan.plan import FUSED_IMPLS, Plan
from meshplan.spec import MODEL_PRESETS, ModelSpec

TORCHTITAN_VERSION = "0.3.0"

# meshplan preset -> (module, config function) in torchtitan/models/{llama3,qwen3}/config_registry.py of 0.3.0.
TORCHTITAN_CONFIGS = {"llama3-8b": ("llama3", "llama3_8b"), "llama3-70b": ("llama3", "llama3_70b"),
                      "llama3-405b": ("llama3", "llama3_405b"), "qwen3-0.6b": ("qwen3", "qwen3_0_6b"),
                      "qwen3-32b": ("qwen3", "qwen3_32b"), "qwen3-30b-a3b": ("qwen3", "qwen3_30b_a3b")}

# torch.distributed.pipelining.schedules.get_schedule_class names.
_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}

# The subcommand token that selects the activation-checkpointing policy; always the last argument.
AC_SUBCOMMAND = "activation-checkpoint:"


# ----------------------------------------------------------------------------------------------
# torchtitan 0.3: --module / --config and --section.key overrides
# ----------------------------------------------------------------------------------------------

def to_torchtitan_args(plan: Plan, warnings: list[str] | None = None, config: str | None = None) -> list[str]:
    """The arguments of ``torchrun ... -m torchtitan.train`` that run the plan on torchtitan 0.3.0.

    ``config`` (``MODULE:FUNCTION``) names the config function that builds the model; without it the model
    must be one of torchtitan's presets (:data:`TORCHTITAN_CONFIGS`), since no override sets the shape.
    Data, tokenizer, optimizer, step count and checkpoint settings stay the config function's.
    """
    module, function = torchtitan_config(plan, config, warnings)
    args = ["--module", module, "--config", function]
    args += _titan_training(plan, warnings)
    args += _titan_data_parallel(plan, warnings)
    args += _titan_model_parallel(plan, warnings)
    args += _titan_pipeline(plan, warnings)
    args += _titan_compile(plan, warnings)
    args.append(AC_SUBCOMMAND + titan_ac_mode(plan, warnings))
    return args


def torchtitan_config(plan: Plan, config: str | None, warnings: list[str] | None) -> tuple[str, str]:
    """(``--module``, ``--config``) for the plan's model; an :class:`InputError` for a model no preset builds."""
    m = plan.model
    if config:
        module, _, function = config.partition(":")
        if not module or not function:
            raise InputError("--torchtitan-config", f"{config!r} is not MODULE:FUNCTION",
                             "write e.g. --torchtitan-config my_pkg.configs:llama3_70b_sdpa")
        warn(warnings, f"torchtitan: the model is what {module}:{function} builds; it must have the plan's shape "
                       f"({shape_words(m)})")
        return module, function
    if m.name not in TORCHTITAN_CONFIGS or MODEL_PRESETS.get(m.name) != m:
        presets = ", ".join(TORCHTITAN_CONFIGS)
        raise InputError("--to torchtitan", f"model {m.name!r} is not a torchtitan {TORCHTITAN_VERSION} preset "
                         f"({presets}), and its shape is no command-line field there",
                         "write a config_registry function that builds it and pass --torchtitan-config "
                         "MODULE:FUNCTION, or use --to torchtitan-toml for torchtitan 0.2")
    _warn_preset_precision(plan, warnings)
    return TORCHTITAN_CONFIGS[m.name]


def shape_words(m: ModelSpec) -> str:
    """The model's shape as a torchtitan model registry entry must match it, in words."""
    words = [f"{m.layers} layers", f"hidden {m.hidden}", f"{m.heads} heads", f"{m.kv_heads} kv heads"]
    if m.q_width != m.hidden:
        words.append(f"head_dim {m.head_dim}")
    if m.qk_norm:
        words.append("q/k norms (torchtitan's qwen3 model)")
    if m.bias or m.qkv_bias:
        words.append("biases on every projection" if m.bias else "q/k/v biases")
    words.append(f"rotary base {m.rope_theta:g}")
    if m.rope_scaling is not None:
        kind = "YaRN" if getattr(m.rope_scaling, "rope_type", "") == "yarn" else "Llama 3"
        words.append(f"{kind} rotary scaling, factor {m.rope_scaling.factor:g}")
    return ", ".join(words + [f"ffn {m.ffn_hidden}", f"vocab {m.vocab}"])


def _warn_preset_precision(plan: Plan, warnings: list[str] | None) -> None:
    """The float8 converter is part of the preset's model_spec: llama3_405b has it, the others do not."""
    fp8 = plan.train.precision == "fp8"
    if plan.model.name == "llama3-405b" and not fp8:
        warn(warnings, f"torchtitan: llama3_405b converts its linear layers to float8 (Float8LinearConverter in "
                       f"its model_spec, not a command-line field) but the plan is priced for "
                       f"{plan.train.precision}; pass --torchtitan-config with a config function without it")
    elif plan.model.name != "llama3-405b" and fp8:
        warn(warnings, f"torchtitan: fp8: {TORCHTITAN_CONFIGS[plan.model.name][1]} has no float8 converter (a "
                       "model_spec setting, not a command-line field); pass --torchtitan-config with a config "
                       "function that adds Float8LinearConverter")


def _titan_training(plan: Plan, warnings: list[str] | None) -> list[str]:
    """``--training.*``: sequence length, batch sizes and mixed precision.

    ``local_batch_size`` is what one data-parallel rank processes per gradient-accumulation step: with a
    pipeline the schedule splits it into ``pipeline_parallel_microbatch_size`` micro-batches (all of the
    plan's), without one torchtitan accumulates ``global / (local * dp)`` micro-batches (trainer.py).
    CUDA graphs run neither pipelines nor the all-to-all token dispatch of expert parallel
    (``Trainer.Config._validate_cuda_graphs``), so a pipeline or ep > 1 disables them.
    """
    t = plan.train
    local = plan.micro_batch * plan.num_microbatches if plan.pp > 1 else plan.micro_batch
    args = ["--training.seq_len", str(t.seq_len), "--training.local_batch_size", str(local),
            "--training.global_batch_size", str(t.global_batch),
            "--training.mixed_precision_param", "float32" if t.precision == "fp32" else "bfloat16"]
    if plan.pp > 1 or plan.ep > 1:
        args.append("--training.disable_cuda_graphs")
    if t.precision == "fp16":
        warn(warnings, "torchtitan: fp16 is not a torchtitan mixed-precision choice (bfloat16 or float32); "
                       "exported as bfloat16")
    if t.optimizer == "sgd":
        warn(warnings, "torchtitan: optimizer sgd: the config function's optimizer is AdamW; set it there")
    return args


def _titan_data_parallel(plan: Plan, warnings: list[str] | None) -> list[str]:
    """ZeRO 0: replicate over dp (``data_parallel_replicate_degree``); 2 and 3: FSDP2 over dp
    (``data_parallel_shard_degree``) with ``fsdp_reshard_after_forward`` ``never`` (ZeRO 2: parameters stay
    gathered from forward to backward) or ``always`` (ZeRO 3), set explicitly because the ``default`` policy
    depends on pipeline parallelism (torchtitan/distributed/fsdp.py)."""
    if plan.zero == 0:
        args = ["--parallelism.data_parallel_replicate_degree", str(plan.dp),
                "--parallelism.data_parallel_shard_degree", "1"]
        if plan.cp > 1:
            warn(warnings, "torchtitan: with context parallel, torchtitan shards parameters over the cp ranks "
                           "(FSDP over dp_shard x cp) even when data_parallel_shard_degree is 1")
        return args
    if plan.zero == 1:
        warn(warnings, "torchtitan: ZeRO-1 has no torchtitan equivalent; exported as FSDP2 with "
                       "fsdp_reshard_after_forward never (ZeRO-2: gradients sharded too)")
    return ["--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree",
            str(plan.dp), "--parallelism.fsdp_reshard_after_forward", "always" if plan.zero == 3 else "never"]


def _titan_model_parallel(plan: Plan, warnings: list[str] | None) -> list[str]:
    """Tensor parallel (with or without sequence parallel) and context parallel."""
    args = ["--parallelism.tensor_parallel_degree", str(plan.tp)]
    if plan.tp > 1:
        args.append("--parallelism.enable_sequence_parallel" if plan.sequence_parallel
                    else "--parallelism.no_enable_sequence_parallel")
    args += ["--parallelism.context_parallel_degree", str(plan.cp)]
    if plan.model.moe is not None:
        args += ["--parallelism.expert_parallel_degree", str(plan.ep)]
    if plan.cp > 1:
        if plan.cp_kind == "ulysses":
            warn(warnings, "torchtitan: Ulysses (all-to-all) context parallelism cannot be expressed; exported "
                           "as torchtitan's context parallel")
        warn(warnings, "torchtitan: torchtitan 0.3 llama3 configs build FlexAttention, whose context parallel "
                       "all-gathers K/V (flex_cp_allgather) rather than passing it around a ring")
    warn_mesh_order(plan, warnings)
    return args


def warn_mesh_order(plan: Plan, warnings: list[str] | None) -> None:
    """The warning for a mesh order torchtitan cannot build (both export forms)."""
    if not mesh_is_default(plan):
        warn(warnings, f"torchtitan: mesh order {list(plan.mesh_order)} cannot be expressed; torchtitan builds "
                       "its mesh as pp, dp_replicate, dp_shard, cp, tp (outermost first)")


def torchtitan_fqns(plan: Plan, head: str = "lm_head") -> list[list[str]]:
    """``module_fqns_per_model_part``: one list of module names per (virtual) stage, in model order. The LM
    head is ``lm_head`` in 0.3 and ``output`` in 0.2 (``_generate_llm_fqn_per_model_part``)."""
    parts: list[list[str]] = []
    last = len(plan.stages) - 1
    for j, stage in enumerate(plan.stages):
        names = ["tok_embeddings"] if j == 0 else []
        names += [f"layers.{i}" for i in range(*stage.layers)]
        if j == last:
            names += ["norm", head]
        parts.append(names)
    return parts


def _titan_pipeline(plan: Plan, warnings: list[str] | None) -> list[str]:
    """Pipeline degree, schedule, micro-batch size and the exact layer split (one comma-separated list of
    module names per stage; stage j runs on pipeline rank j % pp, the "loop" style of 0.3)."""
    args = ["--parallelism.pipeline_parallel_degree", str(plan.pp)]
    if plan.pp == 1:
        return args
    args += ["--parallelism.pipeline_parallel_schedule", _SCHEDULES[schedule_name(plan)],
             "--parallelism.pipeline_parallel_microbatch_size", str(plan.micro_batch),
             "--parallelism.module_fqns_per_model_part"]
    args += [",".join(part) for part in torchtitan_fqns(plan)]
    if plan.vocab_parallel:
        warn(warnings, "torchtitan: vocabulary parallelism over pipeline ranks cannot be expressed; the "
                       "embedding stays on the first and norm/lm_head on the last stage")
    return args


def _titan_compile(plan: Plan, warnings: list[str] | None) -> list[str]:
    """``--compile.enable`` and async TP (``CompileConfig``: async TP needs compile, or the config is refused).
    Both are written either way, since a preset may turn them on (llama3_405b does)."""
    async_tp = plan.tp_overlap and plan.tp > 1
    if async_tp and not plan.compile:
        warn(warnings, "torchtitan: async tensor parallel needs compile (CompileConfig refuses it without); "
                       "exported without async TP")
        async_tp = False
    kernels = sorted(k for k, v in plan.kernels.items() if v in FUSED_IMPLS)
    if kernels:
        warn(warnings, f"torchtitan: fused kernels {kernels} are not torchtitan options; it fuses through "
                       "torch.compile")
    return ["--compile.enable" if plan.compile else "--compile.no_enable",
            "--compile.enable_async_tensor_parallel" if async_tp else "--compile.no_enable_async_tensor_parallel"]


def titan_ac_mode(plan: Plan, warnings: list[str] | None) -> str:
    """``none``, ``full`` or ``selective`` (the op policy) on every block: torchtitan 0.3 has one policy for
    the whole model. A plan that recomputes only some blocks exports the policy that covers them all, so
    the job recomputes at least as much as planned (never more memory, possibly more time)."""
    kind = recompute_kind(plan)
    if kind in ("none", "full", "selective"):
        return kind
    full, _sel, _total = recompute_counts(plan)
    mode = "full" if any(full) else "selective"
    warn(warnings, f"torchtitan: recompute ({describe_recompute(plan)}) cannot be expressed; activation "
                   f"checkpointing is one policy for every block. Exported as {mode} on every block, which "
                   "recomputes at least as much as planned")
    return mode


def format_torchtitan_args(args: list[str]) -> str:
    """One option (with its values) per line, the activation-checkpoint subcommand on the last line."""
    import shlex

    lines: list[str] = []
    for item in args:
        if item.startswith("--") or item.startswith(AC_SUBCOMMAND) or not lines:
            lines.append(shlex.quote(item))
        else:
            lines[-1] += " " + shlex.quote(item)
    return " \\\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# torchtitan 0.2: the TOML job file
# ----------------------------------------------------------------------------------------------

# torchtitan's llama3 flavors that match meshplan presets exactly (torchtitan/models/llama3/__init__.py).
_TORCHTITAN_FLAVORS = {"llama3-8b": ("llama3", "8B"), "llama3-70b": ("llama3", "70B"),
                       "llama3-405b": ("llama3", "405B")}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)          # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml(sections: dict[str, dict[str, Any]], header: list[str]) -> str:
    lines = [f"# {h}" if h else "#" for h in header]
    for name, body in sections.items():
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in body.items():
            if isinstance(value, list) and value and isinstance(value[0], list):
                lines.append(f"{key} = [")
                lines.extend(f"    {_toml_value(v)}," for v in value)
                lines.append("]")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def to_torchtitan_toml(plan: Plan, warnings: list[str] | None = None) -> str:
    """A torchtitan 0.2 job config (TOML) with the plan's parallelism, batch and activation checkpointing."""
    m = plan.model
    header = [f"torchtitan 0.2 job config written by meshplan export: {m.name} on {plan.cluster.name} "
              f"({plan.world_size} ranks)",
              f"dp={plan.dp} tp={plan.tp} pp={plan.pp} cp={plan.cp}, micro batch {plan.micro_batch} x "
              f"{plan.num_microbatches}, schedule {schedule_name(plan)}, recompute {plan.recompute}, ZeRO-{plan.zero}"]
    if plan.predicted is not None:
        header.append(f"predicted: {plan.predicted.iteration_s:.3f} s/iteration, "
                      f"{plan.predicted.tokens_per_s:,.0f} tokens/s, peak {plan.predicted.peak_memory_gib:.1f} GiB")
    sections = {"job": {"description": f"meshplan: {m.name} on {plan.cluster.name}"},
                "model": _toml_model(plan, warnings), "training": _toml_training(plan, warnings),
                "parallelism": _toml_parallelism(plan, warnings),
                "activation_checkpoint": _toml_ac(plan, warnings), "compile": _toml_compile(plan, warnings)}
    return _toml(sections, header)


def _toml_model(plan: Plan, warnings: list[str] | None) -> dict[str, Any]:
    m = plan.model
    name, flavor = _TORCHTITAN_FLAVORS.get(m.name, ("llama3", m.name))
    if m.name not in _TORCHTITAN_FLAVORS:
        warn(warnings, f"torchtitan: model {m.name!r} is not a torchtitan flavor; [model] flavor is set to "
                       f"{m.name!r} and needs a matching entry ({shape_words(m)}) in the model registry")
    if m.mlp != "swiglu" or m.norm != "rmsnorm" or m.position != "rope":
        warn(warnings, f"torchtitan: model {m.name!r} ({m.mlp}, {m.norm}, {m.position}) is not Llama-shaped; "
                       "torchtitan's llama3 model uses SwiGLU, RMSNorm and RoPE")
    model: dict[str, Any] = {"name": name, "flavor": flavor}
    if plan.train.precision == "fp8":
        model["converters"] = ["quantize.linear.float8"]
    return model


def _toml_training(plan: Plan, warnings: list[str] | None) -> dict[str, Any]:
    t = plan.train
    local = plan.micro_batch * plan.num_microbatches if plan.pp > 1 else plan.micro_batch
    if t.precision == "fp16":
        warn(warnings, "torchtitan: fp16 is not a torchtitan mixed-precision choice (bfloat16 or float32); "
                       "exported as bfloat16")
    if t.optimizer == "sgd":
        warn(warnings, "torchtitan: optimizer sgd: set [optimizer] name yourself; torchtitan's default is AdamW")
    return {"seq_len": t.seq_len, "global_batch_size": t.global_batch, "local_batch_size": local,
            "mixed_precision_param": "float32" if t.precision == "fp32" else "bfloat16"}


def _toml_parallelism(plan: Plan, warnings: list[str] | None) -> dict[str, Any]:
    par: dict[str, Any] = {}
    if plan.zero == 0:
        par.update(data_parallel_replicate_degree=plan.dp, data_parallel_shard_degree=1)
    else:
        par.update(data_parallel_replicate_degree=1, data_parallel_shard_degree=plan.dp,
                   fsdp_reshard_after_forward="always" if plan.zero == 3 else "never")
        if plan.zero == 1:
            warn(warnings, "torchtitan: ZeRO-1 has no torchtitan equivalent; exported as FSDP2 with "
                           "fsdp_reshard_after_forward = never (ZeRO-2: gradients sharded too)")
    par["tensor_parallel_degree"] = plan.tp
    if plan.model.moe is not None:
        par["expert_parallel_degree"] = plan.ep
    if plan.tp > 1 and not plan.sequence_parallel:
        warn(warnings, "torchtitan: tensor parallelism without sequence parallelism cannot be expressed in 0.2; "
                       "it always shards norms over the sequence")
    if plan.tp_overlap and plan.tp > 1:
        par["enable_async_tensor_parallel"] = True
        if not plan.compile:
            warn(warnings, "torchtitan: async tensor parallel only takes effect with compile enabled")
    par["pipeline_parallel_degree"] = plan.pp
    if plan.pp > 1:
        par["pipeline_parallel_schedule"] = _SCHEDULES[schedule_name(plan)]
        par["pipeline_parallel_microbatch_size"] = plan.micro_batch
        par["module_fqns_per_model_part"] = torchtitan_fqns(plan, head="output")
        if plan.vocab_parallel:
            warn(warnings, "torchtitan: vocabulary parallelism over pipeline ranks cannot be expressed; the "
                           "embedding stays on the first and norm/output on the last stage")
    par["context_parallel_degree"] = plan.cp
    if plan.cp > 1:
        par["context_parallel_rotate_method"] = "allgather"
        if plan.cp_kind == "ulysses":
            warn(warnings, "torchtitan: Ulysses (all-to-all) context parallelism cannot be expressed; torchtitan's "
                           "context parallel is ring attention; exported as ring with rotate method allgather")
    warn_mesh_order(plan, warnings)
    return par


def _toml_ac(plan: Plan, warnings: list[str] | None) -> dict[str, Any]:
    """0.2's ``[activation_checkpoint]``: ``mode`` and, for selective, the op policy."""
    mode = titan_ac_mode(plan, warnings)
    return {"mode": mode, "selective_ac_option": "op"} if mode == "selective" else {"mode": mode}


def _toml_compile(plan: Plan, warnings: list[str] | None) -> dict[str, Any]:
    kernels = sorted(k for k, v in plan.kernels.items() if v in FUSED_IMPLS)
    if kernels:
        warn(warnings, f"torchtitan: fused kernels {kernels} are not job-config options; torchtitan fuses "
                       "through torch.compile")
    return {"enable": bool(plan.compile), "components": ["model", "loss"]}
