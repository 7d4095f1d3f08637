"""``train.run``'s garbage collection (``RunConfig.gc_every``): automatic collection off while the steps run and
the young generations collected every N steps on every rank at once; 0 keeps automatic collection. That no
step leaves a tensor in cyclic garbage, in every parity layout, is tests/test_runtime_parity.py's."""

from __future__ import annotations

import gc

import pytest

pytest.importorskip("torch")

from meshplan.errors import InputError  # noqa: E402
from meshplan.launcher import render  # noqa: E402
from meshplan.launcher.runtime import train as rt  # noqa: E402


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_manual_gc_turns_automatic_collection_off_and_back(restore_gc):
    gc.enable()
    with rt.manual_gc(50):
        assert not gc.isenabled()
    assert gc.isenabled()
    with rt.manual_gc(0):
        assert gc.isenabled()           # 0: automatic collection stays on
    gc.disable()
    with rt.manual_gc(50):
        assert not gc.isenabled()
    assert not gc.isenabled()           # a caller that had turned it off keeps it off


def test_manual_gc_restores_collection_when_a_step_raises(restore_gc):
    gc.enable()
    with pytest.raises(RuntimeError):
        with rt.manual_gc(10):
            raise RuntimeError("a step failed")
    assert gc.isenabled()


def test_gc_every_reaches_the_ranks_and_is_checked():
    assert "--gc-every" not in render.train_args(steps=4, seed=0, data=None, data_dtype=None, metrics_out=None,
                                                 checkpoint_dir=None, checkpoint_every=0, lr=None)
    args = render.train_args(steps=4, seed=0, data=None, data_dtype=None, metrics_out=None, checkpoint_dir=None,
                             checkpoint_every=0, lr=None, gc_every=0)
    assert rt.parse_args(["--plan", "p.yaml", *args]).gc_every == 0
    assert rt.parse_args(["--plan", "p.yaml"]).gc_every == 50
    with pytest.raises(InputError, match="--gc-every"):
        rt.check_weights_io(None, rt.RunConfig(plan_path="p.yaml", gc_every=-1))


def test_the_parity_jobs_probe_finds_a_tensor_held_by_a_cycle(tmp_path, monkeypatch, restore_gc):
    """layout_job.garbage_per_step, which the parity layouts' no-garbage test reads, sees a step's cycle."""
    import json

    import torch

    import layout_job

    def step_with_a_cycle(*args, **kwargs):
        held = [torch.zeros(10)]
        held.append(held)       # unreachable after return, freed only by a collection
        return {"step": 1}

    monkeypatch.setattr(rt, "timed_step", step_with_a_cycle)
    out = tmp_path / "garbage.json"
    undo = layout_job.garbage_per_step(out)
    gc.collect()
    gc.disable()
    try:
        rt.timed_step()
    finally:
        undo()
    assert rt.timed_step is step_with_a_cycle
    (found,) = json.loads(out.read_text())
    assert found["step"] == 1 and found["tensors"] == 1 and found["bytes"] == 40, found


def test_launch_refuses_a_negative_gc_every_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from meshplan.cli import app
    from runtime_helpers import make_plan

    make_plan().save(tmp_path / "plan.yaml")
    result = CliRunner().invoke(app, ["launch", str(tmp_path / "plan.yaml"), "--gc-every", "-1", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --gc-every: must be >= 0, got -1 (give an integer >= 0)"
