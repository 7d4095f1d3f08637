"""The GitHub Actions template (templates/github-meshplan-plan.yml): valid YAML with the expected trigger,
job and steps, shipped as package data, and its ``run:`` steps work.

How the steps run here: in a temporary git repository with an ``origin`` (a bare repository) holding the base
branch and a checked-out pull-request branch that changes the model and cluster files, each ``run:`` script is
executed in order the way the runner does (``bash --noprofile --norc -eo pipefail``), with the workflow's
``env:`` block and the runner's variables (``GITHUB_BASE_REF``, ``GITHUB_STEP_SUMMARY``, ``RUNNER_TEMP``,
``GITHUB_WORKSPACE``) set to temporary values. ``uses:`` steps (checkout, setup-python, upload-artifact) are
skipped; the checkout is the temporary repository itself. ``MESHPLAN_INSTALL`` is emptied so the install step
uses the meshplan under test instead of pip. The template keeps ``${{ }}`` expressions out of its ``run:``
scripts (checked below), so nothing needs substituting.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "github-meshplan-plan.yml"

BASE_MODEL = {"name": "team-model", "layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 8, "ffn_hidden": 5632,
              "vocab": 32000, "mlp": "swiglu", "norm": "rmsnorm", "position": "rope"}
HEAD_MODEL = {**BASE_MODEL, "layers": 32, "hidden": 4096, "heads": 32, "ffn_hidden": 11008}
BASE_CLUSTER = {"name": "team-cluster", "nodes": 1, "gpus_per_node": 8,
                "gpu": {"name": "H100-SXM5-80GB", "memory_gib": 79.6, "peak_tflops": 989.4,
                        "memory_bandwidth_gbps": 3350},
                "intra_node": {"bandwidth_gbps": 370, "latency_us": 5},
                "inter_node": {"bandwidth_gbps": 47, "latency_us": 10}}
HEAD_CLUSTER = {**BASE_CLUSTER, "nodes": 2}


def _workflow() -> dict:
    return yaml.safe_load((REPO / "templates" / TEMPLATE).read_text())


def _steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def test_workflow_is_valid_with_trigger_job_and_steps():
    wf = _workflow()
    on = wf.get("on", wf.get(True))            # YAML 1.1 reads a bare `on` key as True
    paths = on["pull_request"]["paths"]
    env = wf["env"]
    assert {"MESHPLAN_MODEL", "MESHPLAN_CLUSTER", "MESHPLAN_GLOBAL_BATCH", "MESHPLAN_SEQ_LEN",
            "MESHPLAN_EXTRA_FLAGS", "MESHPLAN_INSTALL", "MESHPLAN_OUT"} <= set(env)
    assert env["MESHPLAN_MODEL"] in paths and env["MESHPLAN_CLUSTER"] in paths, "paths filter misses the inputs"
    assert wf["permissions"] == {"contents": "read"}

    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    steps = job["steps"]
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    upload = steps[-1]
    assert upload["if"] == "always()" and upload["with"]["path"] == "${{ env.MESHPLAN_OUT }}"

    runs = [s["run"] for s in steps if "run" in s]
    assert all("${{" not in r for r in runs), "run: scripts must read env vars, not ${{ }} expressions"
    script = "\n".join(runs)
    for needed in ("download.pytorch.org/whl/cpu", "meshplan plan", "git worktree add", "--compare",
                   "GITHUB_STEP_SUMMARY", "GITHUB_BASE_REF"):
        assert needed in script or needed in str(env), needed
    for r in runs:
        assert subprocess.run(["bash", "-n"], input=r, text=True).returncode == 0


def test_template_ships_as_package_data():
    packaged = importlib.resources.files("meshplan.templates").joinpath(TEMPLATE)
    assert packaged.read_text() == (REPO / "templates" / TEMPLATE).read_text()
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(TEMPLATE, p) for p in patterns["meshplan.templates"])
    # the copy command the template's header and docs give
    code = ("import importlib.resources as r; "
            f"print(r.files('meshplan.templates').joinpath('{TEMPLATE}').read_text(), end='')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == packaged.read_text()


def test_install_step_takes_cpu_torch_before_meshplan(tmp_path):
    """The install step with a recording stand-in for ``python``: CPU torch from the PyTorch index first, so
    pip never resolves meshplan's ``torch>=2.6`` to a CUDA build; then the package; nothing when emptied."""
    wf = _workflow()
    (install,) = [s["run"] for s in _steps(wf) if "pip install" in s.get("run", "")]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    (fake / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()}, "CALLS": str(calls),
           "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", install], env=env, check=True)
    assert calls.read_text().splitlines() == [
        "-m pip install --index-url https://download.pytorch.org/whl/cpu torch>=2.6",
        "-m pip install meshplan[report]"]
    calls.unlink()
    subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", install],
                   env={**env, "MESHPLAN_INSTALL": ""}, check=True, capture_output=True)
    assert not calls.exists()


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def _write(root: Path, model: dict | None, cluster: dict | None) -> None:
    (root / "configs").mkdir(exist_ok=True)
    for name, data in (("model.yaml", model), ("cluster.yaml", cluster)):
        if data is not None:
            (root / "configs" / name).write_text(yaml.safe_dump(data, sort_keys=False))


def _pull_request(tmp: Path, base: tuple[dict | None, dict | None], head: tuple[dict, dict]) -> Path:
    """origin (bare) with branch main = ``base``; a clone checked out on branch pr = ``head``."""
    origin, work = tmp / "origin.git", tmp / "work"
    _git(tmp, "init", "-q", "--bare", "-b", "main", str(origin))
    _git(tmp, "clone", "-q", f"file://{origin}", str(work))
    _git(work, "checkout", "-q", "-b", "main")
    (work / "README.md").write_text("a team's training repo\n")
    _write(work, *base)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "base")
    _git(work, "push", "-q", "origin", "main")
    _git(work, "checkout", "-q", "-b", "pr")
    _write(work, *head)
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "bigger model, two nodes")
    return work


def _run_steps(work: Path, tmp: Path, failing_step: str | None = None) -> tuple[str, Path]:
    """Run the workflow's run: steps in order, as the runner would, until one fails (which must be
    ``failing_step``, if given); returns (job summary, report folder)."""
    wf = _workflow()
    summary = tmp / "step_summary.md"
    runner_temp = tmp / "runner_temp"
    runner_temp.mkdir()
    bindir = str(Path(sys.executable).parent)     # the meshplan console script under test
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()},
           "MESHPLAN_INSTALL": "", "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request", "GITHUB_BASE_REF": "main",
           "GITHUB_HEAD_REF": "pr", "GITHUB_WORKSPACE": str(work), "GITHUB_STEP_SUMMARY": str(summary),
           "RUNNER_TEMP": str(runner_temp)}
    for i, step in enumerate(_steps(wf)):
        if "run" not in step:
            continue
        script = runner_temp / f"step{i}.sh"
        script.write_text(step["run"])
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode and step.get("name") == failing_step:
            break
        assert done.returncode == 0, f"step {step.get('name')!r} failed:\n{done.stdout}\n{done.stderr}"
    else:
        assert failing_step is None, f"step {failing_step!r} did not fail"
    return summary.read_text(), work / wf["env"]["MESHPLAN_OUT"]


def test_workflow_steps_compare_head_with_base(tmp_path):
    work = _pull_request(tmp_path, (BASE_MODEL, BASE_CLUSTER), (HEAD_MODEL, HEAD_CLUSTER))
    summary, out = _run_steps(work, tmp_path)

    assert summary.startswith("# meshplan report: team-model on team-cluster")
    assert "**Plan (`head.yaml`):**" in summary and "## What changed since `base.yaml`" in summary
    assert "layers 16 -> 32" in summary and "hidden 2048 -> 4096" in summary
    changed = summary.split("## What changed")[1].split("\n## ")[0]
    assert "| predicted | old | new | change |" in changed
    assert "tokens/s" in changed and "%" in changed
    assert "## Inputs" in summary and "## Memory per GPU" in summary
    assert "![" not in summary and "`meshplan-report` artifact" in summary
    for name in ("head.yaml", "base.yaml", "README.md", "report.html", "memory.png", "time.png", "schedule.png",
                 "stages.png", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (tmp_path / "runner_temp" / "meshplan-base").exists(), "the base worktree is removed"
    assert "meshplan-base" not in _git(work, "worktree", "list")


def test_workflow_steps_without_base_files_report_without_comparison(tmp_path):
    work = _pull_request(tmp_path, (None, None), (HEAD_MODEL, BASE_CLUSTER))
    summary, out = _run_steps(work, tmp_path)

    assert summary.startswith("> **No comparison:** the base branch `main` gave no plan: error: --model")
    assert "# meshplan report: team-model on team-cluster" in summary
    assert "## What changed" not in summary
    assert (out / "head.yaml").is_file() and not (out / "base.yaml").exists()


def test_workflow_fails_with_the_reason_when_the_pull_request_plan_fails(tmp_path):
    broken = {**HEAD_MODEL, "heads": 0}
    work = _pull_request(tmp_path, (BASE_MODEL, BASE_CLUSTER), (broken, BASE_CLUSTER))
    summary, out = _run_steps(work, tmp_path, failing_step="Plan the pull request")
    assert summary.startswith("## meshplan: this pull request's plan failed")
    assert "error: model 'team-model': heads: must be >= 1" in summary
    assert not (out / "head.yaml").exists()
