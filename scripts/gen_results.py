"""Build docs/results.md from the benchmarks' JSON output under benchmarks/results/.

    python scripts/gen_results.py            # rewrite docs/results.md
    python scripts/gen_results.py --check    # exit 1 when docs/results.md is not what this script writes

Every JSON file there records the command that produced it, its date and its machine (``benchmarks/run_info.py``
writes them for the scripts with ``--json``); the page shows each table with those three. To refresh a table,
rerun its command with ``--json benchmarks/results/NAME.json`` (where the script has that option) and rerun this
script. ``tests/test_docs_reference.py`` fails when the page and the JSON disagree.

A file holds either a benchmark's own output (``fidelity``, ``search_speed``; rendered by a function here) or
``tables``: ``[{"caption", "headers", "rows"}]`` with ``notes``, for results whose script prints text only or
that need hardware CI does not have (GPU runs), kept as measured on the machine they name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

# (file stem, section heading), in page order
SECTIONS = [
    ("fidelity", "Fidelity against published runs"),
    ("search_speed", "Search speed"),
    ("quickstart", "The README quickstart on this machine"),
    ("check_public_runs", "Planned peak memory against `meshplan check`"),
    ("check_vs_real", "`meshplan check` against real runs"),
    ("check_speed", "Planning and `meshplan check` speed"),
    ("check_activations", "Activation bytes: planner against runtime"),
    ("validate_cpu", "`meshplan validate` on 4 CPU ranks"),
    ("gpu_profile_validate_h200", "`meshplan profile` and `validate` on one GPU"),
    ("profile_slow_link", "A slow link, seen by `meshplan profile`"),
    ("profile_memory_per_layer", "Profiled memory per layer against the runtime"),
    ("profile_twice", "Profiling one machine twice"),
    ("kernels_gpu_h200", "Fused kernels on one GPU"),
    ("kernels_correctness", "Fused kernels against their references"),
    ("loss_memory_cpu", "Fused loss memory on CPU"),
    ("loss_kernels_check", "The loss kernels' memory: planner against `meshplan check`"),
    ("vocab_parallel_cpu", "Vocabulary parallelism on CPU ranks"),
    ("vocab_parallel_parity", "Vocabulary parallelism and fused loss: parity"),
    ("gpu_suite_h100", "The runtime on one H100: the GPU suite"),
    ("data_prepare", "`meshplan data prepare` throughput"),
]
# Sections whose file may not exist yet (a GPU was not available): the page says how to produce it.
NOT_YET = {"gpu_suite_h100": "Not measured yet. On one H100: `bash benchmarks/gpu_suite.sh OUT`, then "
                             "`python benchmarks/gpu_suite_report.py OUT --json benchmarks/results/gpu_suite_h100.json` "
                             "and `python scripts/gen_results.py`."}


def markdown_table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def choice_text(choice: dict) -> str:
    """A plan's fields (``Plan.fields_for_fix``) in one short line: degrees (with the expert layout of a mixture
    of experts), micro batch, ZeRO, schedule, recompute."""
    experts = f" ep{choice['ep']}" if "ep" in choice else ""
    if choice.get("expert_tp", 1) > 1:
        experts += f" etp{choice['expert_tp']}"
    text = (f"dp{choice['dp']} tp{choice['tp']} pp{choice['pp']} cp{choice['cp']}{experts} mb{choice['micro_batch']} "
            f"z{choice['zero']}")
    if choice["pp"] > 1:
        text += f" {choice['schedule']}" + (f" v{choice['virtual_stages']}" if choice.get("virtual_stages", 1) > 1
                                            else "")
    recompute = choice.get("recompute")
    return text + f" rc={recompute if isinstance(recompute, str) else 'mixed'}"


def memory_cells(run: dict, reserved: bool) -> list[str]:
    """A fidelity run's predicted memory: the allocated peak, the reserved figure and its error against the
    published one (torchtitan's max_reserved) where the JSON has them, else the peak with its margin."""
    if not reserved:
        return [f"{run['predicted_memory_gib']:.1f}"]
    error = run.get("memory_error")
    return [f"{run['predicted_allocated_gib']:.1f}", f"{run['predicted_reserved_gib']:.1f}",
            f"{error:+.1%}" if error is not None else "-"]


def render_fidelity(data: dict) -> list[str]:
    rows = []
    reserved = all("predicted_reserved_gib" in run for run in data["runs"])
    for run in data["runs"]:
        measured_gib = run["measured_memory_gib"]
        rows.append([run["name"], f"{run['measured_iteration_s']:.2f}", f"{run['predicted_iteration_s']:.2f}",
                     f"{run['error']:+.1%}", f"{measured_gib:.1f}" if measured_gib else "-",
                     *memory_cells(run, reserved), "yes" if run["fits"] else "NO",
                     choice_text(run["planner_choice"]),
                     f"{run['predicted_iteration_s'] / run['planner_iteration_s'] - 1:+.1%}"])
    s = data["summary"]
    memory = ["allocated GiB", "reserved GiB", "memory error"] if reserved else ["predicted GiB"]
    lines = ["Each published run's configuration pinned, predicted against the published iteration time and memory; "
             "\"planner's own choice\" is the free search on the same inputs, \"published vs own\" how much slower "
             "the published configuration is predicted to be (docs/accuracy.md).", "",
             *markdown_table(["run", "measured s/it", "predicted s/it", "error", "measured GiB", *memory,
                              "fits", "planner's own choice", "published vs own"], rows), "",
             f"Median |error| {s['median_abs_error']:.1%}, max |error| {s['max_abs_error']:.1%} over {s['runs']} runs."]
    if "memory_error_min" in s:
        lines.append(f"Reserved memory against the published max_reserved: {s['memory_error_min']:+.1%} to "
                     f"{s['memory_error_max']:+.1%}.")
    return lines


def render_search_speed(data: dict) -> list[str]:
    rows = [[r["model"], r["cluster"], f"{r['gpus']:,}", f"{min(r['runs_s']):.2f}", f"{max(r['runs_s']):.2f}",
             r["evaluated"], r["rejected"], r["plan"], f"{r['predicted_mfu']:.1%}"]
            for r in data["result"]["setups"]]
    return ["A full search (`top=3`), three times per setup: best and worst wall time, configurations evaluated and "
            "rejected, the first plan.", "",
            *markdown_table(["model", "cluster", "GPUs", "best s", "worst s", "evaluated", "rejected", "plan 1",
                             "pred. MFU"], rows)]


def render_tables(data: dict) -> list[str]:
    out: list[str] = []
    for table in data["tables"]:
        if table.get("caption"):
            out += [table["caption"] + ":", ""]
        out += markdown_table(table["headers"], table["rows"]) + [""]
    out += [f"- {note}" for note in data.get("notes") or []]
    while out and out[-1] == "":
        out.pop()
    return out


RENDER = {"fidelity": render_fidelity, "search_speed": render_search_speed}


def render(results: Path = RESULTS) -> str:
    lines = ["# Measured results", "",
             "<!-- generated by `python scripts/gen_results.py` from benchmarks/results/*.json: edit those, not "
             "this page -->", "",
             "Every table below is built from one JSON file under `benchmarks/results/`, which records the command "
             "that produced it, the date and the machine. To refresh one, rerun its command (with `--json "
             "benchmarks/results/NAME.json` where the script has that option) and then `python "
             "scripts/gen_results.py`. Results that need hardware CI does not have (GPUs) stay as measured on "
             "the machine named.", ""]
    for stem, heading in SECTIONS:
        if stem in NOT_YET and not (results / f"{stem}.json").exists():
            lines += [f"## {heading}", "", NOT_YET[stem], ""]
            continue
        data = json.loads((results / f"{stem}.json").read_text())
        date = str(data["date"]).split("T")[0]
        lines += [f"## {heading}", "", f"Command: `{data['command']}`  ", f"Date: {date}  ",
                  f"Machine: {data['machine']}", ""]
        if data.get("source"):
            lines += [f"Source: {data['source']}.", ""]
        lines += RENDER.get(stem, render_tables)(data) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/results.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/results.md is out of date: run python scripts/gen_results.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
