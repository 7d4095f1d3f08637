"""The profiler's fits, whose one home is ``planner/fit.py`` (pure Python; the planner fits a host's core count
with the same module, and may not import the profiler). Kept importable from here for the profiler's modules
and the commands."""

from __future__ import annotations

from meshplan.planner.fit import (  # noqa: F401
    COLLECTIVES, IDENTIFIED_WITHIN, RUN_NOISE, LinkFit, fit_alpha_beta, fit_memory_rate, fit_micro_batch_line,
    fit_shared_cores, fit_two_scales, latency_steps, ranks_with_ties, rate_table, relative_least_squares,
    sharing_speed, spearman, volume_factor)
