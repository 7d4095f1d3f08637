"""Parity: every plan trains the same model on the same data as one process, step for step.

Each layout trains in a real torchrun job on CPU/gloo (fp32, 4 steps), shared with tests/test_check.py's
memory comparison (``layout_run`` in conftest.py: one job per world size measures each layout's step memory,
then trains it from fresh weights with the runtime's loop as ``meshplan launch`` starts it); the per-step
losses must equal the 1-process run's within 1e-4 relative. A wrong shard, a missing gradient reduction, a mis-scaled loss or a
wrong pipeline partition shows up as a different loss by step 2.
"""

from __future__ import annotations

import pytest

from runtime_helpers import (PARITY_LAYOUTS, PARITY_RTOL, TINY_GPT, TINY_LLAMA, assert_same_grad_norms, losses,
                             make_plan, max_relative_difference)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline(trained):
    """``baseline(layout)``: the metrics of the layout's model, batch and sequence trained in one process (once
    per session)."""
    def get(layout: dict) -> list[float]:
        same = {k: layout[k] for k in ("model", "global_batch", "seq_len") if k in layout}
        shared = {TINY_LLAMA.name: "llama", TINY_GPT.name: "gpt"}      # the runs other test files share
        name = "-".join(str(getattr(v, "name", v)) for v in same.values())
        name = shared.get(name, name)
        return trained(f"{name}-1proc", make_plan(**same))
    return get


@pytest.fixture(scope="module")
def llama_baseline(baseline):
    return losses(baseline({"model": TINY_LLAMA}))


def test_baseline_learns(llama_baseline):
    # the loss must move, or parity would be vacuous
    assert llama_baseline[-1] < llama_baseline[0] - 0.05


# The layouts but the GPT one (which has its own test below); a layout names its model or trains TINY_LLAMA.
LLAMA_PLANS = {name: kw for name, kw in PARITY_LAYOUTS.items() if kw.get("model", TINY_LLAMA) is not TINY_GPT}


@pytest.mark.parametrize("name", list(LLAMA_PLANS))
def test_llama_plan_matches_one_process(name, baseline, layout_run):
    expected = baseline({"model": TINY_LLAMA, **LLAMA_PLANS[name]})
    measured = layout_run(name).records
    diff = max_relative_difference(losses(expected), losses(measured))
    print(f"parity {name}: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (name, losses(expected), losses(measured))
    assert_same_grad_norms(name, expected, measured)


def test_replicated_kv_and_odd_group_layouts_are_in_the_matrix():
    """tp 4 over 2 key/value heads (each rank holds a copy of the KV head its 3 query heads use) and the ring on
    fused kernels with 3 query heads per KV head must stay in the parity matrix."""
    kv2, gqa3 = PARITY_LAYOUTS["kv2-tp4-replicated-kv"], PARITY_LAYOUTS["gqa3-tp2-cp2-ring"]
    assert kv2["tp"] > kv2["model"].kv_heads and (kv2["model"].heads // kv2["tp"]) % 2 == 1
    assert gqa3["cp_kind"] == "ring" and (gqa3["model"].heads // gqa3["model"].kv_heads) % 2 == 1


def test_gpt_tied_uneven_gpipe_matches_one_process(baseline, layout_run):
    """GPT family (LayerNorm, learned positions, GELU, biases) with tied embeddings split over two pipeline
    stages (the tied copies' gradients summed, their norm counted once), uneven stages [0,1) and [1,4), GPipe,
    tp2 + selective."""
    assert PARITY_LAYOUTS["gpt-tied-tp2-pp2-gpipe-uneven"] == dict(
        model=TINY_GPT, tp=2, pp=2, schedule="gpipe", bounds=[0, 1, 4], recompute="selective")
    expected = baseline({"model": TINY_GPT})
    measured = layout_run("gpt-tied-tp2-pp2-gpipe-uneven").records
    diff = max_relative_difference(losses(expected), losses(measured))
    print(f"parity gpt tp2-pp2 gpipe uneven tied: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (losses(expected), losses(measured))
    assert_same_grad_norms("gpt-tied-tp2-pp2-gpipe-uneven", expected, measured)


@pytest.mark.parametrize("name", list(PARITY_LAYOUTS))
def test_a_step_leaves_no_tensor_in_cyclic_garbage(name, layout_run):
    """``train.run`` turns Python's automatic garbage collection off while it steps (``RunConfig.gc_every``):
    no memory may wait for a collection. On every rank, after every step, no tensor is among the cyclic
    garbage the step left (``layout_job.garbage_per_step``)."""
    plan, garbage = make_plan(**PARITY_LAYOUTS[name]), layout_run(name).garbage
    assert sorted(garbage) == list(range(plan.world_size))
    for rank, steps in garbage.items():
        assert [s["step"] for s in steps] == [r["step"] for r in layout_run(name).records], (name, rank, steps)
        assert all(s["tensors"] == 0 and s["bytes"] == 0 for s in steps), (name, rank, steps)
