"""Engines: the training systems a plan can be priced for, each a profile in one place.

An engine is what will run the plan: meshplan's own runtime (``meshplan launch``), Megatron-Core, or
torchtitan. Its :class:`Engine` profile says which plan field values it runs (the search offers only those,
a ``--fix`` of anything else is an input error naming the engine) and how it behaves where engines differ (the
cost terms read these fields). Every value is taken from the engine's own code or documentation, cited at
the field.

For ``meshplan`` the profile is a promise about ``launcher/runtime``: every value the planner can emit for it
is one the runtime executes (tests/test_engine_meshplan.py builds each one with ``meshplan check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshplan.errors import InputError

DEFAULT_ENGINE = "meshplan"
# Where a plan file holds the values engine_fields names differently (meshplan/plan.py Plan.engine_fields).
PLAN_FIELD_NAMES = {"precision": "train.precision", "fused_kernels": "kernels", "expert_tensor_parallel": "expert_tp"}


@dataclass(frozen=True)
class Engine:
    """What one engine runs and how.

    Fields (what the engine supports):
        name: ``meshplan``, ``megatron`` or ``torchtitan`` (the plan file's ``engine``).
        title: the engine as a person names it.
        schedules: pipeline schedules it runs (plan ``schedule``).
        zero_stages: optimizer/gradient/parameter sharding stages it runs (plan ``zero``).
        cp_kinds: context-parallel kinds (plan ``cp_kind``; ``ring`` = K/V passed point to point,
            ``ulysses`` = all-to-all over heads).
        vocab_parallel: splits the embedding and LM head over pipeline ranks (plan ``vocab_parallel``).
        tp_overlap: runs tensor-parallel communication under the matmuls (async TP / TP comm overlap).
        tp_overlap_needs_compile: async TP exists only for compiled blocks.
        compile: compiles blocks with torch.compile (plan ``compile``).
        fused_kernels: runs fused kernels for norm, SwiGLU, RoPE and the loss (plan ``kernels``).
        mixed_recompute: stages may mix full and selective recomputation, or recompute some blocks only.
        kv_head_replication: tensor parallel larger than the key/value heads (each head replicated).
        precisions: training precisions it runs (``--precision``).
        tp_without_sp: runs tensor parallel without sequence parallel (plan ``sequence_parallel: false``;
            the norms and residual stream replicated, the block's collectives all-reduces).
        attentions: attention implementations it runs (plan ``attention``): ``flash`` (a fused kernel that
            keeps no scores: FlashAttention, cuDNN fused attention) and ``unfused`` (the scores materialised,
            softmax and dropout as separate ops; cp = 1).
        expert_tensor_parallel: splits each expert's matmuls over the tensor-parallel ranks (plan
            ``expert_tp = tp``); without it every expert is whole on its rank (``expert_tp = 1``).
        token_dropping: honours a model's ``moe.capacity_factor`` (each expert takes at most that multiple of
            its even share of a rank's routed tokens, the rest dropped); without it the engine is dropless
            and a model with a capacity factor is refused.

    Fields (how it behaves where engines differ; read by the cost terms):
        sp_saved_input: what a column-parallel linear keeps for its backward under sequence parallel:
            ``gathered`` (DTensor: the all-gathered input) or ``sharded`` (Megatron: its shard, gathered again
            in backward).
        selective_recompute: what ``selective`` recomputes: ``meshplan`` (the runtime's policy: the matmuls
            whose outputs are not saved and the elementwise ops), ``core_attention`` (Megatron: the attention
            core only), ``op_policy`` (torchtitan: every op but every other matmul, SDPA, reduce-scatter and max).
        pipeline_grad_sync: when a pipeline stage's data-parallel gradients are reduced: ``after_schedule``
            (torch.distributed.pipelining: one reduction after the stage's last backward) or ``overlapped``
            (bucketed under the last micro-batch's backward).
        state_layout: how the training state is held: ``fsdp2`` (fp32 parameters, gradients and Adam moments
            sharded per ZeRO stage by FSDP2 or kept whole by replicate, 16-bit copies gathered for compute) or
            ``distributed_optimizer`` (Megatron: 16-bit parameters and an fp32 contiguous gradient buffer on
            every data-parallel rank, fp32 main parameters and Adam moments sharded from ZeRO 1 on).
        block_recompute: without mixed recompute, full recomputation may cover the same number N of blocks in
            every model chunk, the others recomputing nothing (Megatron's ``--recompute-method block``).
        tp_backward_async: the backward of a column-parallel linear issues its collectives asynchronously:
            the input all-gather under the input-gradient GEMM, the input-gradient reduce-scatter under the
            weight-gradient GEMM (Megatron); False: each collective is waited for where it is issued (DTensor).
        attention_kernel: the attention kernel on GPUs: ``flash2`` (torch SDPA's FlashAttention-2) or ``cudnn``
            (Transformer Engine's cuDNN fused attention); compute.py rates each per GPU generation.
        fp8_allgather: under fp8 the column-parallel inputs are all-gathered in fp8 (1 byte an element).
        pipeline_buffers: how a pipeline rank holds the stage-boundary tensors it receives:
            ``per_microbatch`` (torch.distributed.pipelining keeps one activation and one gradient buffer per
            micro-batch and stage for the whole step) or ``per_transfer`` (Megatron allocates each received
            tensor when it arrives; what outlives the transfer is the chunk's saved input).
    """

    name: str
    title: str
    schedules: tuple[str, ...]
    zero_stages: tuple[int, ...]
    cp_kinds: tuple[str, ...]
    vocab_parallel: bool
    tp_overlap: bool
    tp_overlap_needs_compile: bool
    compile: bool
    fused_kernels: bool
    mixed_recompute: bool
    kv_head_replication: bool
    precisions: tuple[str, ...]
    sp_saved_input: str
    selective_recompute: str
    pipeline_grad_sync: str
    state_layout: str = "fsdp2"
    block_recompute: bool = False
    tp_backward_async: bool = False
    attention_kernel: str = "flash2"
    fp8_allgather: bool = False
    pipeline_buffers: str = "per_microbatch"
    attentions: tuple[str, ...] = ("flash",)
    tp_without_sp: bool = False
    expert_tensor_parallel: bool = True
    token_dropping: bool = False

    def refusal(self, field: str, value: Any) -> str | None:
        """Why this engine cannot run ``field = value`` (a plan field or ``--fix`` key), or None."""
        supported = self.supported_values(field)
        if supported is None or value in supported:
            return None
        shown = ", ".join(str(v).lower() for v in supported)
        return f"{self.title} does not run {field}={str(value).lower()} (it runs {field} in {{{shown}}})"

    def supported_values(self, field: str) -> tuple | None:
        """The values of ``field`` this engine runs; None where every value is supported."""
        table: dict[str, tuple] = {
            "schedule": self.schedules, "zero": self.zero_stages, "cp_kind": self.cp_kinds,
            "vocab_parallel": (False, True) if self.vocab_parallel else (False,),
            "tp_overlap": (False, True) if self.tp_overlap else (False,),
            "compile": (False, True) if self.compile else (False,),
            "fused_kernels": (False, True) if self.fused_kernels else (False,),
            "precision": self.precisions,
            "attention": self.attentions,
            "sequence_parallel": (False, True) if self.tp_without_sp else (True,),
            "expert_tensor_parallel": (False, True) if self.expert_tensor_parallel else (False,),
        }
        return table.get(field)

    def check(self, values: dict[str, Any], where: str = "--fix") -> None:
        """Raise an :class:`InputError` naming the first of ``values`` (field -> value) this engine cannot run."""
        for field, value in values.items():
            why = self.refusal(field, value)
            if why:
                other = [e.name for e in ENGINES.values() if e.refusal(field, value) is None]
                fix = (f"drop the pin, or plan with --engine {' / '.join(other)}" if other else "drop the pin")
                name = f"{where} {field}" if where == "--fix" else f"{where}.{PLAN_FIELD_NAMES.get(field, field)}"
                raise InputError(name, why, fix)


MESHPLAN = Engine(
    name="meshplan", title="meshplan",
    # launcher/runtime/pipeline.py builds torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B and
    # ScheduleInterleaved1F1B; runtime/parallelize.py applies replicate (ZeRO 0), FSDP2 with
    # reshard_after_forward=False over the optimizer state and gradients (1, 2) and FSDP2 resharding (3).
    schedules=("gpipe", "1f1b", "interleaved"), zero_stages=(0, 1, 2, 3),
    # runtime/context_parallel.py: Ulysses all-to-all and ring attention on the fused attention kernel.
    cp_kinds=("ulysses", "ring"), vocab_parallel=True,
    # runtime/parallelize.py enable_async_tp: Inductor's micro-pipelined TP on compiled blocks with symmetric
    # memory for the TP group, as torchtitan's distributed/compile.py enables it (CUDA ranks only).
    tp_overlap=True, tp_overlap_needs_compile=True,
    compile=True, fused_kernels=True, mixed_recompute=True,
    # runtime/parallelize.py replicate_kv_heads: tp a multiple of kv_heads gives each rank the head its query
    # heads use, the copies' gradients summed (train.sync_kv_replica_grads).
    kv_head_replication=True,
    # launcher/runtime/train.py: fp32, or bf16 mixed precision; no fp16 loss scaling, no fp8 matmuls.
    precisions=("fp32", "bf16"),
    sp_saved_input="gathered", selective_recompute="meshplan", pipeline_grad_sync="after_schedule",
    # DTensor collectives wait; runtime/context_parallel.py _RingAttention: the fused attention kernel per
    # hop on zig-zag chunks, the next K/V sent under the current hop; attention is torch SDPA.
    tp_backward_async=False, attention_kernel="flash2", fp8_allgather=False,
    # runtime/moe.py: experts whole on each rank (expert_tp = 1), expert parallel over all-to-all; dropless
    # (launcher/checks.py refuses a capacity factor).
    expert_tensor_parallel=False, token_dropping=False,
)

MEGATRON = Engine(
    name="megatron", title="Megatron-Core",
    # megatron/core/pipeline_parallel/schedules.py: forward_backward_pipelining_without_interleaving (1F1B)
    # and _with_interleaving (virtual pipeline); there is no GPipe schedule.
    schedules=("1f1b", "interleaved"),
    # 1: the distributed optimizer (--use-distributed-optimizer); 2 and 3: Megatron FSDP
    # (--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads / optim_grads_params).
    zero_stages=(0, 1, 2, 3),
    # --cp-comm-type p2p (ring attention, load-balanced causal chunks) and a2a (Ulysses).
    cp_kinds=("ring", "ulysses"), vocab_parallel=False,
    # --tp-comm-overlap (Transformer Engine userbuffers; needs sequence parallel), no compile needed.
    tp_overlap=True, tp_overlap_needs_compile=False,
    # Transformer Engine's fused layers and --cross-entropy-loss-fusion; torch.compile is not used.
    compile=False, fused_kernels=True,
    # --recompute-granularity is one of full / selective per run; full takes --recompute-method
    # uniform|block --recompute-num-layers N (the same N on every stage).
    mixed_recompute=False,
    # megatron/core/transformer/attention.py: num_query_groups_per_partition = divide(num_query_groups, tp).
    kv_head_replication=False,
    # --bf16 / --fp16 (loss scaling) / --fp8-format hybrid (Transformer Engine).
    precisions=("fp32", "bf16", "fp16", "fp8"),
    # megatron/core/tensor_parallel/layers.py LinearWithGradAccumulationAndAsyncCommunication saves the
    # sequence-parallel shard and all-gathers it again in backward; selective = core attention
    # (--recompute-modules core_attn); overlap_grad_reduce buckets reduce under the last backward.
    sp_saved_input="sharded", selective_recompute="core_attention", pipeline_grad_sync="overlapped",
    # docs.nvidia.com/megatron-core distrib_optimizer: bf16 parameters with fp32 gradients take 18 bytes per
    # parameter, 6 + 12/d with the distributed optimizer; megatron/training/arguments.py turns on
    # accumulate_allreduce_grads_in_fp32 under bf16 (the main-grad buffer is fp32).
    state_layout="distributed_optimizer",
    # megatron/core/transformer/transformer_block.py _checkpointed_forward: recompute_method "block" checkpoints
    # the first recompute_num_layers layers of each pipeline stage (of each model chunk under interleaving).
    block_recompute=True,
    # layers.py LinearWithGradAccumulationAndAsyncCommunication.backward: all-gather with async_op=True
    # before the grad_input GEMM, reduce-scatter with async_op=True before the weight-gradient GEMM
    # (CUDA_DEVICE_MAX_CONNECTIONS=1 orders them); Transformer Engine's Linear does the same. Context
    # parallel p2p (TE AttnFuncWithCPAndKVP2P): flash attention per step on load-balanced chunks (2 per
    # rank), the next K/V sent under the current step. TE's DotProductAttention runs cuDNN fused attention
    # on Hopper; TE's fp8 LayerNormLinear all-gathers its fp8 output.
    tp_backward_async=True, attention_kernel="cudnn", fp8_allgather=True,
    # megatron/core/pipeline_parallel/p2p_communication.py _communicate: torch.empty for every receive.
    pipeline_buffers="per_transfer",
    # --attention-backend unfused (megatron/core/transformer/enums.py AttnBackend; DotProductAttention);
    # --sequence-parallel is a switch: without it the TP regions all-reduce (tensor_parallel/mappings.py).
    attentions=("flash", "unfused"), tp_without_sp=True,
    # --expert-tensor-parallel-size (1, or the dense part's tp: MoE parallel folding).
    expert_tensor_parallel=True,
    # --moe-expert-capacity-factor: megatron/core/transformer/moe/moe_utils.py topk_softmax_with_capacity
    # drops, on each rank before the dispatch, what an expert gets beyond get_capacity's ceil(T k / E * factor).
    token_dropping=True,
)

TORCHTITAN = Engine(
    name="torchtitan", title="torchtitan",
    # torchtitan/distributed/pipeline_parallel.py: ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B
    # (and zero-bubble variants meshplan does not price).
    schedules=("gpipe", "1f1b", "interleaved"),
    # data_parallel_replicate_degree (DDP: 0), FSDP2 without resharding after forward (2; its default
    # under pipeline parallel) and with it (3); there is no optimizer-only sharding.
    zero_stages=(0, 2, 3),
    # context_parallel_degree: torch's ring attention over SDPA (allgather or alltoall rotation); no Ulysses.
    cp_kinds=("ring",), vocab_parallel=False,
    # parallelism.enable_async_tensor_parallel: requires compile (torchtitan/models/llama3/parallelize.py).
    tp_overlap=True, tp_overlap_needs_compile=True,
    compile=True, fused_kernels=False,
    # parallelism.enable_sequence_parallel (torchtitan/config/configs.py, default true).
    tp_without_sp=True,
    # torchtitan/distributed/activation_checkpoint.py (0.3.0): FullAC or SelectiveAC (the op policy) on every
    # block, one mode for the whole model; the layer-interval option of older releases is gone, and
    # MemoryBudgetAC (the compiler's choice under a budget) is not priced.
    mixed_recompute=False, kv_head_replication=False,
    # training.mixed_precision_param bfloat16 / float32; fp8 through the float8 converter (torchao); no fp16.
    precisions=("fp32", "bf16", "fp8"),
    # DTensor sequence parallel keeps the gathered input; the op policy saves every other mm, SDPA,
    # reduce-scatter and max outputs (torchtitan/distributed/activation_checkpoint.py _save_list);
    # torch.distributed.pipelining reduces gradients after the schedule.
    sp_saved_input="gathered", selective_recompute="op_policy", pipeline_grad_sync="after_schedule",
    # DTensor collectives wait; torch.distributed.tensor.experimental.context_parallel runs SDPA per step
    # on head-tail load-balanced chunks (torchtitan/distributed/context_parallel: load_balancer "headtail"),
    # rotating K/V beside the step; attention is torch SDPA; torchao Float8ColwiseParallel casts the
    # column-parallel input to fp8 before its all-gather (torchtitan parallelize apply_tp with float8).
    tp_backward_async=False, attention_kernel="flash2", fp8_allgather=True,
    # parallelism.expert_parallel_degree only: the experts' ranks are efsdp * ep = dp_shard * cp * tp, each
    # expert whole (torchtitan/config/configs.py ParallelismConfig); its all-to-all token dispatcher
    # (torchtitan/models/common/token_dispatcher.py) drops no token.
    expert_tensor_parallel=False, token_dropping=False,
)

ENGINES: dict[str, Engine] = {e.name: e for e in (MESHPLAN, MEGATRON, TORCHTITAN)}
ENGINE_NAMES = tuple(ENGINES)


def get_engine(name: str, where: str = "--engine") -> Engine:
    """The profile of engine ``name``; an :class:`InputError` naming ``where`` for an unknown one."""
    engine = ENGINES.get(str(name).lower())
    if engine is None:
        raise InputError(where, f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINE_NAMES)}")
    return engine
