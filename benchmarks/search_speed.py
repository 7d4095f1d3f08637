"""Search speed: wall time of a full `meshplan plan` search per setup.

    python benchmarks/search_speed.py
"""

import time

from tabulate import tabulate

from meshplan.planner.search import search
from meshplan.spec import TrainSpec, load_cluster, load_model

SETUPS = [
    ("llama3-8b", "dgx-h100:1", 64, 8192),
    ("llama3-70b", "dgx-h100:32", 512, 8192),
    ("gpt3-175b", "dgx-a100:128", 1536, 2048),
    ("llama3-405b", "dgx-h100:2048", 2048, 8192),
]


def main() -> None:
    rows = []
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
    print(tabulate(rows, headers=["model", "cluster", "GPUs", "best s", "worst s", "evaluated", "rejected",
                                  "plan 1", "pred. MFU"], tablefmt="github"))


if __name__ == "__main__":
    main()
