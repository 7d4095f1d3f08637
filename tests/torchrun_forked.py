"""torchrun for the tests' multi-rank jobs, its ranks forked from an interpreter that has imported torch and the
runtime once:

    python tests/torchrun_forked.py [torchrun options] /abs/path/job.py [ARGS...]

This is ``torch.distributed.run`` (torchrun) itself, given two of its own options: ``--run-path`` (the script runs
in the worker process through ``runpy.run_path``) and ``--start-method fork``. The elastic agent, the rendezvous,
each rank's environment and its gloo process groups are torchrun's; only a rank's start differs: it is forked
from this process instead of starting an interpreter of its own, so importing torch, DTensor, pipelining and the
runtime (about 5 s of CPU per rank on the CI machine) is paid once per job. ``meshplan launch`` starts its ranks
the usual way (a script per rank, ``launcher/render.py``); tests/test_launch_cli.py, test_runtime_faults.py,
test_launch_multinode.py and the README's quickstart run that path.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys

# torchrun's default for several ranks on one machine; OpenMP reads it when torch loads it, before the fork
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch.distributed.run  # noqa: E402

# what the jobs import, inherited by every rank (tests/layout_job.py, tests/ring_attention_job.py)
from meshplan.launcher.runtime import context_parallel, memory_run, train  # noqa: E402, F401


def stacks_after_hang() -> None:
    """With ``MESHPLAN_JOB_STACKS_AFTER_S`` set, each forked rank prints every thread's Python stack to stderr
    once it has run that long (``faulthandler``; the rank goes on): a job that hangs until the test's timeout
    then shows where each rank waits. The watchdog starts in the child after the fork, so the agent that
    forks the ranks runs no extra thread."""
    seconds = float(os.environ.get("MESHPLAN_JOB_STACKS_AFTER_S", "0"))
    if seconds > 0:
        os.register_at_fork(after_in_child=lambda: faulthandler.dump_traceback_later(seconds, exit=False))


def main(argv: list[str]) -> None:
    stacks_after_hang()
    gc.freeze()     # the imports' objects: a rank's collections never walk them, their pages stay shared
    try:
        torch.distributed.run.main(["--run-path", "--start-method", "fork", *argv])
    finally:
        gc.unfreeze()   # collectable at exit (nanobind reports the instances it finds alive then as leaks)


if __name__ == "__main__":
    main(sys.argv[1:])
