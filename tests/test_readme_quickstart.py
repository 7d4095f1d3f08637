"""The README's 2-minute quickstart works as written: its bash block's meshplan commands (plan, report,
launch on 4 CPU processes, report with the measured metrics) run in a temporary folder, in order, with an empty
measurement cache, and leave what the README says they leave: the first plan measures this machine, a second
plan reads the cached measurement. The pip line is checked, not run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")
pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


def quickstart_block() -> list[str]:
    """The lines of the first bash block under the README's "2-minute quickstart" heading."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## 2-minute quickstart\n", 1)
    assert len(section) == 2, "README.md has no '## 2-minute quickstart' section"
    block = re.search(r"```bash\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert block, "the quickstart section has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_block_installs_cpu_torch_first():
    pip = [line for line in quickstart_block() if line.startswith("pip ")]
    assert len(pip) == 1 and pip[0].index("pip install torch==2.13.0") < pip[0].index('pip install ".[report]"')


def predicted_block(plan_file: Path) -> str:
    """The plan file's `predicted:` section, up to the next top-level key (search timing differs run to run)."""
    return re.search(r"^predicted:\n(?:[ -].*\n)*", plan_file.read_text(), re.MULTILINE).group(0)


@pytest.mark.slow
def test_quickstart_commands_run(tmp_path):
    commands = [line for line in quickstart_block() if line.startswith("meshplan ")]
    assert [c.split()[1] for c in commands] == ["plan", "report", "launch", "report"]
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
           "MESHPLAN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MESHPLAN_NO_PROFILE", None)   # the suite's default; the quickstart measures this machine

    def run(command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README quickstart: `{command}` failed:\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr and "Warning:" not in done.stderr, done.stderr
        return done

    first = run(commands[0])
    assert "measuring this machine once for localhost:4" in first.stderr, first.stderr
    assert len(list((tmp_path / "cache").glob("localhost-*.yaml"))) == 1
    for command in commands[1:]:
        run(command)
    again = run(commands[0].replace("--out quickstart.yaml", "--out again.yaml"))
    assert "using this machine's measurement cached" in again.stderr and "measuring" not in again.stderr
    assert predicted_block(tmp_path / "again.yaml") == predicted_block(tmp_path / "quickstart.yaml")

    assert "localhost:4" in (tmp_path / "quickstart.yaml").read_text()
    # MFU against a peak this machine reaches (a profiled CPU's is at least its fastest measured GEMM)
    predicted = yaml.safe_load((tmp_path / "quickstart.yaml").read_text())["predicted"]
    assert 0 < predicted["mfu"] <= 1.0, predicted
    steps = [json.loads(line) for line in (tmp_path / "quickstart.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 11)) and all(s["loss"] > 0 for s in steps)
    report = (tmp_path / "quickstart" / "README.md").read_text()
    assert "# meshplan report: tiny-llama on localhost:4" in report
    assert "## Measured next to predicted" in report
    for picture in ("memory.png", "time.png", "schedule.png", "stages.png", "measured.png"):
        assert (tmp_path / "quickstart" / picture).stat().st_size > 0, picture
    assert (tmp_path / "quickstart" / "report.html").is_file()
