"""Fused linear + cross-entropy, chunked over tokens (optionally vocabulary-parallel).

``hidden [T, h] @ weight[V_local, h].T`` is computed ``chunk`` tokens at a time, so only a ``[chunk, V_local]``
block of logits ever exists. Because the loss is the last op, the gradient can be computed in the forward:
per chunk we form the logits, their statistics (local log-sum-exp and target logit; all-gathered over the
vocab-parallel group so the statistics are global), turn the logits buffer into ``(softmax - onehot) / n_valid``
in place, and accumulate ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden[chunk]``.
Backward only multiplies the stored gradients by the incoming scalar. (Liger-Kernel's FusedLinearCrossEntropy
and Megatron's vocab-parallel cross-entropy are the two ideas combined here.)

What is Triton and what is not: the matmuls are PyTorch (cuBLAS on a GPU) either way; the per-chunk softmax
statistics and the in-place gradient are the Triton kernels of ``triton_kernels`` (``_ce_stats_kernel``,
``_ce_grad_kernel``) when the ``triton`` backend is used, and a few in-place PyTorch ops otherwise. The memory
saving comes from the chunking, which both backends share; the Triton part saves the fp32 temporaries.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from meshplan.rules import loss_chunk_tokens


def default_chunk_tokens(tokens: int, hidden: int, vocab_local: int) -> int:
    """Tokens per chunk: ``meshplan.rules.loss_chunk_tokens`` (Liger-Kernel's rule, one chunk's logits about as
    large as the hidden states, with a 256-token floor), the rule the planner counts."""
    return loss_chunk_tokens(tokens, hidden, vocab_local)


def _torch_chunk_stats(logits: torch.Tensor, local_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    owned = local_target >= 0
    tlogit = torch.where(owned, z.gather(1, local_target.clamp(min=0)[:, None])[:, 0],
                         torch.zeros((), dtype=z.dtype, device=z.device))
    m = z.amax(dim=-1)
    lse = m + (z - m[:, None]).exp_().sum(dim=-1).log_()     # one fp32 [n, V_local] temporary
    return lse, tlogit


def _torch_chunk_grad_(logits: torch.Tensor, local_target: torch.Tensor, lse: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """``(softmax - onehot) * scale`` into ``logits`` (in place when fp32; one fp32 temporary otherwise)."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    z.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    # minus the one-hot, data-independently (no nonzero / boolean indexing: runs on fake tensors): every row
    # subtracts `scale` at its clamped target column, times 0 for rows whose target another rank owns
    owned = (local_target >= 0).to(z.dtype)
    z.scatter_add_(1, local_target.clamp(min=0)[:, None], (-scale * owned)[:, None])
    if z is not logits:
        logits.copy_(z)
    return logits


def _gather_stats(lse: torch.Tensor, tlogit: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank (local log-sum-exp, target logit) into global ones with one all-gather."""
    world = dist.get_world_size(group)
    packed = torch.stack((lse, tlogit))
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    stats = torch.stack(gathered)                    # [world, 2, n]
    return torch.logsumexp(stats[:, 0], dim=0), stats[:, 1].sum(dim=0)


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group, chunk: int,
                           ignore_index: int = -100, need_grad: bool = True, reduce_hidden_grad: bool = True,
                           backend: str = "torch", vocab_start: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked loss without autograd: ``(loss, grad_hidden, grad_weight)`` of the mean cross-entropy of
    ``hidden [T, h] @ weight[V_local, h].T``, the gradients for an incoming gradient of 1 (``None`` without
    ``need_grad``). ``weight`` holds rows ``[vocab_start, vocab_start + V_local)`` of the vocabulary (default
    ``group rank * V_local``; shards may be uneven). With ``group`` the softmax statistics are all-gathered
    per chunk, so the loss is the global one on every rank; ``grad_hidden`` is this rank's partial sum unless
    ``reduce_hidden_grad`` all-reduces it over the group. Data-independent (no ``.item()``/``nonzero``), so
    it runs on fake tensors; vocabulary parallelism across pipeline ranks calls it directly
    (``launcher/runtime/vocab_parallel.py``)."""
    if backend == "triton":
        from . import triton_kernels as tk
        stats_fn, grad_fn = tk.ce_chunk_stats, tk.ce_chunk_grad_
    else:
        stats_fn, grad_fn = _torch_chunk_stats, _torch_chunk_grad_
    tokens = hidden.shape[0]
    v_local = weight.shape[0]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * v_local if group is not None else 0
    valid = targets != ignore_index
    n_valid = valid.sum().to(torch.float32)                       # a tensor: no host sync
    inv = torch.where(n_valid > 0, 1.0 / n_valid.clamp(min=1.0), torch.zeros_like(n_valid))
    local_all = targets - vocab_start
    local_all = torch.where(valid & (local_all >= 0) & (local_all < v_local), local_all,
                            torch.full_like(local_all, -1))
    grad_hidden = torch.empty_like(hidden) if need_grad else None
    grad_weight = torch.zeros_like(weight) if need_grad else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    wt = weight.t()
    for c0 in range(0, tokens, chunk):
        c1 = min(tokens, c0 + chunk)
        h_c = hidden[c0:c1]
        logits = h_c @ wt                                        # [n, V_local], the only logits that exist
        local_t = local_all[c0:c1].contiguous()
        lse, tlogit = stats_fn(logits, local_t)
        if group is not None:
            lse, tlogit = _gather_stats(lse, tlogit, group)
        valid_c = valid[c0:c1]
        total += torch.where(valid_c, lse - tlogit, torch.zeros_like(lse)).sum()
        if need_grad:
            scale = valid_c.to(torch.float32) * inv
            dlogits = grad_fn(logits, local_t, lse.contiguous(), scale)
            torch.mm(dlogits, weight, out=grad_hidden[c0:c1])
            grad_weight.addmm_(dlogits.t(), h_c)
            del dlogits
        del logits                                               # before the next chunk's logits exist
    if need_grad and group is not None and reduce_hidden_grad:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
    return total / n_valid, grad_hidden, grad_weight             # 0/0 = nan when every token is ignored


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd Function of the chunked loss. Keeps for backward: grad_hidden [T, h] (hidden dtype) and
    grad_weight [V_local, h] (weight dtype), computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group, chunk: int,  # type: ignore[override]
                ignore_index: int, need_grad: bool, reduce_hidden_grad: bool, backend: str,
                vocab_start: int | None = None) -> torch.Tensor:
        loss, grad_hidden, grad_weight = chunked_loss_and_grads(hidden, weight, targets, group, chunk, ignore_index,
                                                                need_grad, reduce_hidden_grad, backend, vocab_start)
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.need_grad = need_grad
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if not ctx.need_grad:
            raise RuntimeError("linear_cross_entropy: backward through a loss computed without grad enabled")
        # The stored gradients are owned by this Function; scale them in place (no second [V, h] buffer).
        # A second backward (retain_graph=True) would scale twice, so it is refused.
        if getattr(ctx, "used", False):
            raise RuntimeError("linear_cross_entropy(impl='fused') supports a single backward per forward")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_out.to(torch.float32)
        grad_hidden.mul_(g.to(grad_hidden.dtype))
        grad_weight.mul_(g.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 process_group=None, chunk_tokens: int | None = None, ignore_index: int = -100,
                                 reduce_hidden_grad: bool = True, backend: str = "torch",
                                 vocab_start: int | None = None) -> torch.Tensor:
    """Chunked linear + cross-entropy; see the module doc. ``backend``: ``triton`` or ``torch`` (chunk math).
    ``vocab_start``: first vocabulary row of ``weight`` (default: group rank * rows).

    Under autocast (the runtime's 16-bit single-GPU plans keep fp32 weights and run under bf16 autocast) the
    loss runs in autocast's dtype, as autocast runs a matmul, with autocast off inside: the chunk GEMMs write
    into preallocated gradient buffers of the inputs' dtype, and autocast would make their products bf16 (an
    H200 run stopped at ``torch.mm(..., out=)``: "expected out tensor to have dtype BFloat16, got float").
    The casts are autograd ops, so the gradients reach the fp32 hidden states and weight in fp32
    (:func:`outside_autocast`)."""
    return outside_autocast(_chunked_linear_cross_entropy, hidden, weight, targets, process_group, chunk_tokens,
                            ignore_index, reduce_hidden_grad, backend, vocab_start)


def outside_autocast(loss: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
                     *args: Any) -> torch.Tensor:
    """``loss(hidden, weight, *args)``; under autocast, with both cast to autocast's dtype first and autocast
    off inside, so a loss that computes its gradients in the forward keeps them in that dtype and writes them
    into buffers of it (the casts are autograd ops: the gradients reach the original tensors in their dtype)."""
    device_type = hidden.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return loss(hidden.to(low), weight.to(low), *args)
    return loss(hidden, weight, *args)


def _chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  process_group, chunk_tokens: int | None, ignore_index: int,
                                  reduce_hidden_grad: bool, backend: str, vocab_start: int | None) -> torch.Tensor:
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_cross_entropy: hidden size {hidden.shape[-1]} != weight's {weight.shape[-1]}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"linear_cross_entropy: {t.shape[0]} targets for {h.shape[0]} tokens")
    if h.stride(-1) != 1:
        h = h.contiguous()
    chunk = chunk_tokens or default_chunk_tokens(h.shape[0], h.shape[1], weight.shape[0])
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(h, weight, t, process_group, int(chunk), ignore_index, need_grad,
                                           reduce_hidden_grad, backend, vocab_start)
