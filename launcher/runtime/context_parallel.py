"""Context parallelism implemented here so it runs on CPU/gloo as well as on CUDA/NCCL.

Each context-parallel rank holds a contiguous chunk of the sequence (rank ``r`` of ``n`` holds tokens
``[r*s/n, (r+1)*s/n)``). Two attention cores replace :func:`model.causal_attention`:

* :class:`UlyssesAttention` (Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns
  "all heads, my sequence chunk" into "my heads, the whole sequence", attention runs locally with the
  ordinary causal kernel (SDPA, flash on CUDA), and a second all-to-all turns it back.
* :class:`RingAttention` (Liu et al. 2023): queries stay put while key/value chunks travel around the
  ring of context ranks over point-to-point sends; partial results are merged with the online-softmax
  rule (log-sum-exp). The backward pass sends the key/value chunks around again together with their
  gradient accumulators, which arrive back at their owner after the last hop. Chunks after a rank's own
  chunk are masked out entirely by causality and skipped (no load balancing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshplan.launcher.runtime.model import causal_attention


# ----------------------------------------------------------------------------------------------
# Ulysses: all-to-all over heads
# ----------------------------------------------------------------------------------------------

def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Split ``x`` into ``n`` chunks along ``scatter_dim``, send chunk ``j`` to rank ``j`` and concatenate the
    chunks received (in source-rank order) along ``gather_dim``."""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _repeat_kv(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


class UlyssesAttention:
    """Causal attention over ``(batch, heads, seq_chunk, head_dim)`` with heads exchanged for sequence."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[1] % self.size:  # fewer key/value heads than ranks: replicate them to the query heads
            k, v = _repeat_kv(q, k), _repeat_kv(q, v)
        q, k, v = (_AllToAll.apply(t, 1, 2, self.group) for t in (q, k, v))   # my heads, whole sequence
        out = causal_attention(q, k, v)
        return _AllToAll.apply(out, 2, 1, self.group)                          # all heads, my chunk


# ----------------------------------------------------------------------------------------------
# Ring: key/value chunks passed around over P2P, online-softmax merge
# ----------------------------------------------------------------------------------------------

def _ring_shift(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Send each tensor to the next rank of the ring and receive the previous rank's."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    nxt, prev = dist.get_global_rank(group, (rank + 1) % n), dist.get_global_rank(group, (rank - 1) % n)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in received]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def _block_scores(q, k, scale, causal):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s = scores.shape[-1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        scale = q.shape[-1] ** -0.5
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        k_cur, v_cur = k, v
        for step in range(n):
            source = (rank - step) % n          # whose chunk k_cur/v_cur is
            if source <= rank:                  # later chunks are fully masked by causality
                scores = _block_scores(q, k_cur, scale, causal=source == rank)
                lse_blk = torch.logsumexp(scores, dim=-1)
                out_blk = torch.matmul(torch.exp(scores - lse_blk[..., None]), v_cur)
                new_lse = torch.logaddexp(lse, lse_blk)
                out = out * torch.exp(lse - new_lse)[..., None] + out_blk * torch.exp(lse_blk - new_lse)[..., None]
                lse = new_lse
            if step < n - 1:
                k_cur, v_cur = _ring_shift([k_cur, v_cur], group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.dtype = group, dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        grad_out = grad_out.float()
        scale = q.shape[-1] ** -0.5
        delta = (grad_out * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q)
        k_cur, v_cur = k, v
        dk_acc, dv_acc = torch.zeros_like(k), torch.zeros_like(v)
        for step in range(n):
            source = (rank - step) % n
            if source <= rank:
                probs = torch.exp(_block_scores(q, k_cur, scale, causal=source == rank) - lse[..., None])
                dv_acc = dv_acc + torch.matmul(probs.transpose(-1, -2), grad_out)
                dscores = probs * (torch.matmul(grad_out, v_cur.transpose(-1, -2)) - delta)
                dq = dq + torch.matmul(dscores, k_cur) * scale
                dk_acc = dk_acc + torch.matmul(dscores.transpose(-1, -2), q) * scale
            if step < n - 1:   # the chunk moves on together with its gradient accumulators
                k_cur, v_cur, dk_acc, dv_acc = _ring_shift([k_cur, v_cur, dk_acc, dv_acc], group)
            else:              # one last hop brings the accumulators home
                dk_acc, dv_acc = _ring_shift([dk_acc, dv_acc], group)
        return dq.to(ctx.dtype), dk_acc.to(ctx.dtype), dv_acc.to(ctx.dtype), None


class RingAttention:
    """Causal attention over ``(batch, heads, seq_chunk, head_dim)`` with K/V chunks passed around a ring."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:
            k, v = _repeat_kv(q, k), _repeat_kv(q, v)
        return _RingAttention.apply(q, k, v, self.group)


def sequence_chunk(seq_len: int, cp_rank: int, cp: int) -> tuple[int, int]:
    """Token range ``[first, end)`` of context rank ``cp_rank`` (contiguous chunks)."""
    size = seq_len // cp
    return cp_rank * size, (cp_rank + 1) * size
