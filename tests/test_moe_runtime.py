"""Mixture of experts in the runtime (launcher/runtime/moe.py): the block against a per-token reference, the
load-balancing loss and its gradient, expert-parallel initialisation and groups, the refusals; and (slow)
every expert layout trains like one process, loss and gradient norm, step for step, and resumes from its
checkpoint.

The gradient norm matters here: AdamW's update hardly changes when one parameter's gradient is scaled, so a
mis-scaled expert or load-balancing gradient moves the losses by less than 1e-4 but the norm by far more than
1e-5 (``runtime_helpers.assert_same_grad_norms``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from meshplan.errors import InputError
from meshplan.launcher.checks import check_supported
from meshplan.launcher.runtime import hf_format
from meshplan.launcher.runtime import moe as moe_mod
from meshplan.launcher.runtime.model import InitConfig, build_model, init_weights
from meshplan.launcher.runtime.parallelize import expert_rank_groups
from meshplan.spec import MODEL_PRESETS, MoESpec
from runtime_helpers import (PARITY_RTOL, assert_same_grad_norms, losses, make_plan, max_relative_difference,
                             train_together)

TINY_MOE = MODEL_PRESETS["tiny-moe"]     # 4 blocks, hidden 64, 4 experts, top-2, expert width 64
# A shared expert with its gate, sigmoid scores without renormalisation, a dense first block, a strong
# load-balancing loss (so that its gradient weighs in the router's); 2 experts, top-1, so that ep 2 leaves one
# expert per rank, which ZeRO splits by its width over two expert-data-parallel ranks.
TINY_MOE_SHARED = dataclasses.replace(
    TINY_MOE, name="tiny-moe-shared",
    moe=MoESpec(experts=2, top_k=1, expert_ffn_hidden=64, shared_experts=1, shared_ffn_hidden=96,
                shared_expert_gate=True, layers=(1, 2, 3), router_score="sigmoid", normalize_top_k=False,
                aux_loss_coeff=0.1))


def _block(spec, seed: int = 0) -> moe_mod.MoE:
    model = build_model(spec, 32, "cpu")
    init_weights(model, spec, InitConfig(seed=seed), torch.device("cpu"))
    return model.layers[str(spec.moe.layers[0] if spec.moe.layers else 0)].feed_forward


def _naive(block: moe_mod.MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token, straight from the definition."""
    out = torch.zeros_like(x)
    ex = block.experts
    for t, token in enumerate(x):
        logits = block.router.weight @ token
        scores = logits.softmax(-1) if block.score == "softmax" else logits.sigmoid()
        weights, chosen = scores.topk(block.top_k)
        if block.normalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, chosen):
            out[t] += w * (ex.w2[e] @ (F.silu(ex.w1[e] @ token) * (ex.w3[e] @ token)))
        if block.shared_experts is not None:
            se = block.shared_experts
            shared = se.w2.weight @ (F.silu(se.w1.weight @ token) * (se.w3.weight @ token))
            gate = torch.sigmoid(block.shared_gate.weight @ token) if block.shared_gate is not None else 1.0
            out[t] += gate * shared
    return out


@pytest.mark.parametrize("spec", [TINY_MOE, TINY_MOE_SHARED], ids=lambda s: s.name)
def test_block_equals_the_per_token_reference(spec):
    block = _block(spec).eval()
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))   # decisive routing
        x = torch.randn(2, 8, spec.hidden, generator=torch.Generator().manual_seed(2))
        got = block(x)
    expected = _naive(block, x.reshape(-1, spec.hidden)).view_as(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_grouped_expert_gemms_equal_the_per_expert_gemms_in_bf16():
    """The grouped GEMMs (torch._grouped_mm) give the per-expert GEMMs' output and gradients, bit for bit in
    bf16 here, with an expert that gets no rows and the counts as a device tensor; ``configure`` picks them
    where the block computes in bf16 only, and selective recompute counts three matmul ops for them."""
    from meshplan.launcher.runtime.parallelize import block_matmuls

    model = build_model(TINY_MOE, 32, "cpu")
    init_weights(model, TINY_MOE, InitConfig(seed=3), torch.device("cpu"))
    moe_mod.configure(model, bf16=False)
    experts = model.layers["0"].feed_forward.experts
    assert not experts.grouped and block_matmuls(model.layers["0"]) == 4 + 1 + 3 * 4
    moe_mod.configure(model, bf16=True)
    assert experts.grouped and block_matmuls(model.layers["0"]) == 4 + 1 + 3
    counts = [5, 0, 7, 4]
    x = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    grad = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for grouped, given in ((True, torch.tensor(counts)), (False, counts)):
        experts.grouped = grouped
        experts.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs = x.clone().requires_grad_()
            out = experts(inputs, given)
        out.backward(grad)
        results.append([out, inputs.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad])
    assert results[0][0].dtype == torch.bfloat16
    for grouped, looped in zip(*results):
        assert torch.equal(grouped.float(), looped.float())
    assert results[0][2][1].abs().max() == 0          # the expert without rows gets no gradient


def test_load_balancing_loss_by_hand():
    """Sequence 1: both tokens to expert 0 (f = [1, 0]), mean probabilities [0.55, 0.45]: E * sum f P = 1.1.
    Sequence 2: one token each (f = [.5, .5]), P = [.5, .5]: 1.0. The loss is coeff times their mean."""
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5], [0.5, 0.5]]])
    chosen = torch.tensor([[[0], [0]], [[0], [1]]])
    loss = moe_mod.load_balancing_loss(probs, chosen, top_k=1, coeff=0.01)
    assert loss.item() == pytest.approx(0.01 * (1.1 + 1.0) / 2)
    # top-2 of 2 experts: every expert gets half the assignments, P sums to 1: the loss is the coefficient
    both = torch.tensor([[[0, 1], [1, 0]]])
    assert moe_mod.load_balancing_loss(probs[:1], both, top_k=2, coeff=0.3).item() == pytest.approx(0.3)


def test_load_balancing_gradient_joins_the_block_output():
    """The block's output carries the loss's gradient (scaled by ``aux_grad_scale``): the router's gradient
    equals that of ``out.sum() + scale * aux`` computed by hand."""
    block = _block(TINY_MOE_SHARED).train()
    x = torch.randn(2, 8, TINY_MOE.hidden, generator=torch.Generator().manual_seed(3))
    block.aux_grad_scale = 0.5
    block(x).sum().backward()
    injected = block.router.weight.grad.clone()
    block.zero_grad()
    coeff, block.aux_coeff = block.aux_coeff, 0.0
    out = block(x)
    block.aux_coeff = coeff
    scores = block.router(x.reshape(-1, x.shape[-1])).float().sigmoid()
    chosen = scores.topk(block.top_k, -1).indices
    aux = moe_mod.load_balancing_loss((scores / scores.sum(-1, keepdim=True)).view(2, 8, -1), chosen.view(2, 8, -1),
                                      block.top_k, coeff)
    (out.sum() + 0.5 * aux).backward()
    torch.testing.assert_close(injected, block.router.weight.grad, rtol=1e-5, atol=1e-8)
    assert aux.item() > 0


def test_expert_parallel_rank_gets_its_rows_of_the_full_tensors():
    full = build_model(TINY_MOE, 32, "cpu")
    init_weights(full, TINY_MOE, InitConfig(), torch.device("cpu"))
    part = build_model(TINY_MOE, 32, "meta")
    moe_mod.shard_experts(part, ep=2, ep_rank=1)
    part.to_empty(device="cpu")
    init_weights(part, TINY_MOE, InitConfig(), torch.device("cpu"))
    for leaf in ("w1", "w2", "w3"):
        mine = getattr(part.layers["2"].feed_forward.experts, leaf)
        assert mine.shape[0] == 2
        assert torch.equal(mine, getattr(full.layers["2"].feed_forward.experts, leaf)[2:4])
    assert torch.equal(part.layers["2"].feed_forward.router.weight, full.layers["2"].feed_forward.router.weight)


def test_expert_groups_fold_into_data_and_context_ranks():
    """dp2 x tp2 (mesh dp, tp): the dp_cp groups are {0, 2} and {1, 3}; ep=2 takes each whole, and the ranks
    holding the same experts are the EP-group places across TP ranks."""
    ep_groups, edp_groups = expert_rank_groups(make_plan(model=TINY_MOE, dp=2, tp=2, ep=2))
    assert sorted(ep_groups) == [[0, 2], [1, 3]]
    assert sorted(edp_groups) == [[0, 1], [2, 3]]
    ep_groups, edp_groups = expert_rank_groups(make_plan(model=TINY_MOE, dp=4, ep=2))
    assert sorted(ep_groups) == [[0, 1], [2, 3]] and sorted(edp_groups) == [[0, 2], [1, 3]]


def test_refusals_name_the_field(tmp_path):
    dropping = dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, capacity_factor=1.25))
    with pytest.raises(InputError) as error:
        check_supported(make_plan(model=dropping, dp=2, ep=2))
    assert "model.moe.capacity_factor" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError) as error:
        check_supported(make_plan(model=TINY_MOE, dp=2, tp=2, ep=2, expert_tp=2))
    assert "plan.expert_tp" in str(error.value)
    assert hf_format.hf_family_for(TINY_MOE) == "mixtral"
    sigmoid = dataclasses.replace(TINY_MOE, moe=dataclasses.replace(TINY_MOE.moe, router_score="sigmoid"))
    with pytest.raises(InputError) as error:
        hf_format.hf_family_for(sigmoid)
    assert "--save-hf" in str(error.value) and "mixture of experts" in str(error.value)


# ----------------------------------------------------------------------------------------------
# parity (torchrun on CPU/gloo)
# ----------------------------------------------------------------------------------------------

MOE_LAYOUTS = {   # world 4, one torchrun job
    "dp4-ep2-zero1": dict(model=TINY_MOE, dp=4, ep=2, zero=1),
    "dp2-tp2-ep2": dict(model=TINY_MOE, dp=2, tp=2, ep=2),
    "dp2-pp2-ep2-full-recompute": dict(model=TINY_MOE, dp=2, pp=2, ep=2, recompute="full"),
    "dp4-ep4-zero3": dict(model=TINY_MOE, dp=4, ep=4, zero=3),
    "shared-dp2-cp2-ep2-zero1": dict(model=TINY_MOE_SHARED, dp=2, cp=2, ep=2, zero=1),
    "shared-dp2-tp2-ep2-selective-zero2": dict(model=TINY_MOE_SHARED, dp=2, tp=2, ep=2, recompute="selective",
                                               zero=2),
    # the experts' FSDP2 unit inside a selectively recomputed block (parallelize._run_profiler_ranges_as_they_come)
    "dp4-ep2-selective-zero3": dict(model=TINY_MOE, dp=4, ep=2, recompute="selective", zero=3),
}


@pytest.fixture(scope="module")
def moe_baseline(trained):
    def get(model):
        return trained(f"{model.name}-1proc", make_plan(model=model))
    return get


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    plans = {name: make_plan(**kw) for name, kw in MOE_LAYOUTS.items()}
    return train_together(plans, tmp_path_factory.mktemp("moe-world4"))


def _assert_parity(name, expected, measured):
    diff = max_relative_difference(losses(expected), losses(measured))
    print(f"moe parity {name}: max relative loss difference {diff:.2e}")
    assert diff <= PARITY_RTOL, (name, losses(expected), losses(measured))
    assert_same_grad_norms(name, expected, measured)


@pytest.mark.slow
def test_baselines_learn(moe_baseline):
    for model in (TINY_MOE, TINY_MOE_SHARED):
        run = losses(moe_baseline(model))
        assert run[-1] < run[0] - 0.05, (model.name, run)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_expert_layout_matches_one_process(name, moe_baseline, world4):
    _assert_parity(name, moe_baseline(MOE_LAYOUTS[name]["model"]), world4[name])


@pytest.mark.slow
def test_expert_parallel_on_two_ranks_and_resume(moe_baseline, tmp_path):
    """dp2 x ep2 (each rank 2 of the 4 experts, the expert-data-parallel group one rank) under replicate and
    under ZeRO-1 with a checkpoint every 2 steps; the ZeRO-1 run restarted from step 2 repeats steps 3 and 4."""
    ckpt = tmp_path / "ckpt"
    (tmp_path / "zero1.run.json").write_text(json.dumps({"checkpoint_dir": str(ckpt), "checkpoint_every": 2}))
    runs = train_together({"replicate": make_plan(model=TINY_MOE, dp=2, ep=2),
                           "zero1": make_plan(model=TINY_MOE, dp=2, ep=2, zero=1)}, tmp_path)
    for name, run in runs.items():
        _assert_parity(f"dp2-ep2-{name}", moe_baseline(TINY_MOE), run)
    (ckpt / "latest").write_text("step-00000002\n")
    (tmp_path / "resumed.run.json").write_text(json.dumps({"checkpoint_dir": str(ckpt)}))
    resumed = train_together({"resumed": make_plan(model=TINY_MOE, dp=2, ep=2, zero=1)}, tmp_path)["resumed"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert losses(resumed) == pytest.approx(losses(runs["zero1"])[2:], rel=1e-6)
