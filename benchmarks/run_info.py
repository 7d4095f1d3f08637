"""What a benchmark's JSON output records about its own run: the command, the date and the machine.

``scripts/gen_results.py`` builds docs/results.md from the JSON files under ``benchmarks/results/``; every table
there names the command that produced it, when, and on what. The scripts that write ``--json`` wrap their
result with :func:`wrap`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform


def cpu_model() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, the CPUs this process may use, operating system, Python."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    return (f"{cpu_model()}, {cpus} CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def wrap(command: str, result, **extra) -> dict:
    """``{"command", "date" (UTC, ISO 8601), "machine", **extra, "result"}``."""
    return {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), **extra, "result": result}
