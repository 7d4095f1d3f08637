"""The training entry point each torchrun rank runs:

    python -m torch.distributed.run --nproc-per-node 4 -m meshplan.launcher.runtime.train --plan plan.yaml

It builds the reference model on the meta device, applies the plan (``parallelize.py``), initialises the
weights by name, and trains: one JSON line of metrics per step, a checkpoint every N steps, a resume from
the newest checkpoint after a restart, and a summary of measured against predicted at the end.
Run without torchrun it trains a world-size-1 plan in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshplan.errors import InputError
from meshplan.launcher.checks import check_supported
from meshplan.launcher.runtime import checkpoint as ckpt
from meshplan.launcher.runtime import parallelize as par
from meshplan.launcher.runtime.data import Slice, make_source
from meshplan.launcher.runtime.metrics import MetricsWriter, model_flops_per_token, summary_table
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
        lr, weight_decay, betas: AdamW (constant learning rate, no warm-up).
        metrics_out: JSON-lines file, one line per step (rank 0 writes it).
        checkpoint_dir, checkpoint_every: DCP checkpoints every N steps (0: only at the end).
        resume: resume from the newest checkpoint in ``checkpoint_dir`` when there is one.
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
    metrics_out: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = True
    fail_at_step: int = 0
    fail_rank: int = 0


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

    @property
    def is_last_stage(self) -> bool:
        return self.plan.pp == 1 or any(j == len(self.plan.stages) - 1 for j, _ in self.parts)

    @property
    def is_first_stage(self) -> bool:
        return self.plan.pp == 1 or any(j == 0 for j, _ in self.parts)


def build(plan: Plan, config: RunConfig, device: torch.device, device_type: str) -> Trainer:
    meshes = par.build_mesh(plan, device_type)
    model = build_model(plan.model, plan.train.seq_len, "meta")
    parts = par.build_stages(model, plan, meshes.coords["pp"])
    gpu_bf16 = device_type == "cuda" and plan.train.precision in ("bf16", "fp16", "fp8")
    mp_policy = None
    if gpu_bf16 and meshes.dp_cp is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    first, end = _positions_range(plan, meshes)
    positions = torch.arange(first, end, device=device)
    for _, part in parts:
        _set_kernels(part, plan, device_type)
        if meshes.tp is not None:
            par.apply_tp(part, meshes.tp, plan.sequence_parallel)
        if meshes.cp is not None:
            par.apply_cp(part, meshes.cp, plan.cp_kind)
        par.apply_ac(part, lambda layer: par.layer_recompute(plan, layer))
        if plan.compile:
            par.apply_compile(part)
        if meshes.dp_cp is not None:
            par.apply_dp(part, meshes.dp_cp, plan.zero, mp_policy)
        part.to_empty(device=device)
        init_weights(part, plan.model, InitConfig(seed=config.seed), device)
        part.set_positions(positions)
        part.train()
    optimizers = [torch.optim.AdamW(part.parameters(), lr=config.lr, betas=config.betas,
                                    weight_decay=config.weight_decay, fused=device_type == "cuda",
                                    foreach=None if device_type == "cuda" else True)
                  for _, part in parts]
    schedule = None
    if plan.pp > 1:
        schedule = par.build_schedule(plan, parts, meshes.pp, device, loss_fn)
    autocast = None
    if gpu_bf16 and mp_policy is None:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    return Trainer(plan, config, device, meshes, parts, optimizers, schedule,
                   par.tied_embedding_group(plan, meshes), autocast)


def _positions_range(plan: Plan, meshes: par.Meshes) -> tuple[int, int]:
    from meshplan.launcher.runtime.context_parallel import sequence_chunk

    return sequence_chunk(plan.train.seq_len, meshes.coords["cp"], plan.cp)


def _set_kernels(model: torch.nn.Module, plan: Plan, device_type: str) -> None:
    """The plan's kernel choice per op; the fused (Triton) kernels run on CUDA only (reference on CPU).
    Under sequence parallelism the norms see DTensors, which the Triton norm does not take: reference there."""
    def impl(name: str) -> str:
        if name == "norm" and plan.tp > 1 and plan.sequence_parallel:
            return "reference"
        return plan.kernels.get(name, "reference") if device_type == "cuda" else "reference"

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


def _loss_context(trainer: Trainer):
    stack = contextlib.ExitStack()
    if trainer.meshes.tp is not None:
        from torch.distributed.tensor.parallel import loss_parallel
        stack.enter_context(loss_parallel())
    if trainer.autocast is not None:
        stack.enter_context(trainer.autocast)
    return stack


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def train_step(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step over this rank's slice of the global batch. Returns the summed micro-batch losses
    (a scalar on the last pipeline stage, zero elsewhere)."""
    plan = trainer.plan
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    with _loss_context(trainer):
        if trainer.schedule is None:                     # no pipeline: gradient accumulation over micro-batches
            model = trainer.parts[0][1]
            for x, y in zip(inputs.chunk(plan.num_microbatches), targets.chunk(plan.num_microbatches)):
                loss = loss_fn(model(x), y)
                (loss / plan.num_microbatches).backward()
                loss_sum += _local(loss).detach().double()
        else:                                            # pipeline: the schedule splits into micro-batches
            losses: list[torch.Tensor] = []
            args = (inputs,) if trainer.is_first_stage else ()
            kwargs = {"target": targets, "losses": losses} if trainer.is_last_stage else {}
            trainer.schedule.step(*args, **kwargs)
            for loss in losses:
                loss_sum += _local(loss).detach().double()
    sync_tied_embedding_grads(trainer)
    for optimizer in trainer.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum


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
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, optim = {}, {}
    for (j, part), optimizer in zip(trainer.parts, trainer.optimizers):
        model.update(get_model_state_dict(part))
        optim[f"stage{j}"] = get_optimizer_state_dict(part, optimizer)
    return {"model": model, "optim": optim, "progress": {"step": torch.tensor(step)}}


def restore(trainer: Trainer, path: Path) -> int:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = state_for_checkpoint(trainer, 0)
    ckpt.load(path, state)
    for (j, part), optimizer in zip(trainer.parts, trainer.optimizers):
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(part, optimizer, state["optim"][f"stage{j}"])
    return int(state["progress"]["step"])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def run(config: RunConfig) -> list[dict]:
    plan = Plan.load(config.plan_path)
    check_supported(plan)
    device, device_type = init_distributed(plan)
    rank = dist.get_rank()
    torch.manual_seed(config.seed)
    trainer = build(plan, config, device, device_type)
    data = make_source(plan.model.vocab, config.seed, config.data, config.data_dtype)
    coords = trainer.meshes.coords
    data_slice = Slice(coords["dp"], plan.dp, coords["cp"], plan.cp)
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else None

    start = 0
    found = ckpt.find_latest(root) if config.resume else None
    if found is not None:
        start = restore(trainer, found[0])
        if start != found[1]:
            raise InputError("--checkpoint-dir", f"{found[0]} says step {found[1]} but holds step {start}",
                             "point `latest` at a consistent checkpoint")
    metrics = MetricsWriter(config.metrics_out if rank == 0 else None, resume_after=start)
    if rank == 0:
        print(f"meshplan: training {plan.model.name} dp={plan.dp} tp={plan.tp} pp={plan.pp} cp={plan.cp} "
              f"on {dist.get_world_size()} {device_type} ranks, steps {start + 1}..{config.steps}"
              + (f" (resumed from {found[0]})" if found else ""), flush=True)

    flops_per_token = model_flops_per_token(plan)
    tokens_per_step = plan.train.global_batch * plan.train.seq_len
    peak_flops = plan.cluster.gpu.peak_flops(plan.train.precision) if device_type == "cuda" else None
    records = []
    for step in range(start + 1, config.steps + 1):
        if config.fail_at_step == step and rank == config.fail_rank \
                and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            print(f"meshplan: fault injection: rank {rank} exits before step {step}", flush=True)
            os._exit(13)
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        inputs, targets = data_slice.take(data.batch(step, plan.train.global_batch, plan.train.seq_len + 1))
        inputs, targets = inputs.to(device), targets.to(device)
        begin = time.perf_counter()
        loss_sum = train_step(trainer, inputs, targets)
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - begin
        loss = global_mean_loss(trainer, loss_sum)
        record = {"step": step, "loss": loss, "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed}
        if device_type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            record["peak_memory_gib"] = float(peak)
            record["mfu"] = flops_per_token * tokens_per_step / elapsed / (plan.world_size * peak_flops)
        records.append(record)
        metrics.write(record)
        if root is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            ckpt.save(root, step, state_for_checkpoint(trainer, step))
    if root is not None and records and (not config.checkpoint_every or config.steps % config.checkpoint_every):
        ckpt.save(root, config.steps, state_for_checkpoint(trainer, config.steps))
    if rank == 0 and records:
        print(summary_table(plan, metrics.all_records()), flush=True)
    metrics.close()
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
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--metrics-out", default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)
    return RunConfig(plan_path=a.plan, steps=a.steps, seed=a.seed, data=a.data, data_dtype=a.data_dtype, lr=a.lr,
                     weight_decay=a.weight_decay, metrics_out=a.metrics_out, checkpoint_dir=a.checkpoint_dir,
                     checkpoint_every=a.checkpoint_every, resume=not a.no_resume,
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
