"""Docs are a reference (the design's rule of that name): docs/, the README and the code's comments say what
the code does, in the present tense. How a figure was reached belongs in commit messages and issue notes.

These tests fail on the marks of a lab notebook -- numbered sessions, validation and profile run ids, paths of
one machine's scratch folders -- in docs/*.md, README.md and every .py file (comments and docstrings included)
under meshplan/, planner/, profiler/, launcher/, scripts/ and benchmarks/; on a docs/profiler.md that grows past
a reference's length; and on a docs/results.md that is not what scripts/gen_results.py builds from the committed
JSON under benchmarks/results/.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("meshplan", "planner", "profiler", "launcher", "scripts", "benchmarks")

# (what it is, pattern). Validation ids have two or more digits (v27): "v2" is a virtual-stage count. Profile ids
# are "p" and two digits with an optional letter (p23, p25m); percentiles (p50, p90, p95, p99) are not ids.
LOG_MARKS = (
    ("a numbered session", re.compile(r"\bsession[ -]\d+\b", re.IGNORECASE)),
    ("a validation run id", re.compile(r"\bv\d{2,}\b")),
    ("a profile run id", re.compile(r"\bp(?!50\b|90\b|95\b|99\b)\d{2}[a-z]?\b")),
    ("a machine-local path", re.compile(r"(?<![\w.])/(?:work|tmp|home)/")),
)


def covered_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    if readme.exists():
        files.append(readme)
    for name in CODE_DIRS:
        files += sorted(p for p in (ROOT / name).rglob("*.py") if "__pycache__" not in p.parts)
        files += sorted((ROOT / name).rglob("*.sh"))
    files += [p for p in (ROOT / ".ci").glob("*") if p.is_file()]
    return files


def log_marks(text: str) -> list[str]:
    """``line N: <what> 'match': <the line>`` for every mark of a dated experiment log in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in LOG_MARKS:
            for match in pattern.finditer(line):
                found.append(f"line {number}: {what} {match.group(0)!r}: {line.strip()[:160]}")
    return found


@pytest.mark.parametrize("path", covered_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_experiment_log_in_docs_or_code(path: Path):
    found = log_marks(path.read_text(encoding="utf-8", errors="replace"))
    assert not found, (f"{path.relative_to(ROOT)} reads like a lab notebook; say what the code does, and put "
                       "how a figure was reached in the commit message:\n" + "\n".join(found))


def test_the_marks_are_found_and_version_strings_are_not():
    assert log_marks("Session 15's runs") and log_marks("session-9 profile") and log_marks("v27 round 1")
    assert log_marks("profiles p23 and p25m") and log_marks("written to /work/runs/x")
    assert log_marks("kept in /tmp/mp/netns") and log_marks("see /home/me/notes")
    assert not log_marks("interleaved v2, v3 and v4; v = 2 virtual stages; p2p sends; pp4 dp2")
    assert not log_marks("the p50 and p99 latencies; torch 2.11.0+cu130; tests/test_work.py; x/tmp/y")


def test_profiler_doc_is_a_reference_not_a_notebook():
    lines = (ROOT / "docs" / "profiler.md").read_text().splitlines()
    assert len(lines) < 400, f"docs/profiler.md has {len(lines)} lines; measured figures belong in results.md"


def _gen_results():
    spec = importlib.util.spec_from_file_location("gen_results", ROOT / "scripts" / "gen_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_is_what_the_script_builds_from_the_committed_json():
    gen = _gen_results()
    assert (ROOT / "docs" / "results.md").read_text() == gen.render(), (
        "docs/results.md is out of date: run python scripts/gen_results.py")


def test_every_result_names_its_command_date_and_machine():
    gen = _gen_results()
    stems = {stem for stem, _ in gen.SECTIONS}
    on_disk = {p.stem for p in gen.RESULTS.glob("*.json")}
    assert on_disk <= stems and stems - on_disk <= set(gen.NOT_YET), \
        f"benchmarks/results/ and gen_results.SECTIONS differ: {sorted(on_disk ^ stems)}"
    for stem in sorted(on_disk):
        data = json.loads((gen.RESULTS / f"{stem}.json").read_text())
        for key in ("command", "date", "machine"):
            assert str(data.get(key) or "").strip(), f"benchmarks/results/{stem}.json has no {key}"
        assert re.match(r"\d{4}-\d{2}-\d{2}", str(data["date"])), f"{stem}.json: date {data['date']!r}"
