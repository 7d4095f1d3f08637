"""Apply a Plan to the reference model, one small function per dimension (torchtitan style).

    build_mesh        DeviceMesh over the plan's ``mesh_order`` (outermost first)
    build_stages      the plan's layer partition: one model part per (virtual) stage of this pipeline rank
    apply_ep          expert parallel: each rank keeps its ``experts / ep`` experts of every MoE block
    apply_tp          tensor + sequence parallel with DTensor; embedding and head sharded by vocabulary;
                      key/value heads replicated where tp exceeds them; per-head q/k norms replicated, each
                      rank norming its own heads
    apply_cp          Ulysses or ring attention over the context-parallel group
    apply_ac          activation checkpointing per block: none / selective (op level) / full
    apply_compile     torch.compile per block (enable_async_tp first where the plan overlaps TP)
    apply_dp          ZeRO 0 (replicate, i.e. DDP), ZeRO 1/2 (FSDP2, parameters kept after forward),
                      ZeRO 3 (FSDP2, parameters resharded after forward), over the dp x cp ranks
    build_schedule    torch.distributed.pipelining stages and schedule (GPipe, 1F1B, interleaved 1F1B)

Nothing here chooses anything: every decision is read from the Plan.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import RowwiseParallel

from meshplan.launcher.runtime.context_parallel import RingAttention, UlyssesAttention
from meshplan.launcher.runtime.model import Attention, Transformer, keep_only
from meshplan.plan import Plan


# ----------------------------------------------------------------------------------------------
# mesh
# ----------------------------------------------------------------------------------------------

@dataclass
class Meshes:
    """The world mesh and the views the runtime uses.

    Fields:
        world: the full mesh, dimension names = ``plan.mesh_order``.
        tp, cp, pp: one-dimensional sub-meshes (``None`` when the degree is 1).
        dp_cp: the ranks that hold the same parameters and average gradients (dp flattened with cp);
            ``None`` when dp * cp == 1.
        coords: this rank's coordinate along each dimension.
        ep: the expert-parallel group (``ep`` consecutive members of the dp_cp group), ``None`` when ep == 1;
            ep_rank: this rank's place in it.
        edp: the expert-data-parallel mesh (named ``edp``): the ranks of this pipeline rank holding the same
            experts (dp*cp/ep of them, times tp: experts are whole on every tensor-parallel rank); ``None``
            for a dense model or where dp * cp == 1.
        sequence: the ranks that split each sequence (cp, and tp under sequence parallelism), whose MoE
            blocks sum their load-balancing statistics; ``None`` for a dense model or where they are one.
    """

    world: DeviceMesh
    tp: DeviceMesh | None
    cp: DeviceMesh | None
    pp: DeviceMesh | None
    dp_cp: DeviceMesh | None
    coords: dict[str, int]
    ep: dist.ProcessGroup | None = None
    ep_rank: int = 0
    edp: DeviceMesh | None = None
    sequence: dist.ProcessGroup | None = None


def build_mesh(plan: Plan, device_type: str) -> Meshes:
    world = init_device_mesh(device_type, plan.mesh_shape(), mesh_dim_names=tuple(plan.mesh_order))
    coords = {name: world.get_local_rank(name) for name in plan.mesh_order}
    data_dims = tuple(d for d in plan.mesh_order if d in ("dp", "cp") and getattr(plan, d) > 1)
    if len(data_dims) == 2:
        dp_cp = world[data_dims]._flatten("dp_cp")
    elif len(data_dims) == 1:
        dp_cp = world[data_dims[0]]
    else:
        dp_cp = None

    def sub(name: str) -> DeviceMesh | None:
        return world[name] if getattr(plan, name) > 1 else None

    meshes = Meshes(world, sub("tp"), sub("cp"), sub("pp"), dp_cp, coords)
    if plan.model.moe is not None:
        build_expert_groups(plan, meshes, device_type)
    return meshes


def expert_rank_groups(plan: Plan) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, expert-data-parallel groups) as global ranks, in plain Python (no tensor reads under
    ``meshplan check``'s fake mode). An EP group is ``ep`` consecutive members of a dp_cp group (dp and cp
    flattened in mesh order, like ``Meshes.dp_cp``); the expert-data-parallel group of a rank is every rank
    of its pipeline rank at the same place in its EP group, across EP groups and tensor-parallel ranks."""
    from meshplan.launcher.runtime.vocab_parallel import rank_groups

    rows = rank_groups(plan, ("dp", "cp"))
    ep_groups = [row[i:i + plan.ep] for row in rows for i in range(0, len(row), plan.ep)]
    edp_groups = []
    for stage in rank_groups(plan, ("dp", "cp", "tp")):
        members = set(stage)
        mine = [g for g in ep_groups if g[0] in members]
        edp_groups += [sorted(g[j] for g in mine) for j in range(plan.ep)]
    return ep_groups, edp_groups


def build_expert_groups(plan: Plan, meshes: Meshes, device_type: str) -> None:
    """The MoE groups of ``meshes`` (its ``ep``, ``edp`` and ``sequence`` fields). Every rank creates every
    group (``new_group`` is collective), in the same order."""
    from meshplan.launcher.runtime.vocab_parallel import rank_groups

    me = dist.get_rank()
    ep_groups, edp_groups = expert_rank_groups(plan)
    for ranks in ep_groups if plan.ep > 1 else []:
        group = dist.new_group(ranks)
        if me in ranks:
            meshes.ep, meshes.ep_rank = group, ranks.index(me)
    for ranks in edp_groups if meshes.dp_cp is not None else []:
        group = dist.new_group(ranks)
        if me in ranks:
            meshes.edp = DeviceMesh.from_group(group, device_type, mesh=ranks, mesh_dim_names=("edp",))
    split = ("cp", "tp") if plan.sequence_parallel else ("cp",)
    if plan.cp * (plan.tp if plan.sequence_parallel else 1) > 1:
        for ranks in rank_groups(plan, split):
            group = dist.new_group(ranks)
            if me in ranks:
                meshes.sequence = group


# ----------------------------------------------------------------------------------------------
# pipeline partition
# ----------------------------------------------------------------------------------------------

def stage_indices(plan: Plan, pp_rank: int) -> list[int]:
    """The (virtual) stages this pipeline rank runs: stage ``j`` lives on pipeline rank ``j % pp``."""
    if plan.pp == 1:
        return [0]
    return [j for j in range(len(plan.stages)) if j % plan.pp == pp_rank]


def build_stages(model: Transformer, plan: Plan, pp_rank: int) -> list[tuple[int, Transformer]]:
    """One model part per stage of this pipeline rank, cut from the (meta-device) full model."""
    if plan.pp == 1:
        return [(0, model)]
    last = len(plan.stages) - 1
    parts = []
    for j in stage_indices(plan, pp_rank):
        first, end = plan.stages[j].layers
        part = keep_only(copy.deepcopy(model), first, end, embedding=j == 0, head=j == last,
                         vocab_elsewhere=plan.vocab_parallel)
        parts.append((j, part))
    return parts


def apply_ep(model: Transformer, meshes: Meshes) -> None:
    """Expert parallel: every MoE block keeps this EP rank's ``experts / ep`` experts (moe.shard_experts)
    and dispatches its tokens over the EP group. On the meta device, before the other dimensions."""
    from meshplan.launcher.runtime import moe

    if meshes.ep is not None:
        moe.shard_experts(model, dist.get_world_size(meshes.ep), meshes.ep_rank)


def fused_loss(plan: Plan) -> bool:
    """The plan's loss kernel is a chunked linear + cross-entropy (``kernels.loss`` fused, auto or liger): the
    head's stage outputs the normed hidden states and the loss function applies the head."""
    return plan.kernels.get("loss", "reference") in ("fused", "auto", "liger")


def stage_outputs_hidden(plan: Plan) -> bool:
    """The last stage outputs hidden states rather than logits (fused loss, or the vocabulary split across
    pipeline ranks)."""
    return fused_loss(plan) or (plan.vocab_parallel and plan.pp > 1)


def layer_recompute(plan: Plan, layer: int) -> str:
    return plan.stages[plan.stage_of_layer(layer)].layer_recompute(layer)


# ----------------------------------------------------------------------------------------------
# tensor + sequence parallel
# ----------------------------------------------------------------------------------------------

def _vocab_shard_embedding_forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Megatron's vocabulary-parallel embedding on this rank's rows ``[start, start + n)`` of the Shard(0)
    weight: ids outside the shard look up row 0 and are zeroed, the output is a Partial (summed over the TP
    ranks by the style's output redistribution). Its backward is a plain embedding backward into the ``[n, h]``
    local shard -- DTensor's own rule for ``embedding_dense_backward`` has no vocabulary-sharded strategy and
    materialises the whole ``[V, h]`` gradient on every TP rank (plus its fp32 cast under FSDP2), 13.5 GiB on
    the first pipeline rank of Megatron's 462B configuration (found by ``meshplan check``)."""
    from torch.distributed.tensor import DTensor, Partial

    weight = module.weight
    mesh = weight.device_mesh
    local_ids = ids.to_local() if isinstance(ids, DTensor) else ids
    shard = weight.to_local(grad_placements=weight.placements)
    start, _ = chunk_rows(weight.shape[0], mesh.size(), mesh.get_local_rank())
    outside = (local_ids < start) | (local_ids >= start + shard.shape[0])
    out = F.embedding((local_ids - start).masked_fill(outside, 0), shard).masked_fill(outside.unsqueeze(-1), 0)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False)


def chunk_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` when ``rows`` are split like ``torch.chunk`` (DTensor's Shard):
    ``ceil(rows / parts)`` per part, the last parts possibly fewer or none. Arithmetic, because DTensor's
    ``compute_local_shape_and_global_offset`` reads a tensor value that fake tensors (``meshplan check``)
    do not have."""
    size = -(-rows // parts)
    return min(rows, index * size), min(rows, (index + 1) * size)


class VocabShardEmbedding(RowwiseParallel):
    """``RowwiseParallel`` for an ``nn.Embedding`` (weight Shard(0) over the vocabulary, output reduced to
    ``output_layouts``) whose forward and backward touch only the local rows, see
    :func:`_vocab_shard_embedding_forward`."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabShardEmbedding applies to nn.Embedding, not {type(module).__name__}")
        module = super()._apply(module, device_mesh)
        module.forward = functools.partial(_vocab_shard_embedding_forward, module)
        return module


def replicate_kv_heads(attention: Attention, tp: int) -> None:
    """Where tp exceeds the key/value heads, give ``wk`` and ``wv`` one head per tensor-parallel rank: each
    head repeated ``tp / kv_heads`` times in a row, so that column-parallel sharding hands rank ``r`` head
    ``r // (tp / kv_heads)``, the one its ``heads / tp`` query heads use. The copies start equal
    (model.init_weights) and stay equal: their gradients are summed over the ranks holding the same head
    (:func:`kv_replica_group`, train.sync_kv_replica_grads). On the meta device, before :func:`apply_tp`."""
    kv_heads = attention.wk.out_features // attention.head_dim
    if tp <= kv_heads:
        return
    copies = tp // kv_heads
    for proj in ("wk", "wv"):
        old = getattr(attention, proj)
        with torch.device(old.weight.device):
            setattr(attention, proj, nn.Linear(old.in_features, old.out_features * copies, bias=old.bias is not None))
    attention.kv_replicas = copies


def kv_replica_group(plan: Plan) -> dist.ProcessGroup | None:
    """The ranks of this rank's tensor-parallel group that hold the same (replicated) key/value head:
    ``tp / kv_heads`` neighbours; ``None`` where tp divides the key/value heads. Every rank creates every
    group (``new_group`` is collective), in the same order."""
    if plan.tp <= plan.model.kv_heads:
        return None
    copies = plan.tp // plan.model.kv_heads
    from meshplan.launcher.runtime.vocab_parallel import rank_groups

    mine, me = None, dist.get_rank()
    for row in rank_groups(plan, ("tp",)):   # plain Python: no tensor reads under meshplan check's fake mode
        for start in range(0, len(row), copies):
            ranks = list(row[start:start + copies])
            group = dist.new_group(ranks)
            if me in ranks:
                mine = group
    return mine


def head_norm_plan() -> dict[str, object]:
    """The per-head q/k norms (``qk_norm``) under tensor parallelism, as torchtitan's Qwen3 places them
    (``SequenceParallel`` on the heads dimension: a norm over the last dimension treats every other one alike):
    each rank norms its own heads, the local q and k ``(batch, seq, heads / tp, head_dim)`` taken as a DTensor
    sharded on the heads; the weights are replicated and their gradients, each rank's covering its own heads,
    summed over the TP ranks (by DTensor's ops for the reference RMSNorm and LayerNorm, by
    ``kernels.rms_norm`` for the fused kernel). Replicated key/value heads (:func:`replicate_kv_heads`) sum
    over every copy too, which is right: a copy's gradient covers the query heads of its own rank, and the
    copies of a head together cover all its query heads, as its one norm does in a single process."""
    from torch.distributed.tensor.parallel import SequenceParallel

    heads_dim = 2
    return {f"attention.{name}": SequenceParallel(sequence_dim=heads_dim, use_local_output=True)
            for name in ("q_norm", "k_norm")}


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron tensor parallelism with DTensor: column-parallel q/k/v and MLP-in, row-parallel attention-out
    and MLP-out; with sequence parallelism the norms and residual stream are sharded on the sequence
    dimension. The embedding is sharded by vocabulary (row-wise) and the head by vocabulary (column-wise),
    its logits left as a DTensor sharded on the vocabulary for ``loss_parallel``. Key/value heads fewer than
    the ranks are replicated first (:func:`replicate_kv_heads`); the q/k norms of each head are replicated
    (:func:`head_norm_plan`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, SequenceParallel,
                                                   parallelize_module)

    for block in model.layers.values():
        replicate_kv_heads(block.attention, tp_mesh.size())
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = VocabShardEmbedding(input_layouts=Replicate(), output_layouts=residual)
    if model.pos_embeddings is not None:
        top["pos_embeddings"] = VocabShardEmbedding(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        if model.tied:   # x @ E^T with E the vocabulary-sharded embedding: logits sharded on the vocabulary
            top["output"] = PrepareModuleInput(input_layouts=(residual, None), desired_input_layouts=(Replicate(), None),
                                               use_local_output=False)
        else:
            top["output"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)

    from meshplan.launcher.runtime.moe import MoE
    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
        }
        if block.attention.q_norm is not None:
            plan.update(head_norm_plan())
        moe_block = isinstance(block.feed_forward, MoE)
        if not moe_block:
            plan.update({"feed_forward.w1": ColwiseParallel(),
                         "feed_forward.w2": RowwiseParallel(output_layouts=residual)})
        if not moe_block and block.feed_forward.w3 is not None:
            plan["feed_forward.w3"] = ColwiseParallel()
        if sequence_parallel:
            # a mixture of experts routes this rank's sequence shard (its weights whole on every TP rank)
            ffn_input = Shard(1) if moe_block else Replicate()
            plan.update({
                "attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(ffn_input,),
                                                   use_local_output=moe_block),
            })
        parallelize_module(block, tp_mesh, plan)


# ----------------------------------------------------------------------------------------------
# context parallel
# ----------------------------------------------------------------------------------------------

def apply_cp(model: Transformer, cp_mesh: DeviceMesh, kind: str) -> None:
    """Swap every block's attention core for Ulysses (all-to-all) or ring (P2P) attention."""
    group = cp_mesh.get_group()
    core = UlyssesAttention(group) if kind == "ulysses" else RingAttention(group)
    for block in model.layers.values():
        block.attention.core = core


# ----------------------------------------------------------------------------------------------
# activation checkpointing
# ----------------------------------------------------------------------------------------------

def _saved_ops() -> tuple[set, set]:
    """(matmul ops, other ops) whose outputs selective recompute may keep."""
    aten = torch.ops.aten
    matmuls = {getattr(aten, n).default for n in ("mm", "addmm", "_grouped_mm") if hasattr(aten, n)}
    names = ["bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward"]
    return matmuls, {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _run_profiler_ranges_as_they_come() -> None:
    """Selective recompute replays a block's ops and requires the replay to dispatch each op as often as the
    forward did. An FSDP2 unit inside a block (a mixture of experts' routed experts, sharded over their own
    ranks) marks its hooks with profiler ranges, and in the replay, which runs in the backward, its
    root pre-forward hook opens one range more than the forward did. A range holds no tensor, so its ops are
    added to the ops the replay runs without counting (``torch.utils.checkpoint.SAC_IGNORED_OPS``)."""
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    for name in ("_record_function_enter", "_record_function_enter_new", "_record_function_exit"):
        packet = getattr(torch.ops.profiler, name, None)
        if packet is not None:
            SAC_IGNORED_OPS.update(getattr(packet, overload) for overload in packet.overloads())


def selective_context(matmuls_per_block: int = 0):
    """torchtitan's op-level policy, which the planner's memory and time model assume
    (planner/memory.py activation_bytes_per_layer; an MoE block's, planner/moe.py selective_matmuls): keep
    the attention op's output and every *other* matmul's output (1st, 3rd, ...), recompute the rest -- except
    the block's last matmul (the ``matmuls_per_block``-th, :func:`block_matmuls`), whose output nothing in the
    backward needs: under TP it is the full-width partial sum before the reduce-scatter, t times the size of
    anything else kept (found by ``meshplan check``). Called once per checkpointed forward, so the counters
    start fresh each time."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    matmuls, saved = _saved_ops()
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, op, *args, **kwargs):
        if op in matmuls:
            key = "recompute" if ctx.is_recompute else "forward"
            counts[key] += 1
            keep = counts[key] % 2 == 1 and counts[key] != matmuls_per_block
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: Transformer, mode_of_layer) -> None:
    """Wrap each block per its recompute mode: ``full`` keeps only the block input, ``selective`` keeps
    the attention output and every other matmul output and recomputes the rest (torchtitan's policy)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for name, block in list(model.layers.items()):
        mode = mode_of_layer(int(name))
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            _run_profiler_ranges_as_they_come()
            model.layers[name] = checkpoint_wrapper(block, context_fn=functools.partial(selective_context,
                                                                                        block_matmuls(block)),
                                                    preserve_rng_state=False)


def block_matmuls(block: nn.Module) -> int:
    """The matmul ops one forward of ``block`` runs: one per linear layer (7 for a SwiGLU block, 6 for GELU)
    and, for its routed experts (moe.GroupedExperts), three grouped GEMMs or three per local expert (each
    runs, with or without tokens)."""
    from meshplan.launcher.runtime.moe import GroupedExperts

    def count(m: nn.Module) -> int:
        if isinstance(m, GroupedExperts):
            return 3 if m.grouped else 3 * m.w1.shape[0]
        return 1 if isinstance(m, nn.Linear) else 0

    return sum(count(m) for m in block.modules())


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Async tensor parallel (Wang et al. 2023, as torchtitan's distributed/compile.py enables it): symmetric
    memory for the TP group and Inductor's micro-pipeline TP pass, which splits each sequence-parallel
    all-gather + matmul and matmul + reduce-scatter of a compiled block into chunks that overlap. CUDA only;
    before the blocks are compiled (:func:`apply_compile`)."""
    import warnings

    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # deprecated in favour of automatic registration
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    inductor_config._micro_pipeline_tp = True


def apply_compile(model: Transformer) -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=False)


# ----------------------------------------------------------------------------------------------
# data parallel: ZeRO 0 / 1-2 / 3
# ----------------------------------------------------------------------------------------------

def apply_expert_dp(model: nn.Module, expert_mesh: DeviceMesh, zero: int, divide: int, kwargs: dict) -> None:
    """The routed experts of each MoE block as a unit of their own over the expert-data-parallel mesh (the
    ranks holding the same experts), by the plan's ZeRO stage. Each expert's gradient arrives summed over the
    EP group's tokens (and the TP ranks' sequence shards), so the reduction divides by ``divide`` = dp * cp,
    the ranks the dense part averages over, not by the mesh's size (torchtitan's ``gradient_divide_factor``).
    ZeRO shards the stacked weights by expert, or by their second dimension where the rank's experts do not
    divide over the mesh (as torchtitan does), so no rank holds padding for a whole expert."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from meshplan.launcher.runtime.moe import moe_modules

    for moe in moe_modules(model):
        if zero == 0:
            from torch.distributed._composable.replicate_with_fsdp import replicate
            unit = replicate(moe.experts, mesh=expert_mesh, **kwargs)
        else:
            dim = 0 if moe.experts.w1.shape[0] % expert_mesh.size() == 0 else 1
            unit = fully_shard(moe.experts, mesh=expert_mesh, reshard_after_forward=zero == 3,
                               shard_placement_fn=lambda _, dim=dim: Shard(dim), **kwargs)
        unit.set_gradient_divide_factor(float(divide))
        if zero > 0 and expert_mesh.size() > 1 and expert_mesh.device_type == "cpu":
            # gloo has no PREMUL_SUM: sum, then divide (a reduce-scatter over more than one rank only: the
            # others divide while copying, and would divide twice)
            unit.set_force_sum_reduction_for_comms(True)


def apply_dp(model: nn.Module, dp_mesh: DeviceMesh, zero: int, mp_policy=None, expert_mesh: DeviceMesh | None = None,
             expert_divide: int = 1) -> None:
    """ZeRO 0: ``replicate`` (DDP on FSDP2's machinery, composable with TP and PP): gradients all-reduced.
    ZeRO 1 and 2: FSDP2 with ``reshard_after_forward=False``: optimizer state and gradients sharded,
    parameters kept gathered between forward and backward. ZeRO 3: FSDP2 resharding parameters after
    forward. Each block is its own communication unit, the rest (embedding, norm, head) the root's; a MoE
    block's routed experts are a unit of their own over ``expert_mesh`` (:func:`apply_expert_dp`)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if expert_mesh is not None:
        apply_expert_dp(model, expert_mesh, zero, expert_divide, kwargs)
    if zero == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in model.layers.values():
            replicate(block, mesh=dp_mesh, **kwargs)
        replicate(model, mesh=dp_mesh, **kwargs)
        return
    reshard = zero == 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, **kwargs)
    # The root unit (embedding, final norm, head) stays gathered from forward to backward under every stage:
    # the fused loss applies the head outside the module's forward, and the backward needs it at once anyway.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# pipeline schedule
# ----------------------------------------------------------------------------------------------

def build_schedule(plan: Plan, parts: list[tuple[int, nn.Module]], pp_mesh: DeviceMesh, device: torch.device,
                   loss_fn, stage_io=None):
    """``torch.distributed.pipelining`` stages for this rank's parts and the plan's schedule.

    ``stage_io(j)``, when given, returns stage ``j``'s ``(input_args, output_args)`` example tensors, which
    replaces the stages' shape inference (a send/recv of shapes at the first step): ``meshplan check`` runs
    the schedule in one process over a fake process group, where nothing real arrives."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    group = pp_mesh.get_group()
    stages = []
    for j, part in parts:
        io = {} if stage_io is None else dict(zip(("input_args", "output_args"), stage_io(j)))
        stages.append(PipelineStage(part, j, len(plan.stages), device, group=group, **io))
    if plan.virtual_stages > 1 or plan.schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, plan.num_microbatches, loss_fn=loss_fn)
    if plan.schedule == "gpipe":
        return ScheduleGPipe(stages[0], plan.num_microbatches, loss_fn=loss_fn)
    return Schedule1F1B(stages[0], plan.num_microbatches, loss_fn=loss_fn)


def stage_io_examples(plan: Plan, stage: int, device: torch.device, hidden_dtype: torch.dtype):
    """Example ``(inputs, outputs)`` of pipeline stage ``stage`` on this rank: token ids ``[b, s/cp]`` into
    the first stage, hidden states ``[b, s/cp (/tp under SP), h]`` between stages (in ``hidden_dtype``:
    bf16 under FSDP2 mixed precision, else fp32), logits ``[b, s/cp, V/tp]`` out of the last. With a fused
    loss the last stage outputs hidden states too; with ``vocab_parallel`` and pp > 1 stage 0 also takes
    hidden states (the token embeddings, computed by every pipeline rank's vocabulary shard). What the
    stages' shape inference would find; ``meshplan check`` passes it to :func:`build_schedule`."""
    b, s, h = plan.micro_batch, plan.train.seq_len // plan.cp, plan.model.hidden
    s_hidden = s // plan.tp if plan.tp > 1 and plan.sequence_parallel else s
    last = len(plan.stages) - 1

    def hidden() -> torch.Tensor:
        return torch.empty(b, s_hidden, h, dtype=hidden_dtype, device=device, requires_grad=True)

    vocab_elsewhere = plan.vocab_parallel and plan.pp > 1
    if stage == 0 and not vocab_elsewhere:
        inputs = torch.zeros(b, s, dtype=torch.long, device=device)
    else:                     # with vocab_parallel stage 0 takes the token embeddings [b, s/cp (/tp), h]
        inputs = hidden()
    if stage == last and not stage_outputs_hidden(plan):
        outputs = torch.empty(b, s, plan.model.vocab // plan.tp, dtype=hidden_dtype, device=device)
    else:                     # fused or vocabulary-parallel loss: the normed hidden states, as between stages
        outputs = hidden()
    return (inputs,), (outputs,)


# ----------------------------------------------------------------------------------------------
# tied embeddings across pipeline stages
# ----------------------------------------------------------------------------------------------

def tied_embedding_group(plan: Plan, meshes: Meshes) -> dist.ProcessGroup | None:
    """With a tied head and pp > 1 the first pipeline rank (embedding) and the last (head) each hold a copy of
    the embedding matrix; this group joins the two so their gradients are summed (Megatron-LM's approach)."""
    if not plan.model.tied_embeddings or plan.pp == 1 or plan.vocab_parallel:
        return None       # vocab_parallel: one shard per rank serves as both embedding and head
    last_rank = (len(plan.stages) - 1) % plan.pp
    if last_rank == 0:
        return None
    from meshplan.launcher.runtime.vocab_parallel import rank_groups

    mine = None
    me = dist.get_rank()
    for row in rank_groups(plan, ("pp",)):   # plain Python: no tensor reads under meshplan check's fake mode
        pair = [row[0], row[last_rank]]
        group = dist.new_group(pair)
        if me in pair:
            mine = group
    return mine
