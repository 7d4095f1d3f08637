"""The planner stays readable: no function in planner/ is longer than one screen, and the planner never imports
torch (DESIGN.md: cost-model terms are small pure functions, ``evaluate`` composes them in one screen)."""

from __future__ import annotations

import ast
from pathlib import Path

PLANNER = Path(__file__).resolve().parents[1] / "planner"
MAX_FUNCTION_LINES = 80


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_planner_function_is_longer_than_80_lines():
    too_long = []
    for path in sorted(PLANNER.glob("*.py")):
        for node in _functions(ast.parse(path.read_text(), str(path))):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(too_long)}"


def test_the_planner_never_imports_torch():
    imports = []
    for path in sorted(PLANNER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            imports += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not imports, f"planner/ imports torch: {', '.join(imports)}"
