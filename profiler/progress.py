"""A one-line progress bar on stderr (rank 0 only), torch-free."""

from __future__ import annotations

import sys
import time

BAR_WIDTH = 24


class Progress:
    """``with Progress("links", budget_s) as p: p.update(done, total, label)`` redraws
    ``links [#####.....] 3/7 all_reduce 1 MiB  12s of 120s`` in place and ends the line on exit."""

    def __init__(self, phase: str, budget_s: float, enabled: bool = True, start: float | None = None,
                 stream=None):
        self.phase, self.budget_s, self.enabled = phase, budget_s, enabled
        self.start = start if start is not None else time.time()
        self.stream = stream or sys.stderr
        self.drawn = False

    def __enter__(self) -> "Progress":
        return self

    def update(self, done: int, total: int, label: str = "") -> None:
        if not self.enabled:
            return
        filled = int(BAR_WIDTH * done / max(1, total))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        elapsed = time.time() - self.start
        self.stream.write(f"\r{self.phase:<8} [{bar}] {done}/{total} {label:<28} {elapsed:4.0f}s of "
                          f"{self.budget_s:.0f}s")
        self.stream.flush()
        self.drawn = True

    def __exit__(self, *exc) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
