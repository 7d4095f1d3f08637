"""Why the profile times the head + loss on logits of a trained model's scale (profiler/worker.py
``measure_vocab``): with unit-scale head weights the logits reach std sqrt(hidden), the softmax underflows to
denormals, and on a CPU the chunked loss's gradient GEMMs slow down several times; with weights scaled by
hidden^-1/2 (logits of std about 1, as in training) they do not.

    python benchmarks/chunked_loss_scale.py [--tokens 1024] [--hidden 256] [--vocab 2048] [--reps 5]

Prints forward + backward seconds (median of ``--reps`` after one warm-up) of the reference head + loss and of
the runtime's chunked one, for both weight scales, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from meshplan.launcher.runtime.kernels import linear_cross_entropy


def seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.hidden, generator=gen).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.tokens,), generator=gen)
    rows = []
    for name, scale in (("unit weights", 1.0), ("hidden^-1/2 weights", a.hidden ** -0.5)):
        w = (torch.randn(a.vocab, a.hidden, generator=gen) * scale).requires_grad_()
        with torch.no_grad():
            std = (x @ w.t()).std().item()
        reference = seconds(lambda: F.cross_entropy(F.linear(x, w), targets).backward(), a.reps)
        chunked = seconds(lambda: linear_cross_entropy(x, w, targets, impl="fused").backward(), a.reps)
        rows.append([name, f"{std:.1f}", f"{reference:.4f}", f"{chunked:.4f}", f"{chunked / reference:.2f}"])
    print(tabulate(rows, headers=["head weights", "logit std", "reference s", "chunked s", "chunked / reference"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
