"""Numbers a person can read: memory, compute rates and device counts in the unit that fits their size.

Plans hold memory in GiB and rates in TFLOP/s, the units of GPU jobs. A CPU process holds megabytes and reaches
gigaflops, where "0.0 GiB" and "0.0 TFLOP/s" say nothing; these helpers pick the unit per number (``human_*``)
or one unit for a whole column (``memory_column``), and the word for a rank ("GPU" or "process").
"""

from __future__ import annotations

KIB_PER_GIB = 2**20
MIB_PER_GIB = 2**10

_MEMORY_UNITS = (("GiB", 1.0), ("MiB", MIB_PER_GIB), ("KiB", KIB_PER_GIB))
_RATE_UNITS = (("PFLOP/s", 1e-3), ("TFLOP/s", 1.0), ("GFLOP/s", 1e3), ("MFLOP/s", 1e6))


def _significant(value: float) -> str:
    """Three significant figures at most, no exponent, thousands separated: 1,234 / 12.3 / 1.23 / 0.123."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def memory_unit(gib: float) -> tuple[str, float]:
    """The unit for ``gib`` and the factor from GiB to it: GiB from 1 GiB up, MiB from 1 MiB, else KiB."""
    for unit, factor in _MEMORY_UNITS:
        if abs(gib) * factor >= 1:
            return unit, factor
    return _MEMORY_UNITS[-1]


def human_memory(gib: float) -> str:
    """``gib`` in the unit that fits it: ``71.3 GiB``, ``512 MiB``, ``12.0 KiB``."""
    unit, factor = memory_unit(gib)
    return f"{_significant(gib * factor)} {unit}"


def memory_column(values_gib: list[float]) -> tuple[str, float]:
    """One unit for a table column: the one that fits its largest value (GiB or MiB, never below MiB)."""
    unit, factor = memory_unit(max((abs(v) for v in values_gib), default=0.0))
    return (unit, factor) if unit != "KiB" else ("MiB", MIB_PER_GIB)


def rate_unit(tflops: float) -> tuple[str, float]:
    """The unit for a rate of ``tflops`` TFLOP/s and the factor from TFLOP/s to it."""
    for unit, factor in _RATE_UNITS:
        if abs(tflops) * factor >= 1:
            return unit, factor
    return _RATE_UNITS[-1]


def human_rate(tflops: float) -> str:
    """``tflops`` TFLOP/s in the unit that fits it: ``412 TFLOP/s``, ``38.2 GFLOP/s``."""
    unit, factor = rate_unit(tflops)
    return f"{_significant(tflops * factor)} {unit}"


def rank_word(device_kind: str, count: int | None = None) -> str:
    """What one rank is: ``GPU`` on accelerators, ``process`` for CPU ranks; plural when ``count`` != 1."""
    word = "process" if device_kind == "cpu" else "GPU"
    if count is None or count == 1:
        return word
    return word + ("es" if word == "process" else "s")


def rank_count(device_kind: str, count: int) -> str:
    """``16,384 GPUs``, ``4 processes``, ``1 GPU``."""
    return f"{count:,} {rank_word(device_kind, count)}"
