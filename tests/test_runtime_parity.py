"""Parity: every plan trains the same model on the same data as one process, step for step.

Each layout trains in a real torchrun job on CPU/gloo (fp32, 4 steps), shared with tests/test_check.py's
memory comparison (``layout_run`` in conftest.py: one job per world size measures each layout's step memory,
then trains it from fresh weights with the runtime's loop as ``meshplan launch`` starts it); the per-step
losses must equal the 1-process run's within 1e-4 relative. A wrong shard, a missing gradient reduction, a mis-scaled loss or a
wrong pipeline partition shows up as a different loss by step 2.
"""

from __future__ import annotations

import pytest

from runtime_helpers import (PARITY_LAYOUTS, PARITY_RTOL, TINY_GPT, TINY_LLAMA, losses, make_plan,
                             max_relative_difference)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_baseline(trained):
    return losses(trained("llama-1proc", make_plan(model=TINY_LLAMA)))


@pytest.fixture(scope="module")
def gpt_baseline(trained):
    return losses(trained("gpt-1proc", make_plan(model=TINY_GPT)))


def test_baseline_learns(llama_baseline):
    # the loss must move, or parity would be vacuous
    assert llama_baseline[-1] < llama_baseline[0] - 0.05


LLAMA_PLANS = {name: kw for name, kw in PARITY_LAYOUTS.items() if "model" not in kw}


@pytest.mark.parametrize("name", list(LLAMA_PLANS))
def test_llama_plan_matches_one_process(name, llama_baseline, layout_run):
    measured = losses(layout_run(name).records)
    diff = max_relative_difference(llama_baseline, measured)
    print(f"parity {name}: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (name, llama_baseline, measured)


def test_gpt_tied_uneven_gpipe_matches_one_process(gpt_baseline, layout_run):
    """GPT family (LayerNorm, learned positions, GELU, biases) with tied embeddings split over two pipeline
    stages (the tied copies' gradients summed), uneven stages [0,1) and [1,4), GPipe, tp2 + selective."""
    assert PARITY_LAYOUTS["gpt-tied-tp2-pp2-gpipe-uneven"] == dict(
        model=TINY_GPT, tp=2, pp=2, schedule="gpipe", bounds=[0, 1, 4], recompute="selective")
    measured = losses(layout_run("gpt-tied-tp2-pp2-gpipe-uneven").records)
    diff = max_relative_difference(gpt_baseline, measured)
    print(f"parity gpt tp2-pp2 gpipe uneven tied: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (gpt_baseline, measured)
