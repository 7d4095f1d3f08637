"""Write the table of what each engine runs into docs/engines.md, from meshplan/engines.py.

    python scripts/gen_engine_docs.py            # rewrite the table between the markers in docs/engines.md
    python scripts/gen_engine_docs.py --out -    # print the table

The table lists, for each engine profile, the plan field values it runs and how it behaves where engines
differ. tests/test_engine_docs.py fails while the committed page is out of date.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "engines.md"
BEGIN = "<!-- engines table: scripts/gen_engine_docs.py -->"
END = "<!-- end of engines table -->"


def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value).replace("_", " ")


def field_meanings(doc: str) -> dict[str, str]:
    """``name: text`` entries of a docstring's field lists (continuation lines indented deeper), joined."""
    meanings: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            meanings[current] = match.group(2).strip()
        elif current and line.startswith(" " * 12):
            meanings[current] += " " + line.strip()
        else:
            current = None
    return meanings


def render() -> str:
    """The Markdown table: one row per Engine field (its meaning from the Engine docstring), one column per
    engine."""
    import dataclasses

    from meshplan.engines import ENGINES, Engine

    engines = list(ENGINES.values())
    meanings = field_meanings(Engine.__doc__ or "")
    rows = ["| field | " + " | ".join(e.title for e in engines) + " | meaning |",
            "|---|" + "---|" * (len(engines) + 1)]
    for field in dataclasses.fields(Engine):
        if field.name in ("name", "title"):
            continue
        cells = " | ".join(_value(getattr(e, field.name)) for e in engines)
        rows.append(f"| `{field.name}` | {cells} | {meanings.get(field.name, '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def rewrite(text: str) -> str:
    """``text`` with the table between the markers replaced by :func:`render`'s."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the page to rewrite, or - to print the table")
    args = parser.parse_args(argv)
    if args.out == "-":
        sys.stdout.write(render())
        return 0
    page = Path(args.out)
    page.write_text(rewrite(page.read_text()))
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
