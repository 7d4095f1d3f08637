"""liger-kernel's RMSNorm, SiLU-mul, rotary and fused linear cross-entropy behind meshplan's kernel signatures
(``impl="liger"``; liger-kernel is the ``gpu`` extra, imported here only when a plan runs one of them).

Each adapter computes what the reference of the same name computes (``reference.py``):

* :func:`rms_norm`: ``casting_mode="gemma"``, liger's mode that computes the whole norm in fp32, weight
  included, and rounds once (its ``llama`` mode rounds before the weight multiply, which the reference does
  not); ``in_place=False`` so the incoming gradient is not overwritten (autograd may hold it elsewhere).
  Keeps for backward what meshplan's fused norm keeps: the input, the weight and one fp32 rstd per row.
* :func:`swiglu`: liger's SiLU-mul, fp32 inside, keeps gate and up.
* :func:`apply_rotary`: liger's kernel takes q and k as ``[batch, heads, seq, head_dim]`` views of
  ``[batch, seq, heads, head_dim]`` storage, meshplan's layout, so it gets transposed views and the results
  are transposed back. It reads full-width tables (``cat(cos, cos)``, ``[1, seq, head_dim]``), built from
  meshplan's half-width ones on each call (``seq x head_dim`` elements, beside the ``seq x heads x head_dim``
  it rotates). :class:`RotaryFunction` keeps the half-width cos and sin for backward, as the fused rotary.
* :func:`linear_cross_entropy`: liger's fused linear cross-entropy, mean over the tokens whose target is not
  ``ignore_index``. It computes both gradients in the forward, chunk by chunk of ``next_pow2(ceil(T /
  ceil(V / h)))`` tokens (``rules.liger_loss_chunk_tokens``: meshplan's chunk rule without its 256-token
  floor); each chunk's logits are written once, in the input's dtype, and overwritten by their gradient. It
  has no vocabulary-parallel form: the runtime uses it only where the head is whole on the rank
  (``launcher/checks.py`` refuses it otherwise).
"""

from __future__ import annotations

import torch

from meshplan.rules import liger_loss_chunk_tokens

from .cross_entropy import outside_autocast

INSTALL_HINT = "pip install 'meshplan[gpu]' (liger-kernel), or set the kernel to fused"

# Memos of import_error and of liger's functional module: plain globals, which torch.compile reads as
# constants (an import traced inside a compiled block broke its graph on an H200; kernels_from_plan fills them
# before any block runs).
_IMPORT: list[str | None] = []
_FUNCTIONAL: list = []


def import_error() -> str | None:
    """None when liger-kernel's functional API imports, else why not (memoized)."""
    if not _IMPORT:
        try:
            from liger_kernel.transformers import functional
            _FUNCTIONAL.append(functional)
            _IMPORT.append(None)
        except Exception as exc:   # ImportError, or an install that does not match this torch / triton
            _IMPORT.append(f"{type(exc).__name__}: {exc}")
    return _IMPORT[0]


def _functional():
    if not _FUNCTIONAL:
        import_error()
    return _FUNCTIONAL[0]


def _arrived(t: torch.Tensor) -> torch.Tensor:
    from .fused_functions import arrived

    return arrived(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _functional().liger_rms_norm(_arrived(x), weight, eps, casting_mode="gemma", in_place=False)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    return _functional().liger_swiglu(_arrived(gate), _arrived(up))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryFunction.apply(_arrived(q), _arrived(k), cos, sin)


def full_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """liger's rotary tables, ``[1, seq, head_dim]`` in the rotated tensors' dtype, from meshplan's
    ``[seq, head_dim / 2]`` (rotate-half: the two halves share their angles)."""
    return tuple(torch.cat((t, t), dim=-1).to(dtype)[None] for t in (cos, sin))


class RotaryFunction(torch.autograd.Function):
    """liger-kernel's rotary kernel (``liger_kernel.ops.rope``'s forward and backward) on q and k as
    ``[batch, seq, heads, head_dim]``, keeping meshplan's half-width tables for backward (shared by every
    block) and building the full-width ones liger reads on each call. liger's own Function would keep the
    full-width tables it is given: a new ``seq x head_dim`` pair per block and micro-batch. Like liger's, the
    forward rotates the storage of q and k in place (callers pass copies where that matters); the backward
    rotates copies of the incoming gradients."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,  # type: ignore[override]
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from liger_kernel.ops.rope import rope_forward

        cos_full, sin_full = full_tables(cos, sin, q.dtype)
        q_out, k_out, _, _ = rope_forward(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)
        ctx.save_for_backward(cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):  # type: ignore[override]
        from liger_kernel.ops.rope import rope_backward

        cos, sin = ctx.saved_tensors
        cos_full, sin_full = full_tables(cos, sin, dq.dtype)
        dq, dk = (_arrived(g).contiguous().clone() for g in (dq, dk))
        dq, dk = rope_backward(dq.transpose(1, 2), dk.transpose(1, 2), cos_full, sin_full)
        return dq.transpose(1, 2), dk.transpose(1, 2), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, shape_only: bool = False) -> torch.Tensor:
    """Under autocast, hidden states and weight are cast to autocast's dtype first and the loss runs with
    autocast off, as meshplan's chunked loss does (``cross_entropy.outside_autocast``): liger then keeps both
    gradients in that dtype (it would keep an fp32 weight's in fp32) and accumulates the weight's in place.
    ``shape_only``: fake or meta tensors (:class:`ShapeOnlyLoss`)."""
    return outside_autocast(_linear_cross_entropy, hidden, weight, targets, ignore_index, shape_only)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          shape_only: bool) -> torch.Tensor:
    if shape_only:
        return ShapeOnlyLoss.apply(hidden, weight)
    loss = _functional().liger_fused_linear_cross_entropy(
        _arrived(hidden).reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index=ignore_index)
    return loss.float()


class ShapeOnlyLoss(torch.autograd.Function):
    """What liger's fused linear cross-entropy allocates, on fake or meta tensors (``meshplan check``; its
    Triton kernel cannot run on them). Forward: the hidden states' and the weight's gradients (the input's
    and the weight's dtypes), the fp32 per-token losses, and one chunk of logits in the input's dtype,
    overwritten in place by their gradient and freed. Each chunk adds its share of the weight gradient in
    place (``addmm(out=)``) on CUDA with 16-bit logits, and through a fresh fp32 ``[V, h]`` product beside
    the chunk otherwise (liger's fallback path). meshplan's runtime computes in 16 bits only on CUDA ranks
    (CPU ranks compute in fp32), and ``check``'s fake tensors stand for CUDA ranks though their device reads
    ``cpu``: the dtype decides. The two gradients are kept until backward, which returns them. The loss is a
    zero scalar: only shapes matter."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        tokens, width = hidden2.shape
        vocab = weight.shape[0]
        grad_hidden = torch.zeros_like(hidden2)
        grad_weight = torch.zeros_like(weight)
        per_token = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        logits_dtype = hidden.dtype
        chunk = liger_loss_chunk_tokens(tokens, width, vocab)
        logits = torch.empty(chunk, vocab, dtype=logits_dtype, device=hidden.device)
        if logits_dtype not in (torch.bfloat16, torch.float16):     # liger's fallback path, see the doc above
            product = torch.empty(vocab, width, dtype=torch.float32, device=hidden.device)
            del product
        del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.shape = hidden.shape
        return per_token.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.view(ctx.shape), grad_weight
