"""The import arrows of DESIGN.md ("Layers and the arrows that must never exist"), read from the source.

Every .py file under meshplan/, planner/, profiler/ and launcher/ is parsed with ``ast``; every import counts,
the ones inside functions included (a lazy import is still an arrow). The arrows that must never exist:

* the runtime (launcher/runtime/) importing the planner, the profiler or a command: it executes a Plan;
* the planner importing torch, the launcher, the profiler or a command: pure Python over the nouns;
* the nouns (meshplan/*.py but the command modules) importing the planner, the profiler, the launcher, a
  command or torch: everything imports them, so they import nothing above them and nothing heavy.

A rule more than one layer needs has one source (docs/architecture.md); the last tests check that its table
or formula is written down once.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"meshplan": "meshplan", "planner": "meshplan.planner", "profiler": "meshplan.profiler",
            "launcher": "meshplan.launcher"}

# Modules of meshplan/ that are commands, not nouns: they compose the layers, as only commands may.
COMMANDS = (
    "meshplan.cli",            # the typer app; registers every stage's commands
    "meshplan.plan_cli",       # meshplan plan (the planner, the quick profile of localhost:N)
    "meshplan.report_cli",     # meshplan report and meshplan export
    "meshplan.validate",       # meshplan validate: plan -> launch -> compare -> calibrate
    "meshplan.validate_cli",   # its typer command
    "meshplan.report",         # meshplan report (a package): draws the schedule the planner prices
)
# meshplan/export.py reads a Plan and nothing above the nouns, so it is held to the nouns' rule; a module that
# starts to compose layers moves to COMMANDS.

PLANNER, PROFILER, LAUNCHER = "meshplan.planner", "meshplan.profiler", "meshplan.launcher"

# (which modules, what they must never import, why)
RULES = (
    ("meshplan.launcher.runtime", (PLANNER, PROFILER, *COMMANDS), "the runtime executes a Plan"),
    (PLANNER, ("torch", LAUNCHER, PROFILER, *COMMANDS), "the planner is pure Python over the nouns"),
    ("nouns", (PLANNER, PROFILER, LAUNCHER, *COMMANDS, "torch"), "the nouns import nothing above them"),
    (PROFILER, COMMANDS, "the profiler measures; commands compose it with the other stages"),
)


def module_name(rel: Path) -> str:
    """``planner/memory.py`` -> ``meshplan.planner.memory``; a package's ``__init__.py`` is the package."""
    parts = list(rel.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_command(module: str) -> bool:
    return any(module == command or module.startswith(command + ".") for command in COMMANDS)


def is_noun(module: str) -> bool:
    return module.startswith("meshplan") and not module.startswith((PLANNER, PROFILER, LAUNCHER)) \
        and not is_command(module)


def in_layer(module: str, layer: str) -> bool:
    if layer == "nouns":
        return is_noun(module)
    return module == layer or module.startswith(layer + ".")


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``; ``from a import b`` names both ``a`` and ``a.b`` (``b`` may
    be a submodule), relative imports resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(rel: Path, source: str) -> list[str]:
    """``file:line: module imports target (why)`` for every forbidden arrow out of the file at ``rel``."""
    module = module_name(rel)
    tree = ast.parse(source, filename=str(rel))
    out = []
    for layer, forbidden, why in RULES:
        if not in_layer(module, layer):
            continue
        flagged = set()
        for line, target in imported(tree, module, rel.name == "__init__.py"):
            if line not in flagged and any(target == bad or target.startswith(bad + ".") for bad in forbidden):
                flagged.add(line)      # one line per import statement: the module it names
                out.append(f"{rel.as_posix()}:{line}: {module} imports {target} ({why})")
    return sorted(out)


def source_files() -> list[Path]:
    files = []
    for folder in PACKAGES:
        files += sorted(p.relative_to(ROOT) for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def test_no_forbidden_arrows():
    found = [v for rel in source_files() for v in violations(rel, (ROOT / rel).read_text())]
    assert not found, "imports DESIGN.md forbids:\n" + "\n".join(found)


def test_every_rule_sees_its_layer():
    modules = [module_name(rel) for rel in source_files()]
    for layer, _, _ in RULES:
        assert any(in_layer(m, layer) for m in modules), f"no module is in {layer}: the rule checks nothing"
    for command in COMMANDS:
        assert command in modules, f"{command} is listed as a command but does not exist"


def test_checker_flags_synthetic_bad_imports():
    runtime = Path("launcher/runtime/example.py")
    lazy = "import math\n\ndef f():\n    from meshplan.planner.memory import loss_chunk_tokens\n"
    assert violations(runtime, lazy) == [
        "launcher/runtime/example.py:4: meshplan.launcher.runtime.example imports meshplan.planner.memory "
        "(the runtime executes a Plan)"]
    assert violations(runtime, "from meshplan import profiler\n")                 # a package named as a name
    assert violations(runtime, "from ...planner import memory\n")                 # relative, three levels up
    assert violations(Path("launcher/runtime/kernels/__init__.py"), "from ....planner import flops\n")
    assert violations(Path("planner/block.py"), "import torch.nn as nn\n")
    assert violations(Path("planner/block.py"), "from meshplan.launcher.runtime import model\n")
    assert violations(Path("meshplan/spec.py"), "def f():\n    import meshplan.planner.search\n")
    assert violations(Path("meshplan/spec.py"), "from meshplan import validate\n")
    # what is allowed stays allowed
    assert not violations(runtime, "from meshplan.rules import loss_chunk_tokens\nfrom meshplan import flops\n")
    assert not violations(Path("planner/memory.py"), "from meshplan.rules import ACT_BYTES\nimport math\n")
    assert not violations(Path("meshplan/plan_cli.py"), "from meshplan.planner.search import search\n")
    assert not violations(Path("profiler/worker.py"), "import torch\nfrom meshplan.planner import compute\n")


# ------------------------------------------------------------------------------------------------
# One source per shared rule
# ------------------------------------------------------------------------------------------------

def _trees():
    for rel in source_files():
        yield rel, ast.parse((ROOT / rel).read_text(), filename=str(rel))


def test_shared_rules_are_written_once():
    """The loss chunk rule, the byte sizes per dtype and the FLOPs formula are defined in one module each, and
    the recompute modes are spelled out as a tuple only in meshplan/plan.py."""
    homes = {"loss_chunk_tokens": "meshplan/rules.py", "ACT_BYTES": "meshplan/rules.py",
             "ELEMENT_BYTES": "meshplan/rules.py", "MIN_LOSS_CHUNK_TOKENS": "meshplan/rules.py",
             "layer_matmul_flops_per_token": "meshplan/flops.py", "attention_core_flops_per_token": "meshplan/flops.py",
             "params_per_layer": "meshplan/flops.py", "total_params": "meshplan/flops.py"}
    modes = ("none", "selective", "full")
    found: dict[str, list[str]] = {name: [] for name in homes}
    mode_tuples = []
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in homes:
                found[node.name].append(rel.as_posix())
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id in homes:
                        found[target.id].append(rel.as_posix())
            elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts) \
                    and tuple(e.value for e in node.elts) == modes:
                mode_tuples.append(f"{rel.as_posix()}:{node.lineno}")
    for name, home in homes.items():
        assert found[name] == [home], f"{name} is defined in {found[name]}, its one home is {home}"
    assert [m.split(":")[0] for m in mode_tuples] == ["meshplan/plan.py"], \
        f"recompute modes spelled out in {mode_tuples}; import meshplan.plan.RECOMPUTE_MODES"


def test_runtime_and_planner_count_the_same():
    """The re-exports the planner and the runtime use are the nouns' own functions."""
    from meshplan import flops, rules
    from meshplan.launcher.runtime.kernels import cross_entropy
    from meshplan.planner import flops as planner_flops
    from meshplan.planner import memory

    assert memory.loss_chunk_tokens is rules.loss_chunk_tokens and memory.ACT_BYTES is rules.ACT_BYTES
    assert planner_flops.model_flops_per_token is flops.model_flops_per_token
    assert cross_entropy.default_chunk_tokens(8192, 1024, 128256) == rules.loss_chunk_tokens(8192, 1024, 128256)
