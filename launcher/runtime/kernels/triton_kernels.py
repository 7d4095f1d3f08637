"""Triton kernels (and the autograd Functions that launch them) for RMSNorm, SwiGLU, rotary and the
cross-entropy chunk of the fused linear + cross-entropy.

This module imports Triton; ``kernels/__init__`` imports it only once the fused path is chosen. Kernel bodies are
plain Python functions that are handed to ``triton.jit`` on first use, once per mode, because Triton decides
at decoration time whether a kernel is compiled for the GPU or run by its interpreter (``TRITON_INTERPRET=1``,
used by the CPU tests). All kernels compute in fp32 and round once to the output dtype.
"""

import os
from typing import Any, Callable

import torch

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def has_data(t: torch.Tensor) -> bool:
    """False for fake or meta tensors (``meshplan check`` traces the fused path for its memory only): the
    Functions below then allocate and save exactly what they would, but launch no kernel."""
    from torch._subclasses.fake_tensor import FakeTensor

    return not (t.is_meta or isinstance(t, FakeTensor))


_JITTED: "dict[tuple[str, bool], Any]" = {}


def _jit(fn: Callable) -> Any:
    """``triton.jit(fn)``, made once per mode (compiled vs interpreted)."""
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _num_programs(rows: int, device: torch.device) -> int:
    """Programs for the row-blocked kernels: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return max(1, min(rows, torch.cuda.get_device_properties(device).multi_processor_count * 4))
    return max(1, min(rows, 4))


# ============================================================================================================
# RMSNorm
# ============================================================================================================

def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)   # 64-bit offsets: T * V can exceed 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW, stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                         BLOCK_N: tl.constexpr):
    # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_rows dy * xhat (partial sum per program)
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = first + i
        # rows past the end (last program) load zeros, contribute nothing and store nothing
        mask = col_mask & ((row + tl.zeros([BLOCK_N], dtype=tl.int32)) < M)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, M - 1))
        xhat = x * rstd
        wdy = w * dy
        c = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW + pid * N + cols, dw, mask=col_mask)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm. Keeps for backward: x (the input), weight and rstd (fp32, one per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        shape = x.shape
        n = shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
        x2 = x.reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.contiguous()
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if m > 0 and has_data(x2):
            _jit(_rms_norm_fwd_kernel)[(m,)](x2, w, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK_N=block)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, w, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = _num_programs(m, x2.device)
        rows_per_program = triton.cdiv(m, programs) if m else 0
        dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
        if m > 0 and has_data(x2):
            _jit(_rms_norm_bwd_kernel)[(programs,)](
                x2, w, dy2, rstd, dx, dw_partial, x2.stride(0), dy2.stride(0), dx.stride(0), m, n,
                rows_per_program, BLOCK_N=triton.next_power_of_2(n))
        dw = dw_partial.sum(0).to(w.dtype)
        return dx.view(ctx.shape), dw, None


# ============================================================================================================
# SwiGLU
# ============================================================================================================

def _swiglu_fwd_kernel(G, U, O, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    o = g * tl.sigmoid(g) * u
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=mask)


def _swiglu_bwd_kernel(G, U, DO, DG, DU, n, BLOCK: tl.constexpr):
    # d/dg silu(g) = sig(g) * (1 + g * (1 - sig(g)))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (do * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (do * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    """Fused ``silu(gate) * up``. Keeps for backward: gate and up only (both inputs)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        if gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
        g, u = gate.contiguous(), up.contiguous()
        out = torch.empty_like(g)
        n = g.numel()
        if n and has_data(g):
            _jit(_swiglu_fwd_kernel)[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, out, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(g, u)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        g, u = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n and has_data(g):
            _jit(_swiglu_bwd_kernel)[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, dout, dg, du, n, BLOCK=_SWIGLU_BLOCK)
        return dg, du


# ============================================================================================================
# Rotary embedding (rotate-half / GPT-NeoX pairing), in place
# ============================================================================================================

def _rotary_kernel(X, COS, SIN, stride_b, stride_s, stride_h, S, H, HALF, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    # one program per (batch, position): all heads of that token, rotated in place
    row = tl.program_id(0).to(tl.int64)   # 64-bit offsets: T * V can exceed 2**31
    b = row // S
    s = row % S
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < HALF
    mask = (heads < H) & dmask
    c = tl.load(COS + s * HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + s * HALF + dims, mask=dmask, other=0.0).to(tl.float32)
    if INVERSE:
        sn = -sn
    base = X + b * stride_b + s * stride_s + heads * stride_h
    x1 = tl.load(base + dims, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + dims, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + dims, (x1 * c - x2 * sn).to(X.dtype.element_ty), mask=mask)
    tl.store(base + HALF + dims, (x2 * c + x1 * sn).to(X.dtype.element_ty), mask=mask)


def rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> None:
    """Rotate ``x`` [batch, seq, heads, head_dim] (last dim contiguous) in place; ``inverse`` rotates by -theta."""
    b, s, h, d = x.shape
    if x.numel() == 0 or not has_data(x):
        return
    _jit(_rotary_kernel)[(b * s,)](x, cos, sin, x.stride(0), x.stride(1), x.stride(2), s, h, d // 2,
                                   BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d // 2),
                                   INVERSE=inverse)


class RotaryFunction(torch.autograd.Function):
    """Fused rotary on one tensor (q or k), in place (``mark_dirty``). Keeps for backward: cos and sin only.

    One tensor per Function because autograd allows an in-place Function on a *view* (q and k split out of a
    fused qkv projection) only when it returns a single tensor. The backward is the inverse rotation
    (by -theta) of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cos, sin = cos.contiguous(), sin.contiguous()
        rotate_inplace(x, cos, sin)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        dx = dx.contiguous().clone()
        rotate_inplace(dx, cos, sin, inverse=True)
        return dx, None, None


# ============================================================================================================
# Cross-entropy chunk: per-row statistics, then the logits buffer turned into the logits gradient in place
# ============================================================================================================

def _ce_stats_kernel(L, TGT, LSE, TLOGIT, stride_l, V, BLOCK_V: tl.constexpr):
    # per row: local log-sum-exp (online max / rescaled sum per lane) and the target logit (0 if not owned)
    row = tl.program_id(0).to(tl.int64)   # 64-bit offsets: T * V can exceed 2**31
    base = L + row * stride_l
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only padding keep m = -inf; shift them by 0 so no (-inf) - (-inf) appears
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        acc = acc * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(acc * tl.exp(m - m_row), axis=0)
    tl.store(LSE + row, m_row + tl.log(s_row))
    t = tl.load(TGT + row)
    owned = t >= 0
    t_safe = tl.where(owned, t, 0)
    t_logit = tl.load(base + t_safe).to(tl.float32)
    tl.store(TLOGIT + row, tl.where(owned, t_logit, 0.0))


def _ce_grad_kernel(L, TGT, LSE, SCALE, stride_l, V, BLOCK_V: tl.constexpr):
    # L[row, :] <- (softmax(L[row, :]) - onehot(target)) * scale[row], in place
    row = tl.program_id(0).to(tl.int64)   # 64-bit offsets: T * V can exceed 2**31
    base = L + row * stride_l
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    t = tl.load(TGT + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
        tl.store(base + cols, (g * scale).to(L.dtype.element_ty), mask=mask)


def _ce_block(v: int) -> int:
    return min(triton.next_power_of_2(max(v, 1)), 4096 if not interpreting() else 1024)


def ce_chunk_stats(logits: torch.Tensor, local_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row local log-sum-exp and target logit (0 where ``local_target < 0``), fp32, of a logits chunk."""
    n, v = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    tlogit = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _jit(_ce_stats_kernel)[(n,)](logits, local_target, lse, tlogit, logits.stride(0), v, BLOCK_V=_ce_block(v))
    return lse, tlogit


def ce_chunk_grad_(logits: torch.Tensor, local_target: torch.Tensor, lse: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits`` with ``(softmax - onehot) * scale`` row-wise (``lse`` is the global log-sum-exp)."""
    n, v = logits.shape
    if n:
        _jit(_ce_grad_kernel)[(n,)](logits, local_target, lse, scale, logits.stride(0), v, BLOCK_V=_ce_block(v))
    return logits
