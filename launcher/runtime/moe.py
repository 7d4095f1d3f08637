"""The mixture-of-experts MLP of the reference model, and its expert-parallel dispatch.

A block whose index is in ``spec.moe.layers`` (``ModelSpec.is_moe_layer``) holds :class:`MoE` as its
``feed_forward``: names ``router.weight`` ``[E, h]``, ``experts.w1`` / ``experts.w3`` ``[E, f_e, h]``,
``experts.w2`` ``[E, h, f_e]`` (stacked SwiGLU experts), ``shared_experts.w1/w2/w3.weight`` (one SwiGLU of width
``shared_ffn_hidden``) and ``shared_gate.weight`` ``[1, h]``.

Forward, per token: router scores (softmax or sigmoid over the E logits, in fp32), the top-k experts, their
weights (renormalised to sum 1 when ``normalize_top_k``), the weighted sum of those experts' SwiGLU outputs,
plus the shared experts' output (scaled by ``sigmoid(shared_gate(x))`` when gated). Dropless: every routed
token is computed. The routed experts run as three grouped GEMMs over their token groups where the block
computes in bf16 (``torch._grouped_mm``, torchtitan's ``GroupedExperts``; on GPUs the token counts then stay
on the device without EP), otherwise one GEMM per expert and weight (fp32, or widths the grouped GEMM's
16-byte row alignment refuses: rules.grouped_expert_gemms).

Expert parallel (``plan.ep``): each rank of an EP group holds ``E / ep`` consecutive experts
(:attr:`GroupedExperts.expert_rows` says which rows of the full tensors, so initialisation by name gives it its
slice). The token copies, sorted by expert, go to their experts' ranks by one all-to-all with variable split
sizes (the counts are exchanged first), are computed there and come back by the reverse all-to-all.

The load-balancing loss (Switch Transformer, Fedus et al. 2021; per sequence as DeepSeek-V3's sequence-wise
balance loss) of one MoE block is ``aux_loss_coeff * E * mean_over_sequences(sum_i f_i * P_i)`` with, over the
tokens of one sequence, ``f_i`` the fraction of its token->expert assignments that go to expert i and ``P_i``
the mean router probability of expert i (softmax scores; sigmoid scores normalised per token to sum 1).
Statistics are per sequence, so the number does not depend on how the batch is split; the ranks that split
one sequence (context parallel, and tensor parallel under sequence parallelism) sum their statistics by a
differentiable all-reduce (:attr:`MoE.sequence_group`) before the ratio. The loss's gradient is added where
the block's output is (:class:`_AuxLossGradient`, Megatron-LM's ``MoEAuxLossAutoScaler``), scaled by
:attr:`MoE.aux_grad_scale` like the training loss's: every pipeline stage contributes it without sending it
along; the reported loss is the cross-entropy alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshplan import rules
from meshplan.spec import ModelSpec


def _is_fake(t: torch.Tensor) -> bool:
    """A tensor without data (``meshplan check``'s FakeTensorMode): token counts cannot be read."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def even_counts(assignments: int, experts: int) -> list[int]:
    """Token copies per expert under perfectly even routing: what ``meshplan check`` assumes (fake tensors
    have no routing to read), the remainder on the first experts."""
    base, extra = divmod(assignments, experts)
    return [base + (e < extra) for e in range(experts)]


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, top_k: int, coeff: float,
                        group: dist.ProcessGroup | None = None, group_size: int = 1) -> torch.Tensor:
    """``coeff * E * mean_b sum_i f_{b,i} P_{b,i}`` over sequences ``b`` (see the module doc).

    ``probs``: ``[b, t, E]`` router probabilities of this rank's ``t`` tokens of each sequence; ``chosen``:
    ``[b, t, k]`` the experts each token went to; ``group``: the ranks holding the other tokens of the same
    sequences (``group_size`` of them, ``t`` tokens each), whose statistics are summed in."""
    b, t, experts = probs.shape
    counts = torch.zeros(b, experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, chosen.reshape(b, -1), torch.ones_like(chosen.reshape(b, -1), dtype=probs.dtype))
    stats = torch.cat([counts, probs.sum(1)], dim=-1)
    if group is not None:
        stats = _AllReduce.apply(stats, group)
    tokens = t * group_size
    fraction, mean_prob = stats[:, :experts] / (tokens * top_k), stats[:, experts:] / tokens
    return coeff * experts * (fraction * mean_prob).sum(-1).mean()


class _AllReduce(torch.autograd.Function):
    """Sum over ``group``; the backward sums the gradients the same way (each rank's loss uses the total)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class _AuxLossGradient(torch.autograd.Function):
    """Returns ``out`` unchanged; its backward also gives ``aux`` the gradient ``scale``: the loss ``aux``
    joins the training loss without travelling with it (Megatron-LM's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable split sizes; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        in_splits, out_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class GroupedExperts(nn.Module):
    """``local`` SwiGLU experts as stacked weights; rows ``expert_rows = (start, total)``: these are experts
    ``start .. start + local - 1`` of ``total`` (model.init_weights gives each rank its slice). ``grouped``
    (set from outside, :func:`configure`): the three GEMMs run over every expert at once in bf16
    (``torch._grouped_mm``, rules.grouped_expert_gemms); otherwise one GEMM per expert and weight."""

    def __init__(self, local: int, hidden: int, width: int, start: int = 0, total: int | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(local, width, hidden))
        self.w2 = nn.Parameter(torch.empty(local, hidden, width))
        self.w3 = nn.Parameter(torch.empty(local, width, hidden))
        self.expert_rows = (start, total if total is not None else local)
        self.swiglu_impl = "reference"
        self.grouped = False

    def forward(self, x: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
        """``x``: token copies grouped by local expert, ``counts[e]`` rows for expert ``e``: a list, or for the
        grouped GEMMs also a tensor on ``x``'s device, which they take without waiting for the device."""
        from meshplan.launcher.runtime.model import swiglu

        if self.grouped:
            offsets = torch.as_tensor(counts, device=x.device).cumsum(0, dtype=torch.int32)
            rows = x.bfloat16()        # a no-op under FSDP's bf16 parameters; under autocast its cast
            gate = torch._grouped_mm(rows, self.w1.bfloat16().transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(rows, self.w3.bfloat16().transpose(-2, -1), offs=offsets)
            inner = swiglu(gate, up, self.swiglu_impl)
            return torch._grouped_mm(inner, self.w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)
        outs = []
        for e, rows in enumerate(x.split(counts)):
            gate, up = rows @ self.w1[e].t(), rows @ self.w3[e].t()
            outs.append(swiglu(gate, up, self.swiglu_impl) @ self.w2[e].t())
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class SharedExperts(nn.Module):
    """The shared experts as one SwiGLU MLP (``w2(silu(w1 x) * w3 x)``, no biases)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.swiglu_impl = "reference"
        self.w1 = nn.Linear(hidden, width, bias=False)
        self.w2 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from meshplan.launcher.runtime.model import swiglu

        return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_impl))


class MoE(nn.Module):
    """The mixture-of-experts MLP (module doc). Set from outside (:func:`configure`): ``ep_group`` (the
    expert-parallel ranks, ``None`` for all experts here), ``sequence_group`` / ``sequence_ranks`` (the ranks
    splitting each sequence) and ``aux_grad_scale``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        moe = spec.moe
        self.experts_total, self.top_k = moe.experts, moe.top_k
        self.score, self.normalize, self.aux_coeff = moe.router_score, moe.normalize_top_k, moe.aux_loss_coeff
        self.router = nn.Linear(spec.hidden, moe.experts, bias=False)
        self.experts = GroupedExperts(moe.experts, spec.hidden, moe.expert_ffn_hidden)
        self.shared_experts = SharedExperts(spec.hidden, moe.shared_ffn_hidden) if moe.shared_experts else None
        self.shared_gate = nn.Linear(spec.hidden, 1, bias=False) if moe.shared_expert_gate else None
        self.ep_group: dist.ProcessGroup | None = None
        self.sequence_group: dist.ProcessGroup | None = None
        self.sequence_ranks = 1
        self.aux_grad_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        tokens = x.reshape(-1, h)
        logits = self.router(tokens).float()
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        weights, chosen = scores.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = self.routed(tokens, weights.to(x.dtype), chosen)
        if self.aux_coeff and self.training and torch.is_grad_enabled():
            probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
            aux = load_balancing_loss(probs.view(b, t, -1), chosen.view(b, t, -1), self.top_k, self.aux_coeff,
                                      self.sequence_group, self.sequence_ranks)
            out = _AuxLossGradient.apply(out, aux, self.aux_grad_scale)
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared
        return out.view(b, t, h)

    def routed(self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each token's chosen experts' outputs: the copies sorted by expert, computed
        (here or on their experts' ranks), put back in token order and summed with their weights (a gather and
        a sum over k keep one ``[T*k, h]`` tensor for the backward; ``index_add`` would keep its source too)."""
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // self.top_k
        if _is_fake(flat):
            counts = even_counts(flat.numel(), self.experts_total)
        else:
            counts = torch.zeros(self.experts_total, dtype=torch.long, device=flat.device)
            counts = counts.scatter_add_(0, flat, torch.ones_like(flat))
            if self.ep_group is not None or not self.experts.grouped:
                counts = counts.tolist()     # the all-to-all's splits, the per-expert GEMMs' rows: on the host
        copies = tokens[token_of]
        if self.ep_group is None:
            done = self.experts(copies, counts)
        else:
            done = self.dispatch(copies, counts)
        unsorted = torch.empty_like(order)
        unsorted[order] = torch.arange(order.numel(), device=order.device)
        by_token = done[unsorted].view(*chosen.shape, -1)
        return (by_token * weights.unsqueeze(-1)).sum(1)

    def dispatch(self, copies: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert parallel: send each copy to its expert's rank, compute, send the results back (same order)."""
        ranks = dist.get_world_size(self.ep_group)
        local = self.experts_total // ranks
        received = exchange_counts(counts, ranks, local, self.ep_group, copies.device, _is_fake(copies))
        in_splits = [sum(counts[p * local:(p + 1) * local]) for p in range(ranks)]
        out_splits = [sum(row) for row in received]
        arrived = _AllToAll.apply(copies, out_splits, in_splits, self.ep_group)
        by_expert = regroup_order(received, arrived.device)
        done = self.experts(arrived[by_expert], [sum(row[e] for row in received) for e in range(local)])
        back = torch.empty_like(by_expert)
        back[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
        return _AllToAll.apply(done[back], in_splits, out_splits, self.ep_group)


def exchange_counts(counts: list[int], ranks: int, local: int, group, device, fake: bool) -> list[list[int]]:
    """``received[p][e]``: the copies EP rank ``p`` sends to this rank's local expert ``e`` (one all-to-all of
    the counts). Under fake tensors every rank is assumed to route like this one."""
    if fake:
        me = dist.get_rank(group)
        return [counts[me * local:(me + 1) * local] for _ in range(ranks)]
    send = torch.tensor(counts, dtype=torch.long, device=device)
    got = torch.empty_like(send)
    dist.all_to_all_single(got, send, group=group)
    return got.view(ranks, local).tolist()


def regroup_order(received: list[list[int]], device) -> torch.Tensor:
    """The permutation that takes arrived copies (by source rank, then local expert) to local-expert order
    (then source rank)."""
    starts, offset = [], 0
    for row in received:
        starts.append([])
        for n in row:
            starts[-1].append(offset)
            offset += n
    pieces = [torch.arange(starts[p][e], starts[p][e] + received[p][e], device=device)
              for e in range(len(received[0]) if received else 0) for p in range(len(received))]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def moe_modules(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, ep: int, ep_rank: int) -> None:
    """Keep this EP rank's ``E / ep`` experts of every MoE block (on the meta device, before the plan's
    other dimensions are applied)."""
    if ep == 1:
        return
    for moe in moe_modules(model):
        old = moe.experts
        total, hidden, width = old.w1.shape[0], old.w1.shape[2], old.w1.shape[1]
        local = total // ep
        with torch.device(old.w1.device):
            moe.experts = GroupedExperts(local, hidden, width, ep_rank * local, total)


def configure(model: nn.Module, *, ep_group=None, sequence_group=None, sequence_ranks: int = 1,
              aux_grad_scale: float = 1.0, bf16: bool = False) -> None:
    """Set every MoE block's groups, the scale of its load-balancing gradient (module doc) and whether its
    routed experts run as grouped GEMMs: where the block computes in ``bf16``, the widths suit
    (rules.grouped_expert_gemms) and this torch has ``torch._grouped_mm``."""
    for moe in moe_modules(model):
        moe.ep_group, moe.sequence_group, moe.sequence_ranks = ep_group, sequence_group, sequence_ranks
        moe.aux_grad_scale = aux_grad_scale
        experts = moe.experts
        experts.grouped = hasattr(torch, "_grouped_mm") and rules.grouped_expert_gemms(
            2 if bf16 else 4, experts.w1.shape[2], experts.w1.shape[1])


def tp_partial_params(model: nn.Module, experts_too: bool) -> list[nn.Parameter]:
    """Parameters of the MoE blocks that every tensor-parallel rank holds whole while routing only its own
    sequence shard: their gradients are partial sums over tp (the router, the shared experts and gate, and
    the routed experts where no expert-data-parallel reduction sums them, ``experts_too``)."""
    found = []
    for moe in moe_modules(model):
        for name, param in moe.named_parameters():
            if experts_too or not name.startswith("experts."):
                found.append(param)
    return found


def expert_checkpoint_key(name: str, ep_rank: int, ep: int) -> str:
    """The checkpoint key of EP rank ``ep_rank``'s piece of stacked experts ``name``: the EP ranks hold
    different experts under one name, so each piece is saved under its own key."""
    return f"{name}@ep{ep_rank}of{ep}"


def split_expert_checkpoint_key(key: str) -> tuple[str, int] | None:
    """``(name, EP rank)`` of a key :func:`expert_checkpoint_key` wrote, else ``None``."""
    if "@ep" not in key:
        return None
    name, tag = key.rsplit("@ep", 1)
    return name, int(tag.split("of")[0])


def expert_param_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters`` gives them) of the routed experts' stacked weights."""
    return {f"{prefix}.{leaf}" for prefix, sub in model.named_modules() if isinstance(sub, GroupedExperts)
            for leaf, _ in sub.named_parameters()}
