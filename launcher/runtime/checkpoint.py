"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), written so a crash never corrupts the last good one.

Layout of ``--checkpoint-dir``::

    step-00000004/          a complete checkpoint: DCP shards, .metadata, and meshplan.json (written last)
    .step-00000006.partial/ a checkpoint being written (ignored, and removed by the next save)
    latest                  the name of the newest complete checkpoint, replaced atomically

A save writes into the ``.partial`` directory, waits for every rank, writes ``meshplan.json``, renames the
directory to its final name and only then points ``latest`` at it (``os.replace``). A crash at any moment
leaves ``latest`` naming a complete checkpoint. On start, :func:`find_latest` returns that checkpoint; a
``latest`` that names a missing or incomplete checkpoint is an error, never a silent restart from step 0.
This module's path checks are torch-free so ``meshplan launch`` can run them before starting torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from meshplan.errors import InputError

MARKER = "meshplan.json"
LATEST = "latest"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def validate(path: Path) -> int:
    """The step of the complete checkpoint at ``path``; an InputError naming the problem otherwise."""
    field = "--checkpoint-dir"
    if not path.is_dir():
        raise InputError(field, f"checkpoint {path} is missing", "restore it, or point `latest` at a checkpoint "
                         "that exists, or start over with an empty --checkpoint-dir")
    marker = path / MARKER
    if not marker.is_file() or not (path / ".metadata").is_file():
        raise InputError(field, f"checkpoint {path} is incomplete or corrupt (no {MARKER} or .metadata)",
                         "point `latest` at an earlier checkpoint, or start over with an empty --checkpoint-dir")
    try:
        info = json.loads(marker.read_text())
        step = int(info["step"])
        files = info.get("files", {})
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(field, f"checkpoint {path} has an unreadable {MARKER}",
                         "point `latest` at an earlier checkpoint") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise InputError(field, f"checkpoint {path} is corrupt ({name} is missing or has the wrong size)",
                             "point `latest` at an earlier checkpoint, or start over with an empty --checkpoint-dir")
    return step


def find_latest(root: Path | None) -> tuple[Path, int] | None:
    """The newest complete checkpoint under ``root`` and its step, ``None`` if none was ever written."""
    if root is None:
        return None
    pointer = root / LATEST
    if not pointer.exists():
        complete = sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
        if complete:
            raise InputError("--checkpoint-dir", f"{root} holds checkpoints but no `{LATEST}` pointer",
                             f"write the name of the checkpoint to resume from into {pointer}")
        return None
    name = pointer.read_text().strip()
    path = root / name
    return path, validate(path)


def _finish(root: Path, partial: Path, final: Path, step: int, keep: int) -> None:
    """Rank 0, after every rank wrote its shards: seal, rename, repoint ``latest``, prune old ones."""
    files = {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file()}
    marker_tmp = partial / (MARKER + ".tmp")
    marker_tmp.write_text(json.dumps({"step": step, "files": files}))
    os.replace(marker_tmp, partial / MARKER)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    pointer_tmp = root / (LATEST + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save(root: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it with its state (DCP state-dict form)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    partial = root / f".{final.name}.partial"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        _finish(root, partial, final, step, keep)
    dist.barrier()
    return final


def load(path: Path, state: dict) -> None:
    """Collective: fill ``state`` in place from the checkpoint at ``path``."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises many kinds; the user needs one line
        raise InputError("--checkpoint-dir", f"checkpoint {path} cannot be loaded: {str(exc).splitlines()[0][:200]}",
                         "point `latest` at an earlier checkpoint, or start over with an empty --checkpoint-dir") from None
