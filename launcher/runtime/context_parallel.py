"""Context parallelism implemented here so it runs on CPU/gloo as well as on CUDA/NCCL.

Each context-parallel rank holds part of every sequence (:func:`sequence_positions`). Two attention cores
replace :func:`model.causal_attention`:

* :class:`UlyssesAttention` (Jacobs et al. 2023, DeepSpeed-Ulysses): rank ``r`` of ``n`` holds tokens
  ``[r*s/n, (r+1)*s/n)``; an all-to-all turns "all heads, my sequence chunk" into "my heads, the whole
  sequence", attention runs locally with the ordinary causal kernel (SDPA, flash on CUDA), and a second
  all-to-all turns it back.
* :class:`RingAttention` (Liu et al. 2023): rank ``r`` holds chunks ``r`` and ``2n - 1 - r`` of ``2n``
  (zig-zag, so the causal work is equal on every rank); queries stay put while key/value chunks travel
  around the ring over point-to-point sends, each hop attended to with the fused attention kernel that
  returns its log-sum-exp (CPU: ``_scaled_dot_product_flash_attention_for_cpu``; CUDA: FlashAttention or
  the memory-efficient kernel) and merged by log-sum-exp. The backward pass runs the fused backward per
  hop and sends the key/value chunks around again, their gradient accumulators one hop behind, which
  arrive back at their owner after the last hop. No ``s x s`` score tensor exists.
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
# Ring: key/value chunks passed around over P2P, fused attention per hop, log-sum-exp merge
# ----------------------------------------------------------------------------------------------

class _Shift:
    """Send each tensor to the next rank of the ring and receive the previous rank's, asynchronously:
    :meth:`wait` returns what arrived. Started before the work it hides under."""

    def __init__(self, tensors: list[torch.Tensor], group: dist.ProcessGroup):
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        nxt, prev = dist.get_global_rank(group, (rank + 1) % n), dist.get_global_rank(group, (rank - 1) % n)
        self.received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, prev, group) for r in self.received]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused attention kernel on one block: ``(out, lse)``, ``lse`` fp32 ``[b, heads, q_len]``. CPU:
    ``_scaled_dot_product_flash_attention_for_cpu``; CUDA: FlashAttention for 16-bit inputs, the
    memory-efficient kernel for fp32 (its log-sum-exp is padded to a multiple of 32 rows). No kernel
    materialises the ``q_len x k_len`` scores."""
    if q.device.type != "cuda":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                             scale=scale)
    return out, lse[..., : q.shape[2]]


def _attend_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of one block from the fused backward, given the rows' final ``out`` and ``lse``
    (merged over every hop): each block's probabilities are ``exp(scores - lse)`` against the whole row, so
    the per-block gradients sum to the whole attention's."""
    if q.device.type != "cuda":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, scale=scale)
    none = torch.empty(0, device=q.device)
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, none, none, q.shape[2], k.shape[2], 0.0, causal, none, none, scale=scale)
    padded = torch.nn.functional.pad(lse, (0, -q.shape[2] % 32))
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, padded, none, none, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped K/V ``[b, kv_heads, s, d]`` repeated to the query heads (each query head's own K/V head)."""
    return t.contiguous() if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _reduce_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of :func:`_expand_kv`: the query heads' K/V gradients summed per K/V head."""
    b, heads, s, d = grad.shape
    return grad if heads == kv_heads else grad.view(b, kv_heads, heads // kv_heads, s, d).sum(2)


def zigzag_block(step: int, rank: int, half: int) -> tuple[slice, slice, bool]:
    """Which local query rows attend to which rows of the K/V chunk pair held at ``step`` (that of rank
    ``(rank - step) mod n``), each rank holding chunks ``rank`` and ``2n - 1 - rank`` of ``2n`` (``half``
    tokens each; :func:`sequence_positions`): ``(query rows, K/V rows, causal)``.
        step 0        its own chunks: every row, causal (both halves in order)
        source < rank the source's first chunk precedes both of ours, its second follows both: every query
                      row against the first K/V half
        source > rank only our second chunk follows the source's: the second query half against all K/V
    Every hop after the first is one half against one chunk pair's worth: equal work on every rank."""
    every = slice(None)
    if step == 0:
        return every, every, True
    if step <= rank:             # source = rank - step, no wrap: an earlier rank
        return every, slice(0, half), False
    return slice(half, None), every, False


class _RingAttention(torch.autograd.Function):
    """Ring attention (Liu et al. 2023) on fused kernels with zig-zag load balancing (Megatron-LM context
    parallel's chunk pairs): queries stay, K/V chunks at their own (grouped) size and in the compute dtype
    travel the ring, the next one sent while the current one is attended to; partial outputs merge by
    log-sum-exp in fp32. Backward: the fused backward per hop with the merged ``out`` and ``lse``; K/V go
    round again, their fp32 gradient accumulators one hop behind, and one last hop brings those home."""

    @staticmethod
    def forward(ctx, q, k, v, group):
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        scale, heads, half = q.shape[-1] ** -0.5, q.shape[1], q.shape[2] // 2
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(n):
            pending = _Shift(kv, group) if step < n - 1 else None
            rows, cols, causal = zigzag_block(step, rank, half)
            k_blk, v_blk = (_expand_kv(t[:, :, cols], heads) for t in kv)
            out_blk, lse_blk = _attend(q[:, :, rows], k_blk, v_blk, causal, scale)
            merged = torch.logaddexp(lse[:, :, rows], lse_blk)
            out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - merged)[..., None]
                               + out_blk.float() * torch.exp(lse_blk - merged)[..., None])
            lse[:, :, rows] = merged
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, n = dist.get_rank(group), dist.get_world_size(group)
        scale, heads, half = q.shape[-1] ** -0.5, q.shape[1], q.shape[2] // 2
        grad_out = grad_out.to(q.dtype).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, acc = [k, v], [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                           torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        acc_pending = None
        for step in range(n):
            pending = _Shift(kv, group) if step < n - 1 else None
            rows, cols, causal = zigzag_block(step, rank, half)
            k_blk, v_blk = (_expand_kv(t[:, :, cols], heads) for t in kv)
            dq_blk, dk_blk, dv_blk = _attend_backward(grad_out[:, :, rows], q[:, :, rows], k_blk, v_blk,
                                                      out[:, :, rows], lse[:, :, rows].contiguous(), causal, scale)
            dq[:, :, rows] += dq_blk.float()
            if acc_pending is not None:          # this chunk's accumulators, one hop behind it
                acc = acc_pending.wait()
            acc[0][:, :, cols] += _reduce_kv(dk_blk.float(), k.shape[1])
            acc[1][:, :, cols] += _reduce_kv(dv_blk.float(), v.shape[1])
            acc_pending = _Shift(acc, group)     # after the last hop it brings them home
            if pending is not None:
                kv = pending.wait()
        dk, dv = acc_pending.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


class RingAttention:
    """Causal attention over ``(batch, heads, seq_chunk, head_dim)`` with K/V chunks passed around a ring;
    the rank's tokens are its zig-zag chunk pair (:func:`sequence_positions`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), self.group)


def sequence_chunk(seq_len: int, cp_rank: int, cp: int) -> tuple[int, int]:
    """Token range ``[first, end)`` of context rank ``cp_rank`` (contiguous chunks)."""
    size = seq_len // cp
    return cp_rank * size, (cp_rank + 1) * size


def sequence_positions(seq_len: int, cp_rank: int, cp: int, cp_kind: str) -> torch.Tensor:
    """The positions of the tokens context rank ``cp_rank`` holds, in its local order. Ulysses (and cp = 1):
    its contiguous chunk. Ring: the zig-zag pair of chunks ``cp_rank`` and ``2 cp - 1 - cp_rank`` of ``2 cp``,
    so that under the causal mask every rank attends to as many keys as every other."""
    if cp == 1 or cp_kind != "ring":
        first, end = sequence_chunk(seq_len, cp_rank, cp)
        return torch.arange(first, end)
    size = seq_len // (2 * cp)
    later = 2 * cp - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * size, (cp_rank + 1) * size), torch.arange(later * size, (later + 1) * size)])
