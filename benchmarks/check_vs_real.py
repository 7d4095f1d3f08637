"""``meshplan check`` (one process, fake process group, fake tensors) against real gloo runs of the same plans.

    python benchmarks/check_vs_real.py [--json benchmarks/results/check_vs_real.json]

For every plan of the launcher's CPU parity matrix (tests/runtime_helpers.py PARITY_LAYOUTS), a real torchrun
job (one per world size, ``run_layouts``) measures each rank (``launcher/runtime/memory_run.py``: the same
live-bytes tracker on real tensors, and the allocator's own events for one forward per stage), and ``check``
builds the same ranks on fake tensors. The
table gives, over the plan's ranks, the largest difference of the parameters + gradients + optimizer bytes,
of the per-stage activation bytes, and of the step's peak, and the largest gap between the real run's
tracker and its allocator (torch.profiler) for the forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the parity matrix's fused-kernel layouts run their Triton kernels interpreted on CPU ranks (as tests/conftest.py)
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT / "tests"))

from tabulate import tabulate  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from run_info import wrap  # noqa: E402

from runtime_helpers import PARITY_LAYOUTS, make_plan, run_layouts  # noqa: E402
from meshplan.launcher.check import check_rank  # noqa: E402


def relative(a: float, b: float) -> float:
    return abs(a - b) / b if b else 0.0


HEADERS = ["plan", "ranks", "params+grads+optim", "activations", "peak", "real run: tracker vs allocator (forward)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the table (with command, date, machine) here")
    args = parser.parse_args(argv)
    rows = []
    plans = {name: make_plan(**spec) for name, spec in PARITY_LAYOUTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for world in sorted({plan.world_size for plan in plans.values()}):    # one torchrun job per world size
            group = {name: plan for name, plan in plans.items() if plan.world_size == world}
            runs.update(run_layouts(group, Path(tmp) / f"world{world}"))
        for name, plan in plans.items():
            real = runs[name].memory
            states = acts = peak = allocator = 0.0
            for rank in range(plan.world_size):
                fake = check_rank(plan, rank)
                measured = real[rank]["measured"]
                states = max(states, relative(sum(fake.measured[k] for k in ("parameters", "gradients", "optimizer")),
                                              sum(measured[k] for k in ("parameters", "gradients", "optimizer"))))
                for stage, b in real[rank]["activations_per_microbatch"].items():
                    acts = max(acts, relative(fake.activations_per_microbatch[int(stage)], b))
                peak = max(peak, relative(fake.measured["peak"], measured["peak"]))
                for stage, b in real[rank]["forward_totals_allocator"].items():
                    allocator = max(allocator, relative(real[rank]["forward_totals"][stage], b))
            rows.append([name, plan.world_size, f"{states * 100:.2f}%", f"{acts * 100:.2f}%", f"{peak * 100:.2f}%",
                         f"{allocator * 100:.1f}%"])
            print(rows[-1], flush=True)
    print(tabulate(rows, headers=HEADERS, tablefmt="github"))
    if args.json:
        table = {"caption": "Largest difference over each plan's ranks; the last column compares the real run's "
                            "tracker with torch.profiler's allocator events for one forward per stage",
                 "headers": HEADERS, "rows": [[str(cell) for cell in row] for row in rows]}
        args.json.write_text(json.dumps({"title": "`meshplan check` against real gloo runs of the same plans",
                                         **wrap("python benchmarks/check_vs_real.py", rows), "tables": [table]},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
