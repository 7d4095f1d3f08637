"""Checks that a plan can run here, torch-free (``meshplan launch`` runs them before starting torchrun and
every rank runs :func:`check_supported` again)."""

from __future__ import annotations

import os

from meshplan.engines import MESHPLAN
from meshplan.errors import InputError
from meshplan.plan import Plan, schedule_problem
from meshplan.rules import head_is_whole

# The engine-field values the runtime reads and runs, each where it is read: MESHPLAN (meshplan/engines.py) may
# list no other (tests/test_engine_meshplan.py), and a plan with another is refused.
RUNTIME_VALUES: dict[str, tuple] = {
    "schedule": ("gpipe", "1f1b", "interleaved"),   # runtime/parallelize.py build_schedule
    "zero": (0, 1, 2, 3),                           # parallelize.apply_dp: replicate, FSDP2 kept / resharded
    "cp_kind": ("ulysses", "ring"),                 # parallelize.apply_cp
    "vocab_parallel": (False, True),                # runtime/vocab_parallel.py
    "tp_overlap": (False, True),                    # parallelize.enable_async_tp (CUDA ranks, compiled blocks)
    "compile": (False, True),                       # parallelize.apply_compile
    "fused_kernels": (False, True),                 # train._set_kernels, train.make_loss_fn
    "precision": ("fp32", "bf16"),                  # train.computes_in_bf16 (per device kind: RUNTIME_PRECISIONS)
    "attention": ("flash",),                        # model.Attention: scaled_dot_product_attention, no scores kept
    "sequence_parallel": (True,),                   # check_supported: tp > 1 runs with sequence parallel
    "expert_tensor_parallel": (False,),             # runtime/moe.py: experts whole on their ranks (expert_tp 1)
}
# What the runtime computes in (runtime/train.py computes_in_bf16): GPU ranks in bf16 (FSDP2 mixed precision or
# autocast) or fp32, CPU ranks in fp32. An fp16 or fp8 plan would silently run as bf16, so it is refused.
RUNTIME_PRECISIONS = {"gpu": ("bf16", "fp32"), "cpu": ("fp32",)}
# The kernels a CPU rank runs fused: the chunked loss (train.make_loss_fn); the Triton norm, SwiGLU and RoPE
# run on GPUs, or on CPU ranks under Triton's interpreter (``TRITON_INTERPRET=1``, a testing mode: slow but the
# same kernel code), train._set_kernels.
# liger-kernel's (the ``liger`` choice) are all Triton.
CPU_FUSED_KERNELS = {"fused": ("loss",), "liger": ()}


def check_liger_loss(plan: Plan) -> None:
    """liger-kernel's linear cross-entropy computes a whole head: refused where the head's rows are split over
    tensor ranks or the vocabulary over pipeline ranks (meshplan's chunked loss is vocabulary-parallel)."""
    if plan.kernels.get("loss") != "liger":
        return
    if not head_is_whole(plan.tp, plan.pp, plan.vocab_parallel):
        where = f"tp={plan.tp}" if plan.tp > 1 else f"the vocabulary split over pp={plan.pp} pipeline ranks"
        raise InputError("plan.kernels.loss", f"liger-kernel's fused linear cross-entropy has no vocabulary-"
                         f"parallel form, and this plan shards the head ({where})", "set kernels.loss: fused")


def token_file_dtype(dtype: str | None, vocab: int, path=None) -> str:
    """The element type of a flat token file: the one given, else the one its ``<file>.json`` records
    (``meshplan data prepare`` writes it), else the smallest that holds the vocabulary."""
    if dtype:
        return dtype
    if path is not None:
        import json
        from pathlib import Path

        described = Path(str(path) + ".json")
        if described.is_file():
            try:
                recorded = json.loads(described.read_text()).get("dtype")
            except (OSError, ValueError, AttributeError):
                recorded = None
            if recorded in ("uint16", "uint32"):
                return recorded
    return "uint16" if vocab <= 65536 else "uint32"


def check_token_file(path, dtype: str, vocab: int, tokens_needed: int, field: str = "--data") -> int:
    """A flat token file (``uint16``/``uint32`` ids) that training can read: it exists, its size is a whole
    number of ids, it holds at least ``tokens_needed`` of them and its first million ids are in the
    vocabulary. Returns its length in tokens. Torch-free: ``launch`` checks before starting torchrun."""
    from pathlib import Path

    import numpy as np

    p = Path(path)
    if dtype not in ("uint16", "uint32"):
        raise InputError("--data-dtype", f"unknown dtype {dtype!r}", "use uint16 or uint32")
    if not p.is_file():
        raise InputError(field, f"no such file: {p}", "give a flat token file (meshplan data prepare writes one)")
    itemsize = np.dtype(dtype).itemsize
    size = p.stat().st_size
    if size % itemsize:
        raise InputError(field, f"{p} has {size} bytes, not a multiple of {itemsize} ({dtype})", "check --data-dtype")
    tokens = size // itemsize
    if tokens < tokens_needed:
        raise InputError(field, f"{p} holds {tokens} tokens, fewer than the {tokens_needed} one batch needs",
                         "give a longer token file")
    sample = np.fromfile(p, dtype=dtype, count=min(tokens, 1 << 20))
    if sample.size and int(sample.max()) >= vocab:
        raise InputError(field, f"{p} holds token id {int(sample.max())} but the model's vocabulary is {vocab}",
                         "tokenize for this model, or check --data-dtype")
    return tokens


def triton_interprets() -> bool:
    """Whether Triton kernels run under Triton's interpreter here (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_supported(plan: Plan) -> None:
    """Plans the runtime cannot run are refused in one line naming the field and the fix: a plan priced for
    another engine, any field value meshplan's engine profile does not list (meshplan/engines.py; the
    runtime reads every value that profile lists), and any value the runtime would silently run as another
    (:func:`check_runtime_values`)."""
    if plan.engine != "meshplan":
        raise InputError("plan.engine", f"this plan is priced for {plan.engine}, not for meshplan's runtime",
                         f"run it with `meshplan export PLAN --to {plan.engine}`, or re-plan with --engine meshplan")
    check_moe_supported(plan)
    plan.model.check_sequence(plan.train.seq_len, "plan.train.seq_len")
    MESHPLAN.check(plan.engine_fields(), "plan")
    check_runtime_values(plan)
    m = plan.model
    if plan.tp > 1 and (m.heads % plan.tp or (m.kv_heads % plan.tp and plan.tp % m.kv_heads)):
        raise InputError("plan.tp", f"tp={plan.tp} does not divide heads={m.heads}, or neither divides nor is a "
                         f"multiple of kv_heads={m.kv_heads}",
                         "re-plan with a tensor-parallel degree dividing heads and dividing (or a multiple of) kv_heads")
    if plan.tp > 1 and m.vocab % plan.tp and not (plan.vocab_parallel and plan.pp > 1):
        # (vocab_parallel with pp > 1 shards the vocabulary over pp x tp with uneven rows allowed)
        raise InputError("plan.tp", f"tp={plan.tp} does not divide the vocabulary {m.vocab}",
                         "pad the vocabulary to a multiple of tp, or re-plan")
    shards = (plan.tp if plan.sequence_parallel else 1) * plan.cp
    if plan.train.seq_len % shards:
        raise InputError("plan.train.seq_len", f"{plan.train.seq_len} is not divisible by the {shards} sequence shards",
                         "re-plan with a sequence length divisible by tp*cp")
    if plan.cp > 1 and plan.cp_kind == "ulysses" and (m.heads // plan.tp) % plan.cp:
        raise InputError("plan.cp", f"Ulysses needs heads/tp = {m.heads // plan.tp} divisible by cp={plan.cp}",
                         "re-plan with cp_kind ring or a smaller cp")
    if plan.micro_batch * plan.num_microbatches * plan.dp != plan.train.global_batch:
        raise InputError("plan.micro_batch", "dp * micro_batch * num_microbatches is not the global batch",
                         "re-plan")
    problem = schedule_problem(plan.schedule, plan.pp, plan.num_microbatches)
    if problem:
        raise InputError("plan.schedule", problem, "re-plan, or pin --fix schedule=gpipe or a smaller micro_batch")


def check_moe_supported(plan: Plan) -> None:
    """The mixtures of experts the runtime runs (runtime/moe.py): dropless, each expert whole on its rank."""
    moe = plan.model.moe
    if moe is None:
        return
    if moe.capacity_factor > 0:
        raise InputError("model.moe.capacity_factor", f"{moe.capacity_factor:g}: meshplan's runtime computes every "
                         "routed token (dropless) and drops none", "set capacity_factor: 0")
    if plan.expert_tp > 1:
        raise InputError("plan.expert_tp", f"meshplan's runtime keeps each expert whole on its rank, not split over "
                         f"expert_tp={plan.expert_tp} ranks", "set expert_tp: 1, or export the plan to Megatron-Core")


def check_runtime_values(plan: Plan) -> None:
    """Field values the runtime does not read, or reads but would not run as written, are refused rather than
    ignored or replaced."""
    for field, value in plan.engine_fields().items():
        # (a field missing from RUNTIME_VALUES fails tests/test_engine_meshplan.py)
        if field in RUNTIME_VALUES and value not in RUNTIME_VALUES[field]:
            shown = ", ".join(str(v).lower() for v in RUNTIME_VALUES[field])
            raise InputError(f"plan.{field}", f"meshplan's runtime does not run {field}={str(value).lower()} "
                             f"(it runs {{{shown}}})", "re-plan with --engine meshplan")
    kind = plan.cluster.gpu.kind
    if plan.train.precision not in RUNTIME_PRECISIONS[kind]:
        runs = " or ".join(RUNTIME_PRECISIONS[kind])
        raise InputError("plan.train.precision", f"meshplan's runtime computes {kind.upper()} ranks in {runs}, "
                         f"not {plan.train.precision}", f"re-plan with --precision {RUNTIME_PRECISIONS[kind][0]}")
    if kind == "cpu":
        for name, impl in plan.kernels.items():
            if impl in ("fused", "liger") and name not in CPU_FUSED_KERNELS[impl] and not triton_interprets():
                raise InputError(f"plan.kernels.{name}", f"the {impl} kernel runs on GPU ranks (or on CPU ranks "
                                 "under TRITON_INTERPRET=1, for testing)",
                                 f"set kernels.{name}: reference, or re-plan without --fix fused_kernels=true")
    check_liger_loss(plan)
    if plan.tp_overlap and kind == "cpu":
        raise InputError("plan.tp_overlap", "async tensor parallel runs on CUDA ranks only (symmetric memory and "
                         "Inductor's micro-pipelined TP)", "set tp_overlap: false")
    if plan.tp_overlap and not plan.compile:
        raise InputError("plan.tp_overlap", "async tensor parallel needs compiled blocks (Inductor rewrites "
                         "their all-gather + matmul and matmul + reduce-scatter)", "set compile: true, or "
                         "tp_overlap: false")
    if plan.tp > 1 and not plan.sequence_parallel:
        # The planner prices tp > 1 with sequence parallelism only, and without it apply_tp leaves the norms'
        # weights plain tensors beside DTensors, which the optimizer step cannot mix unless dp x cp wraps them.
        raise InputError("plan.sequence_parallel", f"meshplan runs tp={plan.tp} only with sequence parallelism",
                         "set sequence_parallel: true")
    if plan.virtual_stages > 1 and (plan.pp == 1 or plan.schedule != "interleaved"):
        raise InputError("plan.virtual_stages", f"{plan.virtual_stages} virtual stages need pp > 1 and the "
                         f"interleaved schedule (the plan has pp={plan.pp}, schedule {plan.schedule})",
                         "set virtual_stages: 1, or re-plan with --fix schedule=interleaved")


def check_local(plan: Plan, nproc: int) -> None:
    """The plan's device kind and per-node process count must match this machine."""
    import torch  # only for a real launch: planning and --dry-run/--emit stay torch-free

    here = "gpu" if torch.cuda.is_available() else "cpu"
    want = plan.cluster.gpu.kind
    if want != here:
        raise InputError("plan.cluster.gpu.kind", f"the plan is for {want} ranks but this machine has "
                         f"{'GPUs' if here == 'gpu' else 'no GPU'}",
                         f"re-plan here (meshplan plan --cluster localhost:{plan.world_size}) or pass --replan")
    if want == "gpu" and nproc > torch.cuda.device_count():
        raise InputError("plan: dp*tp*pp*cp", f"{nproc} ranks per node but this node has "
                         f"{torch.cuda.device_count()} GPUs", "pass --nnodes, or re-plan for this node (--replan)")
    check_liger_installed(plan)


def check_liger_installed(plan: Plan) -> None:
    """A plan that names liger-kernel's kernels launches only where liger-kernel imports (``meshplan check``
    does not need it: it runs shapes only)."""
    if "liger" not in plan.kernels.values():
        return
    from meshplan.launcher.runtime.kernels import liger

    why = liger.import_error()
    if why is not None:
        named = ", ".join(f"kernels.{k}" for k, v in plan.kernels.items() if v == "liger")
        raise InputError(f"plan.{named}", f"liger-kernel does not import here ({why})", liger.INSTALL_HINT)
