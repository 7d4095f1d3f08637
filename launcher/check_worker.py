"""``python -m meshplan.launcher.check_worker OUT``: one rank of ``meshplan check`` in a process of its own.

Reads a pickled ``(plan, rank, predicted)`` from stdin, runs :func:`meshplan.launcher.check.check_rank` and
writes the pickled ``("ok", RankCheck)`` or ``("error", InputError)`` to the file OUT. ``check_plan`` starts one
per rank when it checks ranks side by side (each rank's fake process group is global state of its process).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    (out,) = argv if argv is not None else sys.argv[1:]
    from meshplan.errors import InputError
    from meshplan.launcher.check import check_rank

    plan, rank, predicted = pickle.loads(sys.stdin.buffer.read())
    try:
        answer = ("ok", check_rank(plan, rank, predicted))
    except InputError as error:
        answer = ("error", error)
    Path(out).write_bytes(pickle.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
