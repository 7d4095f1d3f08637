"""Turn a Plan into torchrun command lines, an environment and job scripts (torch-free).

Everything that reaches a shell goes through :func:`shlex.quote`; everything that reaches YAML is a JSON
string (a valid YAML scalar). The templates live in ``templates/`` (package ``meshplan.templates``).
"""

from __future__ import annotations

import json
import re
import shlex
import string
import sys
from dataclasses import dataclass, field
from importlib import resources

from meshplan.errors import InputError
from meshplan.plan import Plan

RUNTIME_MODULE = "meshplan.launcher.runtime.train"
DEFAULT_PORT = 29500
K8S_PLAN_PATH = "/etc/meshplan/plan.yaml"


@dataclass(frozen=True)
class LaunchConfig:
    """How to start a plan's job.

    Fields:
        plan_path: the plan file (passed to every rank).
        nnodes: torchrun agents (nodes); the plan's world size is split evenly over them.
        node_rank: this node's rank (``None``: let c10d rendezvous assign it).
        master_addr, master_port: the rendezvous endpoint for multi-node jobs.
        rdzv_id: the rendezvous (job) id.
        max_restarts: torchrun restarts the whole local worker group this many times after a failure.
        train_args: arguments passed through to the runtime (``--steps``, ``--metrics-out``, ...).
        python: the interpreter that runs torchrun.
    """

    plan_path: str
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    rdzv_id: str = "meshplan"
    max_restarts: int = 0
    train_args: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable or "python")


def nproc_per_node(plan: Plan, nnodes: int) -> int:
    if nnodes < 1:
        raise InputError("--nnodes", f"must be >= 1, got {nnodes}", "give the number of nodes")
    if plan.world_size % nnodes:
        raise InputError("--nnodes", f"the plan's world size {plan.world_size} does not split over {nnodes} nodes",
                         f"use a --nnodes that divides {plan.world_size}, or re-plan for this cluster")
    return plan.world_size // nnodes


def environment(plan: Plan, nproc: int) -> dict[str, str]:
    """Environment of every rank: one OpenMP thread per rank on CPU, NCCL error handling on GPU."""
    env = {"PYTHONUNBUFFERED": "1"}
    if plan.cluster.gpu.kind == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    else:
        env["OMP_NUM_THREADS"] = "8"
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def torchrun_argv(plan: Plan, cfg: LaunchConfig, *, plan_path: str | None = None,
                  rendezvous: tuple[str, str] | None = None, node_rank: str | None = None,
                  rdzv_id: str | None = None) -> list[str]:
    """The torchrun command line (as a list; nothing quoted yet). ``rendezvous`` / ``node_rank`` /
    ``rdzv_id`` override the config with shell expressions for the job templates."""
    nproc = nproc_per_node(plan, cfg.nnodes)
    argv = [cfg.python, "-m", "torch.distributed.run", f"--nnodes={cfg.nnodes}", f"--nproc-per-node={nproc}"]
    if cfg.nnodes == 1 and rendezvous is None:
        argv.append("--standalone")
    else:
        host, port = rendezvous or (cfg.master_addr, str(cfg.master_port))
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}", f"--rdzv-id={rdzv_id or cfg.rdzv_id}"]
        rank = node_rank if node_rank is not None else (None if cfg.node_rank is None else str(cfg.node_rank))
        if rank is not None:
            argv.append(f"--node-rank={rank}")
    argv.append(f"--max-restarts={cfg.max_restarts}")
    argv += ["-m", RUNTIME_MODULE, "--plan", plan_path or cfg.plan_path, *cfg.train_args]
    return argv


def _quote_argv(argv: list[str], raw: dict[str, str] | None = None) -> str:
    """Quote each argument for bash; ``raw`` maps placeholders to shell text kept unquoted (``"$VAR"``)."""
    raw = raw or {}
    pattern = re.compile("(" + "|".join(map(re.escape, raw)) + ")") if raw else None

    def quote(arg: str) -> str:
        if pattern is None or not pattern.search(arg):
            return shlex.quote(arg)
        return "".join(raw[p] if p in raw else (shlex.quote(p) if p else "") for p in pattern.split(arg))

    return " ".join(quote(a) for a in argv)


def dry_run_text(plan: Plan, cfg: LaunchConfig) -> str:
    """What ``launch --dry-run`` prints: the environment and the exact torchrun command for each node."""
    nproc = nproc_per_node(plan, cfg.nnodes)
    env = environment(plan, nproc)
    lines = [f"# plan: {cfg.plan_path}  world={plan.world_size} (dp={plan.dp} tp={plan.tp} pp={plan.pp} "
             f"cp={plan.cp})  nodes={cfg.nnodes} x {nproc} {plan.cluster.gpu.kind} processes"]
    ranks = [cfg.node_rank] if cfg.node_rank is not None else list(range(cfg.nnodes))
    for node in ranks:
        argv = torchrun_argv(plan, cfg if cfg.nnodes == 1 else _with_rank(cfg, node))
        if cfg.nnodes > 1:
            lines.append(f"# node {node} (global ranks {node * nproc}..{(node + 1) * nproc - 1})")
        lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + _quote_argv(argv))
    return "\n".join(lines) + "\n"


def _with_rank(cfg: LaunchConfig, node: int) -> LaunchConfig:
    from dataclasses import replace

    return replace(cfg, node_rank=node)


def _portable(cfg: LaunchConfig) -> LaunchConfig:
    """For scripts that run elsewhere: ``python`` from the PATH and the plan by absolute path."""
    from dataclasses import replace
    from pathlib import Path

    return replace(cfg, python="python", plan_path=str(Path(cfg.plan_path).resolve()))


def _template(name: str) -> string.Template:
    return string.Template(resources.files("meshplan.templates").joinpath(name).read_text())


def _job_name(plan: Plan) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"meshplan-{plan.model.name}".lower()).strip("-")
    return name[:50] or "meshplan"


def render_sh(plan: Plan, cfg: LaunchConfig) -> str:
    """A bash script that runs this node's torchrun agent (NODE_RANK / MASTER_ADDR from the environment)."""
    nproc = nproc_per_node(plan, cfg.nnodes)
    env = environment(plan, nproc)
    cfg = _portable(cfg)
    if cfg.nnodes == 1:
        argv = torchrun_argv(plan, cfg)
        command = _quote_argv(argv)
    else:
        argv = torchrun_argv(plan, cfg, rendezvous=("@ADDR@", "@PORT@"), node_rank="@RANK@")
        command = _quote_argv(argv, {"@ADDR@": '"$MASTER_ADDR"', "@PORT@": '"$MASTER_PORT"', "@RANK@": '"$NODE_RANK"'})
    return _template("launch.sh.tmpl").substitute(
        plan_label=_comment(cfg.plan_path), world=plan.world_size, nnodes=cfg.nnodes, nproc=nproc,
        device_kind=plan.cluster.gpu.kind, backend="nccl" if plan.cluster.gpu.kind == "gpu" else "gloo",
        last_node=cfg.nnodes - 1, exports=_exports(env), node_rank=cfg.node_rank or 0,
        master_addr=shlex.quote(cfg.master_addr), master_port=int(cfg.master_port), command=command)


def render_slurm(plan: Plan, cfg: LaunchConfig) -> str:
    """An sbatch script: one torchrun agent per node (srun), c10d rendezvous on the first node."""
    nproc = nproc_per_node(plan, cfg.nnodes)
    env = environment(plan, nproc)
    argv = torchrun_argv(plan, _portable(cfg), rendezvous=("@ADDR@", "@PORT@"), rdzv_id="@JOB@")
    command = _quote_argv(argv, {"@ADDR@": '"$MASTER_ADDR"', "@PORT@": '"$MASTER_PORT"', "@JOB@": '"$SLURM_JOB_ID"'})
    gpu = f"#SBATCH --gpus-per-node={nproc}\n" if plan.cluster.gpu.kind == "gpu" else f"#SBATCH --cpus-per-task={nproc}\n"
    return _template("slurm.sbatch.tmpl").substitute(
        plan_label=_comment(cfg.plan_path), world=plan.world_size, nnodes=cfg.nnodes, nproc=nproc,
        job_name=_job_name(plan), gpu_directive=gpu, exports=_exports(env), master_port=int(cfg.master_port),
        command=command)


def render_k8s(plan: Plan, cfg: LaunchConfig, plan_text: str, image: str) -> str:
    """A ConfigMap holding the plan and a Kubeflow PyTorchJob (one Master pod, nnodes-1 Worker pods)."""
    nproc = nproc_per_node(plan, cfg.nnodes)
    env = environment(plan, nproc)
    name = _job_name(plan)
    argv = ["python", "-m", "torch.distributed.run", f"--nnodes={cfg.nnodes}",
            f"--nproc-per-node={nproc}", "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)", f"--max-restarts={cfg.max_restarts}",
            "-m", RUNTIME_MODULE, "--plan", K8S_PLAN_PATH, *cfg.train_args]
    specs = []
    for role, replicas in (("Master", 1), ("Worker", cfg.nnodes - 1)):
        if replicas == 0:
            continue
        limits = f"\n                limits: {{\"nvidia.com/gpu\": {nproc}}}" if plan.cluster.gpu.kind == "gpu" else ""
        env_items = ", ".join(f"{{name: {json.dumps(k)}, value: {json.dumps(v)}}}" for k, v in env.items())
        specs.append(f"""    {role}:
      replicas: {replicas}
      restartPolicy: OnFailure
      template:
        spec:
          containers:
            - name: pytorch
              image: {json.dumps(image)}
              command: {json.dumps(argv)}
              env: [{env_items}]
              resources:{limits or " {}"}
              volumeMounts: [{{name: plan, mountPath: "/etc/meshplan"}}]
          volumes: [{{name: plan, configMap: {{name: {json.dumps(name + "-plan")}}}}}]""")
    block = "\n".join("    " + line for line in plan_text.rstrip("\n").splitlines())
    return _template("k8s-pytorchjob.yaml.tmpl").substitute(
        plan_label=_comment(cfg.plan_path), world=plan.world_size, nnodes=cfg.nnodes, nproc=nproc,
        job_name=name, plan_block=block, nproc_quoted=json.dumps(str(nproc)), replica_specs="\n".join(specs))


def _exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def _comment(text: str) -> str:
    return " ".join(str(text).split())  # no newline can escape a comment line


def train_args(*, steps: int, seed: int, data: str | None, data_dtype: str | None, metrics_out: str | None,
               checkpoint_dir: str | None, checkpoint_every: int, lr: float | None, warmup: int = 0,
               schedule: str = "constant", min_lr: float = 0.0, clip: float = 0.0,
               resume: bool = True, init_from: str | None = None, save_hf: str | None = None,
               overwrite: bool = False, eval_data: str | None = None, eval_every: int = 0,
               eval_batches: int = 16, log_every: int = 10, tensorboard: str | None = None,
               gc_every: int = 50) -> tuple[str, ...]:
    """The runtime's arguments, in the order ``python -m meshplan.launcher.runtime.train`` documents them."""
    args = ["--steps", str(steps), "--seed", str(seed)]
    if data:
        args += ["--data", str(data)]
    if data_dtype:
        args += ["--data-dtype", data_dtype]
    if metrics_out:
        args += ["--metrics-out", str(metrics_out)]
    if checkpoint_dir:
        args += ["--checkpoint-dir", str(checkpoint_dir)]
        if checkpoint_every:
            args += ["--checkpoint-every", str(checkpoint_every)]
    if lr is not None:
        args += ["--lr", repr(float(lr))]
    if warmup:
        args += ["--warmup", str(warmup)]
    if schedule != "constant":
        args += ["--schedule", schedule, "--min-lr", repr(float(min_lr))]
    if clip:
        args += ["--clip", repr(float(clip))]
    if not resume:
        args.append("--no-resume")
    if eval_data:
        args += ["--eval-data", str(eval_data), "--eval-every", str(eval_every), "--eval-batches", str(eval_batches)]
    if log_every != 10:
        args += ["--log-every", str(log_every)]
    if gc_every != 50:
        args += ["--gc-every", str(gc_every)]
    if tensorboard:
        args += ["--tensorboard", str(tensorboard)]
    if init_from:
        args += ["--init-from", str(init_from)]
    if save_hf:
        args += ["--save-hf", str(save_hf)]
    if overwrite:
        args.append("--overwrite")
    return tuple(args)

