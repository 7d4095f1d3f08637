"""The training entry point each torchrun rank runs:

    python -m torch.distributed.run --nproc-per-node 4 -m meshplan.launcher.runtime.train --plan plan.yaml

It builds the reference model on the meta device, applies the plan (``parallelize.py``), initialises the
weights by name (or reads its slices of a Hugging Face checkpoint, ``hf_weights.py``), and trains: a progress
line and one JSON line of metrics per step, the evaluation loss on a held-out file, a checkpoint every N
steps, a resume from the newest checkpoint after a restart, a Hugging Face export at the end, and a summary of
measured against predicted.
Run without torchrun it trains a world-size-1 plan in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshplan.errors import InputError
from meshplan.launcher.checks import check_liger_installed, check_supported, token_file_dtype, triton_interprets
from meshplan.launcher.runtime.grad_norm import clip_grads, global_grad_norm
from meshplan.launcher.runtime import hf_format
from meshplan.launcher.runtime.hf_weights import HFReader, export_hf, load_hf_weights
from meshplan.launcher.runtime.schedule import LRSchedule
from meshplan.launcher.runtime import checkpoint as ckpt
from meshplan.launcher.runtime import kernels
from meshplan.launcher.runtime import parallelize as par
from meshplan.launcher.runtime import vocab_parallel as vp
from meshplan.launcher.runtime.data import EvalTokens, Slice, make_source
from meshplan.launcher.runtime.metrics import RunLog, model_flops_per_token, summary_table
from meshplan.launcher.runtime.model import InitConfig, build_model, init_weights
from meshplan.plan import Plan


@dataclass(frozen=True)
class RunConfig:
    """What a run does beyond the plan.

    Fields:
        plan_path: the plan file.
        steps: optimizer steps to reach (a resumed run continues up to this step).
        seed: seeds the weights (by parameter name) and the data.
        data: a flat token file, or ``None`` for the synthetic stream; ``data_dtype`` its element type.
        lr, weight_decay, betas: AdamW; weight decay applies to the matrices of the blocks and the untied head
            only, not to norms, biases and embeddings (:func:`param_groups`).
        warmup, schedule, min_lr: the learning rate per step (schedule.LRSchedule: linear warm-up over
            ``warmup`` steps, then ``constant``, ``linear`` or ``cosine`` decay to ``min_lr`` at ``steps``).
        clip: clip the gradients to this global norm (grad_norm.global_grad_norm, over every shard of every
            parallel dimension); 0: no clipping. The norm is reported either way.
        metrics_out: JSON-lines file, one line per step (rank 0 writes it).
        eval_data, eval_every, eval_batches: the evaluation loss (``eval_loss`` in the step's metrics line) on
            the held-out token file ``eval_data``, over its first ``eval_batches`` global batches (as many as it
            holds), after every ``eval_every`` steps (0: only after the last) and after the last.
        log_every: rank 0 prints a progress line every N steps, the first and the last (metrics.ProgressLine).
        tensorboard: also log every metric to this TensorBoard directory (the ``tensorboard`` extra).
        checkpoint_dir, checkpoint_every: DCP checkpoints every N steps (0: only at the end).
        resume: resume from the newest checkpoint in ``checkpoint_dir`` when there is one.
        init_from: a Hugging Face model directory whose weights start the run (hf_weights.py; each rank reads
            only its slices); a resumed run takes its weights from the checkpoint instead.
        save_hf: write the final weights as a Hugging Face checkpoint into this directory (through the final
            DCP checkpoint: ``checkpoint_dir``'s, or a temporary one beside ``save_hf``), with ``init_from``'s
            config and tokenizer files when the run started from one; ``overwrite`` replaces an existing
            directory.
        gc_every: Python's automatic garbage collection is off while the steps run, and every rank collects the
            young generations (``gc.collect(1)``) after every ``gc_every`` steps, all at the same step; 0 leaves
            automatic collection on. An automatic collection pauses one rank at a moment of its own (a full one
            walks torch's whole heap) while the others wait in the next collective; torchtitan
            (``training.gc_freq``, default 50) and Megatron-LM (``--manual-gc``) collect the same way. A step
            leaves no tensor in cyclic garbage (tests/test_runtime_parity.py, every rank of every parity
            layout), so no memory waits for the collection.
        fail_at_step, fail_rank: fault injection for tests (environment ``MESHPLAN_FAULT_STEP`` and
            ``MESHPLAN_FAULT_RANK``): that rank exits abruptly before that step on the first attempt
            (``TORCHELASTIC_RESTART_COUNT == 0``).
    """

    plan_path: str
    steps: int = 10
    seed: int = 0
    data: str | None = None
    data_dtype: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 0
    schedule: str = "constant"
    min_lr: float = 0.0
    clip: float = 0.0
    metrics_out: str | None = None
    eval_data: str | None = None
    eval_every: int = 0
    eval_batches: int = 16
    log_every: int = 10
    tensorboard: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    init_from: str | None = None
    save_hf: str | None = None
    overwrite: bool = False
    gc_every: int = 50
    fail_at_step: int = 0
    fail_rank: int = 0

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(base_lr=self.lr, total_steps=self.steps, warmup_steps=self.warmup, decay=self.schedule,
                          min_lr=self.min_lr)


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------

def init_distributed(plan: Plan) -> tuple[torch.device, str]:
    use_cuda = plan.cluster.gpu.kind == "gpu"
    if use_cuda and not torch.cuda.is_available():
        raise InputError("plan.cluster.gpu", "the plan is for GPUs but this process sees none",
                         "launch where the plan's GPUs are, or re-plan with --cluster localhost:N")
    if "RANK" not in os.environ:  # plain `python -m ...train`: a one-process world
        if plan.world_size != 1:
            raise InputError("plan", f"world size {plan.world_size} needs torchrun", "use `meshplan launch`")
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    if world != plan.world_size:
        raise InputError("plan: dp*tp*pp*cp", f"the plan needs {plan.world_size} ranks but torchrun started {world}",
                         "launch with `meshplan launch` or --nproc-per-node matching the plan")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=_attempt_store(), rank=int(os.environ["RANK"]), world_size=world,
                                device_id=device)
        return device, "cuda"
    dist.init_process_group("gloo", store=_attempt_store(), rank=int(os.environ["RANK"]), world_size=world)
    return torch.device("cpu"), "cpu"


def _attempt_store() -> dist.Store:
    """The rendezvous store, under a prefix per torchrun restart attempt: a restarted worker group must not
    read the addresses its predecessors published (gloo would try to connect to dead processes)."""
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"meshplan/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Trainer:
    """Everything one rank holds: the model parts (one per pipeline stage it runs), their optimizers, the
    pipeline schedule (``None`` when pp == 1) and where it is in the mesh."""

    plan: Plan
    config: RunConfig
    device: torch.device
    meshes: par.Meshes
    parts: list[tuple[int, torch.nn.Module]]
    optimizers: list[torch.optim.Optimizer]
    schedule: object | None
    tied_group: dist.ProcessGroup | None
    autocast: contextlib.AbstractContextManager | None
    loss_fn: object = None                        # (stage output, targets) -> loss; see make_loss_fn
    vocab: vp.VocabParallel | None = None         # vocab_parallel with pp > 1
    kv_group: dist.ProcessGroup | None = None     # ranks holding the same replicated key/value head

    @property
    def stage_parts(self) -> list[tuple[int, torch.nn.Module]]:
        """The pipeline stages' parts (without the vocabulary shard of ``vocab_parallel``)."""
        return [(j, part) for j, part in self.parts if j != VOCAB_PART]

    @property
    def is_last_stage(self) -> bool:
        return self.plan.pp == 1 or any(j == len(self.plan.stages) - 1 for j, _ in self.parts)

    @property
    def is_first_stage(self) -> bool:
        return self.plan.pp == 1 or any(j == 0 for j, _ in self.parts)


def computes_in_bf16(plan: Plan, device_type: str) -> bool:
    """A 16-bit plan on GPUs: its blocks compute in bf16 (FSDP2 mixed precision or autocast) over fp32 weights.
    CPU jobs compute in fp32 whatever the plan's precision."""
    return device_type == "cuda" and plan.train.precision in ("bf16", "fp16", "fp8")


def mixed_precision_policy(plan: Plan, meshes: par.Meshes, device_type: str):
    """FSDP2's bf16 compute / fp32 reduce policy for 16-bit GPU plans sharded over dp x cp, else ``None``
    (a 16-bit GPU plan without dp x cp uses autocast instead)."""
    if not computes_in_bf16(plan, device_type) or meshes.dp_cp is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def hidden_dtype(plan: Plan, meshes: par.Meshes, device_type: str) -> torch.dtype:
    """The dtype of the hidden states between pipeline stages: bf16 under FSDP2 mixed precision (its
    parameters, hence its outputs, are bf16), else fp32 (autocast keeps the residual stream in fp32)."""
    return torch.bfloat16 if mixed_precision_policy(plan, meshes, device_type) is not None else torch.float32


VOCAB_PART = -1   # index of the vocabulary shard in ``build_parts``' list (vocab_parallel with pp > 1)


def build_parts(plan: Plan, meshes: par.Meshes, device_type: str) -> list[tuple[int, torch.nn.Module]]:
    """This rank's model parts with the whole plan applied, still on the meta device: the stage split,
    kernels, tensor/sequence parallel, context parallel, recompute, compile and ZeRO, in that order.
    ``launch`` materialises them (:func:`build`); ``meshplan check`` measures them under fake tensors.
    With ``vocab_parallel`` and pp > 1 the list ends with ``(VOCAB_PART, VocabShard)``: this rank's rows
    of the embedding and head (``vocab_parallel.py``), not a pipeline stage."""
    model = build_model(plan.model, plan.train.seq_len, "meta")
    parts = par.build_stages(model, plan, meshes.coords["pp"])
    if par.fused_loss(plan):      # the head's stage outputs hidden states; make_loss_fn applies the head
        for _, part in parts:
            if part.output is not None:
                part.output_hidden = True
    mp_policy = mixed_precision_policy(plan, meshes, device_type)
    for _, part in parts:
        par.apply_ep(part, meshes)
        configure_moe(part, plan, meshes, device_type)
        _set_kernels(part, plan, device_type)
        if meshes.tp is not None:
            par.apply_tp(part, meshes.tp, plan.sequence_parallel)
        if meshes.cp is not None:
            par.apply_cp(part, meshes.cp, plan.cp_kind)
        par.apply_ac(part, lambda layer: par.layer_recompute(plan, layer))
        if plan.compile:
            if plan.tp_overlap and meshes.tp is not None and device_type == "cuda":
                par.enable_async_tp(meshes.tp)
            par.apply_compile(part)
        if meshes.dp_cp is not None:
            par.apply_dp(part, meshes.dp_cp, plan.zero, mp_policy, meshes.edp, plan.dp * plan.cp)
    if vp.enabled(plan):
        shard, _ = vp.build_vocab_parallel(plan, meshes)
        parts.append((VOCAB_PART, shard))
    return parts


def configure_moe(part: torch.nn.Module, plan: Plan, meshes: par.Meshes, device_type: str) -> None:
    """The MoE blocks' groups (moe.configure), their routed experts' GEMMs (grouped where the blocks compute
    in bf16) and the scale of their load-balancing gradient: the training loss's, ``1 / num_microbatches``
    without a pipeline (the loss is divided before backward; a pipeline scales the gradients after), over
    ``tp`` under sequence parallelism (each TP rank's loss is the whole loss, its statistics summed with the
    other TP ranks')."""
    from meshplan.launcher.runtime import moe

    scale = 1.0 / plan.num_microbatches if plan.pp == 1 else 1.0
    if plan.tp > 1 and plan.sequence_parallel:
        scale /= plan.tp
    sequence_ranks = plan.cp * (plan.tp if plan.sequence_parallel else 1)
    moe.configure(part, ep_group=meshes.ep, sequence_group=meshes.sequence, sequence_ranks=sequence_ranks,
                  aux_grad_scale=scale, bf16=computes_in_bf16(plan, device_type))


def param_groups(part: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: the matrices of the blocks and the untied head decay; norms, biases and embeddings
    (tied or not, and a learned positions table) do not (GPT-2 / Megatron-LM practice)."""
    decay, no_decay = [], []
    for name, param in part.named_parameters():
        (no_decay if param.ndim < 2 or "embeddings" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(part: torch.nn.Module, config: RunConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(part, config.weight_decay), lr=config.lr_schedule().lr_at(1),
                             betas=config.betas, fused=device_type == "cuda",
                             foreach=None if device_type == "cuda" else True)


def build(plan: Plan, config: RunConfig, device: torch.device, device_type: str,
          init_from: str | None = None) -> Trainer:
    """The Trainer with every part materialised: weights by name (model.init_weights), or this rank's slices
    of the Hugging Face checkpoint ``init_from``."""
    meshes = par.build_mesh(plan, device_type)
    parts = build_parts(plan, meshes, device_type)
    positions = local_positions(plan, meshes).to(device)
    reader = HFReader(Path(init_from), plan.model) if init_from else None
    for j, part in parts:
        part.to_empty(device=device)
        if reader is not None:
            load_hf_weights(part, reader)
        else:
            init_weights(part, plan.model, InitConfig(seed=config.seed), device)
        if j != VOCAB_PART:
            part.set_positions(positions)
        part.train()
    return assemble(plan, config, device, device_type, meshes, parts)


def assemble(plan: Plan, config: RunConfig, device: torch.device, device_type: str, meshes: par.Meshes,
             parts: list[tuple[int, torch.nn.Module]], stage_io=None, autocast_device: str = "cuda") -> Trainer:
    """The Trainer around materialised ``parts``: optimizers, the loss, the pipeline schedule, the tied
    embedding group and autocast. ``meshplan check`` calls it with fake parts, the stages' example shapes
    (``stage_io``, see ``parallelize.build_schedule``) and autocast on the CPU."""
    optimizers = [make_optimizer(part, config, device_type) for _, part in parts]
    vocab = make_vocab_parallel(plan, meshes, parts, device_type)
    stage_loss = make_loss_fn(plan, meshes, parts, vocab)
    schedule = None
    if plan.pp > 1:
        stages = [(j, part) for j, part in parts if j != VOCAB_PART]
        if stage_io is None and par.stage_outputs_hidden(plan):
            # Declared stage shapes: the schedule's dynamic shape inference would call the loss function
            # once on its own, which for the vocabulary passes is a collective the other ranks do not join.
            dtype = hidden_dtype(plan, meshes, device_type)
            stage_io = lambda j: par.stage_io_examples(plan, j, device, dtype)  # noqa: E731
        schedule = par.build_schedule(plan, stages, meshes.pp, device, stage_loss, stage_io)
    autocast = None
    if computes_in_bf16(plan, device_type) and mixed_precision_policy(plan, meshes, device_type) is None:
        autocast = torch.autocast(autocast_device, dtype=torch.bfloat16)
    return Trainer(plan, config, device, meshes, parts, optimizers, schedule,
                   par.tied_embedding_group(plan, meshes), autocast, stage_loss, vocab, par.kv_replica_group(plan))


def make_vocab_parallel(plan: Plan, meshes: par.Meshes, parts, device_type: str = "cpu") -> vp.VocabParallel | None:
    """The driver of the vocabulary passes (``vocab_parallel`` with pp > 1) around the shard in ``parts``; a
    16-bit GPU plan runs its head passes in bf16, as the stages compute (``VocabParallel.compute_dtype``)."""
    if not vp.enabled(plan):
        return None
    shard = dict(parts)[VOCAB_PART]
    return vp.VocabParallel(plan, shard.groups, shard, meshes.coords,
                            torch.bfloat16 if computes_in_bf16(plan, device_type) else None)


def local_positions(plan: Plan, meshes: par.Meshes) -> torch.Tensor:
    """The positions of this rank's tokens in its local order (context_parallel.sequence_positions)."""
    from meshplan.launcher.runtime.context_parallel import sequence_positions

    return sequence_positions(plan.train.seq_len, meshes.coords["cp"], plan.cp, plan.cp_kind)


def _set_kernels(model: torch.nn.Module, plan: Plan, device_type: str) -> None:
    """The plan's kernel choice per op. The fused (Triton) kernels run on CUDA, and on CPU ranks only under
    Triton's interpreter (``TRITON_INTERPRET=1``, checks.triton_interprets; check_supported refuses a fused
    plan on CPU ranks otherwise). Under sequence parallelism the fused norm runs on the local shard of the
    DTensor (kernels.rms_norm)."""
    runs_triton = device_type == "cuda" or triton_interprets()

    def impl(name: str) -> str:
        return plan.kernels.get(name, "reference") if runs_triton else "reference"

    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = impl("norm")
        if hasattr(module, "swiglu_impl"):
            module.swiglu_impl = impl("swiglu")
        if hasattr(module, "rope_impl"):
            module.rope_impl = impl("rope")


# ----------------------------------------------------------------------------------------------
# the training step
# ----------------------------------------------------------------------------------------------

def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the micro-batch (vocabulary-parallel under ``loss_parallel``)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def make_loss_fn(plan: Plan, meshes: par.Meshes, parts, vocab: vp.VocabParallel | None = None):
    """The loss on the head's stage output, ``(output, targets) -> loss`` (the pipeline schedule's
    ``loss_fn``; ``train_step`` calls it with pp == 1):

    * ``vocab_parallel`` with pp > 1: the vocabulary passes across pipeline ranks (``VocabParallel.loss_fn``);
    * ``kernels.loss`` fused/auto: the stage outputs the normed hidden states and this applies the head and
      the loss in one chunked pass (``kernels.linear_cross_entropy``), so the logits never exist; under
      tensor parallelism the head weight is this rank's vocabulary rows and the loss is vocab-parallel over
      the tp group (sequence-parallel hidden states are gathered first);
    * otherwise :func:`loss_fn` on the logits.
    """
    if vocab is not None:
        return vocab.loss_fn
    if not par.fused_loss(plan):
        return loss_fn
    head = next((part for j, part in parts if j != VOCAB_PART and part.output is not None), None)
    if head is None:          # a pipeline rank without the last stage never computes the loss
        return loss_fn
    # meshplan's chunked loss runs everywhere (PyTorch chunk math without Triton); liger's on whole heads
    impl = "liger" if plan.kernels.get("loss") == "liger" else "fused"

    def fused_loss_fn(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        weight, group = head.head_weight(), None
        if isinstance(weight, DTensor):
            if meshes.tp is None or weight.device_mesh.mesh_dim_names != ("tp",):
                raise InputError("plan.kernels.loss", f"the head weight is sharded over "
                                 f"{weight.device_mesh.mesh_dim_names}, not only tp, outside its module's forward",
                                 "use kernels.loss: reference with this ZeRO stage")
            weight, group = weight.to_local(), meshes.tp.get_group()
            if plan.sequence_parallel:   # the head needs the whole sequence on every tensor rank
                hidden = DTensor.from_local(hidden, meshes.tp, [Shard(1)]).full_tensor()
        return kernels.linear_cross_entropy(hidden.to(weight.dtype), weight, targets, impl=impl,
                                            process_group=group)

    return fused_loss_fn


def _loss_context(trainer: Trainer):
    stack = contextlib.ExitStack()
    if trainer.meshes.tp is not None and not par.stage_outputs_hidden(trainer.plan):
        from torch.distributed.tensor.parallel import loss_parallel
        stack.enter_context(loss_parallel())
    if trainer.autocast is not None:
        stack.enter_context(trainer.autocast)
    return stack


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _schedule_step_takes_return_outputs() -> bool:
    import inspect

    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
    return all("return_outputs" in inspect.signature(cls.step).parameters
               for cls in (PipelineScheduleSingle, PipelineScheduleMulti))


# newer torch lets a schedule drop the last stage's outputs; on older ones the keyword would reach the model
_STEP_TAKES_RETURN_OUTPUTS = _schedule_step_takes_return_outputs()


def run_batch(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor, backward: bool = True) -> torch.Tensor:
    """Every micro-batch of this rank's slice of a global batch, forward (and ``backward``: backward,
    gradients accumulated). Returns the summed micro-batch losses: a scalar on the last pipeline stage, zero
    elsewhere. Forward only, the pipeline runs its schedule's ``eval`` and the vocabulary passes no gradient."""
    plan = trainer.plan
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    grad_mode = contextlib.nullcontext() if backward else torch.no_grad()
    with _loss_context(trainer), grad_mode:
        if trainer.schedule is None:                     # no pipeline: gradient accumulation over micro-batches
            model = trainer.parts[0][1]
            batches = list(zip(inputs.chunk(plan.num_microbatches), targets.chunk(plan.num_microbatches)))
            for i, (x, y) in enumerate(batches):
                if backward:
                    _accumulate_without_sync(model, plan, last=i == len(batches) - 1)
                loss = trainer.loss_fn(model(x), y)
                if backward:
                    (loss / plan.num_microbatches).backward()
                loss_sum += _local(loss).detach().double()
        else:                                            # pipeline: the schedule splits into micro-batches
            losses: list[torch.Tensor] = []
            first_input = inputs
            if trainer.vocab is not None:                # embedding passes; head passes start serving
                first_input = trainer.vocab.begin_step(inputs, targets, evaluating=not backward)
            args = (first_input,) if trainer.is_first_stage else ()
            kwargs = {"target": targets, "losses": losses} if trainer.is_last_stage else {}
            if _STEP_TAKES_RETURN_OUTPUTS:
                # the last stage would keep every micro-batch's output (the logits) to the step's end to
                # return them merged; the losses are all train_step needs (m x the logits, found by check)
                kwargs["return_outputs"] = False
            (trainer.schedule.step if backward else trainer.schedule.eval)(*args, **kwargs)
            if trainer.vocab is not None:                # head passes joined, embedding backward, shard grads
                trainer.vocab.end_step()
            for loss in losses:
                loss_sum += _local(loss).detach().double()
    return loss_sum


def train_step(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor,
               lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's slice of the global batch at learning rate ``lr`` (None: the
    optimizers' current one). Returns the summed micro-batch losses (a scalar on the last pipeline stage, zero
    elsewhere) and the global gradient norm before clipping (equal on every rank)."""
    loss_sum = run_batch(trainer, inputs, targets)
    sync_tied_embedding_grads(trainer)
    sync_kv_replica_grads(trainer)
    sync_moe_tp_grads(trainer)
    norm = global_grad_norm(trainer.parts, trainer.plan, trainer.tied_group is not None, trainer.device)
    if trainer.config.clip > 0:
        clip_grads(trainer.parts, norm, trainer.config.clip)
    for optimizer in trainer.optimizers:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm


def eval_loss(trainer: Trainer, data: EvalTokens, data_slice: Slice) -> float:
    """The mean loss over every batch of the held-out file (forward only, the plan's own layout)."""
    total = 0.0
    for i in range(data.batches):
        inputs, targets = data_slice.take(data.eval_batch(i))
        total += global_mean_loss(trainer, run_batch(trainer, inputs.to(trainer.device),
                                                     targets.to(trainer.device), backward=False))
    return total / data.batches


def _accumulate_without_sync(model: torch.nn.Module, plan: Plan, last: bool) -> None:
    """Gradient accumulation as the planner prices it (planner/evaluate.py, data-parallel terms): under
    ZeRO 0, 1 and 2 the gradients are reduced once per step, after the last micro-batch (accumulated
    unsharded in fp32 until then), and ZeRO 1/2 keep the weights gathered until that last backward; ZeRO 3
    reduce-scatters and re-gathers every micro-batch. (``torch.distributed.pipelining`` does the same for
    pipelined plans by itself.)"""
    if plan.num_microbatches == 1 or plan.zero == 3 or not hasattr(model, "set_requires_gradient_sync"):
        return
    model.set_requires_gradient_sync(last)
    if plan.zero in (1, 2) and hasattr(model, "set_reshard_after_backward"):
        model.set_reshard_after_backward(last)


def sync_tied_embedding_grads(trainer: Trainer) -> None:
    """Sum the gradients of the two copies of a tied embedding (first and last pipeline stage)."""
    if trainer.tied_group is None:
        return
    from torch.distributed.tensor import DTensor

    for _, part in trainer.parts:
        if part.tok_embeddings is None:
            continue
        weight = part.tok_embeddings.weight
        grad = weight.grad
        if isinstance(grad, DTensor) and grad.placements != weight.placements:  # same layout on both copies
            grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, group=trainer.tied_group)


def sync_kv_replica_grads(trainer: Trainer) -> None:
    """Sum the gradients of a replicated key/value head over the ranks that hold it (tp > kv_heads,
    parallelize.replicate_kv_heads): each copy served other query heads, the head's gradient is their sum.
    One all-reduce of every such gradient of the rank (its ZeRO shard) per step."""
    if trainer.kv_group is None:
        return
    from meshplan.launcher.runtime.model import replicated_kv_params

    grads = []
    for _, part in trainer.stage_parts:
        params = dict(part.named_parameters())
        grads += [_local_shard(params[name].grad) for name in replicated_kv_params(part)]
    _sum_in_place(grads, trainer.kv_group)


def _sum_in_place(grads: list[torch.Tensor], group) -> None:
    """Replace each of ``grads`` by its sum over ``group``: one all-reduce of them flattened together."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))


def sync_moe_tp_grads(trainer: Trainer) -> None:
    """Sum over the tensor-parallel ranks the gradients of the MoE weights each of them holds whole while
    routing only its sequence shard (moe.tp_partial_params: the router, the shared experts and gate, and the
    routed experts where no expert-data-parallel mesh reduces them). One all-reduce of the rank's shards."""
    if trainer.meshes.tp is None or trainer.plan.model.moe is None:
        return
    from meshplan.launcher.runtime.moe import tp_partial_params

    grads = [_local_shard(p.grad) for _, part in trainer.stage_parts
             for p in tp_partial_params(part, experts_too=trainer.meshes.edp is None) if p.grad is not None]
    _sum_in_place(grads, trainer.meshes.tp.get_group())


def _local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) tensor, as a view that writes through."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def global_mean_loss(trainer: Trainer, loss_sum: torch.Tensor) -> float:
    """Mean loss over the global batch, on every rank: reported by the last stage's tensor rank 0 of every
    data/context rank, then averaged."""
    plan, coords = trainer.plan, trainer.meshes.coords
    reporter = trainer.is_last_stage and coords["tp"] == 0
    value = (loss_sum if reporter else torch.zeros_like(loss_sum)).to(torch.float64)
    if dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value) / (plan.num_microbatches * plan.dp * plan.cp)


# ----------------------------------------------------------------------------------------------
# checkpoint state
# ----------------------------------------------------------------------------------------------

def state_for_checkpoint(trainer: Trainer, step: int) -> dict:
    """The DCP state of this rank. Under expert parallelism each EP rank's experts are its own entries
    (:func:`expert_checkpoint_keys`), so a checkpoint resumes with the same ``ep``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optim = {}, {}
    for (j, part), optimizer in zip(trainer.parts, trainer.optimizers):
        model.update(get_model_state_dict(part))
        optim[f"stage{j}"] = get_optimizer_state_dict(part, optimizer)
    return _rename_experts({"model": model, "optim": optim, "progress": {"step": torch.tensor(step)}},
                           expert_checkpoint_keys(trainer))


def expert_checkpoint_keys(trainer: Trainer) -> dict[str, str]:
    """``{name: checkpoint key}`` of this rank's routed experts under expert parallelism: the name tagged
    with the rank's place in its EP group (``@ep<r>of<ep>``), as the EP ranks hold different experts under one
    name; empty where ep == 1."""
    if trainer.meshes.ep is None:
        return {}
    from meshplan.launcher.runtime.model import canonical_name
    from meshplan.launcher.runtime.moe import expert_checkpoint_key, expert_param_names

    rank, ep = trainer.meshes.ep_rank, trainer.plan.ep
    return {canonical_name(n): expert_checkpoint_key(canonical_name(n), rank, ep) for _, part in trainer.stage_parts
            for n in expert_param_names(part)}


def _rename_experts(state: dict, keys: dict[str, str]) -> dict:
    """``state`` with the model's and the optimizer states' entries renamed by ``keys``."""
    if not keys:
        return state
    state["model"] = {keys.get(k, k): v for k, v in state["model"].items()}
    for optim in state["optim"].values():
        optim["state"] = {keys.get(k, k): v for k, v in optim["state"].items()}
    return state


def restore(trainer: Trainer, path: Path) -> int:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = state_for_checkpoint(trainer, 0)
    ckpt.load(path, state)
    state = _rename_experts(state, {v: k for k, v in expert_checkpoint_keys(trainer).items()})
    for (j, part), optimizer in zip(trainer.parts, trainer.optimizers):
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(part, optimizer, state["optim"][f"stage{j}"])
    return int(state["progress"]["step"])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def check_weights_io(plan: Plan, config: RunConfig) -> None:
    """``--init-from``, ``--save-hf`` and the evaluation and logging counts, checked before any weight is read
    or any step trained."""
    for option, value, low in (("--eval-every", config.eval_every, 0), ("--eval-batches", config.eval_batches, 1),
                               ("--log-every", config.log_every, 1), ("--gc-every", config.gc_every, 0)):
        if value < low:
            raise InputError(option, f"must be >= {low}, got {value}", f"give an integer >= {low}")
    if config.init_from:
        hf_format.check_checkpoint(Path(config.init_from), plan.model, plan.train.seq_len)
    if config.save_hf:
        hf_format.hf_family_for(plan.model)
        hf_format.prepare_output(Path(config.save_hf), config.overwrite)


def save_hf(trainer: Trainer, config: RunConfig, root: Path | None, step: int) -> None:
    """Collective: the final weights as a Hugging Face checkpoint, converted by rank 0 from the final DCP
    checkpoint (``root``'s newest, or one written into a temporary directory beside ``config.save_hf``)."""
    out = Path(config.save_hf)
    scratch = None
    if root is None or ckpt.find_latest(root) is None:
        scratch = out.with_name(out.name + ".dcp")
        ckpt.save(scratch, step, state_for_checkpoint(trainer, step), keep=1)
    source = ckpt.find_latest(root if scratch is None else scratch)[0]
    if dist.get_rank() == 0:
        plan = trainer.plan
        dtype = "bfloat16" if plan.train.precision in ("bf16", "fp16", "fp8") else "float32"
        export_hf(source, plan.model, out, dtype, plan.train.seq_len, overwrite=config.overwrite,
                  base=Path(config.init_from) if config.init_from else None)
        if scratch is not None:
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"meshplan: wrote the Hugging Face checkpoint {out} ({dtype})", flush=True)
    dist.barrier()


def timed_step(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> dict:
    """One training step and its metrics record (launcher/runtime/metrics.py lists the fields)."""
    plan, device = trainer.plan, trainer.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = plan.train.global_batch * plan.train.seq_len
    begin = time.perf_counter()
    lr = trainer.config.lr_schedule().lr_at(step)
    loss_sum, grad_norm = train_step(trainer, inputs, targets, lr)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - begin
    record = {"step": step, "loss": global_mean_loss(trainer, loss_sum), "step_time_s": elapsed,
              "tokens_per_s": tokens_per_step / elapsed, "lr": lr, "grad_norm": float(grad_norm)}
    if cuda:
        peaks = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30,
                              torch.cuda.max_memory_reserved(device) / 2**30], device=device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        record["peak_memory_gib"], record["reserved_memory_gib"] = (float(v) for v in peaks)
        peak_flops = plan.cluster.gpu.peak_flops(plan.train.precision)
        record["mfu"] = model_flops_per_token(plan) * tokens_per_step / elapsed / (plan.world_size * peak_flops)
    return record


def _inject_fault(config: RunConfig, step: int) -> None:
    """Tests: the chosen rank exits abruptly before the chosen step, on the first attempt only."""
    if config.fail_at_step == step and dist.get_rank() == config.fail_rank \
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        print(f"meshplan: fault injection: rank {config.fail_rank} exits before step {step}", flush=True)
        os._exit(13)


@contextlib.contextmanager
def manual_gc(every: int):
    """With ``every`` > 0: the young generations collected, then automatic collection off until the block ends
    (back as it was: a caller that turned it off keeps it off); the block collects every ``every`` steps
    (RunConfig.gc_every)."""
    if not every:
        yield
        return
    was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run(config: RunConfig) -> list[dict]:
    plan = Plan.load(config.plan_path)
    check_supported(plan)
    check_liger_installed(plan)
    config.lr_schedule().validate()
    check_weights_io(plan, config)
    device, device_type = init_distributed(plan)
    rank = dist.get_rank()
    torch.manual_seed(config.seed)
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    found = ckpt.find_latest(root) if config.resume else None
    trainer = build(plan, config, device, device_type, init_from=config.init_from if found is None else None)
    seq, batch = plan.train.seq_len, plan.train.global_batch
    data = make_source(plan.model.vocab, config.seed, config.data, config.data_dtype, seq + 1)
    evals = EvalTokens(config.eval_data, plan.model.vocab,
                       token_file_dtype(config.data_dtype, plan.model.vocab, config.eval_data),
                       batch, seq + 1, config.eval_batches) if config.eval_data else None
    coords = trainer.meshes.coords
    data_slice = Slice.of_rank(plan, coords)

    start = restore(trainer, found[0]) if found is not None else 0
    if found is not None and start != found[1]:
        raise InputError("--checkpoint-dir", f"{found[0]} says step {found[1]} but holds step {start}",
                         "point `latest` at a consistent checkpoint")
    log = RunLog(config.metrics_out, config.tensorboard, start, config.steps, config.log_every, rank == 0)
    if rank == 0:
        print(f"meshplan: training {plan.model.name} dp={plan.dp} tp={plan.tp} pp={plan.pp} cp={plan.cp} "
              f"on {dist.get_world_size()} {device_type} ranks, steps {start + 1}..{config.steps}"
              + (f" (resumed from {found[0]})" if found else ""), flush=True)
    records = []
    with manual_gc(config.gc_every):
        for step in range(start + 1, config.steps + 1):
            _inject_fault(config, step)
            inputs, targets = data_slice.take(data.batch(step, batch, seq + 1))
            record = timed_step(trainer, inputs.to(device), targets.to(device), step)
            if evals is not None and (step == config.steps or config.eval_every and step % config.eval_every == 0):
                record["eval_loss"] = eval_loss(trainer, evals, data_slice)
            records.append(record)
            log.write(record)
            if root is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                ckpt.save(root, step, state_for_checkpoint(trainer, step))
            if config.gc_every and step % config.gc_every == 0:
                gc.collect(1)
    if root is not None and records and (not config.checkpoint_every or config.steps % config.checkpoint_every):
        ckpt.save(root, config.steps, state_for_checkpoint(trainer, config.steps))
    if config.save_hf:
        save_hf(trainer, config, root, config.steps if records else start)
    if rank == 0 and records:
        print(summary_table(plan, log.metrics.all_records()), flush=True)
    log.close()
    dist.barrier()
    dist.destroy_process_group()
    return records


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(prog="python -m meshplan.launcher.runtime.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--data-dtype", default=None, choices=["uint16", "uint32"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--metrics-out", default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--tensorboard", default=None)
    p.add_argument("--init-from", default=None)
    p.add_argument("--save-hf", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--gc-every", type=int, default=50)
    a = p.parse_args(argv)
    return RunConfig(plan_path=a.plan, steps=a.steps, seed=a.seed, data=a.data, data_dtype=a.data_dtype, lr=a.lr,
                     warmup=a.warmup, schedule=a.schedule, min_lr=a.min_lr, clip=a.clip,
                     weight_decay=a.weight_decay, metrics_out=a.metrics_out, checkpoint_dir=a.checkpoint_dir,
                     checkpoint_every=a.checkpoint_every, resume=not a.no_resume, eval_data=a.eval_data,
                     eval_every=a.eval_every, eval_batches=a.eval_batches, log_every=a.log_every,
                     tensorboard=a.tensorboard, init_from=a.init_from,
                     save_hf=a.save_hf, overwrite=a.overwrite, gc_every=a.gc_every,
                     fail_at_step=int(os.environ.get("MESHPLAN_FAULT_STEP", "0")),
                     fail_rank=int(os.environ.get("MESHPLAN_FAULT_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        run(config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
