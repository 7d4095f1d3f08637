"""The learning rate of every step: linear warm-up, then constant, linear or cosine decay to a floor.

torch-free, so ``meshplan launch`` validates the options before starting torchrun. The rate is a function of the
step alone (no scheduler state): a resumed run continues the schedule exactly from its checkpoint's step.

    step 1..W            base * step / W                               (warm-up, W = warmup_steps)
    step W+1..N          constant: base
                         linear:   floor + (base - floor) * (1 - p)
                         cosine:   floor + (base - floor) * (1 + cos(pi * p)) / 2
                         with p = (step - W) / (N - W), N = total_steps: the floor is reached at the last step
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshplan.errors import InputError

DECAYS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Fields:
        base_lr: the rate after warm-up (``--lr``).
        total_steps: the run's last step (``--steps``): where linear and cosine decay reach ``min_lr``.
        warmup_steps: steps of linear warm-up from ``base_lr / warmup_steps`` (``--warmup``; 0: none).
        decay: ``constant``, ``linear`` or ``cosine`` after the warm-up (``--schedule``).
        min_lr: the floor of the decay (``--min-lr``).
    """

    base_lr: float = 1e-3
    total_steps: int = 10
    warmup_steps: int = 0
    decay: str = "constant"
    min_lr: float = 0.0

    def validate(self) -> None:
        """One-line errors naming the launch option and its fix."""
        if not self.base_lr > 0:
            raise InputError("--lr", f"must be > 0, got {self.base_lr:g}", "give a positive learning rate")
        if self.decay not in DECAYS:
            raise InputError("--schedule", f"unknown schedule {self.decay!r}", f"choose one of: {', '.join(DECAYS)}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise InputError("--warmup", f"{self.warmup_steps} warm-up steps for a {self.total_steps}-step run",
                             "give 0 <= --warmup < --steps")
        if not 0 <= self.min_lr <= self.base_lr:
            raise InputError("--min-lr", f"{self.min_lr:g} is outside [0, --lr = {self.base_lr:g}]",
                             "give a floor between 0 and the learning rate")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if self.decay == "constant":
            return self.base_lr
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.decay == "linear":
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
