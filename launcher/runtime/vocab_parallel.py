"""Vocabulary parallelism across pipeline ranks (Yeung et al. 2024, "Vocabulary Parallelism",
sail-sg/VocabularyParallelism): the input embedding and the LM head + cross-entropy are split by vocabulary
over all ``pp x tp`` ranks of a data/context slice, so no pipeline stage carries the vocabulary alone.

Layout. Each rank of the vocabulary group holds rows ``[start, end)`` of the embedding (and of the untied
head) as a DTensor sharded on dim 0 over the flattened ``(pp, tp)`` mesh (``torch.chunk`` sizes, so any
vocabulary size works). The pipeline stages themselves hold no vocabulary matrix: stage 0 takes the token
embeddings as its input (and adds positions), the last stage outputs the final-normed hidden states.

One training step (``train.train_step`` calls :meth:`VocabParallel.begin_step` / :meth:`loss_fn` /
:meth:`end_step`):

1. **Embedding forward** (before the pipeline, all micro-batches at once): every rank looks up the tokens
   of its rows (zeros elsewhere); the partial sums are reduced over the pipeline row to the first stage and
   all-reduced over its tensor ranks. The result is stage 0's input, a leaf that collects its gradient.
2. **Head + loss per micro-batch** (inside the pipeline schedule): the last stage's ``loss_fn`` gathers the
   hidden states over its tensor ranks (sequence parallel), broadcasts them over the pipeline row, and every
   rank runs the chunked linear + cross-entropy on its rows (``kernels.cross_entropy.chunked_loss_and_grads``:
   the full logits never exist; per chunk the local log-sum-exp and target logit are all-gathered over the
   vocabulary group). The gradients are computed in that same pass: each weight slice's gradient stays with
   its owner, the partial hidden-state gradients are reduced over the row to the last stage (and
   all-reduced over its tensor ranks), which uses them in its backward.
   The ranks other than the last serve these passes from a helper thread (``_serve_head``), concurrently
   with their own pipeline work: the vocabulary pass of micro-batch i runs as soon as the last stage reaches
   it, whatever the rank is doing, so the passes do not serialize the pipeline (they compete for the rank's
   compute instead, like the paper's passes interleaved into the schedule). Collectives of the passes run on
   process groups of their own, so they never interleave with the pipeline's send/recv.
3. **Embedding backward** (after the pipeline): the first stage's input gradient is gathered over its
   tensor ranks, broadcast over the row, and every rank adds it into its rows.

Gradients of the vocabulary shards are accumulated in fp32 buffers, divided by the micro-batch count and
averaged over the data x context ranks by hand (the shards are not FSDP-wrapped). Everything is
data-independent (masks multiply, no ``nonzero``/``.item()``), so ``meshplan check`` can run it on fake
tensors; over a fake process group the helper thread's passes run inline after the schedule.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from meshplan.launcher.runtime.kernels import chunk_backend
from meshplan.launcher.runtime.kernels import cross_entropy as CE
from meshplan.launcher.runtime.parallelize import chunk_rows
from meshplan.plan import Plan


def enabled(plan: Plan) -> bool:
    """Vocabulary split across pipeline ranks: ``vocab_parallel`` with ``pp > 1`` (with ``pp == 1`` the
    vocabulary is split over the tensor ranks by ordinary tensor parallelism)."""
    return plan.vocab_parallel and plan.pp > 1


# ----------------------------------------------------------------------------------------------
# process groups
# ----------------------------------------------------------------------------------------------

@dataclass
class VocabGroups:
    """Where this rank sits for the vocabulary passes.

    Fields:
        mesh: the 1-D mesh over this slice's ``pp x tp`` ranks (flattened in mesh order): the DTensor
            placement of the shards.
        group: a process group over the same ranks (softmax statistics).
        row: this rank's pipeline row (same dp, cp, tp coordinates): hidden states broadcast from the last
            stage, their gradient reduced back, the embedding reduced to the first stage.
        first, last: global ranks of the first and last pipeline rank of the row.
        tp: the tensor-parallel group (``None`` when tp == 1); dp_cp: the gradient-averaging group or ``None``.
    """

    mesh: DeviceMesh
    group: dist.ProcessGroup
    row: dist.ProcessGroup
    first: int
    last: int
    tp: dist.ProcessGroup | None
    dp_cp: dist.ProcessGroup | None


def rank_groups(plan: Plan, dims: tuple[str, ...]) -> list[list[int]]:
    """All groups of global ranks that vary along ``dims`` (in mesh order) with the other coordinates fixed.
    Ranks are laid out row-major over ``plan.mesh_order`` (``init_device_mesh``); computed in plain Python,
    since ``meshplan check`` builds under FakeTensorMode, where reading a tensor's values is refused."""
    import itertools

    order = list(plan.mesh_order)
    sizes = [getattr(plan, d) for d in order]
    strides = [1] * len(order)
    for i in range(len(order) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    outer = [i for i, d in enumerate(order) if d not in dims]
    inner = [i for i, d in enumerate(order) if d in dims]
    groups = []
    for fixed in itertools.product(*(range(sizes[i]) for i in outer)):
        base = sum(c * strides[i] for i, c in zip(outer, fixed))
        groups.append([base + sum(c * strides[i] for i, c in zip(inner, moving))
                       for moving in itertools.product(*(range(sizes[i]) for i in inner))])
    return groups


def build_vocab_groups(plan: Plan, meshes) -> VocabGroups:
    """New process groups for the vocabulary passes (every rank creates every group, in the same order)."""
    me = dist.get_rank()
    group = row = None
    for members in rank_groups(plan, ("pp", "tp")):
        g = dist.new_group(members)
        if me in members:
            group = g
    first = last = -1
    for members in rank_groups(plan, ("pp",)):
        g = dist.new_group(members)
        if me in members:
            row, first, last = g, members[0], members[(len(plan.stages) - 1) % plan.pp]
    dims = tuple(d for d in plan.mesh_order if d in ("pp", "tp"))
    mesh = meshes.world[dims]._flatten("vocab_pp_tp")
    tp = meshes.tp.get_group() if meshes.tp is not None else None
    dp_cp = meshes.dp_cp.get_group() if meshes.dp_cp is not None else None
    return VocabGroups(mesh, group, row, first, last, tp, dp_cp)


# ----------------------------------------------------------------------------------------------
# the shards
# ----------------------------------------------------------------------------------------------

class VocabShard(nn.Module):
    """This rank's rows of the embedding (``tok_embeddings.weight``) and of the untied head
    (``output.weight``), DTensors sharded on the vocabulary over the ``pp x tp`` mesh. The names are the full
    model's, so weights are initialised (by name) and checkpointed exactly as in one process."""

    def __init__(self, vocab: int, hidden: int, tied: bool, mesh: DeviceMesh):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        def sharded() -> nn.Parameter:
            return nn.Parameter(distribute_tensor(torch.empty(vocab, hidden, device="meta"), mesh, [Shard(0)],
                                                  src_data_rank=None))

        self.tok_embeddings = nn.Module()
        self.tok_embeddings.weight = sharded()
        self.output: nn.Module | None = None
        if not tied:
            self.output = nn.Module()
            self.output.weight = sharded()
        self.tied = tied

    def weights(self) -> list[nn.Parameter]:
        return [self.tok_embeddings.weight] + ([] if self.tied else [self.output.weight])

    def rows(self) -> tuple[int, int]:
        """``[start, end)``: the vocabulary rows this rank holds."""
        w = self.tok_embeddings.weight
        return chunk_rows(w.shape[0], w.device_mesh.size(), w.device_mesh.get_local_rank())

    def embedding_local(self) -> torch.Tensor:
        return self.tok_embeddings.weight.to_local()

    def head_local(self) -> torch.Tensor:
        return (self.tok_embeddings if self.tied else self.output).weight.to_local()


def owned_ids(tokens: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local row per token, clamped to a valid row; 1.0 where this rank owns the token else 0.0)``."""
    local = tokens - start
    owned = (local >= 0) & (local < end - start)
    return torch.where(owned, local, torch.zeros_like(local)), owned


# ----------------------------------------------------------------------------------------------
# the runtime
# ----------------------------------------------------------------------------------------------

class _LastStageLoss(torch.autograd.Function):
    """The last stage's side of a head + loss pass: forward runs the pass (and the gradients), backward
    returns the stored hidden-state gradient times the incoming one."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, vp: "VocabParallel") -> torch.Tensor:  # type: ignore[override]
        loss, grad_hidden = vp._last_stage_pass(hidden, targets)
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None


class VocabParallel:
    """One rank's side of vocabulary parallelism across pipeline ranks (see the module doc)."""

    def __init__(self, plan: Plan, groups: VocabGroups, shard: VocabShard, coords: dict[str, int],
                 compute_dtype: torch.dtype | None = None):
        self.plan, self.groups, self.shard = plan, groups, shard
        self._compute_dtype = compute_dtype
        self.is_first = coords["pp"] == 0
        self.is_last = coords["pp"] == (len(plan.stages) - 1) % plan.pp
        self.tp_rank = coords["tp"]
        self.sp = plan.tp > 1 and plan.sequence_parallel
        self.fake = dist.get_backend(groups.group) == "fake"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._grads: list[torch.Tensor] = []
        self._tokens = self._embedded = None
        self._head_targets: list[torch.Tensor] = []
        self.evaluating = False       # forward only (train.run_batch for the evaluation loss): no gradients

    # --- shapes -------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The shards' (and their gradient accumulators') dtype: fp32, outside FSDP2's mixed precision."""
        return self.shard.tok_embeddings.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the head passes run in: the hidden states broadcast, the chunk GEMMs and the partial
        hidden gradients reduced back. bf16 for a 16-bit GPU plan (as its stages compute under FSDP2's
        mixed precision or autocast, and as the planner prices the pass), else the shards' own. The
        helper thread has no autocast of its own (autocast is per thread), so the cast is explicit."""
        return self._compute_dtype or self.dtype

    def _chunk(self, tokens: int) -> int:
        """Tokens per chunk, the same on every rank (one statistics all-gather per chunk): sized for the
        largest shard, ``ceil(V / (pp * tp))`` rows."""
        rows = -(-self.plan.model.vocab // (self.plan.pp * self.plan.tp))
        return CE.default_chunk_tokens(tokens, self.plan.model.hidden, rows)

    # --- step lifecycle -----------------------------------------------------------------------

    def begin_step(self, inputs: torch.Tensor, targets: torch.Tensor, evaluating: bool = False) -> torch.Tensor | None:
        """Embedding forward for all micro-batches; returns stage 0's input on the first stage (``None``
        elsewhere) and starts serving the head passes on the other ranks. ``evaluating``: the losses only
        (the pipeline runs forward only; no gradient is computed, reduced or set)."""
        self.evaluating = evaluating
        weights = self.shard.weights()
        self._grads = [torch.zeros(w.to_local().shape, dtype=torch.float32, device=inputs.device) for w in weights]
        self._tokens = inputs
        start, end = self.shard.rows()
        ids, owned = owned_ids(inputs, start, end)
        with torch.no_grad():
            partial = F.embedding(ids, self.shard.embedding_local()) * owned[..., None].to(self.dtype)
            dist.reduce(partial, dst=self.groups.first, group=self.groups.row)
        self._embedded = None
        if self.is_first:
            if self.groups.tp is not None:
                dist.all_reduce(partial, group=self.groups.tp)
            if self.sp:
                partial = partial.chunk(self.plan.tp, dim=1)[self.tp_rank].contiguous()
            self._embedded = partial if evaluating else partial.requires_grad_()
        if not self.is_last:
            self._head_targets = list(targets.chunk(self.plan.num_microbatches))
            if not self.fake:
                from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

                modes = _get_current_dispatch_mode_stack()
                self._thread = threading.Thread(target=self._serve_head_safely, args=(modes,), name="vocab-head",
                                                daemon=True)
                self._thread.start()
        return self._embedded

    def loss_fn(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's loss for one micro-batch: ``hidden`` its final-normed hidden states (this rank's
        sequence chunk under sequence parallelism), ``targets`` global vocabulary ids."""
        return _LastStageLoss.apply(hidden, targets, self)

    def end_step(self) -> None:
        """Wait for the head passes, run the embedding backward, and set the shards' gradients."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif not self.is_last and self.fake:
            self._serve_head()
        if self._error is not None:
            raise RuntimeError("vocabulary-parallel head pass failed") from self._error
        if self.evaluating:
            self._grads, self._embedded, self._tokens = [], None, None
            return
        self._embedding_backward()
        self._set_grads()

    # --- the passes ---------------------------------------------------------------------------

    def _head_pass(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked linear + cross-entropy of this rank's rows on the full micro-batch ``hidden [T, h]``:
        (global loss, this rank's partial hidden gradient); the weight gradient is accumulated here."""
        start, _ = self.shard.rows()
        loss, grad_hidden, grad_weight = CE.chunked_loss_and_grads(
            hidden, self.shard.head_local().detach().to(self.compute_dtype), targets.reshape(-1), self.groups.group,
            self._chunk(hidden.shape[0]), need_grad=not self.evaluating, reduce_hidden_grad=False,
            backend=chunk_backend(hidden), vocab_start=start)
        if grad_weight is not None:
            self._grads[-1].add_(grad_weight)         # accumulated in the shards' dtype
        return loss, grad_hidden

    def _last_stage_pass(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local_shape = hidden.shape
        h = hidden.detach().to(self.compute_dtype)
        if self.sp:                                   # the head needs the whole sequence
            parts = [torch.empty_like(h) for _ in range(self.plan.tp)]
            dist.all_gather(parts, h.contiguous(), group=self.groups.tp)
            h = torch.cat(parts, dim=1)
        full_shape = h.shape
        h = h.reshape(-1, h.shape[-1]).contiguous()
        dist.broadcast(h, src=self.groups.last, group=self.groups.row)
        loss, grad_hidden = self._head_pass(h, targets)
        if self.evaluating:
            return loss, None
        dist.reduce(grad_hidden, dst=self.groups.last, group=self.groups.row)
        if self.groups.tp is not None:
            dist.all_reduce(grad_hidden, group=self.groups.tp)
        grad_hidden = grad_hidden.view(full_shape)
        if self.sp:
            grad_hidden = grad_hidden.chunk(self.plan.tp, dim=1)[self.tp_rank]
        return loss, grad_hidden.reshape(local_shape).to(hidden.dtype).contiguous()

    def _serve_head(self) -> None:
        """A rank other than the last: take part in the head pass of every micro-batch, in order."""
        b, s, h = self.plan.micro_batch, self.plan.train.seq_len // self.plan.cp, self.plan.model.hidden
        device = self._tokens.device
        with torch.no_grad():
            for targets in self._head_targets:
                hidden = torch.empty(b * s, h, dtype=self.compute_dtype, device=device)
                dist.broadcast(hidden, src=self.groups.last, group=self.groups.row)
                _, grad_hidden = self._head_pass(hidden, targets)
                if not self.evaluating:
                    dist.reduce(grad_hidden, dst=self.groups.last, group=self.groups.row)

    def _serve_head_safely(self, modes: list) -> None:
        """The helper thread: ``_serve_head`` under the dispatch modes the step was started under
        (``memory_run``'s live-bytes tracker, a FLOP counter), which are per thread in torch."""
        from torch.utils._python_dispatch import _pop_mode, _push_mode

        for mode in modes:
            _push_mode(mode)
        try:
            self._serve_head()
        except BaseException as error:  # re-raised by end_step in the main thread; printed now, since the
            import traceback            # last stage may be blocked on this rank's pass until a timeout
            traceback.print_exc()
            self._error = error
        finally:
            for _ in modes:
                _pop_mode()

    def _embedding_backward(self) -> None:
        """The first stage's input gradient reaches every rank of its row; each adds it into its rows."""
        b_all, s = self._tokens.shape
        h = self.plan.model.hidden
        if self.is_first:
            grad = self._embedded.grad
            if grad is None:
                grad = torch.zeros_like(self._embedded)
            grad = grad.detach().to(self.dtype)
            if self.sp:
                parts = [torch.empty_like(grad) for _ in range(self.plan.tp)]
                dist.all_gather(parts, grad.contiguous(), group=self.groups.tp)
                grad = torch.cat(parts, dim=1)
            grad = grad.contiguous()
        else:
            grad = torch.empty(b_all, s, h, dtype=self.dtype, device=self._tokens.device)
        dist.broadcast(grad, src=self.groups.first, group=self.groups.row)
        start, end = self.shard.rows()
        ids, owned = owned_ids(self._tokens, start, end)
        src = (grad * owned[..., None].to(grad.dtype)).reshape(-1, h).float()
        self._grads[0].index_add_(0, ids.reshape(-1), src)
        self._embedded = self._tokens = None

    def _set_grads(self) -> None:
        """``grad = sum over micro-batches / m``, averaged over data x context ranks, as the shards' DTensor grads."""
        from torch.distributed.tensor import DTensor

        scale = 1.0 / self.plan.num_microbatches
        if self.groups.dp_cp is not None:
            scale /= self.plan.dp * self.plan.cp
        for weight, grad in zip(self.shard.weights(), self._grads):
            if self.groups.dp_cp is not None:
                dist.all_reduce(grad, group=self.groups.dp_cp)
            grad.mul_(scale)
            local = grad.to(weight.dtype)
            weight.grad = DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                             shape=weight.shape, stride=weight.stride())
        self._grads = []


def build_vocab_parallel(plan: Plan, meshes, device: torch.device | None = None) -> tuple[VocabShard, VocabGroups]:
    """The groups and this rank's (meta-device) shard module; :class:`VocabParallel` drives them."""
    groups = build_vocab_groups(plan, meshes)
    shard = VocabShard(plan.model.vocab, plan.model.hidden, plan.model.tied_embeddings, groups.mesh)
    shard.groups = groups           # a plain attribute: VocabParallel reads it after materialisation
    return shard, groups
