"""The compute phase: forward + backward of the runtime's own ``Block`` (``launcher/runtime/model.py``) with its
projections cut to the per-rank widths of each tensor-parallel degree, for each micro-batch; the same GEMMs alone
(``F.linear``), causal attention alone, the LM-head GEMM, its loss and the embedding; one optimizer step; on
GPUs, each fused op in each implementation (``kernels.py``); the bytes one block holds for backward per
recompute mode; and rounds of every measured shape's block side by side."""

from __future__ import annotations

import dataclasses

import time
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
from meshplan.planner.flops import kv_heads_per_rank
from meshplan.plan import RECOMPUTE_MODES
from meshplan.profiler.phases.kernels import kernel_phase
from meshplan.profiler.phases.timing import (LONG_CALL_S, SAMPLE_S, agree, lower_quartile, quiet_stderr, slowest,
                                             sync, time_reps)
from meshplan.profiler.progress import Progress
from meshplan.spec import ModelSpec

# Rounds of block timings after the first pass over the shapes, every shape once a round (block_rounds): with
# the first pass kept aside, five comparisons of the shapes made within seconds of each other.
BLOCK_ROUNDS = 5
# Rounds the block timings get even past the compute share (out of the link sweep's time, down to half of it):
# the shapes' figures are medians of the rounds, the planner's micro-batch and tensor-parallel choices rest on
# their ratios, and with fewer than two rounds there is no median and no scatter to judge a fit by. The first
# pass over the shapes can take most of the compute share on CPU ranks.
MIN_BLOCK_ROUNDS = 3


def per_rank_block(spec: ModelSpec, tp: int, device: torch.device, dtype: torch.dtype) -> Block:
    """The runtime's ``Block`` with its projections cut to one tensor-parallel rank's widths (Megatron's
    column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2; one whole key/value head where tp exceeds them, as
    the runtime replicates it). Attention reads its head count from the projection widths, so the block
    runs unchanged. The TP collectives are measured with the links.
    A model with experts is timed as its dense block (``moe`` dropped): the rates fitted to it price the
    experts' GEMMs and traffic (planner/moe.py)."""
    spec = dataclasses.replace(spec, moe=None)
    h, f = spec.hidden, spec.ffn_hidden
    q_width, kv_width = spec.q_width // tp, int(kv_heads_per_rank(spec, tp)) * spec.head_dim
    with torch.device(device):
        block = Block(spec)
        attn, ff = block.attention, block.feed_forward
        attn.wq = nn.Linear(h, q_width, bias=spec.attention_biases)
        attn.wk = nn.Linear(h, kv_width, bias=spec.attention_biases)
        attn.wv = nn.Linear(h, kv_width, bias=spec.attention_biases)
        attn.wo = nn.Linear(q_width, h, bias=spec.bias)
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
    return rotary_tables(torch.arange(seq, device=device), spec.rotary_width)


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

    heads, kv = spec.heads // tp, int(kv_heads_per_rank(spec, tp))
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


def vocab_ops_warm_themselves(device) -> bool:
    """Whether the vocabulary ops are left out of :func:`warm_up` and warmed by their own calls in
    :func:`measure_vocab`: on CPU ranks, where nothing of theirs compiles on a first call and at a 128k
    vocabulary one call is seconds; a GPU warms them with the first shape (the chunked loss's first call
    compiles its Triton kernels)."""
    return device.type == "cpu"


def measure_vocab(spec: ModelSpec, tp: int, mb: int, seq: int, device, dtype, reps: int,
                  quick: bool = False) -> dict:
    """LM head GEMM (vocab split by tp), its cross-entropy, and the embedding lookup (the vocab / tp rows of a
    tensor-parallel rank), forward + backward; and the runtime's chunked head + loss
    (``kernels.linear_cross_entropy(impl="fused")``: the fused loss, and the head pass of vocabulary
    parallelism, whose shards have these shapes) on the same tokens and rows. Each op runs an untimed call, a
    trial call, then ``reps`` samples (``timing.time_reps``); ``quick`` (the quick profile) times each op in
    one sample, and an op whose trial lasts LONG_CALL_S or more in that trial alone (on a CPU one call of a
    128k-vocabulary head takes seconds). On CPU ranks the quick profile's trial is also the op's warm-up
    (nothing compiles on a first call there); on a GPU the untimed call stays, since the chunked loss's first
    call compiles its Triton kernels (seconds)."""
    tokens = mb * seq
    vocab_local = -(-spec.vocab // tp)
    cold_trial = quick and vocab_ops_warm_themselves(device)
    x = torch.randn(tokens, spec.hidden, device=device, dtype=dtype, requires_grad=True)
    # logits of a trained model's scale (std about 1, as after the final norm and a hidden^-1/2 head): with
    # unit weights they reach std sqrt(hidden), the softmax underflows to denormals and on a CPU the loss's
    # gradient GEMMs slow down about 10x (benchmarks/chunked_loss_scale.py). The reference head below is timed
    # with a gradient of ones and its loss on unit logits, so only the chunked loss needs the scaled weights
    w = (torch.randn(vocab_local, spec.hidden, device=device, dtype=dtype) * spec.hidden ** -0.5).requires_grad_()

    def every_rank(fn: Callable[[], Any]) -> list[float]:
        # as the block (time_block): every rank starts each sample together, and each sample is the slowest
        # rank's -- a rank's own samples, taken while the others are between calls, run on the cores they left
        times = time_reps(fn, device, 1 if quick else reps, warmup=0 if cold_trial else 1, barrier=dist.barrier,
                          sample_seconds=SAMPLE_S, agree_count=quick, single_call_s=LONG_CALL_S if quick else None)
        return slowest(times, device)

    head = every_rank(fwd_bwd(lambda: F.linear(x, w), [x, w]))
    logits = torch.randn(tokens, vocab_local, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab_local, (tokens,), device=device)
    loss = every_rank(fwd_bwd(lambda: F.cross_entropy(logits.float(), targets), [logits]))
    del logits
    chunked = every_rank(fwd_bwd(lambda: linear_cross_entropy(x, w, targets, impl="fused"), [x, w]))
    # the embedding as a tp rank's VocabShardEmbedding runs it: a plain lookup into its vocab / tp rows, whose
    # backward writes a dense [rows, hidden] gradient (about 1.5 s on a CPU rank for 64k rows of 2048, most of
    # it the page faults of a fresh allocation). Zero weights: neither pass's time depends on their values
    emb = nn.Embedding(vocab_local, spec.hidden, device=device, dtype=dtype, _weight=torch.zeros(
        vocab_local, spec.hidden, device=device, dtype=dtype))
    ids = torch.randint(0, vocab_local, (mb, seq), device=device)
    embed = every_rank(fwd_bwd(lambda: emb(ids), list(emb.parameters())))
    return {"tp": tp, "micro_batch": mb, "seq": seq, "hidden": spec.hidden, "vocab_local": vocab_local,
            "head_gemm": {"m": tokens, "k": spec.hidden, "n": vocab_local,
                          "flops": 2.0 * tokens * spec.hidden * vocab_local, "seconds": lower_quartile(head)},
            "loss_s": lower_quartile(loss), "chunked_head_loss_s": lower_quartile(chunked),
            "embedding_s": lower_quartile(embed), "embedding_rows": vocab_local}


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
    warm_up(spec, shapes[0], seq, device, dtype, quick=bool(cfg.get("quick")))
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
    # every rank times the kernels on its own GPU, so that all reach the block rounds' barriers together
    out["kernels"] = kernel_phase(spec, seq * min(cfg["micro_batches"]), device, dtype, reps, progress,
                                  compiled=not cfg.get("quick"))
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
    (the quick profile) times each GEMM and each vocabulary op in one sample (``measure_vocab``), and leaves
    the saved bytes out (the planner prices memory from its formulas): the time goes to the blocks, whose
    rounds and lines the planner reads. Without ``vocab`` the vocabulary ops are left out (``None``)."""
    block = measure_block(spec, tp, mb, seq, device, dtype, reps, gemm_reps=1 if quick else None)
    vocab_ops = None
    if vocab:
        vocab_ops = measure_vocab(spec, tp, mb, seq, device, dtype, reps, quick=quick)
    saved = []
    if not quick:
        with quiet_stderr():
            saved = [layer_memory(spec, tp, mb, seq, device, dtype, mode) for mode in RECOMPUTE_MODES]
    return block, vocab_ops, saved


def warm_up(spec: ModelSpec, shape: tuple[int, int], seq: int, device, dtype, quick: bool = False) -> None:
    """The first shape's block, GEMMs, attention, (outside the quick profile) saved-bytes passes and (on a GPU)
    vocabulary ops, once, untimed (the smallest shape, one sample each). On CPU ranks the vocabulary ops warm
    themselves (``measure_vocab``): nothing of theirs compiles on a first call, and at a 128k vocabulary one
    call is seconds. On a GPU the first measurement also pays one-time costs (kernel loading and Triton
    compiles, cuBLAS and attention back-end set-up) that later shapes do not: an H200 profile with a 40 s budget
    took about 3.7 s for the micro-batch-1 shape, expected twice that for micro-batch 2 and measured no other
    shape, while with a 75 s budget micro-batches 2 and 4 took about 1 s each. CPU processes pay one too (the
    first calls of each operator and of autograd's recompute paths): 4 CPU ranks took 3 s over the first shape
    of a small model, against well under a second for each shape after it. The next shapes' expected times
    scale the first shape's time."""
    measure_shape(spec, *shape, seq, device, dtype, reps=1, quick=quick, vocab=not vocab_ops_warm_themselves(device))
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
