"""Export a Plan in an engine's own terms: Megatron-LM arguments, torchtitan arguments (or a torchtitan 0.2 TOML
job file, meshplan/export_torchtitan.py), a DeepSpeed JSON config, or meshplan's own JSON.

A plan priced for Megatron-Core exports to ``megatron``, one priced for torchtitan to ``torchtitan`` (and
``torchtitan-toml``); :func:`export_plan` refuses any other pairing, naming the ``meshplan plan`` command that
prices the plan for the target. DeepSpeed is no engine meshplan prices: any plan exports to it, with a warning.

Every function is pure: it reads a :class:`~meshplan.plan.Plan` and returns the target's text or data.
Whatever the target cannot express is appended, one sentence each, to the ``warnings`` list the caller
passes in (the CLI prints them on stderr); nothing is silently dropped.

Option names were checked against the projects' own sources (see docs/export.md for the versions):

* Megatron-LM ``megatron/training/arguments.py`` (flags generated from ``TransformerConfig`` /
  ``ModelParallelConfig`` / ``TrainingConfig`` / ``DistributedDataParallelConfig`` field names, plus the
  hand-written groups): ``--tensor-model-parallel-size``, ``--pipeline-model-parallel-size``,
  ``--context-parallel-size``, ``--cp-comm-type``, ``--sequence-parallel``, ``--micro-batch-size``,
  ``--global-batch-size``, ``--num-layers-per-virtual-pipeline-stage``, ``--decoder-first-pipeline-num-layers``,
  ``--decoder-last-pipeline-num-layers``, ``--pipeline-model-parallel-layout``, ``--recompute-granularity``,
  ``--recompute-method``, ``--recompute-num-layers``, ``--recompute-modules``, ``--use-distributed-optimizer``,
  ``--use-megatron-fsdp``, ``--data-parallel-sharding-strategy``, ``--ckpt-format``, ``--overlap-grad-reduce``,
  ``--overlap-param-gather``, ``--use-tp-pp-dp-mapping``, ``--tp-comm-overlap``, ``--transformer-impl``,
  ``--attention-backend``, ``--cross-entropy-loss-fusion``, ``--cross-entropy-fusion-impl``,
  ``--no-bias-swiglu-fusion``, ``--no-bias-gelu-fusion``, ``--no-rope-fusion``, ``--rotary-percent`` and the
  model-shape flags.
* DeepSpeed ``docs/_pages/config-json.md`` and ``deepspeed/runtime/config.py``: ``train_batch_size``,
  ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``zero_optimization.stage``,
  ``bf16`` / ``fp16``, ``tensor_parallel.autotp_size`` / ``tp_overlap_comm`` (AutoTP training),
  ``sequence_parallel_size`` (Ulysses / ALST), ``pipeline`` (``stages``, ``partition``,
  ``activation_checkpoint_interval``; read by the PipelineEngine) and ``activation_checkpointing``.
"""

from __future__ import annotations

import json
from typing import Any

from meshplan.engines import get_engine
from meshplan.errors import InputError
from meshplan.plan import DEFAULT_MESH_ORDER, FUSED_IMPLS, Plan
from meshplan.spec import YarnScaling

TARGETS = ("megatron", "torchtitan", "torchtitan-toml", "deepspeed", "json")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def warn(warnings: list[str] | None, text: str) -> None:
    if warnings is not None and text not in warnings:
        warnings.append(text)


def stage_counts(plan: Plan) -> list[int]:
    return [s.num_layers for s in plan.stages]


def recompute_counts(plan: Plan) -> tuple[list[int], list[int], list[int]]:
    """(full, selective, total) blocks per (virtual) stage."""
    full = [int(s.recompute_layers.get("full", 0)) for s in plan.stages]
    sel = [int(s.recompute_layers.get("selective", 0)) for s in plan.stages]
    return full, sel, stage_counts(plan)


def recompute_kind(plan: Plan) -> str:
    """Classify the plan's recomputation into what frameworks can say.

    ``none``: no block is recomputed. ``full``: every block fully. ``selective``: every block selectively.
    ``full_block``: the first k blocks of every stage fully, the rest keep activations (k the same for
    every stage). ``mixed``: anything else (counts differ between stages, or full and selective mixed).
    """
    full, sel, total = recompute_counts(plan)
    if not any(full) and not any(sel):
        return "none"
    if not any(sel) and full == total:
        return "full"
    if not any(full) and sel == total:
        return "selective"
    if not any(sel) and len(set(full)) == 1:
        return "full_block"
    return "mixed"


def describe_recompute(plan: Plan) -> str:
    full, sel, total = recompute_counts(plan)
    return (f"full blocks per stage {full}, selective {sel}, of {total}")


def mesh_is_default(plan: Plan) -> bool:
    return tuple(plan.mesh_order) == tuple(DEFAULT_MESH_ORDER)


def schedule_name(plan: Plan) -> str:
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
    Data, tokenizer, learning-rate and checkpoint arguments are the user's and are not emitted (except
    ``--ckpt-format fsdp_dtensor``, which Megatron FSDP requires).
    """
    args: list[str] = []
    _megatron_model(plan, args, warnings)
    _megatron_moe(plan, args, warnings)
    _megatron_degrees(plan, args, warnings)
    _megatron_pipeline(plan, args, warnings)
    _megatron_recompute(plan, args, warnings)
    _megatron_sharding(plan, args)
    _megatron_kernels(plan, args, warnings)
    return args


def _opt(args: list[str], name: str, value: Any) -> None:
    args.extend([name, str(value)])


def _megatron_model(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """Model shape, precision and optimizer (``_add_network_size_args``, ``_add_mixed_precision_args``)."""
    m, t = plan.model, plan.train
    for name, value in (("--num-layers", m.layers), ("--hidden-size", m.hidden), ("--ffn-hidden-size", m.ffn_hidden),
                        ("--num-attention-heads", m.heads)):
        _opt(args, name, value)
    if m.q_width != m.hidden:      # Megatron's kv_channels defaults to hidden / heads
        _opt(args, "--kv-channels", m.head_dim)
    if m.kv_heads != m.heads:
        args.append("--group-query-attention")
        _opt(args, "--num-query-groups", m.kv_heads)
    if m.qk_norm:                  # a norm of the model's kind over each q and k head (TransformerConfig.qk_layernorm)
        args.append("--qk-layernorm")
    _opt(args, "--seq-length", t.seq_len)
    _opt(args, "--max-position-embeddings", max(m.max_seq_len, t.seq_len) if m.position == "learned" else t.seq_len)
    if m.position == "learned" and m.max_seq_len and m.max_seq_len < t.seq_len:
        warn(warnings, f"megatron: the model's learned position table has {m.max_seq_len} rows but seq_len is "
                       f"{t.seq_len}; exported --max-position-embeddings {t.seq_len}")
    _opt(args, "--position-embedding-type", "rope" if m.position == "rope" else "learned_absolute")
    if m.position == "rope":
        _megatron_rope(m, args, warnings)
    _opt(args, "--normalization", "RMSNorm" if m.norm == "rmsnorm" else "LayerNorm")
    _opt(args, "--norm-epsilon", m.norm_eps)
    if m.mlp == "swiglu":
        args.append("--swiglu")
    else:
        _megatron_gelu(m, args, warnings)
    if m.parallel_residual:
        warn(warnings, f"megatron: model {m.name!r} adds the attention and the MLP side by side (parallel_residual); "
                       "Megatron-Core's TransformerLayer has no such option and computes the MLP on the attention's sum")
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if not m.bias:
        args.append("--disable-bias-linear")
        if m.qkv_bias:
            args.append("--add-qkv-bias")
    _opt(args, "--attention-dropout", m.dropout)
    _opt(args, "--hidden-dropout", m.dropout)
    _opt(args, "--vocab-size", m.vocab)
    if t.precision in ("bf16", "fp8"):
        args.append("--bf16")
    elif t.precision == "fp16":
        args.append("--fp16")
    if t.precision == "fp8":
        _opt(args, "--fp8-format", "hybrid")
    _opt(args, "--optimizer", "sgd" if t.optimizer == "sgd" else "adam")


def _megatron_moe(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """The experts and their layout (megatron/training/arguments.py ``_add_moe_args``): dropless all-to-all
    dispatch with grouped GEMM, as the planner prices them; the router renormalises the top-k weights unless
    ``--moe-router-pre-softmax`` (softmax over all experts, then top-k: Qwen2-MoE's ``norm_topk_prob: false``)."""
    moe = plan.model.moe
    if moe is None:
        return
    _opt(args, "--num-experts", moe.experts)
    _opt(args, "--moe-router-topk", moe.top_k)
    _opt(args, "--moe-ffn-hidden-size", moe.expert_ffn_hidden)
    _opt(args, "--expert-model-parallel-size", plan.ep)
    _opt(args, "--expert-tensor-parallel-size", plan.expert_tp)
    if moe.layers is not None:
        _opt(args, "--moe-layer-freq", "[" + ",".join("1" if plan.model.is_moe_layer(i) else "0"
                                                      for i in range(plan.model.layers)) + "]")
    if moe.shared_ffn_hidden:
        _opt(args, "--moe-shared-expert-intermediate-size", moe.shared_ffn_hidden)
        if moe.shared_expert_gate:
            args.append("--moe-shared-expert-gate")
    _opt(args, "--moe-router-score-function", moe.router_score)
    if not moe.normalize_top_k:
        if moe.router_score == "softmax":
            args.append("--moe-router-pre-softmax")
        else:
            warn(warnings, "megatron: sigmoid scores without top-k renormalisation cannot be expressed; Megatron-LM "
                           "renormalises sigmoid top-k weights")
    _opt(args, "--moe-router-load-balancing-type", "aux_loss" if moe.aux_loss_coeff else "none")
    if moe.aux_loss_coeff:
        _opt(args, "--moe-aux-loss-coeff", moe.aux_loss_coeff)
    _opt(args, "--moe-token-dispatcher-type", "alltoall")
    args.append("--moe-grouped-gemm")
    if not moe.dropless:
        _opt(args, "--moe-expert-capacity-factor", moe.capacity_factor)
    if plan.moe_imbalance:
        warn(warnings, f"megatron: the plan is priced with an MoE load imbalance of {plan.moe_imbalance:g}; that "
                       "is a prediction input, not a Megatron-LM option")


def _megatron_gelu(m, args: list[str], warnings: list[str] | None) -> None:
    """Megatron-Core's GELU MLP (megatron/core/transformer/mlp.py) computes the tanh form when it fuses the bias
    with the activation (``bias_gelu_impl``: the default where the MLP has biases) and the erf form
    (``F.gelu``) otherwise; ``--no-bias-gelu-fusion`` turns the fusion off, and a model without biases has none."""
    if m.gelu == "exact" and m.bias:
        args.append("--no-bias-gelu-fusion")
    elif m.gelu == "tanh" and not m.bias:
        warn(warnings, f"megatron: model {m.name!r} uses the tanh GELU without biases; Megatron-Core computes the "
                       "erf GELU there (its tanh form is the bias-GELU fusion)")


# Megatron-LM's Llama 3 rotary scaling (megatron/core/models/common/embeddings/rope_utils.py, apply_scaling):
# only the factor is an option; the band edges and the original context are fixed at these values.
MEGATRON_ROPE_SCALING_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _megatron_rope(m, args: list[str], warnings: list[str] | None) -> None:
    """``--rotary-base`` (an integer in Megatron-LM), the share of each head rotated (``--rotary-percent``) and
    Llama 3 scaling (``--use-rope-scaling``)."""
    _opt(args, "--rotary-base", int(m.rope_theta))
    if m.rotary_dim:                # RotaryEmbedding rotates int(kv_channels * rotary_percent) features
        _opt(args, "--rotary-percent", m.rotary_share)
    if m.rope_theta != int(m.rope_theta):
        warn(warnings, f"megatron: rope_theta {m.rope_theta:g} is not an integer; exported --rotary-base "
                       f"{int(m.rope_theta)}")
    if m.rope_scaling is None:
        return
    if isinstance(m.rope_scaling, YarnScaling):
        warn(warnings, f"megatron: YaRN rotary scaling (factor {m.rope_scaling.factor:g}, original context "
                       f"{m.rope_scaling.original_max_position_embeddings}) cannot be expressed: Megatron-Core's GPT "
                       "model reads config.yarn_rotary_scaling_factor, which no command-line option sets; exported "
                       "with plain rotary positions")
        return
    args.append("--use-rope-scaling")
    _opt(args, "--rope-scaling-factor", m.rope_scaling.factor)
    for field, fixed in MEGATRON_ROPE_SCALING_FIXED.items():
        if getattr(m.rope_scaling, field) != fixed:
            warn(warnings, f"megatron: rope_scaling {field} {getattr(m.rope_scaling, field):g} cannot be expressed; "
                           f"Megatron-LM fixes it at {fixed:g}")


def _megatron_degrees(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """Parallel degrees, context-parallel kind, sequence parallel, batch and rank layout."""
    _opt(args, "--tensor-model-parallel-size", plan.tp)
    _opt(args, "--pipeline-model-parallel-size", plan.pp)
    _opt(args, "--context-parallel-size", plan.cp)
    if plan.cp > 1:
        _opt(args, "--cp-comm-type", "p2p" if plan.cp_kind == "ring" else "a2a")
    if plan.tp > 1 and plan.sequence_parallel:
        args.append("--sequence-parallel")
    _opt(args, "--micro-batch-size", plan.micro_batch)
    _opt(args, "--global-batch-size", plan.train.global_batch)
    order = tuple(plan.mesh_order)
    if order == ("dp", "pp", "cp", "tp"):
        args.append("--use-tp-pp-dp-mapping")
    elif not mesh_is_default(plan):
        warn(warnings, f"megatron: mesh order {list(order)} (outermost first) cannot be expressed; Megatron-LM "
                       "lays ranks out tp-cp-dp-pp (innermost first, i.e. pp,dp,cp,tp) or tp-cp-pp-dp with "
                       "--use-tp-pp-dp-mapping; exported with the default order")


def _megatron_pipeline(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """Schedule and layer partition: virtual stages, first/last stage sizes or the full layout string."""
    counts = stage_counts(plan)
    if plan.pp > 1:
        if plan.schedule == "gpipe":
            warn(warnings, "megatron: Megatron-LM has no GPipe schedule; it runs 1F1B (same bubble, at most pp "
                           "micro-batches of activations in flight instead of all of them)")
        v = plan.virtual_stages
        if len(set(counts)) == 1:
            if v > 1:
                _opt(args, "--num-layers-per-virtual-pipeline-stage", counts[0])
        elif v == 1 and (plan.pp == 2 or len(set(counts[1:-1])) == 1):
            _opt(args, "--decoder-first-pipeline-num-layers", counts[0])
            _opt(args, "--decoder-last-pipeline-num-layers", counts[-1])
        else:
            _opt(args, "--pipeline-model-parallel-layout", _megatron_layout(counts))
    if plan.vocab_parallel and plan.pp > 1:
        warn(warnings, "megatron: vocabulary parallelism over pipeline ranks (embedding, LM head and loss spread "
                       "over every stage) cannot be expressed; Megatron-LM keeps the embedding on the first and "
                       "the head and loss on the last pipeline stage")


def _megatron_recompute(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """``--recompute-granularity full`` (uniform: every block; block: the first N of every stage) or
    ``selective`` with ``--recompute-modules core_attn`` (TransformerConfig.recompute_modules)."""
    kind = recompute_kind(plan)
    full, sel, _total = recompute_counts(plan)
    if kind == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif kind == "selective":
        args += ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"]
    elif kind == "full_block":
        args += ["--recompute-granularity", "full", "--recompute-method", "block",
                 "--recompute-num-layers", str(full[0])]
    elif kind == "mixed":
        k = max(f + s for f, s in zip(full, sel))
        args += ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", str(k)]
        warn(warnings, f"megatron: recompute ({describe_recompute(plan)}) cannot be expressed; Megatron-LM "
                       f"recomputes the same number of blocks in every stage at one granularity. Exported as full "
                       f"recompute of the first {k} blocks of every stage, which recomputes at least as much as "
                       "planned (never more memory, possibly more time)")


def _megatron_sharding(plan: Plan, args: list[str]) -> None:
    """ZeRO stage and data-parallel overlap.

    ZeRO 1 is the distributed optimizer; 2 and 3 are Megatron FSDP (version 1, which runs on the distributed
    optimizer and needs ``--ckpt-format fsdp_dtensor``). The engine profile prices the gradient reduce-scatter
    and the parameter all-gather overlapped with compute: ``--overlap-grad-reduce`` and, where parameters are
    sharded or gathered after the optimizer step, ``--overlap-param-gather`` (which needs the former).
    """
    if plan.zero >= 1:
        args.append("--use-distributed-optimizer")
    if plan.zero in (2, 3):
        args += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy",
                 "optim_grads" if plan.zero == 2 else "optim_grads_params", "--ckpt-format", "fsdp_dtensor"]
    if plan.dp * plan.cp > 1:
        args.append("--overlap-grad-reduce")
        if plan.zero >= 1:
            args.append("--overlap-param-gather")


# Engine profile attention_kernel -> --attention-backend (megatron/core/transformer/enums.py AttnBackend).
_MEGATRON_ATTENTION = {"cudnn": "fused", "flash2": "flash", "unfused": "unfused"}


def _megatron_kernels(plan: Plan, args: list[str], warnings: list[str] | None) -> None:
    """Transformer Engine layers, the attention backend, TP communication overlap and fused kernels.

    Megatron fuses SwiGLU (``bias_swiglu_fusion``) and RoPE (``apply_rope_fusion``) unless told not to; the
    norm is fused into Transformer Engine's LayerNormLinear; the loss fusion is opt-in
    (``--cross-entropy-loss-fusion``, ``native`` implementation: the ``te`` one is refused by arguments.py).
    """
    args += ["--transformer-impl", "transformer_engine"]
    kernel = "unfused" if plan.attention == "unfused" else get_engine(plan.engine).attention_kernel
    args += ["--attention-backend", _MEGATRON_ATTENTION.get(kernel, "auto")]
    if plan.tp_overlap and plan.tp > 1:           # Megatron turns sequence parallel off at tp = 1
        if not plan.sequence_parallel:
            warn(warnings, "megatron: --tp-comm-overlap needs --sequence-parallel; Megatron-LM refuses it without")
        args.append("--tp-comm-overlap")
    kernels = plan.kernels
    if kernels.get("loss") in FUSED_IMPLS:
        args += ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"]
    if kernels.get("swiglu") not in FUSED_IMPLS and plan.model.mlp == "swiglu":
        args.append("--no-bias-swiglu-fusion")
    if kernels.get("rope") != "fused" and plan.model.position == "rope":
        args.append("--no-rope-fusion")
    if kernels.get("norm") != "fused":
        warn(warnings, "megatron: norm: reference (unfused) cannot be expressed; Transformer Engine fuses the "
                       "norm into the following linear layer")
    if plan.compile:
        warn(warnings, "megatron: compile: Megatron-LM has no torch.compile switch for the model; it fuses "
                       "through Transformer Engine / Apex kernels instead")


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
        warn(warnings, "deepspeed: fp8 matmuls are not a DeepSpeed config option (use Transformer Engine "
                       "layers in the model); exported as bf16")
    _deepspeed_tp_cp(plan, cfg, warnings)
    _deepspeed_pipeline(plan, cfg, warnings)
    _deepspeed_recompute(plan, cfg, warnings)
    if plan.vocab_parallel and plan.pp > 1:
        warn(warnings, "deepspeed: vocabulary parallelism over pipeline ranks cannot be expressed")
    order = tuple(plan.mesh_order)
    if order != tuple(DEFAULT_MESH_ORDER):
        warn(warnings, f"deepspeed: mesh order {list(order)} cannot be expressed; DeepSpeed lays ranks out "
                       "pipe, data, model (outermost first)")
    if plan.compile:
        warn(warnings, "deepspeed: compile is not a config option here; call engine.compile() in the script")
    return cfg


def _deepspeed_tp_cp(plan: Plan, cfg: dict[str, Any], warnings: list[str] | None) -> None:
    """AutoTP (``tensor_parallel``) and Ulysses sequence parallelism (``sequence_parallel_size``)."""
    if plan.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": plan.tp}
        if plan.tp_overlap:
            cfg["tensor_parallel"]["tp_overlap_comm"] = True
        if plan.sequence_parallel:
            warn(warnings, "deepspeed: AutoTP has no Megatron-style sequence parallelism; norms and dropout run "
                           "replicated over the tensor-parallel group (more activation memory than planned)")
    elif plan.tp_overlap:
        warn(warnings, "deepspeed: tp_overlap is moot with tp = 1")
    if plan.cp > 1:
        cfg["sequence_parallel_size"] = plan.cp
        if plan.cp_kind == "ring":
            warn(warnings, "deepspeed: ring context parallelism cannot be expressed; DeepSpeed's sequence "
                           "parallelism is Ulysses (all-to-all over heads); exported as Ulysses")
        warn(warnings, "deepspeed: sequence parallelism also needs the model wired for it "
                       "(UlyssesSPAttentionHF.register_with_transformers or DistributedAttention)")


def _deepspeed_pipeline(plan: Plan, cfg: dict[str, Any], warnings: list[str] | None) -> None:
    """``pipeline`` for the PipelineEngine: stages, partition method and the checkpoint interval."""
    if plan.pp == 1:
        return
    kind = recompute_kind(plan)
    counts = stage_counts(plan)
    cfg["pipeline"] = {"stages": plan.pp, "partition": "uniform" if len(set(counts)) == 1 else "parameters",
                       "activation_checkpoint_interval": 0 if kind == "none" else 1}
    if len(set(counts)) > 1:
        warn(warnings, f"deepspeed: the uneven layer partition {counts} cannot be given as numbers; "
                       "PipelineModule balances by partition_method ('parameters' exported); check the "
                       "stages it builds")
    if plan.schedule != "1f1b" or plan.virtual_stages > 1:
        warn(warnings, f"deepspeed: pipeline schedule {plan.schedule} (virtual stages {plan.virtual_stages}) "
                       "cannot be expressed; DeepSpeed's PipelineEngine runs its own 1F1B schedule with one "
                       "stage per rank")
    if plan.zero >= 2:
        warn(warnings, f"deepspeed: ZeRO-{plan.zero} with pipeline parallelism is rejected by DeepSpeed's "
                       "PipelineEngine (ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism); "
                       "use stage 1 or re-plan with --fix zero=1")
    if kind not in ("none", "full"):
        warn(warnings, f"deepspeed: recompute ({describe_recompute(plan)}) cannot be expressed; the pipeline "
                       "engine checkpoints every block or none; exported as activation_checkpoint_interval = 1 "
                       "(every block fully), which recomputes at least as much as planned")


def _deepspeed_recompute(plan: Plan, cfg: dict[str, Any], warnings: list[str] | None) -> None:
    """``activation_checkpointing`` without a pipeline: how many blocks (which ones is model code)."""
    if recompute_kind(plan) == "none" or plan.pp > 1:
        return
    full, sel, _total = recompute_counts(plan)
    n_full = full[0] + sel[0]
    cfg["activation_checkpointing"] = {"partition_activations": plan.tp > 1, "cpu_checkpointing": False,
                                       "contiguous_memory_optimization": False, "number_checkpoints": n_full,
                                       "synchronize_checkpoint_boundary": False}
    warn(warnings, f"deepspeed: which blocks to recompute is decided in model code, not in the config: "
                   f"wrap the first {n_full} transformer blocks in deepspeed.checkpointing.checkpoint")
    if any(sel):
        warn(warnings, "deepspeed: selective (attention-only) recompute cannot be expressed; "
                       "number_checkpoints counts those blocks as fully checkpointed")


# ----------------------------------------------------------------------------------------------
# front door
# ----------------------------------------------------------------------------------------------

# The engine a target's export is written for; targets not listed take a plan priced for any engine.
TARGET_ENGINE = {"megatron": "megatron", "torchtitan": "torchtitan", "torchtitan-toml": "torchtitan"}


def export_plan(plan: Plan, target: str, source: str = "the plan",
                torchtitan_config: str | None = None) -> tuple[str, list[str]]:
    """The text to print for ``meshplan export --to TARGET`` and the warnings for stderr.

    ``megatron``, ``torchtitan`` and ``torchtitan-toml`` need a plan priced for that engine (``source`` names
    the plan file in the error); ``deepspeed`` and ``json`` take any plan. ``torchtitan_config``
    (``MODULE:FUNCTION``) is the torchtitan config function for a model that is not a torchtitan preset.
    """
    target = target.lower().strip()
    if target not in TARGETS:
        raise InputError("--to", f"unknown export target {target!r}", f"choose one of: {', '.join(TARGETS)}")
    engine = TARGET_ENGINE.get(target)
    if engine is not None and plan.engine != engine:
        raise InputError("--to", f"{source} is priced for {plan.engine}, not {engine}",
                         f"re-plan with `{replan_command(plan, engine)}`")
    warnings: list[str] = []
    if target == "megatron":
        return format_megatron_args(to_megatron_args(plan, warnings)), warnings
    if target == "torchtitan":
        from meshplan.export_torchtitan import format_torchtitan_args, to_torchtitan_args

        return format_torchtitan_args(to_torchtitan_args(plan, warnings, torchtitan_config)), warnings
    if target == "torchtitan-toml":
        from meshplan.export_torchtitan import to_torchtitan_toml

        return to_torchtitan_toml(plan, warnings), warnings
    if target == "deepspeed":
        warn(warnings, f"deepspeed: DeepSpeed is not an engine meshplan prices; the plan's predictions are for "
                       f"{get_engine(plan.engine).title}, not for DeepSpeed's runtime")
        return json.dumps(to_deepspeed_config(plan, warnings), indent=2) + "\n", warnings
    return json.dumps(plan.to_dict(), indent=2) + "\n", warnings


def replan_command(plan: Plan, engine: str) -> str:
    """``meshplan plan`` with the plan's inputs and ``--engine``: preset names where the plan's model and
    cluster are presets, ``...`` for inputs given as files."""
    from meshplan.spec import MODEL_PRESETS, load_cluster

    parts = ["meshplan plan"]
    model, cluster = plan.model.name, plan.cluster.name
    try:
        presets = MODEL_PRESETS.get(model) == plan.model and load_cluster(cluster) == plan.cluster
    except InputError:
        presets = False
    if not presets:
        return f"meshplan plan ... --engine {engine}"
    parts += [f"--model {model}", f"--cluster {cluster}", f"--global-batch {plan.train.global_batch}",
              f"--seq-len {plan.train.seq_len}"]
    if plan.train.precision != "bf16":
        parts.append(f"--precision {plan.train.precision}")
    if plan.train.optimizer != "adamw":
        parts.append(f"--optimizer {plan.train.optimizer}")
    parts.append(f"--engine {engine}")
    return " ".join(parts)
