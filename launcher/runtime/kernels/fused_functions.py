"""The autograd Functions of the fused RMSNorm, SwiGLU and rotary kernels.

Each Function allocates its outputs and saves for backward exactly what the fused kernel does, then hands real
tensors to the Triton launchers of ``triton_kernels``. Fake or meta tensors (``meshplan check`` traces the fused
path for its memory) launch nothing, so this module imports no Triton: ``check`` of a fused plan runs on a
machine without it, and only a real launch imports ``triton_kernels``.
"""

from __future__ import annotations

import torch


def has_data(t: torch.Tensor) -> bool:
    """False for fake or meta tensors: the Functions then allocate and save what they would, launching nothing."""
    from torch._subclasses.fake_tensor import FakeTensor

    return not (t.is_meta or isinstance(t, FakeTensor))


def arrived(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the tensor that a pending collective's result wraps (``AsyncCollectiveTensor``: a DTensor's
    local shard or gradient right after a reduce-scatter), waited for: a kernel launch needs real storage."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def num_programs(rows: int, device: torch.device) -> int:
    """Programs for the row-blocked kernels: a few per SM on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return max(1, min(rows, torch.cuda.get_device_properties(device).multi_processor_count * 4))
    return max(1, min(rows, 4))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm. Keeps for backward: x (the input), weight and rstd (fp32, one per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        shape = x.shape
        n = shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"rms_norm: weight must have shape ({n},), got {tuple(weight.shape)}")
        x2 = arrived(x).reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = weight.contiguous()
        m = x2.shape[0]
        # the output is allocated in the input's shape and returned whole, not as a view: a module that FSDP2
        # wraps may return it, and an in-place op on a returned view would skip FSDP2's pre-backward hook
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        if m > 0 and has_data(x2):
            from .triton_kernels import rms_norm_forward

            rms_norm_forward(x2, w, y.view(m, n), rstd, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, w, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = arrived(dy).reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = num_programs(m, x2.device)
        rows_per_program = ceil_div(m, programs) if m else 0
        dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
        if m > 0 and has_data(x2):
            from .triton_kernels import rms_norm_backward

            rms_norm_backward(x2, w, dy2, rstd, dx, dw_partial, programs, rows_per_program)
        dw = dw_partial.sum(0).to(w.dtype)
        return dx.view(ctx.shape), dw, None


class SwiGLUFunction(torch.autograd.Function):
    """Fused ``silu(gate) * up``. Keeps for backward: gate and up only (both inputs)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        if gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
        g, u = arrived(gate).contiguous(), arrived(up).contiguous()
        out = torch.empty_like(g)
        if g.numel() and has_data(g):
            from .triton_kernels import swiglu_forward

            swiglu_forward(g, u, out)
        ctx.save_for_backward(g, u)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        g, u = ctx.saved_tensors
        dout = arrived(dout).contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        if g.numel() and has_data(g):
            from .triton_kernels import swiglu_backward

            swiglu_backward(g, u, dout, dg, du)
        return dg, du


def rotate_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> None:
    """Rotate ``x`` [batch, seq, heads, head_dim] (last dim contiguous) in place; ``inverse`` rotates by -theta."""
    if x.numel() == 0 or not has_data(x):
        return
    from .triton_kernels import rotary_inplace

    rotary_inplace(x, cos, sin, inverse)


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
        dx = arrived(dx).contiguous().clone()
        rotate_inplace(dx, cos, sin, inverse=True)
        return dx, None, None
