"""liger-kernel behind meshplan's kernel signatures (``impl="liger"``) against the references, on CPU under
Triton's interpreter, and the checks that keep a liger plan from starting where it cannot run.

liger-kernel 0.8.5's rotary and fused linear cross-entropy run under the interpreter. Its RMSNorm and SiLU-mul
kernels do not (they call ``.to`` on scalar arguments, which the interpreter passes as Python floats): those two
adapters are checked on CUDA, where the GPU suite's kernel table (``benchmarks/bench_kernels_gpu.py``) runs them
through the same functions and reports their largest difference from eager.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshplan.errors import InputError
from meshplan.launcher.checks import check_liger_installed, check_supported
from meshplan.launcher.runtime import kernels as K
from meshplan.launcher.runtime.kernels import liger as L
from meshplan.launcher.runtime.kernels import reference as R
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes, saved_tensor_bytes
from meshplan.launcher.runtime.model import build_model
from meshplan.rules import liger_loss_chunk_tokens
from runtime_helpers import TINY_LLAMA, make_plan
from test_kernels import FP32_RTOL, interpret, rel_err  # noqa: F401  (interpret: the fixture)

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel is not installed (pip install liger-kernel==0.8.5)")


def grads(fn, inputs):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7)) for o in outs]
    total = sum((o * w).sum() for o, w in zip(outs, weights))
    return outs, torch.autograd.grad(total, inputs)


def rotary_inputs(seq=8, heads=4, kv_heads=2, head_dim=16):
    torch.manual_seed(0)
    q = torch.randn(2, seq, heads, head_dim, requires_grad=True)
    k = torch.randn(2, seq, kv_heads, head_dim, requires_grad=True)
    angles = torch.arange(seq)[:, None] * torch.rand(head_dim // 2)[None]
    return q, k, angles.cos(), angles.sin()


@needs_liger
def test_liger_rotary_equals_reference(interpret):
    q, k, cos, sin = rotary_inputs()
    q_before = q.detach().clone()
    want, want_grads = grads(lambda: R.rotary_reference(q, k, cos, sin), (q, k))
    got, got_grads = grads(lambda: K.apply_rotary(q, k, cos, sin, impl="liger"), (q, k))
    for a, b in zip(got + got_grads, want + want_grads):
        assert rel_err(a, b) < FP32_RTOL
    assert got[0].shape == q.shape
    assert torch.equal(q.detach(), q_before)       # a leaf is copied, not rotated in place


@needs_liger
def test_liger_rotary_keeps_what_the_fused_rotary_keeps(interpret):
    """Only the tables it is given (meshplan's half-width cos and sin, shared by every block): ``check`` runs
    the fused rotary in its place and the planner counts no bytes for it."""
    for impl in ("liger", "fused"):
        q, k, cos, sin = rotary_inputs()
        q_in, k_in = q * 1, k * 1           # non-leaf, as after the projections
        saved = saved_tensor_bytes(lambda: K.apply_rotary(q_in, k_in, cos, sin, impl=impl), (cos, sin))
        assert saved["other"] == 0 and saved["inputs"] == cos.nbytes + sin.nbytes, (impl, saved)


@needs_liger
def test_liger_loss_equals_reference_with_ignored_targets(interpret):
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 32, requires_grad=True)
    weight = torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (2, 24))
    targets[0, :5] = -100
    want, want_grads = grads(lambda: R.linear_cross_entropy_reference(hidden.flatten(0, 1), weight,
                                                                      targets.flatten()), (hidden, weight))
    got, got_grads = grads(lambda: K.linear_cross_entropy(hidden, weight, targets, impl="liger"), (hidden, weight))
    assert got[0].dtype == torch.float32
    for a, b in zip(got + got_grads, want + want_grads):
        assert rel_err(a, b) < FP32_RTOL


@needs_liger
@pytest.mark.parametrize("tokens,width,vocab", [(96, 32, 100), (256, 32, 640)])
def test_shape_only_loss_allocates_what_liger_does(interpret, tokens, width, vocab):
    """``meshplan check`` runs ``liger.ShapeOnlyLoss`` in place of liger's kernel. On real tensors the two keep
    the same bytes for backward, and their peaks lie within one chunk of logits of each other: the interpreted
    run keeps a chunk's logits alive past its launch (liger's code deletes each chunk before the next) and frees
    it during a later call, so the tracked peak moves by one chunk either way from run to run."""
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    real = saved_tensor_bytes(lambda: L.linear_cross_entropy(hidden, weight, targets), (hidden, weight))
    mirror = saved_tensor_bytes(lambda: L.ShapeOnlyLoss.apply(hidden, weight), (hidden, weight))
    assert real["other"] == mirror["other"] == (tokens + vocab) * width * 4
    real_peak, _, _ = peak_tracked_bytes(lambda: L.linear_cross_entropy(hidden, weight, targets))
    mirror_peak, _, _ = peak_tracked_bytes(lambda: L.ShapeOnlyLoss.apply(hidden, weight))
    chunk_logits = liger_loss_chunk_tokens(tokens, width, vocab) * vocab * 4
    assert abs(real_peak - mirror_peak) <= chunk_logits + tokens      # + the boolean target mask


@needs_liger
def test_model_runs_liger_rotary_and_loss(interpret):
    """The runtime model with ``rope_impl = "liger"`` and liger's loss on its hidden states: the same loss and
    gradients as the reference model."""
    def loss_and_grads(impl: str):
        torch.manual_seed(0)
        model = build_model(TINY_LLAMA, 16, device="cpu")
        model.set_positions(torch.arange(16))
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(1.0 if param.ndim == 1 else 0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "rope_impl"):
                module.rope_impl = impl
        tokens = torch.randint(0, TINY_LLAMA.vocab, (2, 17), generator=torch.Generator().manual_seed(1))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want = loss_and_grads("reference")
    got_loss, got = loss_and_grads("liger")
    assert rel_err(got_loss, want_loss) < FP32_RTOL
    assert max(rel_err(got[n], want[n]) for n in want) < FP32_RTOL


def test_liger_loss_refused_on_a_sharded_head():
    plan = make_plan(tp=2, kernels={"loss": "liger"})
    with pytest.raises(InputError, match="kernels.loss.*no vocabulary-parallel form.*set kernels.loss: fused"):
        check_supported(plan)


def test_liger_on_cpu_ranks_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="plan.kernels.norm.*liger kernel runs on GPU ranks"):
        check_supported(make_plan(kernels={"norm": "liger"}))


def test_liger_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(L, "_IMPORT", ["ModuleNotFoundError: No module named 'liger_kernel'"])
    with pytest.raises(InputError, match=r"plan.kernels.norm, kernels.rope.*does not import.*meshplan\[gpu\]"):
        check_liger_installed(make_plan(kernels={"norm": "liger", "rope": "liger"}))
    with pytest.raises(RuntimeError, match="impl='liger'.*not importable"):
        K.swiglu(torch.ones(2, 4), torch.ones(2, 4), impl="liger")
    check_liger_installed(make_plan(kernels={"norm": "fused"}))     # no liger named: nothing to import
