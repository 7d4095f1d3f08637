"""``meshplan check`` (one process, fake process group, fake tensors) against real gloo runs of the same plans.

    python benchmarks/check_vs_real.py

For every plan of the launcher's CPU parity matrix (tests/test_check.py PARITY_MATRIX), a real torchrun job
measures each rank (``launcher/runtime/memory_run.py``: the same live-bytes tracker on real tensors, and the
allocator's own events for one forward per stage), and ``check`` builds the same ranks on fake tensors. The
table gives, over the plan's ranks, the largest difference of the parameters + gradients + optimizer bytes,
of the per-stage activation bytes, and of the step's peak, and the largest gap between the real run's
tracker and its allocator (torch.profiler) for the forward.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tabulate import tabulate  # noqa: E402

from runtime_helpers import make_plan  # noqa: E402
from test_check import PARITY_MATRIX, run_real  # noqa: E402
from meshplan.launcher.check import check_rank  # noqa: E402


def relative(a: float, b: float) -> float:
    return abs(a - b) / b if b else 0.0


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in PARITY_MATRIX.items():
            plan = make_plan(**spec)
            real = run_real(plan, Path(tmp) / name)
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
    print(tabulate(rows, headers=["plan", "ranks", "params+grads+optim", "activations", "peak",
                                  "tracker vs allocator (forward)"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
