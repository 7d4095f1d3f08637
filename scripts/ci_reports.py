"""Plan and report a small matrix of published-scale jobs, and check that the reports are complete.

    python scripts/ci_reports.py                          # -> build/ci-reports/ (what scripts/test.sh runs)
    python scripts/ci_reports.py --out docs/examples      # the committed copy readers browse on GitHub
    python scripts/ci_reports.py --check docs/examples    # only check an existing folder
    python scripts/ci_reports.py --only llama3-8b_dgx-h100-1 --out build/one-report

Each entry runs the two commands a user types, in-process through the typer app (one interpreter, matplotlib
imported once), inside the entry's folder so the report names its files relatively:

    meshplan plan --model MODEL --cluster CLUSTER --global-batch B --seq-len S --out plan.yaml   (> plan.txt)
    meshplan report plan.yaml --out .

and the folder gets an index README.md. ``check`` lists what is missing or malformed (exit 1 when anything is).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "ci-reports"

# Sections every report has (meshplan/report.py), and the pictures it always draws.
REPORT_SECTIONS = ("## Inputs", "## Chosen plan", "## Alternatives and why they lost", "## Memory per GPU",
                   "## Iteration time", "## Pipeline schedule")
REPORT_PICTURES = ("memory.png", "time.png", "schedule.png", "stages.png")
MIN_PICTURE_PX, MAX_PICTURE_PX = 200, 8000


@dataclass(frozen=True)
class Entry:
    """One job of the matrix; ``source`` says where its batch and sequence length come from."""

    model: str
    cluster: str
    global_batch: int
    seq_len: int
    source: str

    @property
    def name(self) -> str:
        return f"{self.model}_{self.cluster.replace(':', '-')}"

    def plan_args(self) -> list[str]:
        return ["plan", "--model", self.model, "--cluster", self.cluster, "--global-batch", str(self.global_batch),
                "--seq-len", str(self.seq_len), "--out", "plan.yaml"]


MATRIX = (
    Entry("llama3-8b", "dgx-h100:1", 16, 8192,
          "torchtitan Llama 3.1 8B on 8 H100s: local batch 2 x FSDP 8 (../shared/benchmarks/public-runs.yaml)"),
    Entry("llama3-70b", "dgx-h100:32", 512, 8192,
          "torchtitan Llama 3.1 70B on 256 H100s: local batch 16 x FSDP 32 (../shared/benchmarks/public-runs.yaml)"),
    Entry("llama3-405b", "dgx-h100:2048", 2048, 8192,
          "Llama 3 405B pre-training (Dubey et al. 2024): 16,384 H100s, 16M-token batches of 8,192-token sequences"),
    Entry("gpt3-175b", "dgx-a100:128", 1536, 2048,
          "GPT-3 175B on 1,024 A100s (Narayanan et al. 2021, table 1): batch 1,536 of 2,048-token sequences"),
)


@contextlib.contextmanager
def _inside(folder: Path):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _meshplan(args: list[str]) -> str:
    """Run one meshplan command in-process; returns its stdout, raises with its stderr when it fails."""
    import typer

    from meshplan.cli import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = typer.main.get_command(app).main(args, prog_name="meshplan", standalone_mode=False)
    if code:
        raise SystemExit(f"meshplan {' '.join(args)} failed (exit {code}): {err.getvalue().strip()}")
    return out.getvalue()


def generate(out: Path, entries=MATRIX) -> None:
    """Plan and report every entry into ``out/<entry.name>/``, then write ``out/README.md``."""
    out = out.resolve()      # the commands run inside each entry's folder
    out.mkdir(parents=True, exist_ok=True)
    for e in entries:
        folder = out / e.name
        folder.mkdir(exist_ok=True)
        start = time.perf_counter()
        with _inside(folder):
            (folder / "plan.txt").write_text(_meshplan(e.plan_args()))
            _meshplan(["report", "plan.yaml", "--out", "."])
        print(f"{e.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    write_index(out, entries)


def write_index(out: Path, entries=MATRIX) -> None:
    """``out/README.md``: one row per entry with its chosen plan and prediction, linking the entry's report."""
    from meshplan.plan import Plan

    rows = []
    for e in entries:
        p = Plan.load(out / e.name / "plan.yaml")
        pr = p.predicted
        sched = "" if p.pp == 1 else f", {p.schedule}" + (f" v={p.virtual_stages}" if p.virtual_stages > 1 else "")
        rows.append(f"| [{e.model} on {e.cluster}]({e.name}/README.md) | {p.world_size:,} | "
                    f"{e.global_batch:,} × {e.seq_len:,} | dp={p.dp} tp={p.tp} pp={p.pp} cp={p.cp}{sched}, "
                    f"ZeRO {p.zero}, recompute {p.recompute} | {pr.tokens_per_s:,.0f} | {pr.mfu * 100:.1f}% | "
                    f"{pr.peak_memory_gib:.1f} / {p.cluster.gpu.memory_gib:.1f} |")
    lines = [
        "# Example plans and reports",
        "",
        "Each folder holds a plan made by `meshplan plan` (`plan.yaml`, and what the command printed in `plan.txt`)",
        "and its report by `meshplan report` (`README.md`, `report.html` and the pictures). They are regenerated",
        "by `python scripts/ci_reports.py --out docs/examples`; CI makes the same set in `build/ci-reports/` and",
        "checks that every report is complete.",
        "",
        "| job | GPUs | batch (sequences × tokens) | chosen plan | predicted tokens/s | MFU | peak GiB / device |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        *rows,
        "",
        "Where the batches come from, and the commands (run inside each folder):",
        "",
        *[f"- **{e.name}**: {e.source}.  \n  `meshplan {' '.join(e.plan_args())} && meshplan report plan.yaml --out .`"
          for e in entries],
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def _picture_problem(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
            width, height = img.size
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
        return f"{path}: not a readable image ({exc})"
    if not (MIN_PICTURE_PX <= width <= MAX_PICTURE_PX and MIN_PICTURE_PX <= height <= MAX_PICTURE_PX):
        return f"{path}: {width}x{height} px is outside {MIN_PICTURE_PX}..{MAX_PICTURE_PX}"
    return None


def check(out: Path, entries=MATRIX) -> list[str]:
    """Everything missing or malformed under ``out``, one line each (empty: complete)."""
    import re

    from meshplan.errors import MeshplanError
    from meshplan.plan import Plan

    problems = []
    index = out / "README.md"
    index_text = index.read_text() if index.is_file() else ""
    if not index_text:
        problems.append(f"{index}: missing or empty")
    for e in entries:
        folder = out / e.name
        if f"({e.name}/README.md)" not in index_text:
            problems.append(f"{index}: no link to {e.name}/README.md")
        files = ("plan.yaml", "plan.txt", "README.md", "report.html", *REPORT_PICTURES)
        missing = [f for f in files if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
        problems += [f"{folder / f}: missing or empty" for f in missing]
        if "plan.yaml" not in missing:
            try:
                p = Plan.load(folder / "plan.yaml")
            except MeshplanError as exc:
                problems.append(f"{folder / 'plan.yaml'}: does not load ({exc})")
            else:
                made_for = (p.model.name, p.cluster.name, p.train.global_batch, p.train.seq_len)
                if made_for != (e.model, e.cluster, e.global_batch, e.seq_len) or p.predicted is None:
                    problems.append(f"{folder / 'plan.yaml'}: made for {made_for}, not this entry, or no prediction")
        if "README.md" not in missing:
            md = (folder / "README.md").read_text()
            problems += [f"{folder / 'README.md'}: no '{s}' section" for s in REPORT_SECTIONS if f"\n{s}\n" not in md]
            for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
                if not (folder / target).is_file():
                    problems.append(f"{folder / 'README.md'}: picture {target} does not exist")
        for pic in sorted(folder.glob("*.png")):
            problem = _picture_problem(pic)
            if problem:
                problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default: {DEFAULT_OUT})")
    parser.add_argument("--check", type=Path, metavar="FOLDER", help="only check FOLDER, generate nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these entries: " +
                        ", ".join(e.name for e in MATRIX))
    args = parser.parse_args(argv)
    entries = MATRIX
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in MATRIX})
        if unknown:
            parser.error(f"--only: unknown entry {unknown[0]!r}; choose from {', '.join(e.name for e in MATRIX)}")
        entries = tuple(e for e in MATRIX if e.name in args.only)
    folder = args.check or args.out
    if args.check is None:
        generate(args.out, entries)
    problems = check(folder, entries)
    for line in problems:
        print(f"incomplete: {line}", file=sys.stderr)
    if not problems:
        print(f"{len(entries)} reports complete in {folder}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
