"""Helpers for the launcher/runtime tests: tiny plans built directly, torchrun jobs, their metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from meshplan.plan import Plan, StagePlan
from meshplan.spec import MODEL_PRESETS, ModelSpec, TrainSpec, YarnScaling, load_cluster, yarn_attention_factor

# 4 blocks, hidden 64, 8 query heads over 4 key/value heads (GQA that splits over tp=4), seq 32.
TINY_LLAMA = ModelSpec(name="tiny-llama-gqa", layers=4, hidden=64, heads=8, kv_heads=4, ffn_hidden=128, vocab=256)
# 12 query heads over 2 key/value heads: tp=4 holds 3 query heads and a copy of one KV head per rank.
TINY_LLAMA_KV2 = ModelSpec(name="tiny-llama-kv2", layers=4, hidden=96, heads=12, kv_heads=2, ffn_hidden=128,
                           vocab=256)
# 6 query heads over 2 key/value heads: tp=2 holds 3 query heads per local KV head (an odd group).
TINY_LLAMA_GQA3 = ModelSpec(name="tiny-llama-gqa3", layers=4, hidden=48, heads=6, kv_heads=2, ffn_hidden=128,
                            vocab=256)
# TINY_LLAMA's 2-block sibling for the Triton kernels, which run under Triton's interpreter on CPU (slow).
TINY_LLAMA_2L = ModelSpec(name="tiny-llama-gqa-2l", layers=2, hidden=64, heads=8, kv_heads=4, ffn_hidden=128,
                          vocab=256)
# Qwen3-shaped: every query and key head normed (qk_norm), 8 heads of 16 (queries 128 wide on a hidden of 64)
# over 2 key/value heads: tp=2 holds one KV head per rank, tp=4 a copy of one.
TINY_QWEN3 = ModelSpec(name="tiny-qwen3", layers=2, hidden=64, heads=8, kv_heads=2, head_dim=16, qk_norm=True,
                       ffn_hidden=128, vocab=256)
TINY_GPT = MODEL_PRESETS["tiny-gpt"]   # LayerNorm, learned positions, GELU, biases, tied embeddings
# GPT-NeoX-shaped: attention and MLP side by side, the erf GELU, a quarter of each 16-wide head rotated with
# YaRN's frequencies over 4 x an original context of 8 (the sequences are 32 long)
TINY_NEOX = ModelSpec(name="tiny-neox", layers=4, hidden=64, heads=4, ffn_hidden=128, vocab=256, mlp="gelu",
                      gelu="exact", norm="layernorm", position="rope", bias=True, rotary_dim=4,
                      parallel_residual=True, rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=8,
                                                                       attention_factor=yarn_attention_factor(4.0)))
GLOBAL_BATCH, SEQ_LEN, STEPS = 8, 32, 4
# The Triton kernels a plan may run fused (the loss stays the reference: its chunked kernel has its own tests).
TRITON_KERNELS = {"norm": "fused", "swiglu": "fused", "rope": "fused", "loss": "reference"}
# The kernels that exist only as Triton kernels (the chunked loss also computes its chunks in PyTorch).
TRITON_ONLY_KERNELS = ("norm", "swiglu", "rope")
PARITY_RTOL = 1e-4
JOB_TIMEOUT_S = 240


def make_plan(*, dp=1, tp=1, pp=1, cp=1, virtual_stages=1, num_microbatches=None, zero=0, schedule="1f1b",
              cp_kind="ulysses", recompute="none", model: ModelSpec = TINY_LLAMA, bounds=None,
              global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN, **extra) -> Plan:
    """A plan pinned by hand (the planner is not involved): even layer split unless ``bounds`` is given."""
    stages_count = pp * virtual_stages
    if bounds is None:
        bounds = [round(i * model.layers / stages_count) for i in range(stages_count + 1)]
    stages = tuple(StagePlan((bounds[i], bounds[i + 1]), {recompute: bounds[i + 1] - bounds[i]})
                   for i in range(stages_count))
    num_microbatches = num_microbatches or max(1, pp)
    world = dp * tp * pp * cp
    return Plan(dp=dp, tp=tp, pp=pp, cp=cp, micro_batch=global_batch // (dp * num_microbatches),
                num_microbatches=num_microbatches, stages=stages, model=model,
                cluster=load_cluster(f"localhost:{world}"), train=TrainSpec(global_batch, seq_len, precision="fp32"),
                cp_kind=cp_kind, sequence_parallel=tp > 1, schedule=schedule, virtual_stages=virtual_stages,
                zero=zero, **extra)


def free_port() -> int:
    """A port free now, for tests/test_launch_multinode.py, whose two agents must be given their rendezvous
    port (``--master-port``) as users give it; it is released before the agents bind it, so another job could
    take it meanwhile. Other jobs rendezvous without one (a store bound to port 0 here: :func:`rendezvous_store`;
    a file store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_forked(world: int, store_port: int) -> list[str]:
    """The command line up to the job script of a ``world``-rank torchrun job on this machine whose ranks are
    forked from an interpreter that has imported the runtime (tests/torchrun_forked.py); the script's path
    must be absolute. The rendezvous is a c10d store at 127.0.0.1:``store_port`` that another process hosts
    (:func:`rendezvous_store`; ``is_host=false``: the agent only connects to it)."""
    return [sys.executable, str(Path(__file__).with_name("torchrun_forked.py")), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{store_port}", "--rdzv-conf", "is_host=false",
            "--rdzv-id", uuid.uuid4().hex, "--nnodes", "1", "--local-addr", "127.0.0.1",
            "--nproc-per-node", str(world)]


def rendezvous_store():
    """A c10d store on a free port of 127.0.0.1, hosted by this process for one forked job's rendezvous (the
    port is bound here and kept, so no other job can take it between choosing and binding)."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


# No thread of the agent that forks a job's ranks may look a name up: a store's server looks up the address of
# every connection it accepts (getnameinfo, to name the peer in its logs) under glibc's resolver lock, and a rank
# forked while another thread of its parent held that lock inherits it held and hangs at its own first lookup
# (its store client's or gloo's, in init_process_group). So the agent hosts no store: the rendezvous store is
# this process's (rendezvous_store, ``is_host=false``), and the store the ranks bootstrap from is rank 0's
# (TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's agent otherwise serves it to the ranks itself).
FORKED_JOB_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def run_forked_job(world: int, script: str, args: list[str], cwd: Path, env: dict[str, str],
                   timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run tests/``script`` as a ``world``-rank torchrun job (:func:`torchrun_forked`). A job still running
    after ``timeout`` seconds is killed and fails the test with what it printed, which includes every rank's
    stacks: each rank prints them 30 s before the timeout (torchrun_forked.stacks_after_hang)."""
    store = rendezvous_store()        # served until this function returns
    cmd = [*torchrun_forked(world, store.port), str(Path(__file__).resolve().with_name(script)), *args]
    stacks_at = max(1.0, timeout - 30)
    env = {**env, **FORKED_JOB_ENV, "MESHPLAN_JOB_STACKS_AFTER_S": str(stacks_at)}
    # a session of its own: on a timeout the agent and every rank it forked are killed together
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as job:
        try:
            out, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, err = job.communicate()
            raise AssertionError(f"{script} {' '.join(args[:3])}... ran past {timeout:.0f} s; its stderr "
                                 f"(each rank's stacks at {stacks_at:.0f} s):\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def job_env(*plans: Plan, **extra: str) -> dict[str, str]:
    """The environment of a test job's ranks: one thread each, no fault injection left from another test.

    Given the job's ``plans``, Triton's interpreter (the session's ``TRITON_INTERPRET=1``, conftest.py) stays on
    only when one of them runs a kernel that exists only in Triton (:func:`runs_triton_only_kernels`); the
    others run as ``meshplan launch`` runs them on a CPU, where the chunked loss computes its chunks in PyTorch
    (the Triton chunk kernels are tested against it in tests/test_kernels.py and
    tests/test_kernels_vocab_parallel.py, and in the runtime's loss function by tests/test_runtime_loss.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MESHPLAN_FAULT_STEP", None)
    env.pop("MESHPLAN_FAULT_RANK", None)
    if plans and not any(runs_triton_only_kernels(plan) for plan in plans):
        env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


def runs_triton_only_kernels(plan: Plan) -> bool:
    """Whether ``plan`` asks for the fused norm, SwiGLU or rotary kernel, which run only in Triton (``auto``
    counts: it picks them wherever they can run), or for any of liger-kernel's (all Triton)."""
    return any(plan.kernels.get(name) in ("fused", "auto") for name in TRITON_ONLY_KERNELS) or \
        "liger" in plan.kernels.values()


def run_launch(args: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: int = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``meshplan launch ARGS`` through the launcher's own entry point (``python -m meshplan.launcher``)."""
    return subprocess.run([sys.executable, "-m", "meshplan.launcher", *args], cwd=cwd, env=env or job_env(),
                          capture_output=True, text=True, timeout=timeout)


def train(plan: Plan, workdir: Path, name: str, steps: int = STEPS, extra: list[str] | None = None,
          env: dict[str, str] | None = None) -> list[dict]:
    """Save ``plan``, run it with ``meshplan launch`` (torchrun; a 1-rank plan runs in-process without it)
    and return the metrics lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / f"{name}.yaml"
    plan.save(plan_path)
    metrics = workdir / f"{name}.jsonl"
    common = ["--steps", str(steps), "--metrics-out", str(metrics), *(extra or [])]
    if plan.world_size == 1:
        proc = subprocess.run([sys.executable, "-m", "meshplan.launcher.runtime.train", "--plan", str(plan_path),
                               *common], cwd=workdir, env=env or job_env(plan), capture_output=True, text=True,
                              timeout=JOB_TIMEOUT_S)
    else:
        proc = run_launch([str(plan_path), *common], workdir, env or job_env(plan))
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return read_metrics(metrics)


# The launcher's CPU parity matrix: tests/test_runtime_parity.py trains each like one process, tests/test_check.py
# measures its memory like ``meshplan check`` (``layout_run`` in conftest.py: one torchrun job per world size).
PARITY_LAYOUTS = {
    # the Triton norm, SwiGLU and rotary with sequence parallel (on CPU under Triton's interpreter: conftest.py
    # sets TRITON_INTERPRET=1 for the session and the jobs it starts)
    "tp2-fused-kernels": dict(model=TINY_LLAMA_2L, tp=2, kernels=TRITON_KERNELS, global_batch=2, seq_len=16),
    # liger-kernel's rotary and loss (those of its kernels that Triton's interpreter runs) on a whole head
    "dp2-liger-rope-loss": dict(model=TINY_LLAMA_2L, dp=2, kernels={"rope": "liger", "loss": "liger"},
                                global_batch=2, seq_len=16),
    "tp2-pp2-1f1b": dict(tp=2, pp=2, schedule="1f1b"),
    "dp2-cp2-ulysses": dict(dp=2, cp=2, cp_kind="ulysses"),
    "dp2-cp2-ring-selective": dict(dp=2, cp=2, cp_kind="ring", recompute="selective"),
    "cp4-ring": dict(cp=4, cp_kind="ring"),
    "gqa3-tp2-cp2-ring": dict(model=TINY_LLAMA_GQA3, tp=2, cp=2, cp_kind="ring"),
    "kv2-tp4-replicated-kv": dict(model=TINY_LLAMA_KV2, tp=4),
    # per-head q/k norms (weights replicated, gradients summed over the TP ranks; each TP gradient is compared
    # with one process in tests/test_qk_norm.py), heads x head_dim != hidden
    "qk-norm-tp4-replicated-kv": dict(model=TINY_QWEN3, tp=4),
    "dp2-pp2-interleaved-v2": dict(dp=2, pp=2, virtual_stages=2, schedule="interleaved", num_microbatches=2),
    "dp4-zero3": dict(dp=4, zero=3),
    "tp4-vocab-sharded": dict(tp=4),
    "dp2-tp2-pp2-full-recompute-zero1": dict(dp=2, tp=2, pp=2, recompute="full", zero=1),
    "dp2-zero1-accumulate-2": dict(dp=2, zero=1, num_microbatches=2),   # one gradient reduction per step
    # GPT family (LayerNorm, learned positions, GELU, biases), tied embeddings over two uneven GPipe stages
    "gpt-tied-tp2-pp2-gpipe-uneven": dict(model=TINY_GPT, tp=2, pp=2, schedule="gpipe", bounds=[0, 1, 4],
                                          recompute="selective"),
    # the parallel block's norms under sequence parallel, partial YaRN rotary on the ring's zig-zag chunks
    "neox-tp2-cp2-ring": dict(model=TINY_NEOX, tp=2, cp=2, cp_kind="ring"),
}


@dataclass(frozen=True)
class LayoutRun:
    """A plan's phases in a torchrun job (tests/layout_job.py): the real step's memory per rank
    (``memory_run``'s ``rank<R>.json``), the metrics of ``steps`` training steps and, per rank, the tensors
    among the cyclic garbage each step left (``layout_job.garbage_per_step``)."""

    memory: dict[int, dict]
    records: list[dict]
    garbage: dict[int, list[dict]]


def _layout_job(plans: list[Plan], paths: list[Path], steps: int, memory: bool = False) -> None:
    world = plans[0].world_size
    assert all(p.world_size == world for p in plans), [p.world_size for p in plans]
    for plan, path in zip(plans, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
    args = ["--steps", str(steps), *(["--memory"] if memory else []), *map(str, paths)]
    proc = run_forked_job(world, "layout_job.py", args, paths[0].parent, job_env(*plans),
                          timeout=JOB_TIMEOUT_S * len(plans))
    assert proc.returncode == 0, f"{paths} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def run_layouts(plans: dict[str, Plan], workdir: Path, steps: int = STEPS) -> dict[str, LayoutRun]:
    """Measure each plan's memory and train it for ``steps`` steps, all in one torchrun job (the plans share
    a world size; tests/layout_job.py): tests/test_check.py and tests/test_runtime_parity.py read the same job
    through ``layout_run`` in conftest.py instead of starting one per test."""
    paths = [workdir / name / "plan.yaml" for name in plans]
    _layout_job(list(plans.values()), paths, steps, memory=True)
    runs = {}
    for (name, plan), path in zip(plans.items(), paths):
        memory = {r: json.loads((path.parent / f"rank{r}.json").read_text()) for r in range(plan.world_size)}
        garbage = {r: json.loads(path.with_suffix(f".garbage{r}.json").read_text()) for r in range(plan.world_size)}
        runs[name] = LayoutRun(memory, read_metrics(path.with_suffix(".jsonl")), garbage)
    return runs


def train_together(plans: dict[str, Plan], workdir: Path, steps: int = STEPS) -> dict[str, list[dict]]:
    """Train plans of the same world size one after the other in one torchrun job (tests/layout_job.py, the
    runtime's ``train.run`` as ``meshplan launch`` starts it, each from fresh weights): their metrics lines by
    name. One start of the ranks instead of one per plan."""
    paths = [workdir / f"{name}.yaml" for name in plans]
    _layout_job(list(plans.values()), paths, steps)
    return {name: read_metrics(path.with_suffix(".jsonl")) for name, path in zip(plans, paths)}


def trained_by_world(plans: dict[str, Plan], workdir: Path, steps: int = STEPS):
    """``get(name)``: the metrics of ``plans[name]``. On first asking, every plan of that plan's world size is
    checked as ``meshplan launch`` checks it before starting (``check_builds``), then all of them train in one
    torchrun job (:func:`train_together`)."""
    done: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in done:
            from meshplan.launcher.check import check_builds

            world = plans[name].world_size
            group = {n: plan for n, plan in plans.items() if plan.world_size == world}
            for plan in group.values():
                check_builds(plan)
            done.update(train_together(group, workdir / f"world{world}", steps=steps))
        return done[name]

    return get


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


GRAD_NORM_RTOL = 1e-5


def assert_same_grad_norms(name: str, expected: list[dict], measured: list[dict]) -> None:
    """One global gradient norm whatever the layout (launcher/runtime/grad_norm.py): the first step's, from the
    same weights, within GRAD_NORM_RTOL of one process's; the later ones within PARITY_RTOL, the drift the
    losses are allowed (a few 1e-5 of the norm by step 4 at tp 4)."""
    norms = [[r["grad_norm"] for r in run] for run in (expected, measured)]
    assert abs(norms[1][0] - norms[0][0]) <= GRAD_NORM_RTOL * norms[0][0], (name, *norms)
    assert max_relative_difference(*norms) <= PARITY_RTOL, (name, *norms)


def max_relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))
