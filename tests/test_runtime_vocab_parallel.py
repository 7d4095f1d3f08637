"""Vocabulary parallelism across pipeline ranks (``vocab_parallel: true`` with pp > 1, issue 6): the embedding
and the LM head + cross-entropy split by vocabulary over every pp x tp rank must train the same model as one
process, step for step (fp32, CPU/gloo, per-step losses within 1e-4 relative), for tied and untied embeddings,
pp2 and pp4, with and without tp2 (sequence parallel), 1F1B and GPipe. See ``launcher/runtime/vocab_parallel.py``.
"""

from __future__ import annotations

import pytest

from runtime_helpers import (PARITY_RTOL, TINY_GPT, TINY_LLAMA, assert_same_grad_norms, losses, make_plan,
                             max_relative_difference, trained_by_world)

pytestmark = pytest.mark.slow
STEPS = 3   # 4-8 process jobs on a small machine: three steps already show a wrong shard or scale


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab-parallel")


@pytest.fixture(scope="module")
def baselines(trained):
    """The one-process runs the other parity tests compare with (``trained`` in conftest.py): their first
    STEPS steps are what a STEPS-step run computes (constant learning rate, the data drawn by step)."""
    return {"llama": trained("llama-1proc", make_plan(model=TINY_LLAMA))[:STEPS],
            "gpt": trained("gpt-1proc", make_plan(model=TINY_GPT))[:STEPS]}


PLANS = {   # name: (model, plan fields); llama: untied head, RoPE; gpt: tied embeddings, learned positions
    "llama-pp2": ("llama", dict(pp=2)),
    "llama-pp4": ("llama", dict(pp=4)),
    "llama-tp2-pp2": ("llama", dict(tp=2, pp=2)),
    "gpt-tied-pp2-uneven": ("gpt", dict(pp=2, bounds=[0, 1, 4])),
    "gpt-tied-tp2-pp2-gpipe": ("gpt", dict(tp=2, pp=2, schedule="gpipe")),
}


def vocab_plan(name: str):
    family, fields = PLANS[name]
    return make_plan(model=TINY_LLAMA if family == "llama" else TINY_GPT, vocab_parallel=True, **fields)


@pytest.fixture(scope="module")
def runs(workdir):
    """``runs(name)``: the layout's metrics; the layouts of one world size train in one torchrun job
    (``trained_by_world``)."""
    return trained_by_world({n: vocab_plan(n) for n in PLANS}, workdir, steps=STEPS)


@pytest.mark.parametrize("name", list(PLANS))
def test_vocab_parallel_matches_one_process(name, baselines, runs):
    expected, measured = baselines[PLANS[name][0]], runs(name)
    diff = max_relative_difference(losses(expected), losses(measured))
    print(f"parity vocab_parallel {name}: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (name, losses(expected), losses(measured))
    assert_same_grad_norms(name, expected, measured)      # the vocabulary shards' norm counted once
