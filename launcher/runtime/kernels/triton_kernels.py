"""Triton kernels and their launchers for RMSNorm, SwiGLU, rotary and the cross-entropy chunk of the fused
linear + cross-entropy (the autograd Functions around them are ``fused_functions``).

This module imports Triton; it is imported only when a fused kernel runs on real tensors. Kernel bodies are
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


_JITTED: "dict[tuple[str, bool], Any]" = {}


def _jit(fn: Callable) -> Any:
    """``triton.jit(fn)``, made once per mode (compiled vs interpreted)."""
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


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


def rms_norm_forward(x2, w, y, rstd, eps: float) -> None:
    """Launch the RMSNorm forward over the rows of ``x2`` into ``y`` and ``rstd``."""
    m, n = x2.shape
    _jit(_rms_norm_fwd_kernel)[(m,)](x2, w, y, rstd, x2.stride(0), y.stride(0), n, eps,
                                     BLOCK_N=triton.next_power_of_2(n))


def rms_norm_backward(x2, w, dy2, rstd, dx, dw_partial, programs: int, rows_per_program: int) -> None:
    """Launch the RMSNorm backward: ``dx`` whole, the weight gradient as one partial sum per program."""
    m, n = x2.shape
    _jit(_rms_norm_bwd_kernel)[(programs,)](x2, w, dy2, rstd, dx, dw_partial, x2.stride(0), dy2.stride(0),
                                            dx.stride(0), m, n, rows_per_program,
                                            BLOCK_N=triton.next_power_of_2(n))


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


def swiglu_forward(g, u, out) -> None:
    n = g.numel()
    _jit(_swiglu_fwd_kernel)[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, out, n, BLOCK=_SWIGLU_BLOCK)


def swiglu_backward(g, u, dout, dg, du) -> None:
    n = g.numel()
    _jit(_swiglu_bwd_kernel)[(triton.cdiv(n, _SWIGLU_BLOCK),)](g, u, dout, dg, du, n, BLOCK=_SWIGLU_BLOCK)


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


def rotary_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """Launch the in-place rotation of ``x`` [batch, seq, heads, head_dim]; ``inverse`` rotates by -theta."""
    b, s, h, d = x.shape
    _jit(_rotary_kernel)[(b * s,)](x, cos, sin, x.stride(0), x.stride(1), x.stride(2), s, h, d // 2,
                                   BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d // 2),
                                   INVERSE=inverse)


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
