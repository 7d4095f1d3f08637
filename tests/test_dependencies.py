"""Every package the installed code imports is declared in pyproject.toml.

A module-level import runs whenever the module is imported, so it must be a core dependency (what a plain
``pip install meshplan`` brings). An import inside a function may name an optional extra's package (``report``:
matplotlib; ``gpu``: triton, liger-kernel), because the code that needs it runs only where the extra is installed. A module
that exists only for an extra (the Triton kernel bodies) may import that extra at module level; it is listed
below with its extra. The built wheel is checked end to end in a fresh virtual environment by
``scripts/check_wheel.sh`` (CI).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("meshplan", "planner", "profiler", "launcher", "templates")
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "liger_kernel": "liger-kernel"}
# modules imported only where an extra is installed, with that extra
EXTRA_MODULES = {"launcher/runtime/kernels/triton_kernels.py": "gpu"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    text = (REPO / "pyproject.toml").read_text()
    if tomllib is None:
        import pytest
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads(text)["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs}
              for name, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


def third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(distribution, line, at module level) for each import of a package outside the standard library."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level or node.module is None:
                continue
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            if root in sys.stdlib_module_names or root == "meshplan":
                continue
            found.append((DISTRIBUTION.get(root, root).lower(), node.lineno, id(node) in module_level))
    return found


def package_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py"))


def test_every_import_is_declared():
    core, extras = declared()
    in_extras = set().union(*extras.values())
    problems = []
    for path in package_files():
        rel = path.relative_to(REPO).as_posix()
        extra = EXTRA_MODULES.get(rel)
        for dist, line, top in third_party_imports(path):
            if dist in core:
                continue
            if extra is not None and dist in extras.get(extra, set()):
                continue
            if top:
                problems.append(f"{rel}:{line} imports {dist} at module level but it is not in [project] "
                                f"dependencies")
            elif dist not in in_extras:
                problems.append(f"{rel}:{line} imports {dist}, declared neither as a dependency nor in an extra")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_an_undeclared_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import numpy\nimport os\n\ndef f():\n    import leftpad_unknown\n")
    assert third_party_imports(module) == [("numpy", 1, True), ("leftpad_unknown", 5, False)]
