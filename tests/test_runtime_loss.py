"""The fused loss in the runtime (``kernels.loss: fused``, issue 7): the head's stage outputs the normed hidden
states and the loss function runs the chunked linear + cross-entropy (vocabulary-parallel over the tp group
under TP), so the logits never exist. Per-step losses must equal the reference path's within 1e-5 relative
(fp32, CPU/gloo), for pp1, tp2, pp2, tied and untied embeddings. The training jobs compute the loss's chunks in
PyTorch, as CPU ranks do (``runtime_helpers.job_env``); the peak test runs the runtime's loss function on the
Triton chunk kernels (under Triton's interpreter)."""

from __future__ import annotations

import pytest

from runtime_helpers import TINY_GPT, TINY_LLAMA, losses, make_plan, max_relative_difference, train, trained_by_world

pytestmark = pytest.mark.slow
FUSED_RTOL = 1e-5
FUSED = {"norm": "reference", "swiglu": "reference", "rope": "reference", "loss": "fused"}


PLANS = {
    "llama-pp1": ("llama", dict()),
    "llama-tp2": ("llama", dict(tp=2)),
    "llama-pp2": ("llama", dict(pp=2)),
    "gpt-tied-pp1": ("gpt", dict()),
    "gpt-tied-tp2-pp2": ("gpt", dict(tp=2, pp=2)),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fused-loss")


def _plans(name: str):
    """(reference, fused) plans of PLANS[name]."""
    family, fields = PLANS[name]
    model = TINY_LLAMA if family == "llama" else TINY_GPT
    return make_plan(model=model, **fields), make_plan(model=model, kernels=FUSED, **fields)


@pytest.fixture(scope="module")
def multi_rank(workdir):
    """``multi_rank(name)``: the losses of PLANS[name] on both paths; each world size's plans train in one
    torchrun job (``trained_by_world``)."""
    plans = {f"{name}-{path}": plan for name in PLANS if _plans(name)[0].world_size > 1
             for path, plan in zip(("reference", "fused"), _plans(name))}
    runs = trained_by_world(plans, workdir)
    return lambda name: (losses(runs(f"{name}-reference")), losses(runs(f"{name}-fused")))


@pytest.mark.parametrize("name", list(PLANS))
def test_fused_loss_matches_reference_path(name, workdir, trained, multi_rank):
    reference_plan, fused_plan = _plans(name)
    if reference_plan.world_size == 1:
        # the reference path is the one-process run the parity tests compare with (``trained`` in conftest.py)
        reference = losses(trained(f"{PLANS[name][0]}-1proc", reference_plan))
        fused = losses(train(fused_plan, workdir, f"{name}-fused"))
    else:
        reference, fused = multi_rank(name)
    diff = max_relative_difference(reference, fused)
    print(f"fused loss {name}: max relative loss difference to the reference path {diff:.2e}")
    assert diff <= FUSED_RTOL, (name, reference, fused)


def test_runtime_fused_loss_peak_matches_planner():
    """The runtime's fused loss function (head + chunked cross-entropy, forward and backward) peaks at what
    ``planner.memory.logits_bytes(fused_loss=True)`` predicts for it, within 10% (CPU tracked allocations)."""
    import torch

    from meshplan.launcher.runtime import parallelize as par
    from meshplan.launcher.runtime import train as rt
    from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes
    from meshplan.launcher.runtime.model import InitConfig, init_weights
    from meshplan.planner.memory import logits_bytes
    from meshplan.spec import ModelSpec

    spec = ModelSpec(name="loss-peak", layers=1, hidden=128, heads=4, kv_heads=4, ffn_hidden=256, vocab=16000)
    plan = make_plan(model=spec, kernels=FUSED, global_batch=2, seq_len=256)
    model = rt.build_model(spec, plan.train.seq_len, "cpu")
    init_weights(model, spec, InitConfig(), torch.device("cpu"))
    model.output_hidden = True
    meshes = par.Meshes(world=None, tp=None, cp=None, pp=None, dp_cp=None, coords={"dp": 0, "tp": 0, "pp": 0, "cp": 0})
    loss_fn = rt.make_loss_fn(plan, meshes, [(0, model)])
    tokens = plan.micro_batch * plan.train.seq_len
    hidden = torch.randn(plan.micro_batch, plan.train.seq_len, spec.hidden, requires_grad=True)
    targets = torch.randint(0, spec.vocab, (plan.micro_batch, plan.train.seq_len))

    def step():
        loss = loss_fn(hidden, targets)
        loss.backward()
        return loss

    peak, _, _ = peak_tracked_bytes(step)
    predicted = logits_bytes(tokens, spec.vocab, "fp32", True, hidden=spec.hidden)
    print(f"runtime fused loss peak: measured {peak / 2**20:.1f} MiB, planner {predicted / 2**20:.1f} MiB, "
          f"error {predicted / peak - 1:+.1%} (T={tokens}, V={spec.vocab}, h={spec.hidden})")
    assert abs(predicted / peak - 1) <= 0.10
