"""Per-head q/k norms (``ModelSpec.qk_norm``, Qwen3): the reference model norms every query and key head over
``head_dim`` before rotary positions, with heads x head_dim free to differ from hidden; its Hugging Face names and
the refusals of an export no family holds. Under tensor parallelism (one torchrun job of 4 ranks, slow) the norms'
weight gradients, each rank's covering its own heads, are summed over the TP ranks: with and without sequence
parallel, at tp 2 and at tp 4 over 2 key/value heads (copies of one KV head per rank), RMSNorm (reference and fused)
and LayerNorm, every gradient equals the one-process gradient. A training run of the same model is in the parity
matrix (runtime_helpers.PARITY_LAYOUTS ``qk-norm-tp4-replicated-kv``); the checkpoints of ``transformers``'
Qwen3 and Qwen3-MoE in tests/test_hf_weights.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from meshplan.errors import InputError
from meshplan.launcher.runtime import hf_format
from meshplan.launcher.runtime.model import RMSNorm, build_model
from meshplan.launcher.runtime.parallelize import block_matmuls
from meshplan.spec import MODEL_PRESETS, ModelSpec
from runtime_helpers import PARITY_LAYOUTS, TINY_QWEN3, job_env, run_forked_job

GRAD_RTOL = 1e-5


def _qwen3(**changes) -> ModelSpec:
    return dataclasses.replace(TINY_QWEN3, **changes)


def test_attention_norms_each_query_and_key_head():
    """q and k are normed per head (each head's rms over head_dim is one after the norm with unit weights), and
    the projections are heads x head_dim wide where that differs from hidden. (That the norms come before the
    rotary positions, with weights other than ones, shows in tests/test_hf_weights.py's logits of Qwen3.)"""
    spec = TINY_QWEN3
    attention = build_model(spec, 16, "cpu").layers["0"].attention
    assert spec.q_width != spec.hidden
    assert attention.wq.weight.shape == (spec.q_width, spec.hidden)
    assert attention.wo.weight.shape == (spec.hidden, spec.q_width)
    assert isinstance(attention.q_norm, RMSNorm) and attention.q_norm.weight.shape == (spec.head_dim,)
    seen = {}
    attention.rope = False
    attention.core = lambda q, k, v: seen.update(q=q, k=k) or q
    torch.manual_seed(0)
    attention(torch.randn(2, 16, spec.hidden), None)
    for t in (seen["q"], seen["k"]):
        rms = t.pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_models_without_qk_norm_have_no_head_norms():
    attention = build_model(MODEL_PRESETS["tiny-llama"], 16, "meta").layers["0"].attention
    assert attention.q_norm is None and attention.k_norm is None


def test_head_norm_weights_get_gradients_and_start_at_ones():
    from meshplan.launcher.runtime.model import InitConfig, init_weights

    model = build_model(TINY_QWEN3, 16, "meta")
    model.to_empty(device="cpu")
    init_weights(model, TINY_QWEN3, InitConfig(), torch.device("cpu"))
    model.set_positions(torch.arange(16))
    model(torch.randint(0, TINY_QWEN3.vocab, (2, 16))).float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(param.detach(), torch.ones_like(param)), name
            assert param.grad.abs().max() > 0, name


def test_the_fused_norm_kernel_is_bound_to_the_head_norms():
    """The plan's norm kernel reaches the q/k norms (train._set_kernels binds every module with ``impl``) and
    gives what the reference gives, forward and backward, on ``(batch, seq, heads, head_dim)``."""
    from meshplan.launcher.runtime import kernels
    from meshplan.launcher.runtime.train import _set_kernels
    from runtime_helpers import make_plan

    if not kernels.fused_available():
        pytest.skip("the fused kernels need Triton (TRITON_INTERPRET=1 on CPU)")
    plan = make_plan(model=TINY_QWEN3, kernels={"norm": "fused"})
    model = build_model(TINY_QWEN3, 16, "meta")
    _set_kernels(model, plan, "cpu")
    attention = model.layers["0"].attention
    assert attention.q_norm.impl == "fused" and attention.k_norm.impl == "fused"
    norm = RMSNorm(TINY_QWEN3.head_dim, TINY_QWEN3.norm_eps)
    x = torch.randn(2, 4, TINY_QWEN3.heads, TINY_QWEN3.head_dim, requires_grad=True)
    grads = []
    for impl in ("reference", "fused"):
        norm.impl, norm.weight.grad, x.grad = impl, None, None
        out = norm(x)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape).sin())
        grads.append((out.detach(), x.grad.clone(), norm.weight.grad.clone()))
    for ref, fused in zip(*grads):
        assert torch.allclose(ref, fused, atol=1e-5), (ref - fused).abs().max()


def test_head_norms_add_no_matmul():
    """Selective recompute counts a block's matmuls (parallelize.block_matmuls): the norms add none."""
    plain = build_model(_qwen3(qk_norm=False), 16, "meta").layers["0"]
    normed = build_model(TINY_QWEN3, 16, "meta").layers["0"]
    assert block_matmuls(normed) == block_matmuls(plain) == 7


@pytest.mark.parametrize("spec", [TINY_QWEN3, _qwen3(qk_norm=False),
                                  dataclasses.replace(MODEL_PRESETS["tiny-gpt"], qk_norm=True, head_dim=32),
                                  dataclasses.replace(MODEL_PRESETS["tiny-moe"], qk_norm=True)],
                         ids=["qwen3", "head-dim-only", "gpt-layernorm", "moe"])
def test_parameter_shapes_list_the_head_norms(spec):
    model = build_model(spec, 64, "meta")
    assert hf_format.parameter_shapes(spec) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_families_and_configs_of_exports():
    assert hf_format.hf_family_for(TINY_QWEN3) == "qwen3"
    config = hf_format.hf_config(TINY_QWEN3, "float32", 32)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == TINY_QWEN3.head_dim
    moe = dataclasses.replace(MODEL_PRESETS["tiny-moe"], qk_norm=True, head_dim=32)
    assert hf_format.hf_family_for(moe) == "qwen3_moe"
    config = hf_format.hf_config(moe, "float32", 32)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == moe.moe.experts
    assert config["norm_topk_prob"] == moe.moe.normalize_top_k and "shared_expert_intermediate_size" not in config


@pytest.mark.parametrize("changes,needles", [
    (dict(qkv_bias=True), ("--save-hf: model.qk_norm", "qkv_bias", "no Hugging Face architecture")),
    (dict(mlp="gelu", norm="layernorm", position="learned", bias=True, tied_embeddings=True, max_seq_len=64),
     ("--save-hf", "no q/k norms")),
])
def test_exports_no_family_holds_are_refused_in_one_line(changes, needles):
    with pytest.raises(InputError) as error:
        hf_format.hf_family_for(_qwen3(**changes))
    line = str(error.value)
    assert "\n" not in line
    for needle in needles:
        assert needle in line, (needle, line)


def test_launch_refuses_to_save_what_no_family_holds(tmp_path):
    """``meshplan launch --save-hf`` of a model with q/k norms and q/k/v biases: one line before any rank."""
    from typer.testing import CliRunner

    from meshplan.cli import app
    from runtime_helpers import make_plan

    plan = tmp_path / "plan.yaml"
    make_plan(model=_qwen3(qkv_bias=True), dp=2).save(plan)
    result = CliRunner().invoke(app, ["launch", str(plan), "--steps", "1", "--no-check", "--save-hf",
                                      str(tmp_path / "hf")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --save-hf: model.qk_norm"), result.output


@pytest.mark.parametrize("field,changes", [("qk_norm", dict(qk_norm=False)), ("head_dim", dict(head_dim=8))])
def test_a_checkpoint_of_another_head_layout_is_refused(field, changes):
    with pytest.raises(InputError) as error:
        hf_format.check_matches_plan(TINY_QWEN3, _qwen3(**changes))
    assert f"--init-from: {field}" in str(error.value)


def test_qk_norm_layouts_are_in_the_parity_matrix():
    """tp 4 over 2 key/value heads, with sequence parallel, of a model with q/k norms and heads x head_dim
    wider than hidden (tp 2 and the other cases: the gradient job below)."""
    kv = PARITY_LAYOUTS["qk-norm-tp4-replicated-kv"]
    assert kv["model"] is TINY_QWEN3 and kv["tp"] > TINY_QWEN3.kv_heads
    assert TINY_QWEN3.qk_norm and TINY_QWEN3.q_width != TINY_QWEN3.hidden


# ----------------------------------------------------------------------------------------------
# tensor parallel (one torchrun job of 4 ranks)
# ----------------------------------------------------------------------------------------------

TP_CASES = {   # name: (tp, sequence parallel, norm, impl)
    "tp2-sp": (2, True, "rmsnorm", "reference"),
    "tp2": (2, False, "rmsnorm", "reference"),
    "tp4-replicated-kv-sp": (4, True, "rmsnorm", "reference"),
    "tp4-replicated-kv": (4, False, "rmsnorm", "reference"),
    "tp2-sp-fused": (2, True, "rmsnorm", "fused"),
    "tp4-replicated-kv-sp-fused": (4, True, "rmsnorm", "fused"),
    "tp2-sp-layernorm": (2, True, "layernorm", "reference"),
    "tp4-replicated-kv-layernorm": (4, False, "layernorm", "reference"),
}
TP_WORLD = 4


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case of TP_CASES in one torchrun job (tests/qk_norm_job.py): per case, each rank's gradient errors
    against one process."""
    out = tmp_path_factory.mktemp("qk-norm")
    cases = [f"{name}:{tp}:{int(sp)}:{norm}:{impl}" for name, (tp, sp, norm, impl) in TP_CASES.items()]
    proc = run_forked_job(TP_WORLD, "qk_norm_job.py", [str(out), *cases], out, job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: [json.loads((out / name / f"result{r}.json").read_text()) for r in range(TP_WORLD)]
            for name in TP_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TP_CASES))
def test_head_norm_gradients_under_tp_equal_one_process(name, tp_results):
    for rank, result in enumerate(tp_results[name]):
        norms = [n for n in result if "q_norm" in n or "k_norm" in n]
        assert len(norms) == (4 if TP_CASES[name][2] == "layernorm" else 2), sorted(result)
        assert all(result[n]["norm"] > 0 for n in norms), result
        errors = {n: r["error"] for n, r in result.items()}
        assert max(errors.values()) <= GRAD_RTOL, (rank, errors)
