"""docs/cli.md is what scripts/gen_cli_docs.py makes from the typer app right now, and the generator covers
every registered command with its options and defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts" / "gen_cli_docs.py")
gen_cli_docs = sys.modules["gen_cli_docs"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_cli_docs)

REGENERATE = "python scripts/gen_cli_docs.py"


def test_generator_lists_every_command_option_and_default():
    from meshplan.cli import app

    text = gen_cli_docs.render()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="meshplan")
    names = [n for n in root.list_commands(ctx) if not root.get_command(ctx, n).hidden]
    assert {"plan", "report", "export"} <= set(names)
    for name in names:
        assert f"\n## meshplan {name}\n" in text, name
        section = text.split(f"\n## meshplan {name}\n")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        for param in root.get_command(ctx, name).params:
            if param.param_type_name == "option" and not param.hidden and param.name != "help":
                long = max(param.opts, key=len)
                assert any(f"{long} " in row or f"{long}`" in row for row in rows), (name, long)
    plan = text.split("\n## meshplan plan\n")[1].split("\n## ")[0]
    assert "| `-b, --global-batch <int>` | `64` | Sequences per optimizer step |" in plan
    assert "| `--no-refine` | `off` |" in plan
    report = text.split("\n## meshplan report\n")[1].split("\n## ")[0]
    assert "meshplan report [OPTIONS]" in report and "| `plan <path>` | required |" in report


def test_committed_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    gen_cli_docs.main(["--out", str(out)])
    committed = (REPO / "docs" / "cli.md").read_text()
    assert out.read_text() == committed, (
        f"docs/cli.md is out of date with the typer app: regenerate it with `{REGENERATE}`")
