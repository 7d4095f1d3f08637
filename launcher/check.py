"""``meshplan check``: build a plan for every rank asked, in this process, and measure its memory.

Each rank is built by the runtime's own code (``train.build_parts``: the stage split, kernels, tensor and
sequence parallel, context parallel, recompute, ZeRO/FSDP2, the pipeline schedule) over a *fake* process
group of the plan's world size (``FakeStore``: collectives return at once) with *fake* tensors
(``FakeTensorMode``: shapes, dtypes and storages, no data). One training step runs through the runtime's
``train_step`` (every micro-batch of the schedule, the optimizer step), while :class:`LiveBytes` follows
every storage the dispatcher hands out and frees. What comes out, per rank:

* parameters, gradients and optimizer state: the bytes of the distinct storages, exactly;
* activations: bytes a micro-batch keeps for backward on each of the rank's stages (its blocks, measured
  by a separate forward), and the planner's micro-batches in flight for the rank's schedule position;
* the peak: the largest live total during the step, with the optimizer state the next steps carry;
* the planner's prediction for the same rank (``planner.replay``), and the differences.

A plan that cannot be built fails here, on one CPU, with the rank and the reason in one line, rather than
on the cluster: a shape that does not divide, a stage without layers or with layers the model lacks, a
process group that was never created, a tied embedding whose copies disagree.

What is not measured: ``torch.compile``'s fusions (the check runs the blocks eagerly), CUDA's caching
allocator's fragmentation (the planner adds a margin for it) and the CUDA context. On a GPU plan the
fused kernels run shape-only (they allocate and save what the Triton path does) and FSDP2 mixed
precision / autocast follow the plan's precision, so the bytes are the GPU run's.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from meshplan.errors import InputError
from meshplan.plan import Plan

GIB = 2**30


# ----------------------------------------------------------------------------------------------
# live-bytes tracking
# ----------------------------------------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Follows every storage that an operator returns (real, fake or meta tensors alike) until it is freed.

    ``live`` is the bytes of the storages alive now, ``peak`` the most since :meth:`reset_peak`, ``largest``
    the largest single storage seen. Each storage counts once however many tensors view it; :meth:`track`
    adds tensors made outside the mode."""

    def __init__(self, cuda_attention_layout: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._sizes: dict[int, int] = {}
        self.cuda_attention_layout = cuda_attention_layout

    def track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(t):   # DTensor, AsyncCollectiveTensor: a wrapper has no data of its own
            for name in t.__tensor_flatten__()[0]:
                self.track(getattr(t, name))
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):   # tensor subclasses without a storage of their own
            return
        key = storage._cdata          # the C++ storage: two Python wrappers of one storage count once
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, size)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self):
        """Also follow ``UntypedStorage.resize_``: FSDP2 frees a gathered weight by resizing its storage to 0
        and re-gathers into the same storage (as torch's own MemTracker does)."""
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            key = storage._cdata
            result = original(storage, size)
            if key in tracker._sizes:
                new = storage.nbytes()
                tracker.live += new - tracker._sizes[key]
                tracker._sizes[key] = new
                tracker.peak = max(tracker.peak, tracker.live)
                tracker.largest = max(tracker.largest, new)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.cuda_attention_layout and func is _cpu_flash_attention():
            out = (_as_cuda_flash_layout(out[0]), *out[1:])
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def _cpu_flash_attention():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu").default


def _as_cuda_flash_layout(out: torch.Tensor) -> torch.Tensor:
    """The CPU flash attention returns ``(b, heads, s, d)`` contiguous; CUDA's flash kernel allocates
    ``(b, s, heads, d)`` and returns it transposed, so the block's ``transpose(1, 2).reshape`` is a view there
    and a copy here. A GPU plan checked on the CPU gets the CUDA layout, so it keeps what the GPU keeps."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (wrapper subclasses such as DTensor: their inner
    tensors, i.e. the local shard)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()

    for t in tensors:
        if t is not None:
            add(t)
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

MEMORY_KEYS = ("parameters", "gradients", "optimizer", "activations", "logits", "peak")


@dataclass
class RankCheck:
    """What ``check`` measured for one rank, and what the planner predicts for it (bytes).

    Fields:
        rank: global rank; coords: its coordinate per mesh dimension; stages: the (virtual) stages it runs.
        measured: parameters, gradients, optimizer (exact storage bytes); activations (bytes kept for
            backward by one micro-batch in each of the rank's stages' blocks, times the micro-batches in
            flight); logits (the head and loss of one micro-batch, where the rank has them); peak (the
            largest live total of a training step with the optimizer state present, i.e. steps 2, 3, ...);
            largest_tensor (the largest single storage of the step: a materialised ``s x s`` attention
            score tensor shows here).
        activations_per_microbatch: per stage, the blocks' bytes for one micro-batch.
        in_flight: micro-batches whose activations the rank holds at its peak (the schedule's count).
        predicted: the planner's bytes for this pipeline rank (``planner.replay``), ``peak`` without margin.
        seconds: time to build and run this rank.
    """

    rank: int
    coords: dict[str, int]
    stages: list[int]
    measured: dict[str, float]
    activations_per_microbatch: dict[int, float]
    in_flight: float
    predicted: dict[str, float]
    seconds: float

    def difference(self, key: str) -> float | None:
        """(predicted - measured) / measured for ``key``; None when nothing was measured."""
        m, p = self.measured.get(key, 0.0), self.predicted.get(key, 0.0)
        return (p - m) / m if m else None


@dataclass
class CheckResult:
    """All checked ranks of one plan. ``worst`` is the rank with the largest measured peak."""

    plan: Plan
    ranks: list[RankCheck]
    capacity_bytes: float
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> RankCheck:
        return max(self.ranks, key=lambda r: r.measured["peak"])

    def fits(self) -> bool:
        """The worst measured peak, with the planner's allocator margin, fits the device."""
        from meshplan.planner.memory import ALLOCATOR_MARGIN

        return self.worst.measured["peak"] * (1 + ALLOCATOR_MARGIN) <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.plan.world_size, "capacity_gib": self.capacity_bytes / GIB, "fits": self.fits(),
                "worst_rank": self.worst.rank, "notes": self.notes,
                "ranks": [{"rank": r.rank, "coords": r.coords, "stages": r.stages, "in_flight": r.in_flight,
                           "seconds": round(r.seconds, 3),
                           "measured_gib": {k: r.measured[k] / GIB for k in MEMORY_KEYS},
                           "largest_tensor_gib": r.measured.get("largest_tensor", 0.0) / GIB,
                           "predicted_gib": {k: r.predicted.get(k, 0.0) / GIB for k in MEMORY_KEYS},
                           "activations_per_microbatch_gib": {str(j): b / GIB
                                                              for j, b in r.activations_per_microbatch.items()}}
                          for r in self.ranks]}


# ----------------------------------------------------------------------------------------------
# structural checks (before anything is built)
# ----------------------------------------------------------------------------------------------

def check_structure(plan: Plan) -> None:
    """What the runtime needs of a plan's shapes and stages, each failure one line with the field and fix."""
    from meshplan.launcher.checks import check_supported

    plan.validate()                 # stage count, contiguous cover of the model's blocks, batch arithmetic
    check_supported(plan)
    m = plan.model
    if plan.tp > 1 and m.ffn_hidden % plan.tp:
        raise InputError("plan.tp", f"tp={plan.tp} does not divide the MLP width ffn_hidden={m.ffn_hidden}",
                         "re-plan with a tensor-parallel degree dividing ffn_hidden")
    for j, stage in enumerate(plan.stages):
        if stage.num_layers == 0:
            raise InputError(f"plan.stages[{j}].layers", f"{list(stage.layers)} holds no layer",
                             "give every stage at least one transformer block, or use fewer stages")


def _check_groups(plan: Plan, meshes, tied_group) -> None:
    """Every process group the plan needs on this rank exists, and tied embedding copies agree."""
    for name in ("tp", "cp", "pp"):
        if getattr(plan, name) > 1 and getattr(meshes, name) is None:
            raise InputError(f"plan.{name}", f"the {name} process group of size {getattr(plan, name)} was not created",
                             "report this as a meshplan bug")
    if plan.dp * plan.cp > 1 and meshes.dp_cp is None:
        raise InputError("plan.dp", "the data-parallel process group was not created", "report this as a meshplan bug")
    if plan.model.tied_embeddings and plan.pp > 1 and (len(plan.stages) - 1) % plan.pp != 0 and tied_group is None \
            and not plan.vocab_parallel:   # vocab_parallel: one vocabulary shard per rank, no copies to join
        coords = meshes.coords
        if coords["pp"] in (0, (len(plan.stages) - 1) % plan.pp):
            raise InputError("plan.model.tied_embeddings", "the tied embedding is split across pipeline ranks "
                             "but no group joins its two copies", "report this as a meshplan bug")


# ----------------------------------------------------------------------------------------------
# one rank
# ----------------------------------------------------------------------------------------------

def _device_type(plan: Plan) -> str:
    """The device the plan runs on: decides mixed precision, fused kernels and the optimizer's kernel."""
    return "cuda" if plan.cluster.gpu.kind == "gpu" else "cpu"


def _skip_p2p_warmup(schedule) -> None:
    """``torch.distributed.pipelining`` votes over P2P at the first step on whether stage shapes are static;
    over a fake group nothing arrives, so the answer is given: static (the shapes come from the plan)."""
    from torch.distributed.pipelining.schedules import InferenceMode

    def warmup(stages, *args, **kwargs):
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = warmup


def _block_bytes(part, tracker: LiveBytes, run: Callable[[], Any],
                 settle: Callable[[], Any] | None = None) -> tuple[float, float]:
    """(bytes held by the part's blocks, bytes held by the whole forward) for one micro-batch: the live-bytes
    growth from just before the first block to just after the last, and over the whole call. ``settle`` (a
    real run's) runs before each of the two marks is read, so that neither counts the tensors of a collective
    that gloo's worker thread has finished but not yet let go of (:func:`measure_trainer`)."""
    blocks = list(part.layers.values())
    marks: dict[str, int] = {}
    hooks = []
    settled = settle or (lambda: None)

    def start(*_):      # hooks return None: a return value would replace the module's args / output
        if "start" not in marks:
            settled()
            marks["start"] = tracker.live

    def end(*_):        # the blocks' output counts: each block keeps its input (the previous one's output)
        settled()
        marks["end"] = tracker.live

    if blocks:   # after FSDP2's pre-forward (the first block gathered), before its post-forward (the last
        # block still gathered): equal-sized blocks, so the gathered weights cancel out under ZeRO-3
        hooks.append(blocks[0].register_forward_pre_hook(start))
        hooks.append(blocks[-1].register_forward_hook(end, prepend=True))
    live_before = tracker.live
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    settled()
    total = tracker.live - live_before
    del result
    return float(marks.get("end", 0) - marks.get("start", 0)), float(total)


def measure_trainer(trainer, tracker: LiveBytes, inputs: torch.Tensor, targets: torch.Tensor,
                    hidden_dtype: torch.dtype, settle: Callable[[], Any] | None = None):
    """One training step of ``trainer`` (the runtime's :class:`train.Trainer`, fake or real tensors) and one
    more forward per stage, measured with ``tracker`` (entered by the caller). Returns the measured bytes
    (parameters, gradients, optimizer, logits, peak; activations is filled in by the caller), the bytes one
    micro-batch keeps in each stage's blocks, and in each stage's whole forward (loss included).

    ``settle`` runs between each stage's warm-up forward and its measured one, and before each mark of the
    blocks' window is read: a real run passes a short sleep, so that gloo's worker thread drops a finished
    collective's input and output tensors (held until the worker takes its queue lock again) before a mark
    counts them (seen in CI: a ZeRO-1 run's blocks measured one unit's all-gather, 145 KiB, short of the fake
    run; a tp2 pp2 run's last block measured its sequence-parallel reduce-scatter's input and output, 48 KiB,
    over it)."""
    from meshplan.launcher.runtime import train as rt

    plan, parts = trainer.plan, trainer.parts
    for _, part in parts:       # what exists before the step: parameters and the rotary tables
        for t in list(part.parameters()) + list(part.buffers()) + list(getattr(part, "rope_cache", None) or ()):
            tracker.track(t)
    params = storage_bytes(p for _, part in parts for p in part.parameters())
    grads = {"bytes": 0, "peak_before_step": 0}

    def before_step(optimizer, *_):
        grads["bytes"] += storage_bytes(p.grad for g in optimizer.param_groups for p in g["params"])
        grads["peak_before_step"] = max(grads["peak_before_step"], tracker.peak)

    handles = [optimizer.register_step_pre_hook(before_step) for optimizer in trainer.optimizers]
    tracker.reset_peak()
    rt.train_step(trainer, inputs, targets)
    for handle in handles:
        handle.remove()
    optimizer_bytes = storage_bytes(t for o in trainer.optimizers for state in o.state.values()
                                    for t in state.values() if isinstance(t, torch.Tensor))
    # Steps 2, 3, ... carry the optimizer state through forward and backward: the first step's forward/backward
    # peak plus that state, or the first step's own peak (its optimizer step), whichever is larger.
    peak = max(grads["peak_before_step"] + optimizer_bytes, tracker.peak)

    per_stage: dict[int, float] = {}
    forward_totals: dict[int, float] = {}
    logits = 0.0
    for j, part, run in stage_forwards(trainer, inputs, targets, hidden_dtype):
        run()                                    # warm: ZeRO-1/2 parameters stay gathered after this
        if settle is not None:
            settle()
        blocks, total = _block_bytes(part, tracker, run, settle)
        per_stage[j] = blocks
        forward_totals[j] = total
        if j == len(plan.stages) - 1:
            logits = max(0.0, total - blocks)
    measured = {"parameters": float(params), "gradients": float(grads["bytes"]), "optimizer": float(optimizer_bytes),
                "activations": 0.0, "logits": logits, "peak": float(peak),
                "largest_tensor": float(tracker.largest)}
    return measured, per_stage, forward_totals


def check_rank(plan: Plan, rank: int, predicted: list[dict[str, float]] | None = None,
               measure: bool = True) -> RankCheck | None:
    """Build ``rank`` of ``plan`` over a fake process group with fake tensors, run one training step and
    measure its memory (see the module doc). ``measure=False`` only builds (``launch``'s fast check) and
    returns None. The default process group is created and destroyed here."""
    return _in_fresh_thread(lambda: _check_rank(plan, rank, predicted, measure))


def check_builds(plan: Plan, ranks: list[int] | None = None) -> None:
    """``launch``'s fast check: the structural checks, then the runtime's build of the first rank of the
    first and last pipeline ranks (or ``ranks``) on fake tensors; raises :class:`InputError` if it fails."""
    check_structure(plan)
    firsts = _first_rank_per_pipeline_rank(plan)
    for rank in ranks if ranks is not None else sorted({firsts[0], firsts[-1]}):
        check_rank(plan, rank, measure=False)


def _check_rank(plan: Plan, rank: int, predicted: list[dict[str, float]] | None, measure: bool) -> RankCheck | None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshplan.launcher.runtime import parallelize as par
    from meshplan.launcher.runtime import train as rt

    begin = time.perf_counter()
    plan = dataclasses.replace(plan, compile=False)      # fusions are not measured: eager blocks
    device_type, device = _device_type(plan), torch.device("cpu")
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=plan.world_size)
    meshes = None
    try:
        meshes = par.build_mesh(plan, "cpu")
        parts = rt.build_parts(plan, meshes, device_type)
        tracker = LiveBytes(cuda_attention_layout=device_type == "cuda")
        config = rt.RunConfig(plan_path="<check>")
        hidden_dtype = rt.hidden_dtype(plan, meshes, device_type)
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            positions = rt.local_positions(plan, meshes)
            for j, part in parts:
                part.to_empty(device=device)
                if hasattr(part, "set_positions"):
                    part.set_positions(positions)
                part.train()
            trainer = rt.assemble(plan, config, device, device_type, meshes, parts,
                                  lambda j: par.stage_io_examples(plan, j, device, hidden_dtype), "cpu")
            _check_groups(plan, meshes, trainer.tied_group)
            if trainer.schedule is not None:
                _skip_p2p_warmup(trainer.schedule)
            if not measure:
                return None
            batch = plan.micro_batch * plan.num_microbatches
            seq = plan.train.seq_len // plan.cp
            inputs = torch.randint(0, plan.model.vocab, (batch, seq))
            targets = torch.randint(0, plan.model.vocab, (batch, seq))
            measured, per_stage, _ = measure_trainer(trainer, tracker, inputs, targets, hidden_dtype)
    except InputError:
        raise
    except Exception as error:   # a plan the runtime cannot build or run: say where, in one line
        where = f"rank {rank}"
        if meshes is not None:
            where += " (" + ", ".join(f"{k}={v}" for k, v in meshes.coords.items()) + ")"
        raise InputError(f"plan, {where}", f"the runtime cannot build or run it: {_root_cause(error)}",
                         "re-plan, or report this as a meshplan bug") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return _rank_check(plan, rank, meshes.coords, [j for j, _ in parts], measured, per_stage, predicted,
                       time.perf_counter() - begin)


def _in_fresh_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread of its own and return its result (or raise its exception).

    DTensor caches sharding decisions per thread, keyed by device meshes, and two meshes compare equal when
    their layout, names and thread agree -- so the next rank's mesh would hit results naming the previous
    rank's (destroyed) process groups. A thread per rank keeps each rank's caches its own."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as error:     # re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target, name="meshplan-check")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain (pipelining wraps the real error), as ``Type: first line``."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _rank_check(plan: Plan, rank: int, coords: dict[str, int], stages: list[int], measured: dict[str, float],
                per_stage: dict[int, float], predicted: list[dict[str, float]] | None, seconds: float) -> RankCheck:
    from meshplan.planner.evaluate import peak_before_margin
    from meshplan.planner.memory import microbatches_in_flight

    in_flight = microbatches_in_flight(plan.schedule, plan.pp, coords["pp"], plan.num_microbatches,
                                       plan.virtual_stages)
    measured = dict(measured, activations=in_flight * sum(per_stage.values()))
    mine = dict(predicted[coords["pp"]]) if predicted else {}
    if mine:
        mine["peak"] = peak_before_margin(mine)
    return RankCheck(rank, dict(coords), stages, measured, per_stage, in_flight, mine, seconds)


def stage_forwards(trainer, inputs: torch.Tensor, targets: torch.Tensor, hidden_dtype: torch.dtype):
    """``(stage, part, run)`` for each pipeline stage of the rank: ``run()`` is one micro-batch through the
    part (the batch's first sequences into the first stage, example hidden states into the others, the loss
    on the last). The vocabulary shard of ``vocab_parallel`` is not a stage and is skipped; with it the first
    stage takes hidden states (the embedding is the shard's) and the last stage's loss is the vocabulary
    pass, a step of its own, so it is not run here."""
    from meshplan.launcher.runtime import parallelize as par
    from meshplan.launcher.runtime import vocab_parallel

    plan = trainer.plan
    last = len(plan.stages) - 1
    vocab_split = vocab_parallel.enabled(plan)
    for j, part in trainer.parts:
        if j < 0:
            continue
        (x,), _ = par.stage_io_examples(plan, j, inputs.device, hidden_dtype)
        if j == 0 and not vocab_split:
            x = inputs[:plan.micro_batch]
        yield j, part, forward_runner(trainer, part, j == last and not vocab_split, x, targets[:plan.micro_batch])


def forward_runner(trainer, part, has_loss: bool, x: torch.Tensor, targets: torch.Tensor):
    """One micro-batch through ``part`` as the runtime runs it (its loss when the part holds the head)."""
    from meshplan.launcher.runtime import train as rt

    def run():
        with rt._loss_context(trainer):
            out = part(x)
            return (trainer.loss_fn or rt.loss_fn)(out, targets) if has_loss else out
    return run


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------

def parse_ranks(spec: str | None, plan: Plan) -> list[int]:
    """``None``: one rank per pipeline rank (the others hold the same shapes); ``all``; or a comma list of
    ranks, ``first``/``last``, and ``pp:K`` (the first rank of pipeline rank K)."""
    world = plan.world_size
    firsts = _first_rank_per_pipeline_rank(plan)
    if spec is None or spec.strip() == "":
        return firsts
    if spec.strip() == "all":
        return list(range(world))
    ranks: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if item in ("first", "last"):
                value = 0 if item == "first" else world - 1
            elif item.startswith("pp:"):
                value = firsts[int(item[3:])]
            else:
                value = int(item)
        except (ValueError, IndexError):
            raise InputError("--ranks", f"{item!r} is not a rank", "use numbers, first, last, pp:K or all") from None
        if not 0 <= value < world:
            raise InputError("--ranks", f"rank {value} is outside the plan's world of {world}",
                             f"use ranks 0..{world - 1}")
        if value not in ranks:
            ranks.append(value)
    return ranks


def _first_rank_per_pipeline_rank(plan: Plan) -> list[int]:
    """The lowest global rank of each pipeline rank (ranks are row-major over ``mesh_order``)."""
    shape = dict(zip(plan.mesh_order, plan.mesh_shape()))
    stride = 1
    for name in reversed(plan.mesh_order):
        if name == "pp":
            return [k * stride for k in range(plan.pp)]
        stride *= shape[name]
    return [0]


def check_plan(plan: Plan, ranks: list[int] | None = None,
               progress: Callable[[int, int, RankCheck], None] | None = None,
               workers: int | None = None) -> CheckResult:
    """Check ``ranks`` of ``plan`` (default: one rank per pipeline rank) in ``workers`` processes (default:
    :func:`check_workers`)."""
    from meshplan.planner.evaluate import Context
    from meshplan.planner.replay import predicted_rank_memory

    check_structure(plan)
    ranks = parse_ranks(None, plan) if ranks is None else ranks
    try:
        predicted = predicted_rank_memory(plan)
    except InputError:
        predicted = None
    notes = []
    if plan.compile:
        notes.append("compile: the blocks were checked eagerly; torch.compile's fusions usually keep less")
    if predicted is None:
        notes.append("the cost model rejects this plan as written: no prediction to compare")
    workers = check_workers(plan, len(ranks)) if workers is None else max(1, min(workers, len(ranks)))
    results = _check_ranks(plan, ranks, predicted, progress, workers)
    capacity = Context(plan.model, plan.cluster, plan.train).capacity_bytes
    return CheckResult(plan, results, capacity, notes)


# A worker process costs a start-up (torch and the runtime imported anew); a rank whose step runs its blocks
# fewer times than this checks faster in-process. benchmarks/check_speed.py measures both: a start-up of about
# 20 block passes of Llama 3 405B on fake tensors (docs/results.md, "Planning and `meshplan check` speed").
PARALLEL_MIN_BLOCK_PASSES = 32
# Memory kept free per check process: about twice the largest resident set benchmarks/check_speed.py measures.
CHECK_PROCESS_BYTES = 2**30


def check_workers(plan: Plan, ranks: int) -> int:
    """Processes that check ``ranks`` ranks of ``plan`` side by side: one per rank up to this machine's cores
    and its free memory (CHECK_PROCESS_BYTES each), or 1 (in this process) when a rank's step runs its blocks
    fewer than PARALLEL_MIN_BLOCK_PASSES times."""
    blocks = max(stop - start for start, stop in (s.layers for s in plan.stages))
    chunks = plan.virtual_stages if plan.pp > 1 else 1
    if ranks <= 1 or blocks * chunks * plan.num_microbatches < PARALLEL_MIN_BLOCK_PASSES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // CHECK_PROCESS_BYTES
    except (AttributeError, OSError, ValueError):     # no sysconf figure here: the cores decide
        memory = cores
    return max(1, min(ranks, cores, memory))


def _check_ranks(plan: Plan, ranks: list[int], predicted: list[dict[str, float]] | None,
                 progress: Callable[[int, int, RankCheck], None] | None, workers: int) -> list[RankCheck]:
    """:func:`check_rank` of each rank, in this process or ``workers`` at a time in processes of their own
    (launcher/check_worker.py: each rank's fake process group is global state of its process);
    ``progress`` as each finishes."""
    if workers <= 1:
        results = []
        for i, rank in enumerate(ranks):
            results.append(check_rank(plan, rank, predicted))
            if progress is not None:
                progress(i + 1, len(ranks), results[-1])
        return results
    from concurrent.futures import ThreadPoolExecutor, as_completed

    done: dict[int, RankCheck] = {}
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(_check_rank_in_process, plan, rank, predicted): rank for rank in ranks}
        try:
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                if progress is not None:
                    progress(len(done), len(ranks), done[futures[future]])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [done[rank] for rank in ranks]


def _check_rank_in_process(plan: Plan, rank: int, predicted: list[dict[str, float]] | None) -> RankCheck:
    """:func:`check_rank` in a ``python -m meshplan.launcher.check_worker`` process."""
    import pickle
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="meshplan-check-") as folder:
        out = Path(folder) / "answer.pickle"
        done = subprocess.run([sys.executable, "-m", "meshplan.launcher.check_worker", str(out)],
                              input=pickle.dumps((plan, rank, predicted)), capture_output=True)
        if done.returncode or not out.is_file():
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise InputError(f"plan, rank {rank}", f"its check process failed (exit {done.returncode}): "
                             f"{lines[-1] if lines else 'no output'}", "report this as a meshplan bug")
        status, value = pickle.loads(out.read_bytes())
    if status == "error":
        raise value
    return value
