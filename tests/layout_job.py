"""One torchrun job that serves several tests of the same ranks (started by ``runtime_helpers.run_layout`` and
``runtime_helpers.train_together``):

    python tests/torchrun_forked.py --nproc-per-node N $PWD/tests/layout_job.py [--memory] --steps S a/x.yaml ...

(``python -m torch.distributed.run`` in place of ``tests/torchrun_forked.py`` runs it too, each rank importing
torch and the runtime itself.)

For each plan in turn, with ``--memory`` each rank first measures one real step the way ``python -m
meshplan.launcher.runtime.memory_run`` does (``memory_run.measure``: ``a/rank<R>.json``, beside the plan); then
it trains the plan from fresh weights with the runtime's own loop (``train.run``, as ``meshplan launch`` starts
it), writing ``a/x.jsonl`` and, per rank, ``a/x.garbage<R>.json``: after each step the tensors among the cyclic
garbage it left (:func:`garbage_per_step`); a ``a/x.run.json`` beside the plan adds fields of its ``RunConfig``
(``init_from``, ``save_hf``, ``checkpoint_dir``...). The phases share nothing but the processes: each builds its
trainer anew (the memory tracker follows only the storages made under it), resets the seed and creates its process
group under a rendezvous prefix of its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from meshplan.launcher.runtime import memory_run
from meshplan.launcher.runtime import train as rt


def garbage_per_step(out: Path):
    """Wrap ``train.timed_step`` so that after each step the cyclic garbage the step left is collected and its
    tensors counted, written to ``out`` (``[{"step", "objects", "tensors", "bytes"}]``) when undone. Automatic
    collection is off while ``train.run`` steps (``RunConfig.gc_every``), so all the step made is in the youngest
    generation: ``gc.collect(0)`` with ``DEBUG_SAVEALL`` finds it. Returns the function that undoes the
    wrapping."""
    import torch

    timed_step, found = rt.timed_step, []

    def probed(*args, **kwargs):
        record = timed_step(*args, **kwargs)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            objects = gc.collect(0)
            tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
            found.append({"step": record["step"], "objects": objects, "tensors": len(tensors),
                          "bytes": sum(t.untyped_storage().nbytes() for t in tensors if t.layout == torch.strided)})
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
        return record

    rt.timed_step = probed

    def undo() -> None:
        rt.timed_step = timed_step
        out.write_text(json.dumps(found))
    return undo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("plans", nargs="+")
    args = parser.parse_args(argv)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    phases = [(what, plan) for plan in args.plans for what in (("memory", "train") if args.memory else ("train",))]
    gc.freeze()     # torch's modules and the imports stay: each phase's collection walks only what came after
    for i, (what, plan) in enumerate(phases):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = f"{attempt}-phase{i}"   # train._attempt_store's prefix
        gc.collect()                                                       # the last phase's trainer gone
        if what == "memory":
            memory_run.measure(plan, Path(plan).parent)
        else:
            extra = Path(plan).with_suffix(".run.json")
            fields = json.loads(extra.read_text()) if extra.is_file() else {}
            undo = garbage_per_step(Path(plan).with_suffix(f".garbage{os.environ['RANK']}.json"))
            try:
                rt.run(rt.RunConfig(plan_path=plan, steps=args.steps,
                                    metrics_out=str(Path(plan).with_suffix(".jsonl")), **fields))
            finally:
                undo()
    os.environ["TORCHELASTIC_RESTART_COUNT"] = attempt
    gc.unfreeze()   # collectable again at exit (nanobind reports the instances it finds alive then as leaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
