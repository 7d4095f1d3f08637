"""Search speed: wall time of a full `meshplan plan` search per setup.

    python benchmarks/search_speed.py [--json out.json]

Each setup is searched three times (``top=3``); the table gives the best and worst wall time, how many
configurations were evaluated and rejected, and the first plan. ``--json`` also writes the rows with the
command, date and machine (``run_info.wrap``), the input of docs/results.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from tabulate import tabulate

from meshplan.planner.search import search
from meshplan.spec import TrainSpec, load_cluster, load_model

SETUPS = [
    ("llama3-8b", "dgx-h100:1", 64, 8192),
    ("llama3-70b", "dgx-h100:32", 512, 8192),
    ("gpt3-175b", "dgx-a100:128", 1536, 2048),
    ("llama3-405b", "dgx-h100:2048", 2048, 8192),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows, with command, date and machine, here")
    args = parser.parse_args(argv)
    rows, records = [], []
    for model, cluster, batch, seq in SETUPS:
        m, c, t = load_model(model), load_cluster(cluster), TrainSpec(batch, seq)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            result = search(m, c, t, top=3)
            runs.append(time.perf_counter() - start)
        best = result.plans[0]
        rows.append([model, cluster, c.world_size, f"{min(runs):.2f}", f"{max(runs):.2f}", result.evaluated,
                     sum(result.rejected.values()),
                     f"dp{best.dp} tp{best.tp} pp{best.pp} cp{best.cp} mb{best.micro_batch} z{best.zero} {best.schedule}",
                     f"{best.predicted.mfu:.1%}"])
        records.append({"model": model, "cluster": cluster, "gpus": c.world_size, "global_batch": batch,
                        "seq_len": seq, "runs_s": runs, "evaluated": result.evaluated,
                        "rejected": sum(result.rejected.values()), "plan": rows[-1][7],
                        "predicted_mfu": best.predicted.mfu})
    print(tabulate(rows, headers=["model", "cluster", "GPUs", "best s", "worst s", "evaluated", "rejected",
                                  "plan 1", "pred. MFU"], tablefmt="github"))
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_info import wrap

        args.json.write_text(json.dumps(wrap("python benchmarks/search_speed.py", {"setups": records}), indent=2))


if __name__ == "__main__":
    main()
