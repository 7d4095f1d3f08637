"""Export a Plan in another framework's own terms: Megatron-LM arguments, a torchtitan TOML job config,
a DeepSpeed JSON config, or meshplan's own JSON.

Every function is pure: it reads a :class:`~meshplan.plan.Plan` and returns the target's text or data.
Whatever the target cannot express is appended, one sentence each, to the ``warnings`` list the caller
passes in (the CLI prints them on stderr); nothing is silently dropped.

Option names were checked against the projects' own sources (see docs/export.md for the versions):

* Megatron-LM ``megatron/training/arguments.py`` (flags generated from ``TransformerConfig`` /
  ``ModelParallelConfig`` / ``TrainingConfig`` field names, plus the hand-written distributed group):
  ``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``, ``--context-parallel-size``,
  ``--cp-comm-type``, ``--sequence-parallel``, ``--micro-batch-size``, ``--global-batch-size``,
  ``--num-layers-per-virtual-pipeline-stage``, ``--decoder-first-pipeline-num-layers``,
  ``--decoder-last-pipeline-num-layers``, ``--pipeline-model-parallel-layout``, ``--recompute-granularity``,
  ``--recompute-method``, ``--recompute-num-layers``, ``--use-distributed-optimizer``,
  ``--use-megatron-fsdp``, ``--data-parallel-sharding-strategy``, ``--use-tp-pp-dp-mapping``,
  ``--tp-comm-overlap``, ``--cross-entropy-loss-fusion`` and the model-shape flags.
* torchtitan ``torchtitan/config/job_config.py``: ``[training]`` ``local_batch_size``, ``global_batch_size``,
  ``seq_len``, ``mixed_precision_param``, ``compile``; ``[parallelism]`` ``data_parallel_replicate_degree``,
  ``data_parallel_shard_degree``, ``fsdp_reshard_after_forward``, ``tensor_parallel_degree``,
  ``enable_async_tensor_parallel``, ``pipeline_parallel_degree``, ``pipeline_parallel_schedule``,
  ``pipeline_parallel_microbatch_size``, ``module_fqns_per_model_part``, ``context_parallel_degree``,
  ``context_parallel_rotate_method``; ``[activation_checkpoint]`` ``mode``, ``selective_ac_option``;
  ``[model]`` ``name``, ``flavor``, ``converters``.
* DeepSpeed ``docs/_pages/config-json.md`` and ``deepspeed/runtime/config.py``: ``train_batch_size``,
  ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``zero_optimization.stage``,
  ``bf16`` / ``fp16``, ``tensor_parallel.autotp_size`` / ``tp_overlap_comm`` (AutoTP training),
  ``sequence_parallel_size`` (Ulysses / ALST), ``pipeline`` (``stages``, ``partition``,
  ``activation_checkpoint_interval``; read by the PipelineEngine) and ``activation_checkpointing``.
"""

from __future__ import annotations

import json
from typing import Any

from meshplan.errors import InputError
from meshplan.plan import DEFAULT_MESH_ORDER, Plan

TARGETS = ("megatron", "torchtitan", "deepspeed", "json")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def _warn(warnings: list[str] | None, text: str) -> None:
    if warnings is not None and text not in warnings:
        warnings.append(text)


def _stage_counts(plan: Plan) -> list[int]:
    return [s.num_layers for s in plan.stages]


def _recompute_counts(plan: Plan) -> tuple[list[int], list[int], list[int]]:
    """(full, selective, total) blocks per (virtual) stage."""
    full = [int(s.recompute_layers.get("full", 0)) for s in plan.stages]
    sel = [int(s.recompute_layers.get("selective", 0)) for s in plan.stages]
    return full, sel, _stage_counts(plan)


def recompute_kind(plan: Plan) -> str:
    """Classify the plan's recomputation into what frameworks can say.

    ``none``: no block is recomputed. ``full``: every block fully. ``selective``: every block selectively.
    ``full_block``: the first k blocks of every stage fully, the rest keep activations (k the same for
    every stage). ``mixed``: anything else (counts differ between stages, or full and selective mixed).
    """
    full, sel, total = _recompute_counts(plan)
    if not any(full) and not any(sel):
        return "none"
    if not any(sel) and full == total:
        return "full"
    if not any(full) and sel == total:
        return "selective"
    if not any(sel) and len(set(full)) == 1:
        return "full_block"
    return "mixed"


def _describe_recompute(plan: Plan) -> str:
    full, sel, total = _recompute_counts(plan)
    return (f"full blocks per stage {full}, selective {sel}, of {total}")


def _mesh_is_default(plan: Plan) -> bool:
    return tuple(plan.mesh_order) == tuple(DEFAULT_MESH_ORDER)


def _schedule_name(plan: Plan) -> str:
    if plan.pp == 1:
        return "none"
    if plan.schedule == "interleaved" and plan.virtual_stages > 1:
        return "interleaved"
    return "1f1b" if plan.schedule == "interleaved" else plan.schedule


# ----------------------------------------------------------------------------------------------
# Megatron-LM
# ----------------------------------------------------------------------------------------------

def _megatron_layout(counts: list[int]) -> str:
    """``--pipeline-model-parallel-layout``: stages in model order separated by ``|``; ``E`` embedding,
    ``t`` a transformer block (``t*3`` three), ``L`` the loss (final norm, head and loss)."""
    parts = []
    for j, n in enumerate(counts):
        text = "E" if j == 0 else ""
        text += "" if n == 0 else ("t" if n == 1 else f"t*{n}")
        if j == len(counts) - 1:
            text += "L"
        parts.append(text)
    return "|".join(parts)


def to_megatron_args(plan: Plan, warnings: list[str] | None = None) -> list[str]:
    """Megatron-LM command-line arguments (for ``pretrain_gpt.py``) that reproduce the plan.

    Returns a flat argv-style list (``["--tensor-model-parallel-size", "4", "--sequence-parallel", ...]``).
    Data, tokenizer, learning-rate and checkpoint arguments are the user's and are not emitted.
    """
    m, t = plan.model, plan.train
    args: list[str] = []

    def opt(name: str, value: Any) -> None:
        args.extend([name, str(value)])

    # --- model shape ------------------------------------------------------------------------
    opt("--num-layers", m.layers)
    opt("--hidden-size", m.hidden)
    opt("--ffn-hidden-size", m.ffn_hidden)
    opt("--num-attention-heads", m.heads)
    if m.kv_heads != m.heads:
        args.append("--group-query-attention")
        opt("--num-query-groups", m.kv_heads)
    opt("--seq-length", t.seq_len)
    opt("--max-position-embeddings", max(m.max_seq_len, t.seq_len) if m.position == "learned" else t.seq_len)
    if m.position == "learned" and m.max_seq_len and m.max_seq_len < t.seq_len:
        _warn(warnings, f"megatron: the model's learned position table has {m.max_seq_len} rows but seq_len is "
                        f"{t.seq_len}; exported --max-position-embeddings {t.seq_len}")
    opt("--position-embedding-type", "rope" if m.position == "rope" else "learned_absolute")
    opt("--normalization", "RMSNorm" if m.norm == "rmsnorm" else "LayerNorm")
    if m.mlp == "swiglu":
        args.append("--swiglu")
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not m.bias:
        args.append("--disable-bias-linear")
    opt("--attention-dropout", m.dropout)
    opt("--hidden-dropout", m.dropout)
    opt("--vocab-size", m.vocab)

    # --- precision and optimizer ------------------------------------------------------------
    if t.precision in ("bf16", "fp8"):
        args.append("--bf16")
    elif t.precision == "fp16":
        args.append("--fp16")
    if t.precision == "fp8":
        opt("--fp8-format", "hybrid")
    opt("--optimizer", "sgd" if t.optimizer == "sgd" else "adam")

    # --- parallel degrees and batch -----------------------------------------------------------
    opt("--tensor-model-parallel-size", plan.tp)
    opt("--pipeline-model-parallel-size", plan.pp)
    opt("--context-parallel-size", plan.cp)
    if plan.cp > 1:
        opt("--cp-comm-type", "p2p" if plan.cp_kind == "ring" else "a2a")
    if plan.tp > 1 and plan.sequence_parallel:
        args.append("--sequence-parallel")
    opt("--micro-batch-size", plan.micro_batch)
    opt("--global-batch-size", t.global_batch)

    order = tuple(plan.mesh_order)
    if order == ("dp", "pp", "cp", "tp"):
        args.append("--use-tp-pp-dp-mapping")
    elif not _mesh_is_default(plan):
        _warn(warnings, f"megatron: mesh order {list(order)} (outermost first) cannot be expressed; Megatron-LM "
                        "lays ranks out tp-cp-dp-pp (innermost first, i.e. pp,dp,cp,tp) or tp-cp-pp-dp with "
                        "--use-tp-pp-dp-mapping; exported with the default order")

    # --- pipeline: schedule and layer partition --------------------------------------------------
    counts = _stage_counts(plan)
    if plan.pp > 1:
        if plan.schedule == "gpipe":
            _warn(warnings, "megatron: Megatron-LM has no GPipe schedule; it runs 1F1B (same bubble, at most pp "
                            "micro-batches of activations in flight instead of all of them)")
        v = plan.virtual_stages
        if len(set(counts)) == 1:
            if v > 1:
                opt("--num-layers-per-virtual-pipeline-stage", counts[0])
        elif v == 1 and (plan.pp == 2 or len(set(counts[1:-1])) == 1):
            opt("--decoder-first-pipeline-num-layers", counts[0])
            opt("--decoder-last-pipeline-num-layers", counts[-1])
        else:
            opt("--pipeline-model-parallel-layout", _megatron_layout(counts))
    if plan.vocab_parallel and plan.pp > 1:
        _warn(warnings, "megatron: vocabulary parallelism over pipeline ranks (embedding, LM head and loss spread "
                        "over every stage) cannot be expressed; Megatron-LM keeps the embedding on the first and "
                        "the head and loss on the last pipeline stage")

    # --- recomputation -------------------------------------------------------------------------
    kind = recompute_kind(plan)
    full, sel, total = _recompute_counts(plan)
    if kind == "full":
        opt("--recompute-granularity", "full")
        opt("--recompute-method", "uniform")
        opt("--recompute-num-layers", 1)
    elif kind == "selective":
        opt("--recompute-granularity", "selective")
    elif kind == "full_block":
        opt("--recompute-granularity", "full")
        opt("--recompute-method", "block")
        opt("--recompute-num-layers", full[0])
    elif kind == "mixed":
        k = max(f + s for f, s in zip(full, sel))
        opt("--recompute-granularity", "full")
        opt("--recompute-method", "block")
        opt("--recompute-num-layers", k)
        _warn(warnings, f"megatron: recompute ({_describe_recompute(plan)}) cannot be expressed; Megatron-LM "
                        f"recomputes the same number of blocks in every stage at one granularity. Exported as full "
                        f"recompute of the first {k} blocks of every stage, which recomputes at least as much as "
                        "planned (never more memory, possibly more time)")

    # --- data parallel sharding ------------------------------------------------------------------
    if plan.zero == 1:
        args.append("--use-distributed-optimizer")
    elif plan.zero in (2, 3):
        args.append("--use-megatron-fsdp")
        opt("--data-parallel-sharding-strategy", "optim_grads" if plan.zero == 2 else "optim_grads_params")

    # --- kernels and overlap ---------------------------------------------------------------------
    if plan.tp_overlap:
        args.append("--tp-comm-overlap")
    if plan.kernels.get("loss") == "fused":
        args.append("--cross-entropy-loss-fusion")
    if plan.compile:
        _warn(warnings, "megatron: compile: Megatron-LM has no torch.compile switch for the model; it fuses "
                        "through Transformer Engine / Apex kernels instead")
    return args


def format_megatron_args(args: list[str]) -> str:
    """One option (and its value) per line, joined with shell line continuations."""
    import shlex

    lines: list[str] = []
    for item in args:
        if item.startswith("--") or not lines:
            lines.append(shlex.quote(item))
        else:
            lines[-1] += " " + shlex.quote(item)
    return " \\\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# torchtitan
# ----------------------------------------------------------------------------------------------

# torchtitan's llama3 flavors that match meshplan presets exactly (torchtitan/models/llama3/__init__.py).
_TORCHTITAN_FLAVORS = {"llama3-8b": ("llama3", "8B"), "llama3-70b": ("llama3", "70B"),
                       "llama3-405b": ("llama3", "405B")}

_TORCHTITAN_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}


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


def torchtitan_fqns(plan: Plan) -> list[list[str]]:
    """``module_fqns_per_model_part``: one list of module names per (virtual) stage, in model order."""
    parts: list[list[str]] = []
    last = len(plan.stages) - 1
    for j, stage in enumerate(plan.stages):
        names = ["tok_embeddings"] if j == 0 else []
        names += [f"layers.{i}" for i in range(*stage.layers)]
        if j == last:
            names += ["norm", "output"]
        parts.append(names)
    return parts


def to_torchtitan_toml(plan: Plan, warnings: list[str] | None = None) -> str:
    """A torchtitan job config (TOML) with the plan's parallelism, batch and activation checkpointing."""
    m, t = plan.model, plan.train
    name, flavor = _TORCHTITAN_FLAVORS.get(m.name, ("llama3", m.name))
    if m.name not in _TORCHTITAN_FLAVORS:
        _warn(warnings, f"torchtitan: model {m.name!r} is not a torchtitan flavor; [model] flavor is set to "
                        f"{m.name!r} and needs a matching entry ({m.layers} layers, hidden {m.hidden}, {m.heads} "
                        f"heads, {m.kv_heads} kv heads, ffn {m.ffn_hidden}, vocab {m.vocab}) in the model registry")
    if m.mlp != "swiglu" or m.norm != "rmsnorm" or m.position != "rope":
        _warn(warnings, f"torchtitan: model {m.name!r} ({m.mlp}, {m.norm}, {m.position}) is not Llama-shaped; "
                        "torchtitan's llama3 model uses SwiGLU, RMSNorm and RoPE")

    model: dict[str, Any] = {"name": name, "flavor": flavor}
    if t.precision == "fp8":
        model["converters"] = ["float8"]

    training: dict[str, Any] = {"seq_len": t.seq_len, "global_batch_size": t.global_batch}
    if plan.pp > 1:
        # The pipeline schedule splits the local batch into micro-batches itself.
        training["local_batch_size"] = plan.micro_batch * plan.num_microbatches
    else:
        # Without a pipeline, torchtitan accumulates global / (local * dp) micro-batches.
        training["local_batch_size"] = plan.micro_batch
    training["mixed_precision_param"] = "float32" if t.precision == "fp32" else "bfloat16"
    if t.precision == "fp16":
        _warn(warnings, "torchtitan: fp16 is not a torchtitan mixed-precision choice (bfloat16 or float32); "
                        "exported as bfloat16")
    training["compile"] = bool(plan.compile)
    if t.optimizer == "sgd":
        _warn(warnings, "torchtitan: optimizer sgd: set [optimizer] name yourself; torchtitan's default is AdamW")

    par: dict[str, Any] = {}
    if plan.zero == 0:
        par["data_parallel_replicate_degree"] = plan.dp
        par["data_parallel_shard_degree"] = 1
    else:
        par["data_parallel_replicate_degree"] = 1
        par["data_parallel_shard_degree"] = plan.dp
        if plan.zero in (1, 2):
            par["fsdp_reshard_after_forward"] = "never"
            _warn(warnings, f"torchtitan: ZeRO-{plan.zero} has no exact equivalent; exported as FSDP2 with "
                            "reshard_after_forward = never (parameters stay gathered from forward to backward, "
                            "gradients and optimizer state sharded: ZeRO-2-like"
                            + (", which shards gradients too" if plan.zero == 1 else "") + ")")
    par["tensor_parallel_degree"] = plan.tp
    if plan.tp > 1 and not plan.sequence_parallel:
        _warn(warnings, "torchtitan: tensor parallelism without sequence parallelism cannot be expressed; "
                      "torchtitan always shards norms and dropout over the sequence (sequence parallel)")
    if plan.tp_overlap:
        par["enable_async_tensor_parallel"] = True
        if not plan.compile:
            _warn(warnings, "torchtitan: async tensor parallel only takes effect with compile enabled")
    par["pipeline_parallel_degree"] = plan.pp
    if plan.pp > 1:
        par["pipeline_parallel_schedule"] = _TORCHTITAN_SCHEDULES[plan.schedule]
        par["pipeline_parallel_microbatch_size"] = plan.micro_batch
        par["module_fqns_per_model_part"] = torchtitan_fqns(plan)
        if plan.vocab_parallel:
            _warn(warnings, "torchtitan: vocabulary parallelism over pipeline ranks cannot be expressed; the "
                            "embedding stays on the first and norm/output on the last stage (vocab is still split "
                            "over tensor-parallel ranks by loss parallel)")
    par["context_parallel_degree"] = plan.cp
    if plan.cp > 1:
        par["context_parallel_rotate_method"] = "allgather"
        if plan.cp_kind == "ulysses":
            _warn(warnings, "torchtitan: Ulysses (all-to-all) context parallelism cannot be expressed; torchtitan's "
                            "context parallel is ring attention; exported as ring with rotate method allgather")
    if not _mesh_is_default(plan):
        _warn(warnings, f"torchtitan: mesh order {list(plan.mesh_order)} cannot be expressed; torchtitan builds "
                        "its mesh as pp, dp_replicate, dp_shard, cp, tp (outermost first)")

    ac: dict[str, Any] = {}
    kind = recompute_kind(plan)
    full, sel, total = _recompute_counts(plan)
    if kind in ("none", "full"):
        ac["mode"] = kind
    elif kind == "selective":
        ac["mode"] = "selective"
        ac["selective_ac_option"] = "op"
    else:
        ac["mode"] = "full"
        n_full, n_all = sum(full), sum(total)
        hint = ""
        if not any(sel) and n_full:
            hint = (f"; selective_ac_option = \"{max(1, round(n_all / n_full))}\" (every Nth block fully) "
                    "is the closest cheaper setting")
        _warn(warnings, f"torchtitan: recompute ({_describe_recompute(plan)}) cannot be expressed; "
                        f"activation checkpointing is one mode for every block. Exported as mode = full, which "
                        f"recomputes at least as much as planned{hint}")
    kernels = {k: v for k, v in plan.kernels.items() if v == "fused"}
    if kernels:
        _warn(warnings, f"torchtitan: fused kernels {sorted(kernels)} are not job-config options; torchtitan uses "
                        "torch.compile for fusion")

    header = [f"torchtitan job config written by meshplan export: {m.name} on {plan.cluster.name} "
              f"({plan.world_size} ranks)",
              f"dp={plan.dp} tp={plan.tp} pp={plan.pp} cp={plan.cp}, micro batch {plan.micro_batch} x "
              f"{plan.num_microbatches}, schedule {_schedule_name(plan)}, recompute {plan.recompute}, ZeRO-{plan.zero}"]
    if plan.predicted is not None:
        header.append(f"predicted: {plan.predicted.iteration_s:.3f} s/iteration, "
                      f"{plan.predicted.tokens_per_s:,.0f} tokens/s, peak {plan.predicted.peak_memory_gib:.1f} GiB")
    sections = {"job": {"description": f"meshplan: {m.name} on {plan.cluster.name}"},
                "model": model, "training": training, "parallelism": par, "activation_checkpoint": ac}
    return _toml(sections, header)


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------

def to_deepspeed_config(plan: Plan, warnings: list[str] | None = None) -> dict[str, Any]:
    """A DeepSpeed config (the ``ds_config.json`` dict)."""
    t = plan.train
    cfg: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.num_microbatches,
        "zero_optimization": {"stage": plan.zero},
    }
    if t.precision in ("bf16", "fp8"):
        cfg["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    if t.precision == "fp8":
        _warn(warnings, "deepspeed: fp8 matmuls are not a DeepSpeed config option (use Transformer Engine "
                        "layers in the model); exported as bf16")

    if plan.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": plan.tp}
        if plan.tp_overlap:
            cfg["tensor_parallel"]["tp_overlap_comm"] = True
        if plan.sequence_parallel:
            _warn(warnings, "deepspeed: AutoTP has no Megatron-style sequence parallelism; norms and dropout run "
                            "replicated over the tensor-parallel group (more activation memory than planned)")
    elif plan.tp_overlap:
        _warn(warnings, "deepspeed: tp_overlap is moot with tp = 1")

    if plan.cp > 1:
        cfg["sequence_parallel_size"] = plan.cp
        if plan.cp_kind == "ring":
            _warn(warnings, "deepspeed: ring context parallelism cannot be expressed; DeepSpeed's sequence "
                            "parallelism is Ulysses (all-to-all over heads); exported as Ulysses")
        _warn(warnings, "deepspeed: sequence parallelism also needs the model wired for it "
                        "(UlyssesSPAttentionHF.register_with_transformers or DistributedAttention)")

    kind = recompute_kind(plan)
    full, sel, total = _recompute_counts(plan)
    if plan.pp > 1:
        counts = _stage_counts(plan)
        cfg["pipeline"] = {"stages": plan.pp, "partition": "uniform" if len(set(counts)) == 1 else "parameters",
                           "activation_checkpoint_interval": 0 if kind == "none" else 1}
        if len(set(counts)) > 1:
            _warn(warnings, f"deepspeed: the uneven layer partition {counts} cannot be given as numbers; "
                            "PipelineModule balances by partition_method ('parameters' exported); check the "
                            "stages it builds")
        if plan.schedule != "1f1b" or plan.virtual_stages > 1:
            _warn(warnings, f"deepspeed: pipeline schedule {plan.schedule} (virtual stages {plan.virtual_stages}) "
                            "cannot be expressed; DeepSpeed's PipelineEngine runs its own 1F1B schedule with one "
                            "stage per rank")
        if plan.zero >= 2:
            _warn(warnings, f"deepspeed: ZeRO-{plan.zero} with pipeline parallelism is rejected by DeepSpeed's "
                            "PipelineEngine (ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism); "
                            "use stage 1 or re-plan with --fix zero=1")
        if kind not in ("none", "full"):
            _warn(warnings, f"deepspeed: recompute ({_describe_recompute(plan)}) cannot be expressed; the pipeline "
                            "engine checkpoints every block or none; exported as activation_checkpoint_interval = 1 "
                            "(every block fully), which recomputes at least as much as planned")
    if kind != "none" and plan.pp == 1:
        n_full = full[0] + sel[0]
        ac = {"partition_activations": plan.tp > 1, "cpu_checkpointing": False,
              "contiguous_memory_optimization": False, "number_checkpoints": n_full,
              "synchronize_checkpoint_boundary": False}
        _warn(warnings, f"deepspeed: which blocks to recompute is decided in model code, not in the config: "
                        f"wrap the first {n_full} transformer blocks in deepspeed.checkpointing.checkpoint")
        if any(sel):
            _warn(warnings, "deepspeed: selective (attention-only) recompute cannot be expressed; "
                            "number_checkpoints counts those blocks as fully checkpointed")
        cfg["activation_checkpointing"] = ac
    if plan.vocab_parallel and plan.pp > 1:
        _warn(warnings, "deepspeed: vocabulary parallelism over pipeline ranks cannot be expressed")
    order = tuple(plan.mesh_order)
    if order != tuple(DEFAULT_MESH_ORDER):
        _warn(warnings, f"deepspeed: mesh order {list(order)} cannot be expressed; DeepSpeed lays ranks out "
                        "pipe, data, model (outermost first)")
    if plan.compile:
        _warn(warnings, "deepspeed: compile is not a config option here; call engine.compile() in the script")
    return cfg


# ----------------------------------------------------------------------------------------------
# front door
# ----------------------------------------------------------------------------------------------

def export_plan(plan: Plan, target: str) -> tuple[str, list[str]]:
    """The text to print for ``meshplan export --to TARGET`` and the warnings for stderr."""
    target = target.lower().strip()
    warnings: list[str] = []
    if target == "megatron":
        return format_megatron_args(to_megatron_args(plan, warnings)), warnings
    if target == "torchtitan":
        return to_torchtitan_toml(plan, warnings), warnings
    if target == "deepspeed":
        return json.dumps(to_deepspeed_config(plan, warnings), indent=2) + "\n", warnings
    if target == "json":
        return json.dumps(plan.to_dict(), indent=2) + "\n", warnings
    raise InputError("--to", f"unknown export target {target!r}", f"choose one of: {', '.join(TARGETS)}")
