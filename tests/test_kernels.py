"""Fused kernels against their references (forward and gradients), single process, CPU.

The Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the ``interpret``
fixture); they are skipped, with the reason, only where ``triton`` cannot be imported. The chunked
cross-entropy's PyTorch backend and the references run everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from meshplan.launcher.runtime import kernels as K
from meshplan.launcher.runtime.kernels import cross_entropy as CE
from meshplan.launcher.runtime.kernels import reference as R
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes, saved_tensor_bytes

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton==3.9.0); "
                                                          "the Triton kernels cannot be interpreted")

FP32_RTOL = 1e-5   # relative (norm-wise) error allowed between fp32 implementations


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def run(fn, inputs, grad_out=None):
    """Forward, then gradients of ``sum(out * grad_out)`` wrt ``inputs``; returns (outputs tuple, grads)."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    if grad_out is None:
        gen = torch.Generator().manual_seed(1234)
        grad_out = tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grad_out))
    grads = torch.autograd.grad(loss, inputs)
    return tuple(o.detach().clone() for o in outs), grads


# --- the references themselves against independent formulations ----------------------------------------------

def test_references_match_independent_formulas():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 17), torch.randn(17)
    assert rel_err(R.rms_norm_reference(x, w, 1e-6), F.rms_norm(x, (17,), w, 1e-6)) < FP32_RTOL
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    assert rel_err(R.swiglu_reference(g, u), g * torch.sigmoid(g) * u) < FP32_RTOL
    # rotary = complex multiplication of (x_i + j x_{i+d/2}) by exp(j theta)
    b, s, h, d = 2, 5, 3, 8
    q, k = torch.randn(b, s, h, d), torch.randn(b, s, 1, d)
    theta = torch.randn(s, d // 2)
    qr, kr = R.rotary_reference(q, k, theta.cos(), theta.sin())
    for x, xr in ((q, qr), (k, kr)):
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(theta), theta)[None, :, None]
        assert rel_err(xr, torch.cat((z.real, z.imag), -1)) < FP32_RTOL


# --- RMSNorm ---------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(1, 3), (3, 7, 33), (5, 130), (2, 1000)])
def test_rms_norm_fused_matches_reference(interpret, shape):
    torch.manual_seed(hash(shape) % 1000)
    x = leaf(*shape)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    ref_out, ref_grads = run(lambda: K.rms_norm(x, w, 1e-5, impl="reference"), (x, w))
    out, grads = run(lambda: K.rms_norm(x, w, 1e-5, impl="fused"), (x, w))
    assert out[0].shape == x.shape and out[0].dtype == x.dtype
    assert rel_err(out[0], ref_out[0]) < FP32_RTOL
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < FP32_RTOL


@needs_triton
def test_rms_norm_fused_bf16_and_non_contiguous(interpret):
    torch.manual_seed(1)
    base = torch.randn(6, 40)
    x = base[:, :33].to(torch.bfloat16).requires_grad_()          # bf16 leaf
    w = torch.randn(33, dtype=torch.bfloat16, requires_grad=True)
    ref_out, ref_grads = run(lambda: K.rms_norm(x, w, impl="reference"), (x, w))
    out, grads = run(lambda: K.rms_norm(x, w, impl="fused"), (x, w))
    assert out[0].dtype == torch.bfloat16
    assert rel_err(out[0], ref_out[0]) < 1e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 2e-2
    strided = torch.randn(5, 2 * 24)[:, ::2].requires_grad_()      # last dim not contiguous
    w32 = torch.randn(24, requires_grad=True)
    ref_out, ref_grads = run(lambda: K.rms_norm(strided, w32, impl="reference"), (strided, w32))
    out, grads = run(lambda: K.rms_norm(strided, w32, impl="fused"), (strided, w32))
    assert rel_err(out[0], ref_out[0]) < FP32_RTOL
    assert all(rel_err(g, r) < FP32_RTOL for g, r in zip(grads, ref_grads))


# --- SwiGLU ----------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 5, 301)])
def test_swiglu_fused_matches_reference(interpret, shape):
    torch.manual_seed(len(shape))
    g, u = leaf(*shape, scale=3.0), leaf(*shape)
    ref_out, ref_grads = run(lambda: K.swiglu(g, u, impl="reference"), (g, u))
    out, grads = run(lambda: K.swiglu(g, u, impl="fused"), (g, u))
    assert rel_err(out[0], ref_out[0]) < FP32_RTOL
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < FP32_RTOL


# --- rotary ----------------------------------------------------------------------------------------------------

def _angles(seq, half, base=10000.0):
    inv = base ** (-torch.arange(half, dtype=torch.float32) / half)
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


@needs_triton
@pytest.mark.parametrize("b,s,h,kv,d", [(1, 1, 1, 1, 2), (2, 5, 3, 1, 6), (1, 7, 4, 2, 64)])
def test_rotary_fused_matches_reference_and_is_in_place(interpret, b, s, h, kv, d):
    torch.manual_seed(s)
    q0, k0 = leaf(b, s, h, d), leaf(b, s, kv, d)
    cos, sin = _angles(s, d // 2)
    ref_out, ref_grads = run(lambda: K.apply_rotary(q0 * 1, k0 * 1, cos, sin, impl="reference"), (q0, k0))

    def fused():
        q, k = q0 * 1, k0 * 1                     # non-leaf activations, as out of a projection
        q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
        qr, kr = K.apply_rotary(q, k, cos, sin, impl="fused")
        assert qr.data_ptr() == q_ptr and kr.data_ptr() == k_ptr, "fused rotary should work in place"
        return qr, kr

    out, grads = run(fused, (q0, k0))
    for got, want in zip(out + grads, ref_out + ref_grads):
        assert rel_err(got, want) < FP32_RTOL


@needs_triton
def test_rotary_fused_on_leaves_and_strided_views(interpret):
    torch.manual_seed(3)
    b, s, h, kv, d = 2, 3, 2, 1, 8
    cos, sin = _angles(s, d // 2)
    # leaves that require grad cannot be written in place: the fused path copies them
    q0, k0 = leaf(b, s, h, d), leaf(b, s, kv, d)
    ref_out, ref_grads = run(lambda: K.apply_rotary(q0, k0, cos, sin, impl="reference"), (q0, k0))
    out, grads = run(lambda: K.apply_rotary(q0, k0, cos, sin, impl="fused"), (q0, k0))
    assert all(rel_err(x, y) < FP32_RTOL for x, y in zip(out + grads, ref_out + ref_grads))
    # q and k as strided views of one fused qkv projection output (heads not contiguous): rotated in place
    qkv0 = leaf(b, s, h + 2 * kv, d)

    def split(impl):
        qkv = qkv0 * 1
        q, k = qkv[:, :, :h], qkv[:, :, h:h + kv]
        return K.apply_rotary(q, k, cos, sin, impl=impl)

    ref_out, ref_grads = run(lambda: split("reference"), (qkv0,))
    out, grads = run(lambda: split("fused"), (qkv0,))
    assert all(rel_err(x, y) < FP32_RTOL for x, y in zip(out + grads, ref_out + ref_grads))


def test_rotary_rejects_bad_shapes():
    q, k = torch.randn(1, 4, 2, 6), torch.randn(1, 4, 1, 6)
    with pytest.raises(ValueError, match="head_dim//2"):
        K.apply_rotary(q, k, torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="even"):
        K.apply_rotary(torch.randn(1, 4, 2, 5), torch.randn(1, 4, 1, 5), torch.randn(4, 2), torch.randn(4, 2))


# --- linear + cross-entropy ------------------------------------------------------------------------------------

def _loss_inputs(t, h, v, dtype=torch.float32, ignore_every=5, seed=0):
    torch.manual_seed(seed)
    hidden = leaf(t, h, dtype=dtype)
    weight = leaf(v, h, dtype=dtype, scale=h ** -0.5)
    targets = torch.randint(0, v, (t,))
    targets[1::ignore_every] = -100
    return hidden, weight, targets


CE_CASES = [(1, 4, 3, None), (37, 16, 101, 8), (64, 8, 1000, 1), (50, 12, 257, 64), (33, 24, 130, None)]


def _check_loss(impl_fn, t, h, v, chunk, scale=2.5, tol=FP32_RTOL):
    hidden, weight, targets = _loss_inputs(t, h, v, seed=t + v)
    ref = K.linear_cross_entropy(hidden, weight, targets, impl="reference")
    ref_grads = torch.autograd.grad(ref * scale, (hidden, weight))
    # the reference is F.cross_entropy on the full logits
    assert rel_err(ref, F.cross_entropy((hidden @ weight.t()).float(), targets)) < FP32_RTOL
    got = impl_fn(hidden, weight, targets, chunk)
    grads = torch.autograd.grad(got * scale, (hidden, weight))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert rel_err(got, ref) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < tol


@pytest.mark.parametrize("t,h,v,chunk", CE_CASES)
def test_chunked_loss_torch_backend_matches_reference(t, h, v, chunk):
    _check_loss(lambda hd, w, tg, c: CE.chunked_linear_cross_entropy(hd, w, tg, chunk_tokens=c, backend="torch"),
                t, h, v, chunk)


@needs_triton
@pytest.mark.parametrize("t,h,v,chunk", CE_CASES[:4])
def test_chunked_loss_triton_backend_matches_reference(interpret, t, h, v, chunk):
    assert K.fused_available("cpu")
    _check_loss(lambda hd, w, tg, c: K.linear_cross_entropy(hd, w, tg, impl="fused", chunk_tokens=c), t, h, v, chunk)


@needs_triton
def test_ce_triton_chunk_kernels_against_torch(interpret):
    from meshplan.launcher.runtime.kernels import triton_kernels as TK
    torch.manual_seed(5)
    logits = torch.randn(6, 2500) * 4                        # V larger than one block (1024 under the interpreter)
    local_t = torch.tensor([0, 2499, -1, 17, 1024, -1])
    lse, tl_ = TK.ce_chunk_stats(logits, local_t)
    assert rel_err(lse, torch.logsumexp(logits, -1)) < 1e-6
    want_t = torch.where(local_t >= 0, logits.gather(1, local_t.clamp(min=0)[:, None])[:, 0], torch.tensor(0.0))
    assert torch.equal(tl_, want_t)
    scale = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 1.0])
    want = torch.softmax(logits, -1)
    rows = torch.nonzero(local_t >= 0)[:, 0]
    want[rows, local_t[rows]] -= 1
    want *= scale[:, None]
    got = TK.ce_chunk_grad_(logits.clone(), local_t, lse, scale)
    assert rel_err(got, want) < 1e-6


def test_chunked_loss_shapes_eval_and_errors():
    hidden, weight, targets = _loss_inputs(12, 8, 50)
    # leading dims are flattened
    a = K.linear_cross_entropy(hidden.view(3, 4, 8), weight, targets.view(3, 4), impl="fused", chunk_tokens=5)
    b = K.linear_cross_entropy(hidden, weight, targets, impl="reference")
    assert rel_err(a, b) < FP32_RTOL
    # without grad: loss only, no graph
    with torch.no_grad():
        c = K.linear_cross_entropy(hidden, weight, targets, impl="fused", chunk_tokens=5)
    assert not c.requires_grad and rel_err(c, b) < FP32_RTOL
    # one backward per forward: a second one would double-scale the stored gradients
    loss = K.linear_cross_entropy(hidden, weight, targets, impl="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()
    # every token ignored: the mean over no tokens is nan, as in F.cross_entropy; the gradients are zero
    nothing = torch.full_like(targets, -100)
    assert torch.isnan(K.linear_cross_entropy(hidden, weight, nothing, impl="reference"))
    empty = K.linear_cross_entropy(hidden, weight, nothing, impl="fused")
    assert torch.isnan(empty)
    assert not torch.autograd.grad(empty, hidden)[0].any()
    with pytest.raises(ValueError, match="dtypes differ"):
        K.linear_cross_entropy(hidden, weight.double(), targets, impl="fused")
    with pytest.raises(ValueError, match="impl"):
        K.linear_cross_entropy(hidden, weight, targets, impl="triton")


def test_chunked_loss_bf16_close_to_fp32_reference():
    hidden, weight, targets = _loss_inputs(40, 32, 300, dtype=torch.bfloat16)
    ref = K.linear_cross_entropy(hidden.float(), weight.float(), targets, impl="reference")
    got = K.linear_cross_entropy(hidden, weight, targets, impl="fused", chunk_tokens=16)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-2
    got.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_chunked_loss_under_autocast_runs_in_its_dtype():
    """fp32 hidden states and weight under bf16 autocast (how the runtime runs a 16-bit single-GPU plan): the
    loss runs in bf16 like autocast's matmuls and the gradients come back fp32. An H200 run stopped here with
    "expected out tensor to have dtype BFloat16, but got float" before the loss handled autocast."""
    hidden, weight, targets = _loss_inputs(40, 32, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = K.linear_cross_entropy(hidden, weight, targets, impl="reference")
        got = K.linear_cross_entropy(hidden, weight, targets, impl="fused", chunk_tokens=16)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    grads = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) / ref.item() < 1e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel_err(g, r) < 3e-2


def test_default_chunk_tokens():
    assert CE.default_chunk_tokens(8192, 1024, 128256) == 256      # ceil(8192 / 126) = 66 -> 128, floor 256
    assert CE.default_chunk_tokens(512, 256, 32768) == 256         # Liger's rule alone: 4 tokens
    assert CE.default_chunk_tokens(8192, 4096, 128256) == 256
    assert CE.default_chunk_tokens(10, 4096, 1000) == 10            # never more than T
    assert CE.default_chunk_tokens(1, 8, 10**6) == 1


# --- dispatch --------------------------------------------------------------------------------------------------

def test_dispatch_without_triton_runtime(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: fused is available on CUDA tensors")
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="fused"):
        K.rms_norm(x, w, impl="fused")
    with pytest.raises(RuntimeError, match="fused"):
        K.swiglu(x, x, impl="fused")
    assert torch.equal(K.rms_norm(x, w, impl="auto"), K.rms_norm(x, w, impl="reference"))
    assert not K.fused_available("cpu")
    with pytest.raises(ValueError, match="impl"):
        K.swiglu(x, x, impl="fast")
    # triton not importable at all: the message says so, auto still falls back
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="pip install triton"):
        K.apply_rotary(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.ones(2, 2), torch.zeros(2, 2),
                       impl="fused")
    assert K.resolve_impl("auto", torch.device("cpu")) == "reference"
    # the chunked loss runs everywhere (its saving is the chunking; Triton only speeds the chunk math)
    hidden, weight, targets = _loss_inputs(9, 4, 20)
    assert rel_err(K.linear_cross_entropy(hidden, weight, targets, impl="fused"),
                   K.linear_cross_entropy(hidden, weight, targets, impl="reference")) < FP32_RTOL


def test_kernels_from_plan_and_pytorch_fused_helpers():
    from meshplan.plan import KERNEL_NAMES
    ks = K.kernels_from_plan({"loss": "fused", "norm": "auto"})
    assert set(ks.impls) == set(KERNEL_NAMES)
    assert ks.impls == {"norm": "auto", "swiglu": "reference", "rope": "reference", "loss": "fused"}
    assert ks.loss.keywords["impl"] == "fused"
    with pytest.raises(ValueError, match="unknown kernel"):
        K.kernels_from_plan({"attention": "fused"})
    assert K.fused_adamw_available() == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert K.sdpa_flash_available() is False


# --- memory: what each implementation keeps, and the loss's peak (docs/kernels.md) ----------------------------

@needs_triton
def test_saved_bytes_match_documented_formulas(interpret):
    t, h, f = 24, 40, 56
    x, w = leaf(t, h), leaf(h)
    ref = saved_tensor_bytes(lambda: K.rms_norm(x, w, impl="reference"), [x, w])
    fused = saved_tensor_bytes(lambda: K.rms_norm(x, w, impl="fused"), [x, w])
    assert ref["other"] == 4 * t * h + 4 * t           # fp32: xhat [T, h] and rstd [T] (x itself is an input)
    assert fused["other"] == 4 * t                     # rstd only
    xb, wb = leaf(t, h, dtype=torch.bfloat16), leaf(h, dtype=torch.bfloat16)
    ref = saved_tensor_bytes(lambda: K.rms_norm(xb, wb, impl="reference"), [xb, wb])
    fused = saved_tensor_bytes(lambda: K.rms_norm(xb, wb, impl="fused"), [xb, wb])
    assert ref["total"] == 8 * t * h + 4 * t + 4 * h   # bf16: fp32 copy of x, xhat, rstd, fp32 weight
    assert fused["total"] == 2 * t * h + 4 * t + 2 * h  # x, rstd, weight
    g, u = leaf(t, f, dtype=torch.bfloat16), leaf(t, f, dtype=torch.bfloat16)
    assert saved_tensor_bytes(lambda: K.swiglu(g, u, impl="reference"), [g, u])["other"] == 2 * t * f
    assert saved_tensor_bytes(lambda: K.swiglu(g, u, impl="fused"), [g, u])["other"] == 0
    q, k = leaf(2, 6, 4, 8), leaf(2, 6, 2, 8)
    cos, sin = _angles(6, 4)
    for impl in ("reference", "fused"):
        assert saved_tensor_bytes(lambda: K.apply_rotary(q * 1, k * 1, cos, sin, impl=impl),
                                  [q, k, cos, sin])["other"] == 0
    hd, wt, tg = _loss_inputs(64, 16, 500, ignore_every=1000)
    ref = saved_tensor_bytes(lambda: K.linear_cross_entropy(hd, wt, tg, impl="reference"), [hd, wt, tg])
    fused = saved_tensor_bytes(lambda: K.linear_cross_entropy(hd, wt, tg, impl="fused"), [hd, wt, tg])
    assert ref["other"] - 4 * 64 * 500 <= 64 * 8 + 64       # fp32 log-probs [T, V] (+ O(T))
    assert fused["other"] == 4 * (64 + 500) * 16             # grad_hidden [T, h] + grad_weight [V, h]


def test_fused_loss_peak_below_quarter_and_formula():
    """Small version of benchmarks/bench_loss_memory.py (tracked CPU allocations)."""
    t, h, v = 4096, 64, 8000       # T large enough for several chunks above the 256-token floor
    hidden, weight, targets = _loss_inputs(t, h, v, ignore_every=1000)
    peaks = {}
    for impl in ("reference", "fused"):
        hidden.grad = weight.grad = None

        def step():
            loss = CE.chunked_linear_cross_entropy(hidden, weight, targets, backend="torch") if impl == "fused" \
                else K.linear_cross_entropy(hidden, weight, targets, impl="reference")
            loss.backward()

        peaks[impl] = peak_tracked_bytes(step)[0]
    chunk = CE.default_chunk_tokens(t, h, v)
    assert peaks["fused"] < peaks["reference"] / 4
    predicted_ref = 12 * t * v
    predicted_fused = 4 * (t + v) * h + chunk * v * (4 + 4)
    assert abs(peaks["reference"] - predicted_ref) / predicted_ref < 0.02
    assert abs(peaks["fused"] - predicted_fused) / predicted_fused < 0.05
