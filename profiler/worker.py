"""The profiling job every torchrun rank runs at once (so contention is real):

    python -m torch.distributed.run --nproc-per-node 4 -m meshplan.profiler.worker --config job.json

``meshplan profile`` writes ``job.json`` (:func:`meshplan.profiler.cli.job_config`) and starts this. Eight
phases, each inside its share of the time budget; rank 0 decides whether the next measurement fits and
broadcasts the decision, so every rank stays in step:

1. compute: forward + backward of the runtime's own ``Block`` (``launcher/runtime/model.py``) with its
   projections cut to the per-rank widths of each tensor-parallel degree, for each micro-batch; the same
   GEMMs alone (``F.linear``), causal attention alone, the LM-head GEMM and the embedding; and the bytes
   one block holds for backward under none / selective / full recompute (the runtime's ``apply_ac``), as the
   net growth of live tensor bytes (``kernels/measure.py: peak_tracked_bytes``).
2. sharing (CPU ranks only): a GEMM loop on k of each host's ranks at once, the others asleep, for k = 1 ..
   ranks per host: how much faster a rank computes when others idle (``busy_speedup``; a rank idle in a
   pipeline bubble hands its share of the cores to the busy ones). GPUs are one device per rank: skipped.
3. meeting (CPU ranks only): every rank computes GEMMs for 2.2 s from a barrier, noting the time after each;
   cut into windows of 10 ms to 2 s, how far behind the mean the last rank is at a window's end: what a
   collective costs beyond its lined-up time when ranks come to it from computing, time-sliced on shared
   cores (``meeting``).
4. pipeline ops (CPU ranks only): torch.distributed.pipelining's 1F1B over pairs of ranks at two micro-batch
   counts, against the stage's module alone: what one forward or backward op of a schedule costs beyond its
   compute (the schedule's bookkeeping, its send/recv, the wait for a time-sliced neighbour),
   ``op_overhead_s``.
   These three run before the link sweep: after it, CPU ranks drift apart several times further than in a
   training job, while the sharing rates and the pipeline op cost do not move.
5. links: all-reduce, all-gather, reduce-scatter, all-to-all and point-to-point over message sizes, inside
   a node (one group per node) and across nodes (one group per local rank), all groups at once.
6. reduction: all-reduce, reduce-scatter and all-gather at the sizes of the runtime's gradient units, over
   every data-parallel group shape (size, stride) the world allows, all groups of a shape at once, in
   rounds: what the planner prices data-parallel traffic from where it was measured.
7. overlap: one message size of all-reduce, all-gather and reduce-scatter alone, a GEMM loop of about the
   same length alone, and the two together (the collective started asynchronously, the GEMMs run, then
   waited for): how much of a collective still shows beside compute (``exposed_fraction``).
8. pairs: point-to-point bandwidth between every pair of ranks (round-robin rounds, all pairs of a round at
   once), the matrix that shows a slow link.

Rank 0 writes the raw samples as JSON; the CLI fits them (``fit.py``) and writes the cluster YAML.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshplan.launcher.runtime.kernels import linear_cross_entropy
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes, saved_tensor_bytes
from meshplan.launcher.runtime.model import Block, causal_attention, rotary_tables
from meshplan.launcher.runtime.parallelize import apply_ac
from meshplan.planner.compute import layer_matmul_shapes
from meshplan.profiler.fit import COLLECTIVES
from meshplan.profiler.progress import Progress
from meshplan.plan import RECOMPUTE_MODES
from meshplan.spec import ModelSpec

# One timed sample lasts about this long: several scheduler quanta (~4 ms at Linux's common 250 Hz tick),
# so every sample sees the same fair share of the cores.
SAMPLE_S = 0.025
# Rounds of block timings after the first pass over the shapes, every shape once a round (block_rounds): with
# the first pass kept aside, five comparisons of the shapes made within seconds of each other.
BLOCK_ROUNDS = 5
# Rounds the block timings get even past the compute share (out of the link sweep's time, down to half of it):
# the shapes' figures are medians of the rounds, the planner's micro-batch and tensor-parallel choices rest on
# their ratios, and with fewer than two rounds there is no median and no scatter to judge a fit by. The first
# pass over the shapes can take most of the compute share on CPU ranks.
MIN_BLOCK_ROUNDS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# setup and lock-step helpers
# ----------------------------------------------------------------------------------------------

def init(device_kind: str) -> torch.device:
    """The process group: nccl on GPUs, gloo on CPU processes."""
    if device_kind == "gpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agree(decision: bool) -> bool:
    """Rank 0's decision, on every rank."""
    flag = torch.tensor([1 if decision else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, 0)
    return bool(flag.item())


def slowest(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (the slowest rank sets the pace)."""
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def lower_quartile(times: list[float]) -> float:
    """The figure kept from repeated samples: the lower quartile. On a shared machine other tenants' bursts
    inflate the upper half of the samples; the lower quartile repeats from one profile to the next. All
    samples are kept raw."""
    ordered = sorted(times)
    return ordered[(len(ordered) - 1) // 4]


def calls_per_sample(trial_seconds: float, sample_seconds: float, max_calls: int = 1000) -> int:
    """Back-to-back calls in one timed sample so that it lasts about ``sample_seconds``."""
    if trial_seconds <= 0:
        return max_calls
    return int(min(max_calls, max(1, -(-sample_seconds // trial_seconds))))


def time_reps(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1,
              barrier: Callable[[], None] | None = None, sample_seconds: float = 0.0,
              agree_count: bool = False) -> list[float]:
    """Seconds per call of ``fn``, one figure per timed sample, ``reps`` samples after ``warmup`` untimed
    calls. Each sample runs ``fn`` back to back for about ``sample_seconds`` and divides, as nccl-tests and
    ``torch.utils.benchmark`` do: a sample much longer than a scheduler quantum sees the share of the
    machine a rank gets in a real step (all ranks busy at once), not a lucky idle core. ``barrier`` runs
    before each sample; ``agree_count``: every rank uses the slowest rank's trial to pick the number of
    calls, so collectives stay matched."""
    for _ in range(warmup):
        fn()
    sync(device)
    begin = time.perf_counter()
    fn()
    sync(device)
    trial = time.perf_counter() - begin
    if agree_count:
        trial = slowest([trial], device)[0]
    calls = calls_per_sample(trial, sample_seconds)
    times = []
    for _ in range(reps):
        if barrier is not None:
            barrier()
        sync(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - begin) / calls)
    return times


class quiet_stderr:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) on ranks that draw no progress."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            sys.stderr.flush()
            self.saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            os.dup2(self.saved, 2)
            os.close(self.saved)


# ----------------------------------------------------------------------------------------------
# compute
# ----------------------------------------------------------------------------------------------

def per_rank_block(spec: ModelSpec, tp: int, device: torch.device, dtype: torch.dtype) -> Block:
    """The runtime's ``Block`` with its projections cut to one tensor-parallel rank's widths (Megatron's
    column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2). Attention reads its head count from the
    projection widths, so the block runs unchanged. The TP collectives are measured with the links."""
    h, d, f = spec.hidden, spec.head_dim, spec.ffn_hidden
    with torch.device(device):
        block = Block(spec)
        attn, ff = block.attention, block.feed_forward
        attn.wq = nn.Linear(h, spec.heads * d // tp, bias=spec.bias)
        attn.wk = nn.Linear(h, spec.kv_heads * d // tp, bias=spec.bias)
        attn.wv = nn.Linear(h, spec.kv_heads * d // tp, bias=spec.bias)
        attn.wo = nn.Linear(spec.heads * d // tp, h, bias=spec.bias)
        ff.w1 = nn.Linear(h, f // tp, bias=spec.bias)
        ff.w2 = nn.Linear(f // tp, h, bias=spec.bias)
        if ff.w3 is not None:
            ff.w3 = nn.Linear(h, f // tp, bias=spec.bias)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return block.to(dtype)


def rope_for(spec: ModelSpec, seq: int, device: torch.device):
    if spec.position != "rope":
        return None
    return rotary_tables(torch.arange(seq, device=device), spec.head_dim)


def fwd_bwd(module_call: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running forward and backward (gradients set to None first, as ``zero_grad`` does)."""
    def run() -> None:
        for p in params:
            p.grad = None
        out = module_call()
        out.backward(torch.ones_like(out))
    return run


def time_block(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, reps: int) -> list[float]:
    """Forward + backward seconds of one per-rank block at this shape, ``reps`` samples, each the slowest
    rank's (every rank times the same shape at once; a collective call, so every rank calls it together)."""
    block = per_rank_block(spec, tp, device, dtype)
    block.train()
    rope = rope_for(spec, seq, device)
    x = torch.randn(mb, seq, spec.hidden, device=device, dtype=dtype, requires_grad=True)
    params = list(block.parameters()) + [x]
    # Every rank starts each sample together: ranks that time-slice shared cores drift apart over a round of
    # shapes, and a rank still timing the round's last shape while the others wait runs on the cores they
    # left, which makes that shape look cheap.
    # Each sample is the slowest rank's: a rank's own time counts the moments after the first ranks finished
    # their call and left it the cores, and such lucky samples make short blocks (few calls a sample) look
    # cheaper per sequence than long ones; a training step waits for its slowest rank.
    return slowest(time_reps(fwd_bwd(lambda: block(x, rope), params), device, reps, barrier=dist.barrier,
                             sample_seconds=SAMPLE_S), device)


def measure_block(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, reps: int,
                  gemm_reps: int | None = None) -> dict:
    """Forward + backward seconds of one per-rank block, its GEMMs alone (``gemm_reps`` samples each, default
    ``reps``), and its attention alone."""
    block_times = time_block(spec, tp, mb, seq, device, dtype, reps)

    gemms = []
    tokens = mb * seq
    for m, k, n in layer_matmul_shapes(spec, tokens, tp):
        m, k, n = int(m), int(k), int(n)
        a = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
        t = time_reps(fwd_bwd(lambda a=a, w=w: F.linear(a, w), [a, w]), device, gemm_reps or reps,
                      sample_seconds=SAMPLE_S)
        gemms.append({"m": m, "k": k, "n": n, "flops": 2.0 * m * k * n, "seconds": lower_quartile(t)})

    heads, kv = spec.heads // tp, spec.kv_heads // tp
    q = torch.randn(mb, heads, seq, spec.head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(mb, kv, seq, spec.head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(mb, kv, seq, spec.head_dim, device=device, dtype=dtype, requires_grad=True)
    attn_times = time_reps(fwd_bwd(lambda: causal_attention(q, k, v), [q, k, v]), device, reps,
                           sample_seconds=SAMPLE_S)
    return {"tp": tp, "micro_batch": mb, "seq": seq, "block_s": lower_quartile(block_times),
            "block_reps": block_times, "gemms": gemms, "attention_s": lower_quartile(attn_times)}


def measure_optimizer(spec: ModelSpec, tp: int, device, reps: int) -> dict | None:
    """One optimizer step as the runtime builds it (``train.make_optimizer``: AdamW, foreach on CPU, fused on
    CUDA) over one per-rank block's parameters, fp32 as the runtime keeps them (FSDP2 and autocast alike),
    every gradient set: seconds per step and the parameters it updated. The planner prices a rank's step
    from its seconds per parameter (``compute.measured_optimizer_seconds_per_param``) instead of the
    memory-bound rate, itself a residual of the block fit. ``None`` on every rank when one ran out of memory
    (a block's fp32 weights, gradients and two moments: 16 B a parameter)."""
    from meshplan.launcher.runtime.train import RunConfig, make_optimizer

    try:
        block = per_rank_block(spec, tp, device, torch.float32)
        params = list(block.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make_optimizer(block, RunConfig(plan_path=""), device.type)
        optimizer.step()                                   # allocates the moments
        fits = 1.0
    except torch.OutOfMemoryError:
        block = params = optimizer = None
        fits = 0.0
    if -slowest([-fits], device)[0] < 1.0:                # the least of the ranks' answers
        return None
    # the slowest rank's samples, as the blocks' (time_block): a rank's own time counts the moments the
    # others, done, left it the cores, and a training step's optimizer phase waits for the slowest rank
    times = slowest(time_reps(optimizer.step, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S), device)
    return {"tp": tp, "params": sum(p.numel() for p in params), "tensors": len(params),
            "step_s": lower_quartile(times), "step_reps": times}


def measure_vocab(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, reps: int) -> dict:
    """LM head GEMM (vocab split by tp), its cross-entropy, and the embedding lookup, forward + backward; and
    the runtime's chunked head + loss (``kernels.linear_cross_entropy(impl="fused")``: the fused loss, and the
    head pass of vocabulary parallelism, whose shards have these shapes) on the same tokens and rows."""
    tokens = mb * seq
    vocab_local = -(-spec.vocab // tp)
    x = torch.randn(tokens, spec.hidden, device=device, dtype=dtype, requires_grad=True)
    # logits of a trained model's scale (std about 1, as after the final norm and a hidden^-1/2 head): with
    # unit weights they reach std sqrt(hidden), the softmax underflows to denormals and on a CPU the loss's
    # gradient GEMMs slow down about 10x (benchmarks/chunked_loss_scale.py). The reference head below is timed
    # with a gradient of ones and its loss on unit logits, so only the chunked loss needs the scaled weights
    w = (torch.randn(vocab_local, spec.hidden, device=device, dtype=dtype) * spec.hidden ** -0.5).requires_grad_()

    def every_rank(fn: Callable[[], Any]) -> list[float]:
        # as the block (time_block): every rank starts each sample together, and each sample is the slowest
        # rank's -- a rank's own samples, taken while the others are between calls, run on the cores they left
        return slowest(time_reps(fn, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S), device)

    head = every_rank(fwd_bwd(lambda: F.linear(x, w), [x, w]))
    logits = torch.randn(tokens, vocab_local, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab_local, (tokens,), device=device)
    loss = every_rank(fwd_bwd(lambda: F.cross_entropy(logits.float(), targets), [logits]))
    del logits
    chunked = every_rank(fwd_bwd(lambda: linear_cross_entropy(x, w, targets, impl="fused"), [x, w]))
    emb = nn.Embedding(spec.vocab, spec.hidden, device=device, dtype=dtype)
    ids = torch.randint(0, spec.vocab, (mb, seq), device=device)
    embed = every_rank(fwd_bwd(lambda: emb(ids), list(emb.parameters())))
    return {"tp": tp, "micro_batch": mb, "seq": seq, "hidden": spec.hidden, "vocab_local": vocab_local,
            "head_gemm": {"m": tokens, "k": spec.hidden, "n": vocab_local,
                          "flops": 2.0 * tokens * spec.hidden * vocab_local, "seconds": lower_quartile(head)},
            "loss_s": lower_quartile(loss), "chunked_head_loss_s": lower_quartile(chunked),
            "embedding_s": lower_quartile(embed)}


class _Holder(nn.Module):
    """The ``layers`` container ``apply_ac`` wraps (the runtime's Transformer keeps blocks the same way)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict({"0": block})


def layer_memory(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, mode: str) -> dict:
    """Bytes one block holds for backward under ``mode``: the net growth of live tensor bytes over its forward
    (what ``saved_tensors_hooks`` sees, plus what a checkpoint keeps, which those hooks miss), with the
    block's input allocated beforehand. In a stack of blocks this is each block's increment: its output
    becomes the next block's input. Also the peak during the forward and the hook-counted saved bytes."""
    holder = _Holder(per_rank_block(spec, tp, device, dtype))
    apply_ac(holder, lambda _layer: mode)
    block = holder.layers["0"]
    block.train()
    rope = rope_for(spec, seq, device)
    x = torch.randn(mb, seq, spec.hidden, device=device, dtype=dtype, requires_grad=True)
    peak, net, out = peak_tracked_bytes(lambda: block(x, rope))
    del out
    hooks = saved_tensor_bytes(lambda: block(x, rope), inputs=[x])
    del hooks["result"]
    return {"tp": tp, "micro_batch": mb, "seq": seq, "mode": mode, "net_bytes": int(net), "peak_bytes": int(peak),
            "hook_saved_bytes": int(hooks["total"]), "hook_saved_input_bytes": int(hooks["inputs"])}


def compute_phase(cfg: dict, spec: ModelSpec, device, dtype, deadline: float, progress: Progress | None,
                  rounds_deadline: float | None = None) -> dict:
    """Measure the shapes smallest first while rank 0 expects the next one to fit before ``deadline``; the
    smallest shape is always measured. Then, while time is left, up to BLOCK_ROUNDS rounds time every
    measured shape's block again, side by side (:func:`block_rounds`)."""
    shapes = sorted(((tp, mb) for tp in cfg["tps"] for mb in cfg["micro_batches"]),
                    key=lambda s: (s[1] * (spec.hidden + spec.ffn_hidden) / s[0], -s[0]))
    reps = cfg["reps"]
    seq = cfg["seq_len"]
    out = {"blocks": [], "vocab": [], "memory": [], "skipped": []}
    warm_up(spec, shapes[0], seq, device, dtype)
    last_cost = last_seconds = 0.0
    round_estimate = 0.0    # one block round: each shape's warm-up, trial and reps samples (time_reps)
    for index, (tp, mb) in enumerate(shapes):
        cost = mb * (spec.hidden + spec.ffn_hidden) / tp
        expected = last_seconds * cost / last_cost if last_cost else 0.0
        go = index == 0 or time.time() + expected < deadline
        if not agree(go):
            out["skipped"] = [{"tp": t, "micro_batch": m} for t, m in shapes[index:]]
            break
        begin = time.time()
        # the quick profile times the vocabulary ops at the smallest micro-batch only (the planner prices the
        # head and loss of other shapes from the fitted rates)
        quick = bool(cfg.get("quick"))
        block, vocab, memory = measure_shape(spec, tp, mb, seq, device, dtype, reps, quick=quick,
                                             vocab=not quick or mb == min(cfg["micro_batches"]))
        round_estimate += 2 * block["block_s"] + reps * max(SAMPLE_S, block["block_s"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"block": block, "vocab": vocab})
        if dist.get_rank() == 0:
            out["blocks"].append({**block, "per_rank_block_s": [g["block"]["block_s"] for g in gathered]})
            if vocab is not None:
                out["vocab"].append(vocab)
            out["memory"].extend(memory)
        last_cost, last_seconds = cost, time.time() - begin
        if progress:
            progress.update(index + 1, len(shapes), f"tp={tp} mb={mb}")
    measured = [shape for shape in shapes if {"tp": shape[0], "micro_batch": shape[1]} not in out["skipped"]]
    steps = [measure_optimizer(spec, tp, device, reps) for tp in sorted({tp for tp, _ in measured})]
    out["optimizer"] = [step for step in steps if step is not None]
    rounds = block_rounds(spec, measured, seq, device, dtype, reps, deadline, round_estimate, progress,
                          rounds_deadline)
    if dist.get_rank() == 0:
        for block, times in zip(out["blocks"], rounds):
            block["block_rounds_s"] = [block["block_s"], *times]
    return out


def measure_shape(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, reps: int,
                  quick: bool = False, vocab: bool = True) -> tuple[dict, dict | None, list]:
    """Everything the compute phase measures at one shape: the block, its GEMMs, the vocabulary ops, and the
    saved bytes per recompute mode, which the cluster file records beside the planner's formula. ``quick``
    (the quick profile) times each GEMM in one sample and leaves the saved bytes out (the planner prices
    memory from its formulas): the time goes to the blocks, whose rounds and lines the planner reads. Without
    ``vocab`` the vocabulary ops are left out (``None``)."""
    block = measure_block(spec, tp, mb, seq, device, dtype, reps, gemm_reps=1 if quick else None)
    vocab_ops = measure_vocab(spec, tp, mb, seq, device, dtype, reps) if vocab else None
    saved = []
    if not quick:
        with quiet_stderr():
            saved = [layer_memory(spec, tp, mb, seq, device, dtype, mode) for mode in RECOMPUTE_MODES]
    return block, vocab_ops, saved


def warm_up(spec: ModelSpec, shape: tuple[int, int], seq: int, device, dtype) -> None:
    """Everything the first shape's measurement runs, once, untimed (the smallest shape, one sample each). On
    a GPU the first measurement also pays one-time costs (kernel loading, cuBLAS and attention back-end set-up)
    that later shapes do not: an H200 profile with a 40 s budget took about 3.7 s for the micro-batch-1 shape,
    expected twice that for micro-batch 2 and measured no other shape, while with a 75 s budget micro-batches 2
    and 4 took about 1 s each. CPU processes pay one too (the first calls of each operator and of autograd's
    recompute paths): 4 CPU ranks took 3 s over the first shape of a small model, against well under a second
    for each shape after it. The next shapes' expected times scale the first shape's time."""
    measure_shape(spec, *shape, seq, device, dtype, reps=1)
    sync(device)


def block_rounds(spec: ModelSpec, shapes: list[tuple[int, int]], seq: int, device, dtype, reps: int,
                 deadline: float, round_s: float, progress: Progress | None,
                 rounds_deadline: float | None = None) -> list[list[float]]:
    """Each shape's block timed again in up to BLOCK_ROUNDS rounds, every shape once a round (a round is a
    few seconds; the first pass measures the shapes up to a minute apart, and a shared machine's speed
    drifts by tens of percent over minutes): per shape, this rank's lower
    quartile of each round. A round runs while rank 0 expects it to end before ``deadline`` (the first as
    ``round_s`` estimates, then as long as the last took), the first MIN_BLOCK_ROUNDS before
    ``rounds_deadline`` where that is later. ``cluster_file.blocked_block_seconds`` compares the shapes within
    each round."""
    times: list[list[float]] = [[] for _ in shapes]
    for round_ in range(BLOCK_ROUNDS):
        until = max(deadline, rounds_deadline or deadline) if round_ < MIN_BLOCK_ROUNDS else deadline
        if not agree(time.time() + round_s < until):
            break
        begin = time.time()
        for i, (tp, mb) in enumerate(shapes):
            times[i].append(lower_quartile(time_block(spec, tp, mb, seq, device, dtype, reps)))
        round_s = time.time() - begin
        if progress:
            progress.update(round_ + 1, BLOCK_ROUNDS, f"block round {round_ + 1} of {BLOCK_ROUNDS}")
    return times


# ----------------------------------------------------------------------------------------------
# links
# ----------------------------------------------------------------------------------------------

def level_groups(world: int, nproc: int) -> dict[str, list[list[int]]]:
    """Rank lists per level: ``intra_node`` one group per node, ``inter_node`` one group per local rank
    (the same local rank on every node); a level with groups of one rank is left out."""
    nodes = world // nproc
    levels = {}
    if nproc > 1:
        levels["intra_node"] = [list(range(n * nproc, (n + 1) * nproc)) for n in range(nodes)]
    if nodes > 1:
        levels["inter_node"] = [[n * nproc + local for n in range(nodes)] for local in range(nproc)]
    return levels


def first_level_group(nproc: int):
    """``(level, group, members)`` of this rank on the first level of :func:`level_groups` (inside a node when
    there are several ranks per node), every rank creating the level's groups; ``None`` with one rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    levels = level_groups(world, nproc)
    if not levels:
        return None
    level = next(iter(levels))
    group, _ = dist.new_subgroups_by_enumeration(levels[level])
    return level, group, next(g for g in levels[level] if rank in g)


def all_ranks_time(fn: Callable[[], Any], device, reps: int, agree_count: bool = False) -> float:
    """Seconds per call of ``fn`` run on every rank at once (a barrier before each sample): the slowest rank's
    lower-quartile sample (``time_reps``; ``agree_count`` for collectives, so every rank makes as many calls)."""
    times = time_reps(fn, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S, agree_count=agree_count)
    return lower_quartile(slowest(times, device))


def collective_call(name: str, nbytes: int, n: int, group, device, element: int = 4):
    """A closure running one collective whose message is ``nbytes`` in nccl-tests' convention (all-gather:
    the gathered size; reduce-scatter: the input size; all-to-all: one rank's data); ``closure(async_op=True)``
    returns its work handle."""
    numel = max(n, nbytes // element // n * n)
    if name == "all_reduce":
        x = torch.ones(numel, device=device)
        return lambda async_op=False: dist.all_reduce(x, group=group, async_op=async_op), numel * element
    if name == "all_gather":
        x, y = torch.ones(numel // n, device=device), torch.empty(numel, device=device)
        return (lambda async_op=False: dist.all_gather_into_tensor(y, x, group=group, async_op=async_op),
                numel * element)
    if name == "reduce_scatter":
        x, y = torch.ones(numel, device=device), torch.empty(numel // n, device=device)
        return (lambda async_op=False: dist.reduce_scatter_tensor(y, x, group=group, async_op=async_op),
                numel * element)
    if name == "all_to_all":
        x, y = torch.ones(numel, device=device), torch.empty(numel, device=device)
        return (lambda async_op=False: dist.all_to_all_single(y, x, group=group, async_op=async_op),
                numel * element)
    raise ValueError(name)


def exchange_call(me: int, peer: int, nbytes: int, device, element: int = 4):
    """Both ranks of a pair send ``nbytes`` to each other at once (isend + irecv)."""
    x = torch.ones(max(1, nbytes // element), device=device)
    y = torch.empty_like(x)

    def run() -> None:
        ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]
        if me > peer:
            ops.reverse()
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return run, x.numel() * element


def pair_in_group(members: list[int], rank: int) -> int | None:
    """The p2p partner of ``rank`` in its group: members 0-1, 2-3, ... (the odd one out idles)."""
    i = members.index(rank)
    j = i + 1 if i % 2 == 0 else i - 1
    return members[j] if j < len(members) else None


def sweep_order(sizes: list[int]) -> list[int]:
    """The order the links phase measures ``sizes`` (ascending) in: the smallest, the largest, then the sizes
    between, ascending. The first two always run, and an alpha-beta fit needs both ends: the smallest message
    shows the latency, the largest the bandwidth. Two small messages alone are both latency-bound (about 1 ms
    for 4 and 16 KiB over gloo), and the bandwidth fitted to them is the noise in their difference (0.01-0.03
    GB/s on a link whose 1 MiB pairs run at 0.7-1.1 GB/s, tests/test_profile_netns.py's 30 s budget)."""
    return sizes[:1] + sizes[-1:] + sizes[1:-1] if len(sizes) > 2 else list(sizes)


def links_phase(cfg: dict, device, deadline: float, progress: Progress | None) -> dict:
    """Sweep message sizes per level in :func:`sweep_order` (the smallest and the largest always) while rank 0
    expects the next size to fit before ``deadline``, splitting the time evenly between levels; a size between
    the two ends is expected to take the time interpolated linearly in bytes between theirs (alpha-beta)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    levels = level_groups(world, cfg["nproc_per_node"])
    subgroups = {}
    for level, groups in levels.items():   # every rank creates every group, in the same order
        mine, _ = dist.new_subgroups_by_enumeration(groups)
        members = next(g for g in groups if rank in g)
        subgroups[level] = (mine, members)
    results: dict[str, list[dict]] = {level: [] for level in levels}
    skipped: dict[str, list[int]] = {level: [] for level in levels}
    reps = cfg["reps"]
    start = time.time()
    for li, (level, (group, members)) in enumerate(subgroups.items()):
        level_deadline = start + (deadline - start) * (li + 1) / len(subgroups)
        n = len(members)
        sizes = sweep_order(cfg["sizes"])
        ends: list[tuple[int, float]] = []   # (bytes, seconds for all collectives) of the two ends
        for si, size in enumerate(sizes):
            expected = 0.0
            if len(ends) == 2:
                (s0, t0), (s1, t1) = ends
                expected = t0 + (t1 - t0) * (size - s0) / (s1 - s0)
            if not agree(si < 2 or time.time() + expected < level_deadline):
                skipped[level] = sorted(sizes[si:])
                break
            begin = time.time()
            for name in COLLECTIVES:
                if name == "p2p":
                    peer = pair_in_group(members, rank)
                    if n < 2:
                        continue
                    fn, nbytes = exchange_call(rank, peer, size, device) if peer is not None else (lambda: None, size)
                    ranks = 2
                else:
                    fn, nbytes = collective_call(name, size, n, group, device)
                    ranks = n
                times = slowest(time_reps(fn, device, reps, barrier=dist.barrier, sample_seconds=SAMPLE_S,
                                          agree_count=True), device)
                results[level].append({"collective": name, "ranks": ranks, "bytes": nbytes,
                                       "seconds": lower_quartile(times), "reps": times})
            if si < 2:
                ends.append((size, time.time() - begin))
            if progress:
                progress.update(si + 1, len(sizes), f"{level} {size // 1024} KiB")
    return {"levels": {lvl: {"groups": levels[lvl], "samples": results[lvl], "skipped_bytes": skipped[lvl]}
                       for lvl in levels}}


# The collectives a data-parallel step makes (planner/evaluate.py's data-parallel term): gradients all-reduced
# (ZeRO 0) or reduce-scattered (ZeRO >= 1), weights all-gathered (ZeRO >= 1).
REDUCTION_COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")
# Rounds over every (group shape, size, collective): a point's figure is the median of its rounds' lower
# quartiles, so one burst of another tenant moves one round, not the figure (one lower quartile of 5 samples
# can be several times another's on a shared machine).
REDUCTION_ROUNDS = 3
# Group shapes measured at most (smallest groups first): a world of 16 has 10, of 64 already 21.
MAX_REDUCTION_LAYOUTS = 12


def reduction_layouts(world: int) -> list[tuple[int, int]]:
    """``(size, stride)`` of every data-parallel group shape a plan of ``world`` ranks can have -- ``size``
    ranks ``stride`` apart, ``size * stride`` dividing the world (the stride is the product of the inner mesh
    dimensions' degrees, planner/comm.py: group_stride) -- smallest groups first, at most
    MAX_REDUCTION_LAYOUTS."""
    shapes = [(size, stride) for size in range(2, world + 1) if world % size == 0
              for stride in range(1, world // size + 1) if (world // size) % stride == 0]
    return shapes[:MAX_REDUCTION_LAYOUTS]


def layout_groups(world: int, size: int, stride: int) -> list[list[int]]:
    """The groups of a ``(size, stride)`` shape: one per base rank whose coordinate along the dimension is 0,
    ``[base, base + stride, ...]`` -- as planner/comm.py places a mesh dimension's groups; every rank in one."""
    return [[base + i * stride for i in range(size)] for base in range(world) if (base // stride) % size == 0]


def reduction_phase(cfg: dict, device, deadline: float, progress: Progress | None) -> dict:
    """For each data-parallel group shape (:func:`reduction_layouts`), every group of that shape at once --
    the contention of a real step, where each replica set reduces its own gradients -- runs each of
    REDUCTION_COLLECTIVES at each of ``cfg['reduction_sizes']`` (the gradient bytes of one of the runtime's
    communication units, bracketed: ``cli.reduction_sizes``), ``reps`` samples of back-to-back calls, the
    slowest rank's lower quartile kept; all of it in up to REDUCTION_ROUNDS rounds. The planner prices a
    plan's data-parallel traffic from these (planner/comm.py: measured_collective_time) instead of reading
    it off the alpha-beta line, which is fitted over every collective and message size and can miss the
    sizes of a data-parallel step by tens of percent on gloo. A point is started
    only when rank 0 expects it to end before ``deadline`` (its own time in an earlier round, or the last
    point's scaled by the bytes in the first); the first shape's all-reduce at the smallest and the largest
    size runs once whatever the budget."""
    world = dist.get_world_size()
    sizes = sorted(int(s) for s in cfg.get("reduction_sizes") or ())
    if world < 2 or not sizes:
        return {}
    shapes = reduction_layouts(world)
    groups = {}
    for size, stride in shapes:   # every rank creates every group, in the same order
        mine, _ = dist.new_subgroups_by_enumeration(layout_groups(world, size, stride))
        groups[size, stride] = mine
    points = [(shape, nbytes, name) for shape in shapes for nbytes in sizes for name in REDUCTION_COLLECTIVES]
    took: dict[int, float] = {}    # point index -> wall seconds it took in the first round it ran
    rounds: dict[int, list[float]] = {i: [] for i in range(len(points))}
    reps: dict[int, list[list[float]]] = {i: [] for i in range(len(points))}
    sent: dict[int, int] = {}      # point index -> bytes of the message as built (a multiple of the group)
    last = (0.0, 1)                # (seconds, bytes) of the last point run, for the first round's estimates
    total = REDUCTION_ROUNDS * len(points)
    # whatever the budget, the first shape's all-reduce at both ends once: a slope to price from
    always = {(shapes[0], sizes[0], "all_reduce"), (shapes[0], sizes[-1], "all_reduce")}
    for round_ in range(REDUCTION_ROUNDS):
        for i, ((size, stride), nbytes, name) in enumerate(points):
            expected = took.get(i, last[0] * max(1.0, nbytes / last[1]))
            first_time = round_ == 0 and ((size, stride), nbytes, name) in always
            if not agree(first_time or time.time() + expected < deadline):
                continue
            begin = time.time()
            call, actual = collective_call(name, nbytes, size, groups[size, stride], device)
            times = slowest(time_reps(call, device, cfg["reps"], barrier=dist.barrier, sample_seconds=SAMPLE_S,
                                      agree_count=True), device)
            rounds[i].append(lower_quartile(times))
            reps[i].append(times)
            sent[i] = actual
            took.setdefault(i, time.time() - begin)
            last = (time.time() - begin, nbytes)
            if progress:
                progress.update(round_ * len(points) + i + 1, total,
                                f"round {round_ + 1}: {name} {size} ranks x{stride} {nbytes / 2**20:.2g} MiB")
    samples = []
    for i, ((size, stride), nbytes, name) in enumerate(points):
        if rounds[i]:
            samples.append({"collective": name, "ranks": size, "stride": stride, "bytes": sent[i],
                            "rounds_s": rounds[i], "reps": reps[i]})
    return {"world": world, "rounds": REDUCTION_ROUNDS, "samples": samples}


OVERLAP_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
OVERLAP_GEMM = {"cpu": 256, "cuda": 4096}   # square GEMM side: ~1 ms on a CPU core, ~0.1-0.2 ms on an H100
OVERLAP_ROUNDS = 3


def overlap_phase(cfg: dict, device, dtype, progress: Progress | None) -> dict:
    """For each of OVERLAP_COLLECTIVES at one message size on the first level's groups: the collective alone
    (c), k square GEMMs alone with k chosen so they last about as long (w), and both at once (b: the
    collective issued with ``async_op=True``, the GEMMs run, then ``wait()``), all ranks at once, each the
    slowest rank's lower-quartile sample, in OVERLAP_ROUNDS rounds. ``exposed_fraction`` = (b - w) / c: 0
    when the collective hides under the GEMMs (NCCL on its own stream), 1 when they take turns, more when
    they slow each other down (gloo's threads and the GEMMs sharing the same cores). The cluster file keeps
    the median over rounds and collectives: one round's ratio of three noisy times moves from profile to
    profile, and it scales every data-parallel reduction of a CPU plan."""
    first = first_level_group(cfg["nproc_per_node"])
    if first is None:
        return {}
    level, group, members = first
    size = int(cfg["overlap_bytes"])
    side = OVERLAP_GEMM["cuda" if device.type == "cuda" else "cpu"]
    a = torch.randn(side, side, device=device, dtype=dtype)
    c = torch.empty_like(a)

    def measure(fn) -> float:
        return all_ranks_time(fn, device, cfg["reps"], agree_count=True)

    one_gemm = measure(lambda: torch.mm(a, a, out=c))
    rows = []
    gemm_counts: dict[str, int] = {}
    for round_ in range(OVERLAP_ROUNDS):
        for i, name in enumerate(OVERLAP_COLLECTIVES):
            call, nbytes = collective_call(name, size, len(members), group, device)
            collective_s = measure(call)
            if name not in gemm_counts:   # the first round picks the GEMM count; later rounds keep it
                k = max(1, round(collective_s / one_gemm)) if one_gemm > 0 else 1
                gemm_counts[name] = int(slowest([float(k)], device)[0])
            k = gemm_counts[name]

            def gemms() -> None:
                for _ in range(k):
                    torch.mm(a, a, out=c)

            def both() -> None:
                work = call(async_op=True)
                gemms()
                work.wait()

            compute_s = measure(gemms)
            both_s = measure(both)
            rows.append({"collective": name, "round": round_, "bytes": nbytes, "ranks": len(members), "gemms": k,
                         "collective_s": collective_s, "compute_s": compute_s, "both_s": both_s,
                         "exposed_fraction": (both_s - compute_s) / collective_s if collective_s > 0 else 0.0})
            if progress:
                progress.update(round_ * len(OVERLAP_COLLECTIVES) + i + 1, OVERLAP_ROUNDS * len(OVERLAP_COLLECTIVES),
                                f"{level} {name}, round {round_ + 1}")
    return {"level": level, "gemm_side": side, "samples": rows}


SHARING_WINDOW_S = 0.25   # per round: ~250 GEMMs of OVERLAP_GEMM["cpu"], many scheduler time slices (~ms)
SHARING_ROUNDS = 5   # each a window per busy count, side by side (sharing_phase)


def host_phases_seconds(device, nproc: int, sizes: "HostPhaseSizes | None" = None) -> float:
    """What the sharing and meeting phases take (CPU ranks; nothing on GPUs), kept out of the link sweep's
    share of the budget: the sharing windows, the meeting rounds, a fifth more for barriers and the timing of
    the GEMM and the all-reduce alone, and the pipeline phase's steps."""
    if device.type == "cuda":
        return 0.0
    sizes = sizes or FULL_HOST_PHASES
    sharing = nproc * sizes.sharing_rounds * sizes.sharing_window_s
    meeting = sizes.meeting_runs * sizes.meeting_run_s
    return 1.2 * (sharing + meeting) + 1.0 + sizes.pipeline_reserve_s


def sharing_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: in each of SHARING_ROUNDS rounds, for each k = 1 .. ranks per host, the first k local ranks
    of every host run square GEMMs for SHARING_WINDOW_S while the others sleep; a window's rate is the busy
    ranks' mean GEMMs per second. Every count is measured in every round, next to each other, so a round's
    ratio rate(k) / rate(all busy) is taken within a second and the machine's own drift (a shared machine's
    speed moves by several percent from one second to the next) cancels from it; ``busy_speedup`` (in
    ``cluster_file.fit_sharing``) is the median of the rounds' ratios: about ranks / k (up to one core per
    rank) where the ranks share fewer cores. Nothing on GPUs (a device per rank; the planner then assumes a
    speed of 1 whatever the others do)."""
    if device.type == "cuda":
        return {}
    nproc = int(cfg["nproc_per_node"])
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % nproc))
    side = OVERLAP_GEMM["cpu"]
    a = torch.randn(side, side)
    c = torch.empty_like(a)
    torch.mm(a, a, out=c)
    sizes = host_phase_sizes(cfg)
    rounds: dict[int, list[float]] = {k: [] for k in range(1, nproc + 1)}
    for round_ in range(sizes.sharing_rounds):
        for k in range(1, nproc + 1):
            dist.barrier()
            rate = 0.0
            if local < k:
                calls, begin = 0, time.perf_counter()
                while time.perf_counter() - begin < sizes.sharing_window_s:
                    torch.mm(a, a, out=c)
                    calls += 1
                rate = calls / (time.perf_counter() - begin)
            else:
                time.sleep(sizes.sharing_window_s)
            rates = [torch.zeros(1) for _ in range(dist.get_world_size())]
            dist.all_gather(rates, torch.tensor([rate]))
            busy = [float(x) for x in rates if float(x) > 0]
            rounds[k].append(sum(busy) / len(busy))
        if progress:
            progress.update(round_ + 1, sizes.sharing_rounds, f"round {round_ + 1}: 1 to {nproc} ranks busy")
    rows = [{"busy": k, "gemms_per_s": sorted(r)[len(r) // 2], "rounds": r} for k, r in rounds.items()]
    return {"gemm_side": side, "window_s": sizes.sharing_window_s, "samples": rows}


MEETING_SEGMENTS_S = (0.01, 0.04, 0.16, 0.5, 1.0, 2.0)   # computing between collectives: a layer's pass .. a step
MEETING_RUN_S = 2.2           # one run: every rank computes this long without meeting (past the longest segment)
MEETING_RUNS = 6              # runs, each from a barrier; the figure is the median of the runs
MEETING_BYTES = 64 * 1024     # the lined-up all-reduce timed for reference: the latency side, not bandwidth


def last_after_mean(arrivals: torch.Tensor) -> torch.Tensor:
    """Per meeting (columns), the last rank's arrival after the ranks' mean arrival (rows: ranks): what the
    mean rank waits there, and what the meeting adds to the step, which ends with the last rank's path."""
    return arrivals.max(0).values - arrivals.mean(0)


def drift_windows(marks: torch.Tensor, gemms: int) -> torch.Tensor:
    """Per window of ``gemms`` GEMMs (disjoint, from the run's start), the last rank's time for it after the
    ranks' mean time (``last_after_mean`` of the windows' durations): what a collective at the window's end
    would cost beyond its lined-up time had the ranks left one at its start together. ``marks``: [rank, GEMMs
    done + 1], each rank's ``perf_counter`` at its start and after every GEMM."""
    ends = torch.arange(gemms, marks.shape[1], gemms)
    if len(ends) == 0:
        return torch.empty(0, dtype=marks.dtype)
    durations = marks[:, ends] - marks[:, ends - gemms]
    return last_after_mean(durations)


def meeting_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: how far the first level's ranks (inside a node) drift apart while they compute, as a
    function of how long they compute between two collectives. In each of MEETING_RUNS runs every rank
    leaves a barrier and runs square GEMMs for MEETING_RUN_S, noting ``time.perf_counter`` (one clock per
    host) after each; the runs' marks are gathered. For each segment of MEETING_SEGMENTS_S the run is cut
    into disjoint windows of that many GEMMs' time and each window's penalty is the last rank's duration after
    the mean duration (``drift_windows``): the wait a collective at the window's end costs the mean rank.
    ``penalty_s`` per segment is the median over runs of a run's mean window; ``segment_s`` the windows'
    mean duration. On shared cores the operating system time-slices the ranks and they drift apart; on GPUs
    the ranks are not time-sliced: skipped.

    One run gives every segment length at once, the step-long ones included, so the planner reads a step's
    drift off the measurement instead of extrapolating it. Raw files without ``timing: drift`` hold one
    sample per segment and are fitted as a line (``cluster_file.fit_meeting``)."""
    if device.type == "cuda":
        return {}
    first = first_level_group(cfg["nproc_per_node"])
    if first is None:
        return {}
    level, group, members = first
    side = OVERLAP_GEMM["cpu"]
    a = torch.randn(side, side)
    c = torch.empty_like(a)
    call, nbytes = collective_call("all_reduce", MEETING_BYTES, len(members), group, device)
    collective_s = all_ranks_time(call, device, cfg["reps"], agree_count=True)
    one_gemm = all_ranks_time(lambda: torch.mm(a, a, out=c), device, cfg["reps"])
    sizes = host_phase_sizes(cfg)
    gemms = int(slowest([float(math.ceil(sizes.meeting_run_s / one_gemm))], device)[0])
    runs: list[list[tuple[float, float, int]]] = [[] for _ in MEETING_SEGMENTS_S]   # (penalty, segment, windows)
    for run in range(sizes.meeting_runs):
        marks = [0.0] * (gemms + 1)
        dist.barrier()
        marks[0] = time.perf_counter()
        for k in range(gemms):
            torch.mm(a, a, out=c)
            marks[k + 1] = time.perf_counter()
        mine = torch.tensor(marks, dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in members]
        dist.all_gather(every, mine, group=group)
        table = torch.stack(every)                                   # [rank, mark]
        per_gemm = (table[:, -1] - table[:, 0]).mean().item() / gemms
        for i, segment_s in enumerate(MEETING_SEGMENTS_S):
            width = min(gemms, max(1, round(segment_s / per_gemm)))
            penalties = drift_windows(table, width)
            runs[i].append((penalties.mean().item(), width * per_gemm, len(penalties)))
        if progress:
            progress.update(run + 1, sizes.meeting_runs, f"{level}: {len(members)} ranks computing "
                            f"{sizes.meeting_run_s:.1f} s without meeting, run {run + 1}")
    rows = []
    for i, samples in enumerate(runs):
        rows.append({"segment_s": statistics.median(s for _, s, _ in samples),
                     "penalty_s": statistics.median(p for p, _, _ in samples),
                     "rounds_s": [p for p, _, _ in samples], "windows": sum(n for _, _, n in samples),
                     "collective_s": collective_s})
    return {"level": level, "ranks": len(members), "bytes": nbytes, "gemm_side": side, "timing": "drift",
            "run_s": sizes.meeting_run_s, "samples": rows}


PIPELINE_MICROBATCHES = (4, 16)   # the op cost comes from the slope between the two: fixed costs cancel
PIPELINE_STEPS = 5
PIPELINE_TOKENS, PIPELINE_WIDTH, PIPELINE_LAYERS = 256, 256, 4   # a stage op of a few ms on a CPU core
PIPELINE_RESERVE_S = 6.0           # 2 x 6 steps of up to 16 micro-batches, the module alone, building stages


@dataclass(frozen=True)
class HostPhaseSizes:
    """How long the host phases (sharing, meeting, pipeline; CPU ranks only) measure: rounds and windows."""

    sharing_rounds: int
    sharing_window_s: float
    meeting_runs: int
    meeting_run_s: float
    pipeline_steps: int
    pipeline_reserve_s: float


FULL_HOST_PHASES = HostPhaseSizes(SHARING_ROUNDS, SHARING_WINDOW_S, MEETING_RUNS, MEETING_RUN_S, PIPELINE_STEPS,
                                  PIPELINE_RESERVE_S)
# The quick profile (`meshplan plan --cluster localhost:N` on first use, about 30 s in all): two rounds of each
# and meeting runs of a second, which cover the steps of the small jobs a first plan on one machine runs.
QUICK_HOST_PHASES = HostPhaseSizes(2, 0.15, 2, 1.1, 3, 2.0)


def host_phase_sizes(cfg: dict) -> HostPhaseSizes:
    return QUICK_HOST_PHASES if cfg.get("quick") else FULL_HOST_PHASES


def median_schedule_step(schedule, position: int, x: torch.Tensor, target: torch.Tensor, steps: int, group) -> float:
    """This rank's median seconds per ``schedule.step`` of a two-rank pipeline over ``steps`` steps after one
    warm-up step (``position`` 0 feeds ``x``, 1 computes the loss against ``target``), the pair lined up by a
    barrier before each step."""
    samples = []
    for step in range(steps + 1):
        dist.barrier(group)
        begin = time.perf_counter()
        if position == 0:
            schedule.step(x)
        else:
            schedule.step(target=target, losses=[])
        if step:
            samples.append(time.perf_counter() - begin)
    return sorted(samples)[len(samples) // 2]


def pipeline_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """CPU ranks: every host's ranks in pairs (0-1, 2-3, ...; all pairs at once, an odd one out idles), each
    pair a two-stage ``Schedule1F1B`` (torch.distributed.pipelining, what the runtime's pipelines run) whose
    stage is PIPELINE_LAYERS linears on [PIPELINE_TOKENS, PIPELINE_WIDTH], timed at both micro-batch counts of
    PIPELINE_MICROBATCHES (the slowest rank's median of PIPELINE_STEPS steps after a warm-up); and the same
    module's forward + backward alone, every rank at once. In 1F1B's steady state each micro-batch more adds
    one forward and one backward op on each stage, so ``op_overhead_s`` = (slope per micro-batch - forward +
    backward alone) / 2: what an op costs beyond its compute -- the schedule's bookkeeping, its send/recv,
    and the wait for the neighbour to be scheduled when ranks time-slice shared cores. GPUs: the host's
    bookkeeping runs ahead of the device's queue; not measured."""
    world, rank = dist.get_world_size(), dist.get_rank()
    nproc = int(cfg["nproc_per_node"])
    if device.type == "cuda" or nproc < 2:
        return {}
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    def module() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(PIPELINE_WIDTH, PIPELINE_WIDTH) for _ in range(PIPELINE_LAYERS)])

    alone_module = module()
    x_alone = torch.randn(1, PIPELINE_TOKENS, PIPELINE_WIDTH, requires_grad=True)

    def fwd_bwd() -> None:
        alone_module(x_alone).sum().backward()

    alone_s = all_ranks_time(fwd_bwd, device, cfg["reps"])
    pairs = [[node * nproc + i, node * nproc + i + 1] for node in range(world // nproc) for i in range(0, nproc - 1, 2)]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    pair = next((p for p in pairs if rank in p), None)
    times = {}
    for i, m in enumerate(PIPELINE_MICROBATCHES):
        step_s = 0.0
        if pair is not None:
            position = pair.index(rank)
            stage = PipelineStage(module(), position, 2, device, group=group)
            schedule = Schedule1F1B(stage, m, loss_fn=lambda out, target: (out - target).pow(2).mean())
            x = torch.randn(m, PIPELINE_TOKENS, PIPELINE_WIDTH)
            target = torch.randn(m, PIPELINE_TOKENS, PIPELINE_WIDTH)
            step_s = median_schedule_step(schedule, position, x, target, host_phase_sizes(cfg).pipeline_steps,
                                          group)
        times[m] = slowest([step_s], device)[0]
        if progress:
            progress.update(i + 1, len(PIPELINE_MICROBATCHES), f"1F1B over pairs, {m} micro-batches")
    low, high = PIPELINE_MICROBATCHES
    per_microbatch = (times[high] - times[low]) / (high - low)
    return {"pairs": len(pairs), "tokens": PIPELINE_TOKENS, "width": PIPELINE_WIDTH, "layers": PIPELINE_LAYERS,
            "step_s": {str(m): t for m, t in times.items()}, "fwd_bwd_alone_s": alone_s,
            "per_microbatch_s": per_microbatch, "op_overhead_s": max(0.0, (per_microbatch - alone_s) / 2)}


def round_robin(world: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair once (the circle method; a bye when world is odd)."""
    players = list(range(world)) + ([None] if world % 2 else [])
    m = len(players)
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[i], players[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(a, b) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def pairs_phase(cfg: dict, device, progress: Progress | None) -> dict:
    """Per-pair bandwidth (bytes/s, one direction while both directions run) for every pair of ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = cfg["pair_bytes"]
    matrix = [[0.0] * world for _ in range(world)]
    rounds = round_robin(world)
    for ri, pairs in enumerate(rounds):
        peer = next((b if a == rank else a for a, b in pairs if rank in (a, b)), None)
        if peer is None:
            fn, nbytes = (lambda: None), size
        else:
            fn, nbytes = exchange_call(rank, peer, size, device)
        times = time_reps(fn, device, cfg["reps"], barrier=dist.barrier, sample_seconds=SAMPLE_S, agree_count=True)
        seconds = lower_quartile(times)
        on = device if dist.get_backend() == "nccl" else "cpu"   # nccl gathers device tensors only
        row = torch.zeros(world, dtype=torch.float64, device=on)
        if peer is not None:
            row[peer] = nbytes / seconds
        gathered = [torch.zeros(world, dtype=torch.float64, device=on) for _ in range(world)] if rank == 0 else None
        dist.gather(row, gathered, dst=0)
        if rank == 0:
            for i, r in enumerate(gathered):
                for j, bw in enumerate(r.tolist()):
                    if bw > 0:
                        matrix[i][j] = bw
        if progress:
            progress.update(ri + 1, len(rounds), "pairs")
    return {"bytes": size, "bandwidth_bytes_per_s": matrix}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def run(cfg: dict) -> dict | None:
    warnings.filterwarnings("ignore", category=UserWarning)   # gloo's deprecation notes on every rank
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = init(cfg["device"])
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg["nnodes"] * cfg["nproc_per_node"]:
        raise SystemExit(f"error: torchrun started {world} ranks, the job asked for "
                         f"{cfg['nnodes']} x {cfg['nproc_per_node']}")
    torch.manual_seed(1234 + rank)
    spec = ModelSpec.from_dict(cfg["model"])
    dtype = DTYPES[cfg["precision"]] if device.type == "cuda" else torch.float32
    deadline = float(cfg["deadline"])
    begin = time.time()
    total = max(1.0, deadline - begin)
    # The host checks take a fixed time (host_phases_seconds); the shares are of what they leave, so that a
    # short budget still ends the link sweep after the compute phase and the worker inside its budget.
    host_s = host_phases_seconds(device, cfg["nproc_per_node"], host_phase_sizes(cfg))
    flexible = max(0.0, total - host_s)
    compute_deadline = begin + cfg["compute_share"] * flexible
    pairs_reserve = cfg["pairs_share"] * flexible   # the host phases run before the sweep, its end is after them
    hosts = [None] * world
    dist.all_gather_object(hosts, {"host": socket.gethostname(), "node": int(os.environ.get("GROUP_RANK", 0)),
                                   "local_rank": int(os.environ.get("LOCAL_RANK", 0))})
    show = rank == 0 and cfg.get("progress", True)
    raw: dict[str, Any] = {"ranks": hosts, "device": describe_device(device), "torch": torch.__version__,
                           "world": world, "nnodes": cfg["nnodes"], "nproc_per_node": cfg["nproc_per_node"],
                           "precision": cfg["precision"] if device.type == "cuda" else "fp32",
                           "model": cfg["model"], "budget_s": total}
    # the block rounds' floor (MIN_BLOCK_ROUNDS) may take up to half of the link sweep's time
    sweep_s = max(0.0, deadline - pairs_reserve - host_s - compute_deadline)
    with Progress("compute", total, enabled=show) as progress:
        raw["compute"] = compute_phase(cfg, spec, device, dtype, compute_deadline, progress,
                                       rounds_deadline=compute_deadline + 0.5 * sweep_s)
    # The host phases run before the link sweep: after it, ranks computing side by side drift apart several
    # times further than before it or inside a training job, while the sharing rates and the pipeline op
    # cost do not move.
    with Progress("sharing", total, enabled=show and device.type != "cuda", start=begin) as progress:
        raw["sharing"] = sharing_phase(cfg, device, progress)
    with Progress("meeting", total, enabled=show and device.type != "cuda", start=begin) as progress:
        raw["meeting"] = meeting_phase(cfg, device, progress)
    with Progress("pipeline", total, enabled=show and device.type != "cuda", start=begin) as progress:
        raw["pipeline"] = pipeline_phase(cfg, device, progress)
    links_end = deadline - pairs_reserve
    with Progress("links", total, enabled=show, start=begin) as progress:
        # half of what the compute phase left to the sweep; the reduction phase has the rest (and what the
        # sweep did not use)
        raw["links"] = links_phase(cfg, device, time.time() + 0.5 * max(0.0, links_end - time.time()), progress)
    with Progress("reduction", total, enabled=show, start=begin) as progress:
        raw["reduction"] = reduction_phase(cfg, device, links_end, progress)
    with Progress("overlap", total, enabled=show, start=begin) as progress:
        raw["overlap"] = overlap_phase(cfg, device, dtype, progress)
    with Progress("pairs", total, enabled=show, start=begin) as progress:
        raw["pairs"] = pairs_phase(cfg, device, progress)
    raw["elapsed_s"] = time.time() - begin
    dist.barrier()
    dist.destroy_process_group()
    return raw if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshplan.profiler.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="job JSON written by `meshplan profile`")
    args = p.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    raw = run(cfg)
    if raw is not None:
        out = Path(cfg["raw_out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
