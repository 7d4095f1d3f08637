"""The profile's kernel table: which implementation of each fused op a plan runs, the rate the planner prices it
at, liger's loss memory against ``meshplan check``, and the profiler's kernel phase (on CPU under Triton's
interpreter, where its timings mean nothing but its rows and checks run as on a GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from meshplan.measured import MeasuredProfile
from meshplan.plan_cli import render_text
from meshplan.planner import compute, kernels, memory
from meshplan.planner.search import search
from meshplan.profiler.cli import kernel_summary
from meshplan.profiler.cluster_file import kernel_table
from meshplan.profiler.phases import kernels as phase
from meshplan.spec import ModelSpec, TrainSpec, load_cluster

# A model whose head and loss weigh on memory as an LLM's do (vocab / hidden as Llama 3's), small enough to
# check on fake tensors in a second.
MODEL = ModelSpec(name="wide-vocab", layers=2, hidden=512, heads=8, kv_heads=4, ffn_hidden=1536, vocab=32000)
TRAIN = TrainSpec(global_batch=8, seq_len=2048, precision="bf16")
TOKENS = 2048


def row(op, impl, seconds=None, max_error=0.0, **extra):
    return {"op": op, "impl": impl, "tokens": TOKENS, "seconds": seconds, "max_error": max_error, **extra}


TABLE = [row("norm", "fused", 4e-4), row("norm", "liger", 1e-4),
         row("swiglu", "fused", 3e-4), row("swiglu", "liger", 1e-4, max_error=0.5),      # wrong: not chosen
         row("rope", "fused", 2e-4), {"op": "rope", "impl": "liger", "tokens": TOKENS, "error": "RuntimeError: x"},
         row("loss", "fused", 9e-3), row("loss", "liger", 6e-3)]


def profiled(table, precision="bf16", base="dgx-h100:1"):
    raw = {"precision": precision, "compute": {"kernels": table}}
    rows = kernel_table(raw, MODEL)
    return dataclasses.replace(load_cluster(base), measured={"compute": {"precision": precision, "kernels": rows}})


def test_each_op_runs_its_fastest_correct_implementation():
    cluster = profiled(TABLE)
    assert kernels.kernel_choice(cluster, "bf16") == {"norm": "liger", "swiglu": "fused", "rope": "fused",
                                                      "loss": "liger"}
    fused = {op: "fused" for op in kernels.KERNEL_OPS}
    assert kernels.kernel_choice(load_cluster("dgx-h100:1"), "bf16") == fused         # no table
    assert kernels.kernel_choice(profiled(TABLE, precision="fp32"), "bf16") == fused  # timed in another precision


def test_plans_name_the_chosen_kernels_and_keep_liger_loss_to_whole_heads():
    cluster = profiled(TABLE)
    whole = search(MODEL, cluster, TRAIN, {"tp": 1, "pp": 1}, top=1, engine="meshplan").plans[0]
    assert whole.kernels == {"norm": "liger", "swiglu": "fused", "rope": "fused", "loss": "liger"}
    sharded = search(MODEL, cluster, TRAIN, {"tp": 2}, top=1, engine="meshplan").plans[0]
    assert sharded.kernels["loss"] == "fused" and sharded.kernels["norm"] == "liger"
    assert "plan 1 kernels: norm liger, swiglu fused, rope fused, loss liger" in render_text(
        search(MODEL, cluster, TRAIN, {"tp": 1, "pp": 1}, top=1, engine="meshplan"))
    other = search(MODEL, cluster, TRAIN, {"tp": 1}, top=1, engine="megatron").plans[0]
    assert set(other.kernels.values()) <= {"fused", "reference"}
    eager = search(MODEL, cluster, TRAIN, {"tp": 1, "fused_kernels": False}, top=1, engine="meshplan").plans[0]
    assert set(eager.kernels.values()) == {"reference"}


def test_a_rate_reproduces_the_measured_time_at_the_timed_shape():
    """The profile turns a kernel's time into a rate over the planner's own bytes, so the planner's term for
    that op at the timed shape is the measured time (forward + backward = 3 x forward)."""
    (norm,) = [r for r in kernel_table({"precision": "bf16", "compute": {"kernels": TABLE}}, MODEL)
               if r["op"] == "norm" and r["impl"] == "liger"]
    forward_bytes = kernels.op_bytes(MODEL, "norm", TOKENS, 2) / kernels.FWD_BWD_BYTES
    seconds = compute.elementwise_seconds({"norm": forward_bytes}, 1e12, (("norm", norm["gbps"] * 1e9),))
    assert kernels.FWD_BWD_BYTES * seconds == pytest.approx(1e-4)


def test_measured_rates_price_the_block():
    """A norm measured at 4x the memory rate and a SwiGLU at half of it: one block's forward + backward
    (tp 1, one sequence) moves by exactly their bytes at the new rates, forward + 2 x forward."""
    from meshplan.planner.block import config_layer_cost
    from meshplan.planner.inputs import Context
    from meshplan.planner.replay import config_of

    plain = load_cluster("dgx-h100:1")
    memory_rate = compute.achieved_rates(plain, "bf16").memory
    table = [row("norm", "fused", kernels.op_bytes(MODEL, "norm", TOKENS, 2) / (4 * memory_rate)),
             row("swiglu", "fused", kernels.op_bytes(MODEL, "swiglu", TOKENS, 2) / (memory_rate / 2))]
    cfg = config_of(search(MODEL, plain, TRAIN, {"tp": 1, "micro_batch": 1}, top=1, engine="meshplan").plans[0])
    before, after = (config_layer_cost(Context(MODEL, cluster, TRAIN), cfg) for cluster in (plain, profiled(table)))
    moved = compute.elementwise_bytes_by_op(MODEL, TOKENS, 1, False, True, 2)
    change = moved["norm"] * (1 / 4 - 1) / memory_rate + moved["swiglu"] * (2 - 1) / memory_rate
    assert (after.fwd + after.bwd) - (before.fwd + before.bwd) == pytest.approx(kernels.FWD_BWD_BYTES * change)
    from meshplan.engines import MEGATRON     # another engine runs its own kernels: none of these rates
    assert kernels.block_kernel_rates(Context(MODEL, profiled(table), TRAIN, MEGATRON), cfg) == ()


@pytest.mark.parametrize("impl", ["liger", "fused"])
def test_the_loss_keeps_what_the_planner_prices(impl):
    """On fake tensors, as ``meshplan check`` runs it (a 16-bit plan), each loss kernel's peak above its inputs
    is the planner's term: memory.liger_loss_bytes for liger's (liger.ShapeOnlyLoss), memory.logits_bytes for
    meshplan's chunked loss."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from meshplan.launcher.check import LiveBytes
    from meshplan.launcher.runtime import kernels as K

    with FakeTensorMode():
        hidden = torch.empty(1, TOKENS, MODEL.hidden, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(MODEL.vocab, MODEL.hidden, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.zeros(TOKENS, dtype=torch.long)
        with LiveBytes() as tracker:
            for t in (hidden, weight, targets):      # made before the tracker: views of them are not new bytes
                tracker.track(t)
            start = tracker.live
            K.linear_cross_entropy(hidden, weight, targets, impl=impl)
    priced = (memory.liger_loss_bytes(TOKENS, MODEL.vocab, "bf16", MODEL.hidden) if impl == "liger" else
              memory.logits_bytes(TOKENS, MODEL.vocab, "bf16", True, MODEL.hidden))
    assert tracker.peak - start == pytest.approx(priced, rel=1e-3)


def test_kernel_rows_round_trip_and_read_typed():
    cluster = profiled(TABLE)
    data = cluster.profile.to_dict()
    assert MeasuredProfile.from_dict(data) == cluster.profile
    liger_rope = [r for r in cluster.profile.compute.kernels if r.op == "rope" and r.impl == "liger"][0]
    assert liger_rope.seconds is None and liger_rope.error == "RuntimeError: x"
    assert [r.gbps is not None for r in cluster.profile.compute.kernels] == \
        [r["op"] != "loss" and "error" not in r for r in TABLE]


def test_the_summary_names_each_row():
    rows = kernel_table({"precision": "bf16", "compute": {"kernels": TABLE}}, MODEL)
    text = [kernel_summary(r) for r in rows]
    assert text[1].startswith("norm/liger 0.1 ms (") and "GB/s" in text[1]
    assert "not chosen: differs from eager by 0.5" in text[3]
    assert text[5] == "rope/liger did not run (RuntimeError: x)"
    assert text[7] == "loss/liger 6 ms"


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
TINY = ModelSpec(name="tiny", layers=1, hidden=32, heads=4, kv_heads=2, ffn_hidden=48, vocab=100)


@needs_triton
@pytest.mark.parametrize("op", kernels.KERNEL_OPS)
def test_the_phase_times_and_checks_each_op(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    measured = phase.measure_op(TINY, op, "fused", 16, torch.device("cpu"), torch.float32, reps=2)
    assert measured["seconds"] > 0 and measured["max_error"] < 1e-5, measured


def test_the_phase_records_what_fails_or_differs(monkeypatch):
    def broken(op, impl, inputs, fixed):
        if impl == "liger":
            raise RuntimeError("no kernel image\nsecond line")
        if impl == "fused":
            return lambda: inputs[0] * inputs[1] * 2
        return lambda: inputs[0] * inputs[1]

    monkeypatch.setattr(phase, "op_call", broken)
    cpu = torch.device("cpu")
    failed = phase.measure_op(TINY, "norm", "liger", 16, cpu, torch.float32, reps=1)
    assert failed == {"op": "norm", "impl": "liger", "tokens": 16, "error": "RuntimeError: no kernel image"}
    wrong = phase.measure_op(TINY, "norm", "fused", 16, cpu, torch.float32, reps=1)
    assert wrong["max_error"] == pytest.approx(1.0) and wrong["seconds"] > 0
    assert phase.kernel_phase(TINY, 16, cpu, torch.float32, reps=1) == []     # CPU ranks: no kernel table


def test_kernel_pins_override_the_table_and_imply_what_they_need():
    """``--fix <op>_kernel``: the pinned implementation whatever the profile says (or where it timed none),
    fused kernels on, and for liger's loss a whole head; the plan's reproduce pins carry them."""
    from meshplan.errors import InputError
    from meshplan.planner.search import parse_fixes

    plain = load_cluster("dgx-h100:1")
    fixes = parse_fixes(["norm_kernel=liger", "loss_kernel=liger"])
    plan = search(MODEL, plain, TRAIN, fixes, top=1, engine="meshplan").plans[0]
    assert plan.kernels == {"norm": "liger", "swiglu": "fused", "rope": "fused", "loss": "liger"} and plan.tp == 1
    again = search(MODEL, plain, TRAIN, plan.fields_for_fix(), top=1, engine="meshplan").plans[0]
    assert again.kernels == plan.kernels
    over = search(MODEL, profiled(TABLE), TRAIN, parse_fixes(["norm_kernel=fused"]), top=1,
                  engine="meshplan").plans[0]
    assert over.kernels["norm"] == "fused"
    refused = {"on a CPU cluster": (load_cluster("localhost:2"), ["rope_kernel=liger"], "meshplan", "run on GPUs"),
               "for another engine": (plain, ["rope_kernel=liger"], "megatron", "runs its own"),
               "with fused kernels off": (plain, ["rope_kernel=liger", "fused_kernels=false"], "meshplan",
                                          "drop one of the two"),
               "on a sharded head": (plain, ["loss_kernel=liger", "tp=2"], "meshplan", "whole head")}
    for case, (cluster, pins, engine, why) in refused.items():
        with pytest.raises(InputError, match=why):
            search(MODEL, cluster, TRAIN, parse_fixes(pins), top=1, engine=engine)


def test_liger_loss_is_priced_at_its_measured_ratio():
    """The head + loss of a plan running liger's loss: meshplan's chunked loss's price times the two kernels'
    measured ratio (6 ms / 9 ms in TABLE)."""
    from meshplan.planner.inputs import Context
    from meshplan.planner.vocab import VocabKey, head_and_loss

    assert kernels.loss_time_ratio(profiled(TABLE), "bf16", "liger") == pytest.approx(6 / 9)
    assert kernels.loss_time_ratio(load_cluster("dgx-h100:1"), "bf16", "liger") == 1.0
    key = VocabKey(micro_batch=1, cp=1, tp=1, pp=1, dp=8, vocab_parallel=False, fused_kernels=True,
                   mesh_order=("pp", "dp", "cp", "tp"))
    pinned = tuple({"norm": "fused", "swiglu": "fused", "rope": "fused", "loss": "fused"}.items())
    times = {name: head_and_loss(Context(MODEL, profiled(TABLE), TRAIN, kernels=k), key,
                                 compute.achieved_rates(profiled(TABLE), "bf16")).head_time
             for name, k in (("liger", None), ("fused", pinned))}
    assert times["liger"] == pytest.approx(times["fused"] * 6 / 9)


def test_compiled_reference_is_a_candidate_in_compiled_plans_only():
    """A ``compile`` row (torch.compile of the reference op) that is fastest: a plan compiling its blocks runs
    the reference op there, priced at the compile row's rate; one that does not keeps the fastest kernel.
    Replay reads such a plan back as one with fused kernels."""
    from meshplan.planner.inputs import Context
    from meshplan.planner.replay import config_of, replay

    cluster = profiled(TABLE + [row("norm", "compile", 5e-5), row("loss", "compile", 1e-4)])
    assert kernels.kernel_choice(cluster, "bf16", compiled=True)["norm"] == "reference"
    assert kernels.kernel_choice(cluster, "bf16", compiled=False)["norm"] == "liger"
    compiled = search(MODEL, cluster, TRAIN, {"tp": 1, "compile": True}, top=1, engine="meshplan").plans[0]
    eager = search(MODEL, cluster, TRAIN, {"tp": 1, "compile": False}, top=1, engine="meshplan").plans[0]
    assert compiled.kernels["norm"] == "reference" and eager.kernels["norm"] == "liger"
    assert compiled.kernels["loss"] == "liger"           # the loss is chosen among fused and liger only
    assert "plan 1 kernels: norm reference" in render_text(
        search(MODEL, cluster, TRAIN, {"tp": 1, "compile": True}, top=1, engine="meshplan"))
    cfg = config_of(compiled)
    assert cfg.fused_kernels
    rates = dict(kernels.block_kernel_rates(Context(MODEL, cluster, TRAIN, kernels=tuple(compiled.kernels.items())),
                                            cfg))
    compile_row = [r for r in cluster.profile.compute.kernels if r.impl == "compile" and r.op == "norm"][0]
    assert rates["norm"] == pytest.approx(compile_row.gbps * 1e9)
    assert replay(compiled).iteration_s == pytest.approx(compiled.predicted.iteration_s)


def test_the_phase_times_the_compiled_reference(monkeypatch):
    """The ``compile`` row runs the reference op through torch.compile (here its ``eager`` backend: Inductor's
    compilation takes seconds on CPU) and is checked against the reference like the kernels."""
    compiled, real_compile = [], torch.compile

    def compile_eagerly(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(phase.torch, "compile", compile_eagerly)
    measured = phase.measure_op(TINY, "swiglu", "compile", 16, torch.device("cpu"), torch.float32, reps=1)
    assert compiled and measured["seconds"] > 0 and measured["max_error"] < 1e-6, measured
