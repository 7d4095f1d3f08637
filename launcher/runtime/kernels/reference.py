"""Reference implementations: plain eager PyTorch, the ground truth every fused kernel is tested against.

These are also what the runtime runs when the plan says ``reference`` (and what ``impl="auto"`` falls back to
when Triton or a GPU is absent), so they are written the way an ordinary eager model would write them: the
bytes they keep for backward are the ones ``docs/kernels.md`` lists for the ``reference`` column.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32, returned in x.dtype."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` (the gate·up product of a SwiGLU MLP), in the inputs' dtype."""
    return F.silu(gate) * up


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    b, s, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq, head_dim")
    if d % 2:
        raise ValueError(f"apply_rotary: head_dim must be even, got {d}")
    if tuple(cos.shape) != (s, d // 2) or tuple(sin.shape) != (s, d // 2):
        raise ValueError(f"apply_rotary: cos and sin must be [seq, head_dim//2] = [{s}, {d // 2}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate-half ("GPT-NeoX") convention; out of place.

    With ``x1 = x[..., :d/2]`` and ``x2 = x[..., d/2:]`` (dimension ``i`` is paired with ``i + d/2``):
    ``out = cat(x1*cos - x2*sin, x2*cos + x1*sin)``, where ``cos[s, i] = cos(s * theta_i)`` has shape
    ``[seq, head_dim//2]`` and broadcasts over batch and heads. Computed in the tensors' dtype.
    """
    _check_rotary(q, k, cos, sin)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        c = cos.to(x.dtype)[None, :, None, :]
        s = sin.to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)


# --- linear + cross-entropy ----------------------------------------------------------------------------------


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward (Megatron's ``f`` operator), a functional
    collective so torch.compile traces it.

    The hidden state entering a vocabulary-parallel head is replicated over the group and each rank's shard
    contributes only part of its gradient; the sum makes the hidden gradient the full (unsharded) one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward all-reduces the gradient over ``group``."""
    return _CopyToGroup.apply(x, group)


def _global_value(local: torch.Tensor, op, group) -> torch.Tensor:
    """``local`` with its value replaced by the all-reduce over ``group`` but its gradient left local.

    d(result)/d(local) = 1 on this rank: every rank then holds the gradient of the one global loss with
    respect to its own shard (the other ranks' terms are constants here and get their gradient there).
    """
    reduced = local.detach().clone()
    dist.all_reduce(reduced, op=op, group=group)
    return local + (reduced - local.detach())


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   process_group=None, ignore_index: int = -100,
                                   reduce_hidden_grad: bool = True) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, with the full logits materialized.

    Unsharded: ``F.cross_entropy(logits.float(), targets)``. With ``process_group`` the weight is this rank's
    vocabulary shard (rows ``[r*V_local, (r+1)*V_local)`` for group rank r) and the max, the sum of exponentials
    and the target logit are all-reduced over the group (vocab-parallel cross-entropy, Megatron-LM); the loss is
    the same on every rank. With ``reduce_hidden_grad`` the hidden gradient is all-reduced over the group so it
    equals the unsharded one (turn off when the caller's own collective already sums it, e.g. the backward of
    a sequence-parallel all-gather). Tokens whose target is ``ignore_index`` count neither in the sum nor the mean.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if process_group is None:
        logits = h @ weight.t()
        return F.cross_entropy(logits.float(), t, ignore_index=ignore_index)

    if reduce_hidden_grad:
        h = copy_to_group(h, process_group)
    v_local = weight.shape[0]
    start = dist.get_rank(process_group) * v_local
    logits = (h @ weight.t()).float()
    # max: a shift only (log-sum-exp does not depend on it), so it needs no gradient
    m = logits.detach().amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    sum_exp = _global_value(torch.exp(logits - m[:, None]).sum(dim=-1), dist.ReduceOp.SUM, process_group)
    valid = t != ignore_index
    local = t - start
    owned = valid & (local >= 0) & (local < v_local)
    target_logit = torch.where(owned, logits.gather(1, local.clamp(0, v_local - 1)[:, None])[:, 0],
                               torch.zeros((), dtype=logits.dtype, device=logits.device))
    target_logit = _global_value(target_logit, dist.ReduceOp.SUM, process_group)
    per_token = torch.log(sum_exp) + m - target_logit
    return (per_token * valid).sum() / valid.sum()
