"""``meshplan launch``: run a plan as torchrun job(s), or print / write the command and job scripts.

Registered by ``meshplan.cli`` through :func:`register`. Torch-free at import time: torch is imported only
when a job is started here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import typer

from meshplan.errors import InputError, MeshplanError

EMIT_KINDS = ("slurm", "k8s", "sh")


def register(app: typer.Typer) -> None:
    app.command("launch", help="Run a plan as torchrun job(s) (or --dry-run / --emit slurm|k8s|sh).")(launch)
    from meshplan.launcher import data_cli
    data_cli.register(app)
    app.command("export-hf", help="Write a run's DCP checkpoint as a Hugging Face checkpoint (config.json, "
                                  "sharded safetensors, index).")(export_hf)


def export_hf(
    checkpoint: Path = typer.Argument(..., help="a --checkpoint-dir (its latest checkpoint) or one step-* in it"),
    plan: Path = typer.Option(..., "--plan", help="the plan the run trained"),
    out: Path = typer.Option(..., "--out", "-o", help="the Hugging Face model directory to write"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="the Hugging Face directory the run "
                                             "started from: its config.json and tokenizer files are carried over"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    try:
        _export_hf(checkpoint, plan, out, dtype, overwrite, init_from)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)


def _export_hf(checkpoint: Path, plan_path: Path, out: Path, dtype: str, overwrite: bool,
               init_from: Path | None = None) -> None:
    from meshplan.launcher.runtime import hf_format
    from meshplan.launcher.runtime.checkpoint import find_latest, validate
    from meshplan.plan import Plan

    if dtype not in ("float32", "bfloat16"):
        raise InputError("--dtype", f"unknown dtype {dtype!r}", "use float32 or bfloat16")
    plan = Plan.load(plan_path)
    hf_format.hf_family_for(plan.model)
    hf_format.prepare_output(out, overwrite, "--out")
    if init_from is not None:
        started = hf_format.read_config(init_from, "--init-from", plan.train.seq_len)[2]
        hf_format.check_matches_plan(started, plan.model)
    if (checkpoint / "latest").exists():
        checkpoint = find_latest(checkpoint)[0]
    else:
        validate(checkpoint)
    from meshplan.launcher.runtime.hf_weights import export_hf as write

    write(checkpoint, plan.model, out, dtype, plan.train.seq_len, overwrite=overwrite, base=init_from)
    typer.echo(f"wrote {out} ({plan.model.name}, {dtype}) from {checkpoint}", err=True)


def launch(
    plan: Path = typer.Argument(..., help="plan file written by `meshplan plan --out`"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the torchrun command(s) and environment, run nothing"),
    emit: Optional[str] = typer.Option(None, "--emit", help="write a job script instead: slurm, k8s or sh"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="where --emit writes (default: stdout)"),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", help="torchrun agents (default: the plan's nodes)"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="this node's rank (multi-node)"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="rendezvous host (node 0)"),
    master_port: int = typer.Option(29500, "--master-port", help="rendezvous port"),
    rdzv_id: str = typer.Option("meshplan", "--rdzv-id", help="rendezvous id shared by the nodes of one job"),
    max_restarts: int = typer.Option(0, "--max-restarts", help="torchrun restarts after a failure"),
    steps: int = typer.Option(10, "--steps", help="optimizer steps"),
    seed: int = typer.Option(0, "--seed", help="seeds the weights and the data"),
    data: Optional[str] = typer.Option(None, "--data", help="flat token file (uint16/uint32); default synthetic"),
    data_dtype: Optional[str] = typer.Option(None, "--data-dtype", help="uint16 or uint32"),
    metrics_out: Optional[str] = typer.Option(None, "--metrics-out", help="JSON lines, one per step"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="DCP checkpoints; resumes from it"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="checkpoint every N steps (0: at the end)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate after warm-up (default 1e-3)"),
    warmup: int = typer.Option(0, "--warmup", help="steps of linear learning-rate warm-up"),
    schedule: str = typer.Option("constant", "--schedule", help="after warm-up: constant, linear or cosine decay "
                                 "to --min-lr at the last step"),
    min_lr: float = typer.Option(0.0, "--min-lr", help="the floor of linear / cosine decay"),
    clip: float = typer.Option(0.0, "--clip", help="clip gradients to this global norm (0: off; the norm is "
                               "reported either way)"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="held-out token file: eval_loss in the "
                                            "metrics after every --eval-every steps and after the last"),
    eval_every: int = typer.Option(0, "--eval-every", help="evaluate every N steps (0: only after the last)"),
    eval_batches: int = typer.Option(16, "--eval-batches", help="global batches of --eval-data per evaluation "
                                     "(at most what the file holds)"),
    log_every: int = typer.Option(10, "--log-every", help="print a progress line every N steps"),
    gc_every: int = typer.Option(50, "--gc-every", help="Python's automatic garbage collection off while training; "
                                 "every rank collects after every N steps at once (0: automatic)"),
    tensorboard: Optional[str] = typer.Option(None, "--tensorboard", help="also log the metrics to this "
                                              "TensorBoard directory (pip install 'meshplan[tensorboard]')"),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="start from this Hugging Face model directory "
                                             "(config.json + safetensors; Llama, Mistral, Qwen2/3, Mixtral, "
                                             "Qwen2/3-MoE, GPT-2)"),
    save_hf: Optional[Path] = typer.Option(None, "--save-hf", help="write the final weights as a Hugging Face "
                                           "checkpoint into this directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="let --save-hf replace an existing directory"),
    image: str = typer.Option("meshplan:latest", "--image", help="container image for --emit k8s"),
    replan: bool = typer.Option(False, "--replan", help="re-plan for this machine when the plan does not fit it"),
    check: bool = typer.Option(True, "--check/--no-check", help="build the plan's first and last pipeline rank on "
                               "fake tensors before starting (meshplan check's fast mode, a few seconds)"),
) -> None:
    try:
        training = dict(lr=lr, warmup=warmup, schedule=schedule, min_lr=min_lr, clip=clip,
                        init_from=str(init_from) if init_from else None, save_hf=str(save_hf) if save_hf else None,
                        overwrite=overwrite, eval_data=eval_data, eval_every=eval_every, eval_batches=eval_batches,
                        log_every=log_every, tensorboard=tensorboard, gc_every=gc_every)
        code = _launch(plan, dry_run, emit, out, nnodes, node_rank, master_addr, master_port, rdzv_id, max_restarts,
                       steps, seed, data, data_dtype, metrics_out, checkpoint_dir, checkpoint_every, training, image,
                       replan, check)
    except MeshplanError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code)
    if code:
        raise typer.Exit(code)


def _launch(plan_path, dry_run, emit, out, nnodes, node_rank, master_addr, master_port, rdzv_id, max_restarts,
            steps, seed, data, data_dtype, metrics_out, checkpoint_dir, checkpoint_every, training, image, replan,
            check=True) -> int:
    """``training``: the runtime's ``lr`` (None: its default), ``warmup``, ``schedule``, ``min_lr``, ``clip``,
    ``eval_data``, ``eval_every``, ``eval_batches``, ``log_every``, ``tensorboard``, ``gc_every``, ``init_from``,
    ``save_hf`` and ``overwrite`` (train.RunConfig's fields of those names)."""
    from meshplan.launcher import render
    from meshplan.launcher.checks import check_local, check_supported
    from meshplan.launcher.runtime.checkpoint import find_latest
    from meshplan.plan import Plan

    if emit is not None and emit not in EMIT_KINDS:
        raise InputError("--emit", f"unknown kind {emit!r}", f"choose one of: {', '.join(EMIT_KINDS)}")
    if data_dtype is not None and data_dtype not in ("uint16", "uint32"):
        raise InputError("--data-dtype", f"unknown dtype {data_dtype!r}", "use uint16 or uint32")
    for name, value, low in (("--steps", steps, 1), ("--max-restarts", max_restarts, 0),
                             ("--checkpoint-every", checkpoint_every, 0), ("--master-port", master_port, 1),
                             ("--eval-every", (training or {}).get("eval_every", 0), 0),
                             ("--eval-batches", (training or {}).get("eval_batches", 16), 1),
                             ("--log-every", (training or {}).get("log_every", 10), 1),
                             ("--gc-every", (training or {}).get("gc_every", 50), 0)):
        if value < low:
            raise InputError(name, f"must be >= {low}, got {value}", f"give an integer >= {low}")
    training = {"lr": None, "warmup": 0, "schedule": "constant", "min_lr": 0.0, "clip": 0.0, "init_from": None,
                "save_hf": None, "overwrite": False, "eval_data": None, "eval_every": 0, "eval_batches": 16,
                "log_every": 10, "tensorboard": None, "gc_every": 50, **(training or {})}
    _check_training(training, steps)
    plan = Plan.load(plan_path)
    check_supported(plan)
    nnodes = nnodes if nnodes is not None else plan.cluster.nodes
    nproc = render.nproc_per_node(plan, nnodes)
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise InputError("--node-rank", f"{node_rank} is not in 0..{nnodes - 1}", "give this node's rank")
    args = render.train_args(steps=steps, seed=seed, data=data, data_dtype=data_dtype, metrics_out=metrics_out,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, **training)
    cfg = render.LaunchConfig(plan_path=str(plan_path), nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                              master_port=master_port, rdzv_id=rdzv_id, max_restarts=max_restarts, train_args=args)
    if emit is not None:
        if emit == "slurm":
            text = render.render_slurm(plan, cfg)
        elif emit == "sh":
            text = render.render_sh(plan, cfg)
        else:
            text = render.render_k8s(plan, cfg, Path(plan_path).read_text(), image)
        if out is None:
            typer.echo(text, nl=False)
        else:
            out.write_text(text)
            if emit != "k8s":
                out.chmod(0o755)
            typer.echo(f"wrote {out}", err=True)
        return 0
    if dry_run:
        typer.echo(render.dry_run_text(plan, cfg), nl=False)
        return 0

    try:
        check_local(plan, nproc)
    except InputError:
        if not replan:
            raise
        plan_path = _replan(plan, Path(plan_path))
        plan = Plan.load(plan_path)
        nproc = render.nproc_per_node(plan, nnodes)
        cfg = render.LaunchConfig(**{**cfg.__dict__, "plan_path": str(plan_path)})
    _check_token_files(plan, data, data_dtype, training)
    if checkpoint_dir is not None:
        find_latest(Path(checkpoint_dir))  # a missing or corrupt checkpoint stops here, before any rank starts
    _check_weights_io(plan, training)
    if nnodes > 1 and node_rank is None and master_addr in ("127.0.0.1", "localhost"):
        typer.echo("note: multi-node rendezvous on 127.0.0.1: every agent must run on this machine "
                   "(pass --master-addr for real nodes)", err=True)
    if check and (node_rank is None or node_rank == 0):
        from meshplan.launcher.check import check_builds

        check_builds(plan)     # the runtime's build of the first and last pipeline rank, on fake tensors
    env = {**os.environ, **render.environment(plan, nproc)}
    argv = render.torchrun_argv(plan, cfg)
    typer.echo("meshplan: " + " ".join(argv), err=True)
    return subprocess.run(argv, env=env).returncode


def _check_training(training: dict, steps: int) -> None:
    """The learning-rate schedule and clipping options, one line each (launcher/runtime/schedule.py)."""
    from meshplan.launcher.runtime.schedule import LRSchedule

    lr = training["lr"] if training["lr"] is not None else LRSchedule.base_lr
    LRSchedule(base_lr=lr, total_steps=steps, warmup_steps=training["warmup"], decay=training["schedule"],
               min_lr=training["min_lr"]).validate()
    if not training["clip"] >= 0:
        raise InputError("--clip", f"must be >= 0, got {training['clip']:g}", "give a global norm, or 0 for no clipping")


def _check_token_files(plan, data: str | None, data_dtype: str | None, training: dict) -> None:
    """--data holds one sequence, --eval-data one global batch, both in the model's vocabulary;
    --tensorboard has its package."""
    from meshplan.launcher.checks import check_token_file, token_file_dtype

    sequence, vocab = plan.train.seq_len + 1, plan.model.vocab
    if data is not None:
        check_token_file(data, token_file_dtype(data_dtype, vocab, data), vocab, sequence, "--data")
    if training["eval_data"] is not None:
        check_token_file(training["eval_data"], token_file_dtype(data_dtype, vocab, training["eval_data"]), vocab,
                         plan.train.global_batch * sequence, "--eval-data")
    if training["tensorboard"]:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("--tensorboard", "needs the tensorboard package", "pip install 'meshplan[tensorboard]'")


def _check_weights_io(plan, training: dict) -> None:
    """``--init-from`` (the architecture, the plan's model, every shard and shape) and ``--save-hf`` (an
    architecture that holds the model, an output that does not exist) before any rank starts."""
    from meshplan.launcher.runtime import hf_format

    if training["init_from"]:
        hf_format.check_checkpoint(Path(training["init_from"]), plan.model, plan.train.seq_len)
    if training["save_hf"]:
        hf_format.hf_family_for(plan.model)
        hf_format.prepare_output(Path(training["save_hf"]), training["overwrite"])


def _replan(plan, plan_path: Path) -> Path:
    """Re-plan the same model and batch for this machine (asked for with --replan), from this machine's
    measurement as ``meshplan plan --cluster localhost:N`` takes it (cached quick profile; the documented
    defaults with MESHPLAN_NO_PROFILE=1), in a precision this machine's ranks compute in (the plan's where
    they can: CPU ranks compute in fp32, GPU ranks in bf16 or fp32)."""
    import dataclasses

    import torch

    from meshplan.launcher.checks import RUNTIME_PRECISIONS
    from meshplan.plan_cli import measure_this_machine
    from meshplan.planner.search import search
    from meshplan.spec import _as_bool, load_cluster

    kind = "gpu" if torch.cuda.is_available() else "cpu"
    ranks = torch.cuda.device_count() if kind == "gpu" else plan.world_size
    cluster = load_cluster(f"localhost:{ranks}")
    train, changed = plan.train, ""
    if train.precision not in RUNTIME_PRECISIONS[kind]:
        train = dataclasses.replace(train, precision=RUNTIME_PRECISIONS[kind][0])
        changed = f" in {train.precision} ({kind.upper()} ranks do not compute in {plan.train.precision})"
    if not _as_bool(os.environ.get("MESHPLAN_NO_PROFILE", "false"), "MESHPLAN_NO_PROFILE"):
        cluster = measure_this_machine(cluster, plan.model, train)
    new = search(plan.model, cluster, train, {}, top=1).plans[0]
    target = plan_path.with_name(plan_path.stem + ".replanned.yaml")
    new.save(target)
    typer.echo(f"meshplan: re-planned for localhost:{ranks}{changed} -> {target}", err=True)
    return target
