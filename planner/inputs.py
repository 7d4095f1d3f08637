"""The inputs of one evaluation: a point of the search space (:class:`Config`), the fixed inputs of a search
(:class:`Context`), and why a configuration cannot run (:class:`Rejection`)."""

from __future__ import annotations

from dataclasses import dataclass

from meshplan.engines import MESHPLAN, Engine
from meshplan.plan import DEFAULT_MESH_ORDER, RECOMPUTE_MODES
from meshplan.spec import ClusterSpec, ModelSpec, TrainSpec
from meshplan.planner import memory
from meshplan.planner.host import HostModel, host_model

GIB = memory.GIB
MODES = RECOMPUTE_MODES   # the Plan's recompute modes (meshplan/plan.py), in the planner's short name


@dataclass(frozen=True)
class Config:
    """One point of the search space (everything but the layer partition and recompute counts, which
    ``evaluate`` chooses). ``recompute`` pins a uniform mode; None lets the planner choose per stage."""

    dp: int
    tp: int
    pp: int
    cp: int
    micro_batch: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    vocab_parallel: bool = False
    cp_kind: str = "ulysses"
    tp_overlap: bool = False
    compile: bool = False
    fused_kernels: bool = False
    recompute: str | None = None
    mesh_order: tuple[str, ...] = DEFAULT_MESH_ORDER
    sequence_parallel: bool = True     # under tp > 1: sequence parallel (False: TP alone, all-reduces)
    attention: str = "flash"           # ``flash`` or ``unfused`` (plan.ATTENTIONS)
    ep: int = 1                        # expert parallel (plan.ep)
    expert_tp: int = 1                 # tensor parallel of each expert: 1 or tp (plan.expert_tp)
    moe_imbalance: float | None = None  # MoE load factor of the slowest EP rank; None: moe.default_imbalance

    @property
    def sp(self) -> bool:
        """Sequence parallel is in effect: tp > 1 and not turned off."""
        return self.tp > 1 and self.sequence_parallel

    @property
    def degrees(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp}

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (plan.Plan.expert_dp)."""
        return self.dp * self.cp * self.tp // (self.ep * self.expert_tp)


@dataclass(frozen=True)
class Context:
    """The fixed inputs of a search: the model, the cluster, the batch and the engine that will run the plan
    (meshplan/engines.py: what it runs and how; the cost terms read its behaviour)."""

    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    engine: Engine = MESHPLAN
    memory_headroom: float = memory.DEFAULT_MEMORY_HEADROOM   # share of device memory a plan leaves unused
    # implementations pinned per fused op, ((op, impl), ...), over the cluster's kernel table
    # (planner/kernels.py): --fix <op>_kernel pins, or a written plan's whole section (planner/replay.py)
    kernels: tuple[tuple[str, str], ...] | None = None

    def __hash__(self) -> int:
        """Computed once (the planner's caches are keyed on the context: hundreds of thousands of lookups in a
        16,384-GPU search, each hashing the model, cluster, batch and engine again otherwise)."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.model, self.cluster, self.train, self.engine, self.memory_headroom, self.kernels))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        """Pickled without the cached hash (strings hash differently in another process) and the memo."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_memo")}

    @property
    def memo(self) -> dict:
        """A cache of values computed from this context alone and a key of their own (block.config_layer_cost);
        a context made by ``dataclasses.replace`` starts with an empty one."""
        memo = self.__dict__.get("_memo")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_memo", memo)
        return memo

    @property
    def pipeline_grad_sync(self) -> str:
        """When a pipeline stage's data-parallel gradients are reduced. ``"after_schedule"``
        (torch.distributed.pipelining, meshplan's runtime and torchtitan: gradient sync is off for every
        backward and one REDUCE_GRAD action runs after the stage's last one, ``PipelineStage.perform_reduce_grad``,
        measured in benchmarks/dp_reduce_wait.py) or ``"overlapped"`` (Megatron-LM's ``overlap_grad_reduce``:
        buckets reduce as the last micro-batch's backward fills them). Only plans with ``pp > 1`` and
        data-parallel replicas are affected."""
        return self.engine.pipeline_grad_sync

    @property
    def act_bytes(self) -> int:
        return memory.ACT_BYTES[self.train.precision]

    @property
    def capacity_bytes(self) -> float:
        """What a rank may use: device memory less the CUDA context kept outside torch's allocator."""
        context = memory.CUDA_CONTEXT_GIB if self.cluster.gpu.kind == "gpu" else 0.0
        return (self.cluster.gpu.memory_gib - context) * GIB

    @property
    def caching_allocator(self) -> bool:
        """Whether ranks allocate through the CUDA caching allocator (GPU clusters) and reserve more than they
        use (memory.reserved_bytes); CPU ranks reserve what they allocate."""
        return self.cluster.gpu.kind == "gpu"

    @property
    def reserved_capacity_bytes(self) -> float:
        """What torch's allocator and NCCL together may reserve on a rank: device memory less the headroom
        (``memory_headroom``) and the CUDA context kept outside torch's allocator."""
        context = memory.CUDA_CONTEXT_GIB if self.caching_allocator else 0.0
        return (self.cluster.gpu.memory_gib * (1.0 - self.memory_headroom) - context) * GIB

    @property
    def host(self) -> HostModel:
        """The host model of the cluster's ranks (host.py: shared cores on CPU clusters, none on GPUs)."""
        return host_model(self.cluster)

    def num_microbatches(self, cfg: Config) -> int:
        """Micro-batches per step per data-parallel rank: global batch / (dp * micro batch)."""
        return self.train.global_batch // (cfg.dp * cfg.micro_batch)


@dataclass(frozen=True)
class Rejection:
    reason: str               # a short family name used for counting ("OOM", "divisibility: ...")
    detail: str = ""
    over_bytes: float = 0.0   # for OOM: by how much the best variant missed
