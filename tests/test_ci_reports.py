"""scripts/ci_reports.py: the CI report matrix is generated complete, the check catches what is missing or
malformed, and the committed copy in docs/examples/ is complete."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ci_reports", REPO / "scripts" / "ci_reports.py")
ci_reports = sys.modules["ci_reports"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ci_reports)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ci-reports")
    ci_reports.generate(out)           # the whole matrix: ~10 s, 405B on 16,384 GPUs included
    return out


def test_matrix_reports_are_complete(generated):
    assert ci_reports.check(generated) == []
    names = {e.name for e in ci_reports.MATRIX}
    assert names == {p.name for p in generated.iterdir() if p.is_dir()}
    big = (generated / "llama3-405b_dgx-h100-2048" / "README.md").read_text()
    assert "on 16,384 GPUs" in big and "## Pipeline schedule" in big


def test_check_names_every_problem(generated, tmp_path):
    shutil.copytree(generated, tmp_path / "r")
    entry = tmp_path / "r" / "llama3-8b_dgx-h100-1"
    (entry / "report.html").unlink()
    (entry / "time.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    md = entry / "README.md"
    md.write_text(md.read_text().replace("\n## Memory per GPU\n", "\n## Memory\n"))
    (entry / "schedule.png").rename(entry / "other.png")
    problems = ci_reports.check(tmp_path / "r")
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    assert "report.html: missing or empty" in joined
    assert "schedule.png: missing or empty" in joined
    assert "picture schedule.png does not exist" in joined
    assert "time.png: not a readable image" in joined
    assert "no '## Memory per GPU' section" in joined


def test_check_rejects_a_plan_for_another_job(generated, tmp_path):
    shutil.copytree(generated, tmp_path / "r")
    a, b = tmp_path / "r" / "llama3-8b_dgx-h100-1", tmp_path / "r" / "llama3-70b_dgx-h100-32"
    shutil.copy(b / "plan.yaml", a / "plan.yaml")
    (problem,) = ci_reports.check(tmp_path / "r")
    assert "llama3-8b_dgx-h100-1/plan.yaml: made for ('llama3-70b'" in problem


def test_committed_examples_are_complete():
    problems = ci_reports.check(REPO / "docs" / "examples")
    assert problems == [], ("docs/examples is incomplete; regenerate it with "
                            "`python scripts/ci_reports.py --out docs/examples`:\n" + "\n".join(problems))
