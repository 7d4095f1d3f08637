"""``meshplan launch`` without running a job: --dry-run and --emit text, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

import pytest
import yaml

from meshplan.plan import Plan
from meshplan.spec import load_cluster
from runtime_helpers import TINY_LLAMA, job_env, make_plan, run_launch


@pytest.fixture()
def plan_path(tmp_path):
    path = tmp_path / "dp2-tp2.yaml"
    make_plan(dp=2, tp=2).save(path)
    return path


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dry_run_single_node(plan_path, tmp_path):
    out = _ok(run_launch([str(plan_path), "--dry-run", "--steps", "7", "--metrics-out", "m.jsonl",
                          "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--max-restarts", "3"], tmp_path))
    command = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(command) == 1
    words = shlex.split(command[0])
    assert words[:2] == ["PYTHONUNBUFFERED=1", "OMP_NUM_THREADS=1"]
    assert words[3:5] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=1", "--nproc-per-node=4", "--standalone", "--max-restarts=3",
                 "meshplan.launcher.runtime.train"):
        assert flag in words
    tail = words[words.index("--plan"):]
    assert tail == ["--plan", str(plan_path), "--steps", "7", "--seed", "0", "--metrics-out", "m.jsonl",
                    "--checkpoint-dir", "ck", "--checkpoint-every", "2"]


def test_dry_run_multi_node_lists_every_node(plan_path, tmp_path):
    out = _ok(run_launch([str(plan_path), "--dry-run", "--nnodes", "2", "--master-addr", "host0",
                          "--master-port", "1234"], tmp_path))
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 2
    assert "# node 1 (global ranks 2..3)" in out
    for node, words in enumerate(commands):
        assert "--nproc-per-node=2" in words and "--nnodes=2" in words
        assert "--rdzv-backend=c10d" in words and "--rdzv-endpoint=host0:1234" in words
        assert f"--node-rank={node}" in words and "--standalone" not in words
    only = _ok(run_launch([str(plan_path), "--dry-run", "--nnodes", "2", "--node-rank", "1"], tmp_path))
    assert len([line for line in only.splitlines() if not line.startswith("#")]) == 1 and "--node-rank=1" in only


def test_emit_slurm_passes_bash_n_and_quotes_values(tmp_path):
    odd = tmp_path / "my plan $(rm -rf x) 'q'.yaml"      # every value that reaches a shell is quoted
    make_plan(dp=2, tp=2).save(odd)
    script = tmp_path / "job.sbatch"
    _ok(run_launch([str(odd), "--emit", "slurm", "--nnodes", "2", "--out", str(script), "--data", "a b.bin",
                    "--metrics-out", "run;1.jsonl"], tmp_path))
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert '--rdzv-endpoint="$MASTER_ADDR":"$MASTER_PORT"' in text and '--rdzv-id="$SLURM_JOB_ID"' in text
    srun = next(line for line in text.splitlines() if line.startswith("srun"))
    words = shlex.split(srun)
    assert words[words.index("--plan") + 1] == str(odd.resolve())
    assert words[words.index("--data") + 1] == "a b.bin" and words[words.index("--metrics-out") + 1] == "run;1.jsonl"
    assert "--nproc-per-node=2" in words


def test_emit_sh_runs_through_bash_n(plan_path, tmp_path):
    text = _ok(run_launch([str(plan_path), "--emit", "sh", "--nnodes", "2", "--max-restarts", "1"], tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert 'NODE_RANK="${NODE_RANK:-0}"' in text and "export OMP_NUM_THREADS=1" in text
    assert '--node-rank="$NODE_RANK"' in text and "--max-restarts=1" in text
    single = _ok(run_launch([str(plan_path), "--emit", "sh"], tmp_path))
    assert "--standalone" in single and "--nproc-per-node=4" in single


def test_emit_k8s_is_a_configmap_and_a_pytorchjob(plan_path, tmp_path):
    text = _ok(run_launch([str(plan_path), "--emit", "k8s", "--nnodes", "2", "--image", "reg/img:1"], tmp_path))
    config_map, job = list(yaml.safe_load_all(text))
    assert config_map["kind"] == "ConfigMap"
    carried = Plan.from_dict(yaml.safe_load(config_map["data"]["plan.yaml"]))
    assert carried == Plan.load(plan_path)
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "2"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    container = specs["Worker"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/img:1"
    cmd = container["command"]
    assert "--node-rank=$(RANK)" in cmd and "--master-addr=$(MASTER_ADDR)" in cmd and "--nnodes=2" in cmd
    assert cmd[cmd.index("--plan") + 1] == "/etc/meshplan/plan.yaml"
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]


def _refused(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_world_size_and_bad_options_are_refused(plan_path, tmp_path):
    _refused(run_launch([str(plan_path), "--dry-run", "--nnodes", "3"], tmp_path), "--nnodes", "world size 4")
    _refused(run_launch([str(plan_path), "--emit", "pbs"], tmp_path), "--emit")
    _refused(run_launch([str(plan_path), "--dry-run", "--nnodes", "2", "--node-rank", "2"], tmp_path), "--node-rank")
    _refused(run_launch([str(tmp_path / "nope.yaml"), "--dry-run"], tmp_path), "no such file")


def test_device_kind_mismatch_is_refused(tmp_path):
    gpu_plan = dataclasses.replace(make_plan(dp=2, tp=2, pp=2), cluster=load_cluster("dgx-h100:1"))
    path = tmp_path / "gpu.yaml"
    gpu_plan.save(path)
    _ok(run_launch([str(path), "--dry-run"], tmp_path))   # printing a GPU job is fine anywhere
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        _refused(run_launch([str(path), "--steps", "1"], tmp_path), "plan.cluster.gpu.kind", "--replan")


@pytest.mark.slow
def test_replan_runs_a_gpu_plan_on_this_machine(tmp_path):
    """launch --replan of a bf16 plan for 4 GPUs on a machine without one: re-planned for localhost:4 in
    fp32 (what CPU ranks compute in), saved beside the plan, and trained."""
    import torch

    if torch.cuda.is_available():   # pragma: no cover
        pytest.skip("this machine has a GPU: the plan launches as it is")
    cluster = tmp_path / "gpus.yaml"
    cluster.write_text("name: four\nnodes: 1\ngpus_per_node: 4\ngpu: {name: g, memory_gib: 80, peak_tflops: 900, "
                       "memory_bandwidth_gbps: 3000}\nintra_node: {bandwidth_gbps: 400, latency_us: 5}\n")
    gpu_plan = dataclasses.replace(make_plan(dp=4), cluster=load_cluster(str(cluster)),
                                   train=dataclasses.replace(make_plan().train, precision="bf16"))
    path = tmp_path / "gpu.yaml"
    gpu_plan.save(path)
    env = {**job_env(), "MESHPLAN_NO_PROFILE": "1"}
    proc = run_launch([str(path), "--steps", "2", "--replan"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-planned for localhost:4 in fp32" in proc.stderr
    replanned = Plan.load(tmp_path / "gpu.replanned.yaml")
    assert replanned.train.precision == "fp32" and replanned.world_size == 4
    assert replanned.train.global_batch == gpu_plan.train.global_batch


def test_vocab_split_over_pipeline_is_accepted(tmp_path):
    """vocab_parallel with pp > 1 runs (launcher/runtime/vocab_parallel.py), also when tp does not divide the
    vocabulary: the pp x tp shards may be uneven."""
    for name, plan in {"vp": make_plan(pp=2, vocab_parallel=True),
                       "vp-odd": make_plan(pp=2, tp=2, vocab_parallel=True,
                                           model=dataclasses.replace(TINY_LLAMA, vocab=TINY_LLAMA.vocab + 1))}.items():
        path = tmp_path / f"{name}.yaml"
        plan.save(path)
        proc = run_launch([str(path), "--dry-run"], tmp_path)
        assert proc.returncode == 0, proc.stderr


def test_launch_module_does_not_import_torch():
    code = "import sys, meshplan.launcher.cli, meshplan.launcher.render, meshplan.launcher.checks; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registered_in_the_meshplan_app():
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from meshplan.launcher.cli import register

    app = typer.Typer()
    register(app)

    @app.command("other")
    def other() -> None:  # a second command so typer keeps sub-command names
        pass

    result = CliRunner().invoke(app, ["launch", "--help"])
    assert result.exit_code == 0 and "--dry-run" in result.output and "--emit" in result.output
