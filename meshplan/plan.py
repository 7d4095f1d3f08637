"""The Plan: how one training job is split, and what meshplan predicts for it.

A Plan is what ``meshplan plan`` writes and what ``launch``, ``check`` and ``report`` read. It carries the
inputs it was made for (model, cluster, train) so a plan file is self-contained. The runtime reads every
choice from here and re-derives none of them (DESIGN.md: one place decides each thing).

Conventions the runtime relies on:
    * ``mesh_order`` lists mesh dimensions outermost first; ranks are laid out row-major over it, so the
      last (innermost) dimension has consecutive ranks and stays inside a node.
    * ``stages`` has ``pp * virtual_stages`` entries in model order. Stage ``j`` runs on pipeline rank
      ``j % pp`` (the interleaved convention of Megatron-LM and ``torch.distributed.pipelining``).
      ``layers`` is the half-open range ``[first, end)`` of transformer blocks. The first stage also holds
      the embedding and the last the final norm, LM head and loss, unless ``vocab_parallel`` splits
      those over every pipeline rank.
    * Within a stage, the first ``recompute_layers['full']`` blocks are fully recomputed, the next
      ``recompute_layers['selective']`` selectively, and the rest keep all activations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from meshplan.engines import DEFAULT_ENGINE, get_engine
from meshplan.errors import InputError
from meshplan.spec import (SCHEMA_VERSION, ClusterSpec, ModelSpec, TrainSpec, _as_bool, _as_choice, _as_float, _as_int,
                           load_structured_file)

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE_MODES = ("none", "selective", "full")
CP_KINDS = ("ulysses", "ring")
ATTENTIONS = ("flash", "unfused")
KERNEL_NAMES = ("norm", "swiglu", "rope", "loss")
# fused: meshplan's Triton kernels (the chunked loss); liger: liger-kernel's (the gpu extra); reference: eager
KERNEL_IMPLS = ("fused", "liger", "reference")
FUSED_IMPLS = ("fused", "liger")   # the choices priced as fused kernels (planner/compute.py pass counts)
MESH_DIMS = ("pp", "dp", "cp", "tp")
DEFAULT_MESH_ORDER = ("pp", "dp", "cp", "tp")   # outermost first: tp innermost (NVLink), pp outermost


# Predictions in a plan file keep this many significant figures, so a CPU process's few MiB (thousandths of
# a GiB) and a GPU's 70 GiB keep the same relative precision.
SIGNIFICANT_FIGURES = 6


def significant(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_FIGURES}g}")


def schedule_problem(schedule: str, pp: int, num_microbatches: int) -> str | None:
    """Why torch.distributed.pipelining cannot run ``schedule`` over ``pp`` ranks with ``num_microbatches`` per
    step, or ``None``. ``Schedule1F1B`` refuses fewer micro-batches than stages, and
    ``ScheduleInterleaved1F1B`` runs its micro-batches in rounds of ``pp`` (torch/distributed/pipelining/
    schedules.py); GPipe runs any count. The planner offers and the runtime accepts only what passes."""
    if pp <= 1:
        return None
    if schedule == "1f1b" and num_microbatches < pp:
        return f"1f1b needs at least pp={pp} micro-batches per step, the plan has {num_microbatches}"
    if schedule == "interleaved" and num_microbatches % pp:
        return f"interleaved needs a multiple of pp={pp} micro-batches per step, the plan has {num_microbatches}"
    return None


def expert_layout_problem(model: ModelSpec, dp: int, tp: int, cp: int, ep: int,
                          expert_tp: int) -> tuple[str, str, str] | None:
    """Why ``ep`` and ``expert_tp`` cannot split ``model``'s experts over a dp x tp x cp layout, as
    ``(field, problem, fix)``, or ``None``: one rule for the planner, the plan file and the runtime.
    EP groups are folded into the data x context ranks (Megatron-Core's MoE parallel folding, restricted to
    EP within dp x cp), so ``ep`` divides ``dp * cp``; each rank holds ``experts / ep`` whole experts."""
    if model.moe is None:
        if ep != 1 or expert_tp != 1:
            return ("ep", f"ep={ep}, expert_tp={expert_tp} for a model without experts", "set ep: 1 and expert_tp: 1")
        return None
    if (dp * cp) % ep:
        return ("ep", f"ep={ep} does not divide dp*cp = {dp * cp}",
                "pick ep among the divisors of dp*cp (expert groups are folded into the data x context ranks)")
    if model.moe.experts % ep:
        return ("ep", f"ep={ep} does not divide the {model.moe.experts} experts", "pick ep dividing moe.experts")
    if expert_tp not in (1, tp):
        return ("expert_tp", f"expert_tp={expert_tp} is neither 1 nor tp={tp}", "set expert_tp to 1 or to tp")
    if expert_tp > 1 and model.moe.expert_ffn_hidden % expert_tp:
        return ("expert_tp", f"expert_tp={expert_tp} does not divide moe.expert_ffn_hidden "
                f"{model.moe.expert_ffn_hidden}", "set expert_tp: 1")
    return None


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage (a virtual stage when interleaved).

    Fields:
        layers: ``(first, end)`` transformer blocks of this stage.
        recompute_layers: how many of its blocks use each recompute mode (``none``/``selective``/``full``).
        peak_memory_gib: predicted peak memory of the rank that runs this stage (all its virtual stages).
    """

    layers: tuple[int, int]
    recompute_layers: dict[str, int]
    peak_memory_gib: float = 0.0

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def recompute(self) -> str:
        """``none``/``selective``/``full`` when every block of the stage uses it, else ``mixed``."""
        used = [m for m in RECOMPUTE_MODES if self.recompute_layers.get(m, 0) > 0]
        if not used:
            return "none"
        return used[0] if len(used) == 1 else "mixed"

    def layer_recompute(self, layer: int) -> str:
        """Recompute mode of global block index ``layer`` (which must belong to this stage)."""
        first, end = self.layers
        if not first <= layer < end:
            raise IndexError(f"layer {layer} is not in stage [{first}, {end})")
        offset = layer - first
        full = self.recompute_layers.get("full", 0)
        selective = self.recompute_layers.get("selective", 0)
        if offset < full:
            return "full"
        if offset < full + selective:
            return "selective"
        return "none"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "recompute": self.recompute,
                "recompute_layers": {m: int(self.recompute_layers.get(m, 0)) for m in RECOMPUTE_MODES},
                "peak_memory_gib": significant(self.peak_memory_gib)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "StagePlan":
        try:
            first, end = (int(x) for x in data["layers"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}.layers", "expected [first, end)", "write layers: [0, 8]") from None
        counts = data.get("recompute_layers")
        if counts is None:
            mode = _as_choice(data.get("recompute", "none"), f"{where}.recompute", RECOMPUTE_MODES)
            counts = {mode: end - first}
        counts = {m: _as_int(counts.get(m, 0), f"{where}.recompute_layers.{m}", 0) for m in RECOMPUTE_MODES}
        if sum(counts.values()) != end - first:
            raise InputError(f"{where}.recompute_layers", f"counts {counts} do not add up to {end - first} layers",
                             "make none + selective + full equal the stage's layer count")
        return cls((first, end), counts, float(data.get("peak_memory_gib", 0.0)))


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts for one iteration (one optimizer step).

    Fields:
        iteration_s: seconds per iteration.
        tokens_per_s: global tokens per second.
        tflops_per_gpu: model FLOPs per GPU per second (TFLOP/s): forward + backward of the model,
            attention counted causally halved, no recompute (see planner.flops.model_flops_per_token).
        mfu: tflops_per_gpu over the device's dense peak for the precision.
        peak_memory_gib: the worst rank's peak, allocator margin included.
        time_breakdown_s: compute, recompute, exposed communication per dimension, bubble, optimizer.
        memory_breakdown_gib: the worst rank's parameters, gradients, optimizer, activations, logits, buffers.
        reserved_memory_gib: the most any rank's CUDA caching allocator reserves (what
            ``torch.cuda.max_memory_reserved`` reports: the allocated peak, cached blocks and fragmentation;
            planner/memory.py reserved_bytes); equal to the live peak on CPU ranks. None in plans written
            before it existed.
        nccl_memory_gib: NCCL's buffers per rank, outside torch's allocator. A plan fits when reserved + NCCL +
            the CUDA context stay under the device memory less the headroom (``meshplan plan --memory-headroom``).
    """

    iteration_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    peak_memory_gib: float
    time_breakdown_s: dict[str, float] = field(default_factory=dict)
    memory_breakdown_gib: dict[str, float] = field(default_factory=dict)
    reserved_memory_gib: float | None = None
    nccl_memory_gib: float | None = None

    @property
    def allocated_peak_gib(self) -> float:
        """The worst rank's live tensors at their peak: ``peak_memory_gib`` without the allocator margin."""
        return self.peak_memory_gib - float(self.memory_breakdown_gib.get("margin", 0.0) or 0.0)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "iteration_s": significant(self.iteration_s), "tokens_per_s": significant(self.tokens_per_s),
            "tflops_per_gpu": significant(self.tflops_per_gpu), "mfu": significant(self.mfu),
            "peak_memory_gib": significant(self.peak_memory_gib),
            "time_breakdown_s": {k: significant(v) for k, v in self.time_breakdown_s.items()},
            "memory_breakdown_gib": {k: significant(v) for k, v in self.memory_breakdown_gib.items()},
        }
        for key in ("reserved_memory_gib", "nccl_memory_gib"):
            if getattr(self, key) is not None:
                data[key] = significant(getattr(self, key))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prediction":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class Plan:
    """One way to split a training job, and its prediction.

    Fields:
        engine: the engine the plan is priced for and runs on (meshplan/engines.py): ``meshplan`` (``meshplan
            launch``), ``megatron`` or ``torchtitan`` (``meshplan export``).
        dp, tp, pp, cp: data, tensor, pipeline and context parallel degrees; dp*tp*pp*cp = world size.
        ep: expert parallel degree of a mixture of experts (1 for a dense model): each MoE block's routed
            experts are split over ``ep`` ranks of the data x context group (Megatron-Core's "MoE parallel
            folding": the expert groups are folded into the dense part's dp x cp), tokens dispatched to their
            experts' ranks and combined back by all-to-all. Divides ``dp * cp`` and ``moe.experts``. The
            ``dp * cp * tp / (ep * expert_tp)`` ranks holding the same experts are the expert-data-parallel group
            that reduces (and under ZeRO shards) their gradients and state.
        expert_tp: the tensor-parallel degree of each expert: 1 (each expert whole on its rank; under tp > 1 the
            tensor-parallel ranks route their own sequence-parallel shards of the tokens) or ``tp`` (the
            expert's matmuls split like the dense MLP's).
        moe_imbalance: the load of the busiest EP rank over the mean that the plan was priced with
            (``--fix moe_imbalance``); 0 for the planner's default (planner/moe.py default_imbalance).
        cp_kind: ``ulysses`` (all-to-all over heads) or ``ring`` (K/V passed around a ring); ignored if cp == 1.
        sequence_parallel: Megatron sequence parallelism inside the tensor-parallel group (the planner turns it
            on whenever tp > 1; ``--fix sequence_parallel=false`` prices tensor parallel without it).
        attention: ``flash`` (a fused attention kernel that keeps no scores) or ``unfused`` (the scores
            materialised; ``--fix attention=unfused``, an engine that runs it, cp = 1).
        vocab_parallel: embedding, LM head and loss split by vocabulary over all pipeline (and tensor) ranks
            (Yeung et al. 2024) instead of living on the first/last stage.
        micro_batch: sequences per micro-batch per data-parallel rank.
        num_microbatches: micro-batches per iteration per data-parallel rank
            (global_batch = dp * micro_batch * num_microbatches).
        schedule: pipeline schedule ``gpipe``, ``1f1b`` or ``interleaved`` (accepted but moot when pp == 1).
        virtual_stages: model chunks per pipeline rank (> 1 only for ``interleaved``).
        zero: 0 (DDP), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters: FSDP).
        tp_overlap: tensor-parallel communication overlapped with the matmuls (async TP; GPU only).
        compile: blocks are compiled (torch.compile), fusing their elementwise ops.
        kernels: implementation per kernel (``norm``, ``swiglu``, ``rope``, ``loss``): ``fused`` (Triton, GPU)
            or ``reference`` (plain PyTorch). ``loss: fused`` is the chunked linear + cross-entropy that never
            holds the full logits. The planner fills it; the memory and time model count what each saves.
        mesh_order: mesh dimensions outermost first (default pp, dp, cp, tp: tp on the fastest link).
        stages: per pipeline (virtual) stage layer range, recompute and peak memory; see the module doc.
        predicted: the cost model's prediction; see Prediction.
        model, cluster, train: the inputs the plan was made for.
        notes: why this plan, what bound it, anything a reader should know.
        search: summary of the search that chose it (seconds, evaluated, rejected reasons with counts,
            the runner-up plans as pins and predictions); empty for a plan read from elsewhere.
    """

    dp: int
    tp: int
    pp: int
    cp: int
    micro_batch: int
    num_microbatches: int
    stages: tuple[StagePlan, ...]
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    engine: str = "meshplan"
    ep: int = 1
    expert_tp: int = 1
    moe_imbalance: float = 0.0
    cp_kind: str = "ulysses"
    sequence_parallel: bool = True
    attention: str = "flash"
    vocab_parallel: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    tp_overlap: bool = False
    compile: bool = False
    kernels: dict[str, str] = field(default_factory=lambda: {k: "reference" for k in KERNEL_NAMES})
    mesh_order: tuple[str, ...] = DEFAULT_MESH_ORDER
    predicted: Prediction | None = None
    notes: tuple[str, ...] = ()
    search: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts (the expert-data-parallel group): dp*cp*tp / (ep*expert_tp)."""
        return self.dp * self.cp * self.tp // (self.ep * self.expert_tp)

    @property
    def recompute(self) -> str:
        """The plan-wide recompute mode, ``mixed`` when stages differ or mix modes."""
        modes = {s.recompute for s in self.stages}
        return modes.pop() if len(modes) == 1 else "mixed"

    def stage_of_layer(self, layer: int) -> int:
        for index, stage in enumerate(self.stages):
            if stage.layers[0] <= layer < stage.layers[1]:
                return index
        raise IndexError(f"layer {layer} is in no stage")

    def pipeline_rank_of_stage(self, stage: int) -> int:
        return stage % self.pp

    def mesh_shape(self) -> tuple[int, ...]:
        """Sizes of the mesh dimensions in ``mesh_order``."""
        return tuple(getattr(self, d) for d in self.mesh_order)

    def fields_for_fix(self) -> dict[str, Any]:
        """The ``--fix`` pins that reproduce this plan's choices (a mixed recompute is left to the planner,
        which chooses it again for the same configuration)."""
        pins = {"dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "cp_kind": self.cp_kind,
                "micro_batch": self.micro_batch, "schedule": self.schedule, "virtual_stages": self.virtual_stages,
                "recompute": self.recompute, "zero": self.zero, "vocab_parallel": self.vocab_parallel}
        if self.tp > 1 and not self.sequence_parallel:
            pins["sequence_parallel"] = False
        if self.attention != "flash":
            pins["attention"] = self.attention
        if self.model.moe is not None:
            pins["ep"] = self.ep
            pins["expert_tp"] = self.expert_tp
            if self.moe_imbalance:
                pins["moe_imbalance"] = self.moe_imbalance
        for op, impl in self.kernels.items():
            if impl == "liger":
                pins[f"{op}_kernel"] = impl
        if pins["recompute"] == "mixed":
            del pins["recompute"]
        return pins

    def engine_fields(self) -> dict[str, Any]:
        """The fields whose values an engine may not run (meshplan/engines.py), those that matter here: the
        schedule under a pipeline, the context-parallel kind with cp > 1."""
        fields: dict[str, Any] = {"zero": self.zero, "vocab_parallel": self.vocab_parallel,
                                  "tp_overlap": self.tp_overlap, "compile": self.compile,
                                  "fused_kernels": any(v in FUSED_IMPLS for v in self.kernels.values()),
                                  "precision": self.train.precision, "attention": self.attention}
        if self.tp > 1:
            fields["sequence_parallel"] = self.sequence_parallel
        if self.pp > 1:
            fields["schedule"] = self.schedule
        if self.cp > 1:
            fields["cp_kind"] = self.cp_kind
        if self.expert_tp > 1:
            fields["expert_tensor_parallel"] = True
        return fields

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self, with_inputs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version, "engine": self.engine,
            "dp": self.dp, "tp": self.tp, "pp": self.pp, "cp": self.cp, "cp_kind": self.cp_kind,
            **({"ep": self.ep, "expert_tp": self.expert_tp, "moe_imbalance": self.moe_imbalance}
               if self.model.moe is not None else {}),
            "sequence_parallel": self.sequence_parallel, "attention": self.attention,
            "vocab_parallel": self.vocab_parallel, "micro_batch": self.micro_batch, "num_microbatches": self.num_microbatches,
            "schedule": self.schedule, "virtual_stages": self.virtual_stages, "zero": self.zero,
            "recompute": self.recompute, "tp_overlap": self.tp_overlap, "compile": self.compile,
            "kernels": dict(self.kernels), "mesh_order": list(self.mesh_order),
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.predicted is not None:
            out["predicted"] = self.predicted.to_dict()
        if self.notes:
            out["notes"] = list(self.notes)
        if self.search:
            out["search"] = self.search
        if with_inputs:
            out["model"] = self.model.to_dict()
            out["cluster"] = self.cluster.to_dict()
            out["train"] = self.train.to_dict()
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if p.suffix == ".json" else self.to_yaml()
        p.write_text(text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "plan") -> "Plan":
        if not isinstance(data, Mapping):
            raise InputError(where, "expected a mapping", "give a plan file written by `meshplan plan --out`")
        for key in ("dp", "tp", "pp", "cp", "micro_batch", "num_microbatches", "stages", "model", "cluster", "train"):
            if key not in data:
                raise InputError(f"{where}.{key}", "missing", "give a plan file written by `meshplan plan --out`")
        known = {f.name for f in dataclasses.fields(cls)} | {"recompute"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{where}.{unknown[0]}", "unknown key", f"known keys: {', '.join(sorted(known))}")
        degrees = {k: _as_int(data[k], f"{where}.{k}", 1) for k in ("dp", "tp", "pp", "cp")}
        stages_data = data["stages"]
        if not isinstance(stages_data, list) or not stages_data:
            raise InputError(f"{where}.stages", "expected a non-empty list", "give one entry per pipeline stage")
        stages = tuple(StagePlan.from_dict(s, f"{where}.stages[{i}]") for i, s in enumerate(stages_data))
        mesh_order = tuple(data.get("mesh_order", DEFAULT_MESH_ORDER))
        if sorted(mesh_order) != sorted(MESH_DIMS):
            raise InputError(f"{where}.mesh_order", f"{list(mesh_order)} is not an order of {list(MESH_DIMS)}",
                             "list each of pp, dp, cp, tp once")
        plan = cls(
            **degrees,
            micro_batch=_as_int(data["micro_batch"], f"{where}.micro_batch", 1),
            num_microbatches=_as_int(data["num_microbatches"], f"{where}.num_microbatches", 1),
            stages=stages,
            model=ModelSpec.from_dict(data["model"], f"{where}.model"),
            cluster=ClusterSpec.from_dict(data["cluster"], f"{where}.cluster"),
            train=TrainSpec.from_dict(data["train"], f"{where}.train"),
            engine=get_engine(data.get("engine", DEFAULT_ENGINE), f"{where}.engine").name,
            ep=_as_int(data.get("ep", 1), f"{where}.ep", 1),
            expert_tp=_as_int(data.get("expert_tp", 1), f"{where}.expert_tp", 1),
            moe_imbalance=_as_float(data.get("moe_imbalance", 0.0), f"{where}.moe_imbalance", strict=False),
            cp_kind=_as_choice(data.get("cp_kind", "ulysses"), f"{where}.cp_kind", CP_KINDS),
            sequence_parallel=_as_bool(data.get("sequence_parallel", degrees["tp"] > 1), f"{where}.sequence_parallel"),
            attention=_as_choice(data.get("attention", "flash"), f"{where}.attention", ATTENTIONS),
            vocab_parallel=_as_bool(data.get("vocab_parallel", False), f"{where}.vocab_parallel"),
            schedule=_as_choice(data.get("schedule", "1f1b"), f"{where}.schedule", SCHEDULES),
            virtual_stages=_as_int(data.get("virtual_stages", 1), f"{where}.virtual_stages", 1),
            zero=_as_int(data.get("zero", 0), f"{where}.zero", 0, 3),
            tp_overlap=_as_bool(data.get("tp_overlap", False), f"{where}.tp_overlap"),
            compile=_as_bool(data.get("compile", False), f"{where}.compile"),
            kernels=_kernels_from(data.get("kernels"), f"{where}.kernels"),
            mesh_order=mesh_order,
            predicted=Prediction.from_dict(data["predicted"]) if data.get("predicted") else None,
            notes=tuple(data.get("notes", ())),
            search=dict(data.get("search") or {}),
        )
        plan.validate(where)
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(load_structured_file(path, "plan"), where=str(path))

    def validate(self, where: str = "plan") -> None:
        """Structural checks every consumer relies on (the schedule rule is ``schedule_problem`` above; the
        degree rules are the planner's ``degree_problems`` and ``launcher/checks.py``)."""
        if self.world_size != self.cluster.world_size:
            raise InputError(f"{where}: dp*tp*pp*cp",
                             f"{self.dp}*{self.tp}*{self.pp}*{self.cp} = {self.world_size} but the cluster has "
                             f"{self.cluster.world_size} ranks", "re-plan for this cluster")
        if self.dp * self.micro_batch * self.num_microbatches != self.train.global_batch:
            raise InputError(f"{where}: micro_batch", f"dp*micro_batch*num_microbatches = "
                             f"{self.dp * self.micro_batch * self.num_microbatches} != global batch "
                             f"{self.train.global_batch}", "re-plan, or fix the numbers so they multiply out")
        if self.attention == "unfused" and self.cp > 1:
            raise InputError(f"{where}.attention", "unfused attention runs without context parallel",
                             "set attention: flash, or re-plan with cp = 1")
        if self.tp_overlap and self.tp > 1 and not self.sequence_parallel:
            raise InputError(f"{where}.tp_overlap", "TP communication overlap needs sequence parallel",
                             "set sequence_parallel: true or tp_overlap: false")
        expert_problem = expert_layout_problem(self.model, self.dp, self.tp, self.cp, self.ep, self.expert_tp)
        if expert_problem:
            field_name, problem, fix = expert_problem
            raise InputError(f"{where}.{field_name}", problem, fix)
        expected = self.pp * self.virtual_stages
        if len(self.stages) != expected:
            raise InputError(f"{where}.stages", f"{len(self.stages)} stages for pp*virtual_stages = {expected}",
                             "give one entry per (virtual) pipeline stage")
        get_engine(self.engine, f"{where}.engine").check(self.engine_fields(), where)
        cursor = 0
        for i, stage in enumerate(self.stages):
            if stage.layers[0] != cursor or stage.layers[1] < stage.layers[0]:
                raise InputError(f"{where}.stages[{i}].layers", f"{list(stage.layers)} does not continue at {cursor}",
                                 "stages must cover the blocks in order without gaps")
            cursor = stage.layers[1]
        if cursor != self.model.layers:
            raise InputError(f"{where}.stages", f"cover {cursor} blocks but the model has {self.model.layers}",
                             "make the last stage end at the model's layer count")


def _kernels_from(data: Any, where: str) -> dict[str, str]:
    kernels = {k: "reference" for k in KERNEL_NAMES}
    if data is None:
        return kernels
    if not isinstance(data, Mapping):
        raise InputError(where, f"expected a mapping kernel -> {'|'.join(KERNEL_IMPLS)}",
                         "write e.g. kernels: {loss: fused}")
    for name, impl in data.items():
        if name not in KERNEL_NAMES:
            raise InputError(f"{where}.{name}", "unknown kernel", f"known kernels: {', '.join(KERNEL_NAMES)}")
        kernels[name] = _as_choice(impl, f"{where}.{name}", KERNEL_IMPLS)
    return kernels
