"""The global gradient norm of a parallel model, and clipping by it: one norm, whatever the plan.

Every rank sums the squares of the gradient it holds, each parameter's divided by how many ranks hold that same
data, and one all-reduce over the world adds them up: what one process computes over the whole model.

A gradient's copies (:func:`copies`, after :func:`reduced_grad` has done any pending ``Partial`` sum):
    DTensor           the ranks of its mesh's ``Replicate`` dimensions, times every data/tensor dimension (dp, cp,
                      tp) its mesh does not span (FSDP2 and DTensor meshes: ``dp``, ``cp``, ``dp_cp``, ``tp``,
                      vocabulary parallel's ``vocab_pp_tp``, and the routed experts' ``edp``, which with the EP
                      group covers dp x cp x tp: experts differ across EP ranks); pipeline ranks hold
                      different stages
    plain tensor      dp * cp * tp (replicated over every rank of its pipeline stage)
    replicated K/V    times ``tp / kv_heads`` (model.replicated_kv_params: neighbouring TP ranks hold equal heads)
    tied embedding    times 2 where the first and last pipeline ranks each hold it (parallelize.tied_embedding_group)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshplan.launcher.runtime.model import replicated_kv_params
from meshplan.plan import Plan

# The runtime's mesh dimension names (parallelize.build_mesh, vocab_parallel.build_vocab_parallel) and the plan
# dimensions each spans.
MESH_DIMS = {"dp": ("dp",), "cp": ("cp",), "tp": ("tp",), "pp": ("pp",), "dp_cp": ("dp", "cp"),
             "vocab_pp_tp": ("pp", "tp"), "edp": ("dp", "cp", "tp")}
DATA_AND_TENSOR_DIMS = ("dp", "cp", "tp")


def copies(tensor: torch.Tensor, plan: Plan) -> int:
    """How many ranks hold the same data as this rank's shard of ``tensor`` (a gradient with no ``Partial``
    placement left; before the K/V and tied factors)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return plan.dp * plan.cp * plan.tp
    spanned, replicated = set(), 1
    for name, placement, size in zip(tensor.device_mesh.mesh_dim_names or (), tensor.placements,
                                     tensor.device_mesh.shape):
        if name not in MESH_DIMS:
            raise ValueError(f"grad_norm: unknown mesh dimension {name!r}; add it to MESH_DIMS")
        spanned.update(MESH_DIMS[name])
        if isinstance(placement, Replicate):
            replicated *= size
    outside = 1
    for dim in DATA_AND_TENSOR_DIMS:
        if dim not in spanned:
            outside *= getattr(plan, dim)
    return replicated * outside


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def reduced_grad(param: torch.Tensor) -> torch.Tensor:
    """``param.grad`` with its pending sums done: a DTensor gradient left ``Partial`` (each rank a part of the
    sum, as sequence parallel leaves a replicated norm weight's) is all-reduced to ``Replicate`` and kept as the
    gradient, the redistribution the optimizer step would otherwise make."""
    from torch.distributed.tensor import DTensor, Replicate

    grad = param.grad
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        grad = param.grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p
                                                                 for p in grad.placements])
    return grad


def global_grad_norm(parts, plan: Plan, tied: bool, device: torch.device) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (a 0-d fp32 tensor, equal on every rank). ``parts``: this
    rank's ``(stage, module)`` pairs; ``tied``: the first and last pipeline ranks hold copies of the tied
    embedding (their gradients already summed)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    seen: set[int] = set()
    for _, part in parts:
        kv = replicated_kv_params(part)
        for name, param in part.named_parameters():
            if param.grad is None or id(param) in seen:
                continue
            seen.add(id(param))
            grad = reduced_grad(param)
            n = copies(grad, plan) * kv.get(name, 1) * (2 if tied and name == "tok_embeddings.weight" else 1)
            # vector_norm reduces without a squared copy of the gradient (a temporary as large as the embedding)
            total += torch.linalg.vector_norm(_local(grad), dtype=torch.float32).square() / n
    dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_grads(parts, norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` (torch.nn.utils.clip_grad_norm_'s rule),
    on the local shards, without reading the norm on the host."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    seen: set[int] = set()
    for _, part in parts:
        for param in part.parameters():
            if param.grad is not None and id(param) not in seen:
                seen.add(id(param))
                _local(param.grad).mul_(scale.to(param.grad.dtype))
