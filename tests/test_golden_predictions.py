"""The planner's predictions for a fixed set of jobs equal the committed golden file, byte for byte.

tests/golden/predictions.json is written by scripts/make_golden_predictions.py: searches and pinned evaluations
over model presets, precisions, schedules, ZeRO stages, vocabulary and context parallelism, on GPU presets, explicit
CPU clusters and measured profiles, plus the report matrix and the fidelity table. A change that moves a
prediction fails here with the first case and field that differ; when the change is meant, rerun the script and
commit the new file with it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_golden_predictions.py"


def _script():
    name = "_make_golden_predictions"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_predictions_equal_the_golden_file_byte_for_byte(fidelity_table):
    golden = _script()
    committed = golden.OUT.read_text()
    regenerated = golden.golden_text(fidelity_table(golden.PUBLIC_RUNS))
    if regenerated != committed:
        where = golden.first_difference(json.loads(committed), json.loads(regenerated))
        raise AssertionError(f"predictions differ from {golden.OUT.name} at {where or 'formatting only'} "
                             f"(python scripts/make_golden_predictions.py rewrites it when the change is meant)")


def test_first_difference_names_the_case_and_field():
    golden = _script()
    old = {"search": {"a": {"plans": [{"predicted": {"iteration_s": 1.0}}]}}}
    new = {"search": {"a": {"plans": [{"predicted": {"iteration_s": 1.5}}]}}}
    assert golden.first_difference(old, new) == "/search/a/plans[0]/predicted/iteration_s: 1.0 before, 1.5 now"
    assert golden.first_difference(old, old) is None
