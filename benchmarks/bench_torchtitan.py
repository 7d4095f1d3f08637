"""torchtitan training the model of a meshplan plan on one GPU, for a tokens/s comparison (needs torchtitan 0.3).

    python benchmarks/bench_torchtitan.py --plan plan.yaml --steps 30 --json titan.json
    python benchmarks/bench_torchtitan.py --plan plan.yaml --smoke     # CPU: builds the model and runs a forward

The plan must be a single-GPU plan of a Llama 3 shape torchtitan registers (``llama3.2-1b`` is its ``1B``
flavor: 16 blocks, hidden 2048, 32/8 heads, SwiGLU 8192, tied embeddings, vocabulary 128256). torchtitan's own
pieces build and parallelize it: ``model_registry(flavor)`` (FlexAttention, its only causal attention for
language models in 0.3), ``parallelize_llama`` (its activation checkpointing in the plan's mode, per-block
``torch.compile`` when the plan compiles, and FSDP2 with bf16 parameters and fp32 reduction, which torchtitan
applies on one GPU too). The loop is the plan's: ``micro_batch`` sequences per forward, ``num_microbatches``
accumulated per step, cross-entropy on random tokens, fused AdamW. Printed and written: median tokens/s and step
time over the steps after ``--warmup``, ``max_memory_allocated`` and ``max_memory_reserved``.

torchtitan's Trainer needs a tokenizer and a dataset download; this driver needs neither, and times the same
model code and parallelism. A plan with tp, pp or cp > 1 is refused: the comparison is one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

FLAVORS = {"llama3.2-1b": "1B", "llama3-8b": "8B"}      # meshplan preset -> torchtitan's llama3 flavor


def build(plan, device: str):
    """torchtitan's model for the plan, parallelized by torchtitan's parallelize_llama, on ``device``."""
    import torch
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.parallelize import parallelize_llama

    spec = model_registry(FLAVORS[plan.model.name], attn_backend="flex")
    with torch.device("meta"):
        model = spec.model.build()
    parallel_dims_module.device_type = device             # its mesh on this device (CPU for --smoke)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    mode = recompute_mode(plan)
    ac = {"none": None, "selective": SelectiveAC.Config(), "full": FullAC.Config()}[mode]
    training = TrainingConfig(local_batch_size=plan.micro_batch, seq_len=plan.train.seq_len, steps=1)
    model = parallelize_llama(model, parallel_dims=dims, training=training, parallelism=ParallelismConfig(),
                              compile_config=CompileConfig(enable=plan.compile and device == "cuda"),
                              ac_config=ac, dump_folder=tempfile.mkdtemp()) or model
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states()
    return model, spec.model.vocab_size, mode


def recompute_mode(plan) -> str:
    """The plan's recompute mode where every block has the same one (torchtitan applies one to all)."""
    modes = {mode for stage in plan.stages for mode, count in stage.recompute_layers.items() if count}
    if len(modes) != 1:
        raise SystemExit(f"error: the plan mixes recompute modes {sorted(modes)}; torchtitan applies one to every "
                         "block: re-plan with --fix recompute=MODE")
    return modes.pop()


def step(model, optimizer, vocab: int, plan, device: str, train: bool = True) -> float:
    """One training step of the plan's batch (its micro-batches accumulated); returns the mean loss."""
    import torch
    import torch.nn.functional as F

    b, s = plan.micro_batch, plan.train.seq_len
    positions = torch.arange(s, device=device).repeat(b, 1)
    total = 0.0
    for _ in range(plan.num_microbatches):
        tokens = torch.randint(0, vocab, (b, s + 1), device=device)
        masks = model.get_attention_masks(positions=positions)
        with torch.set_grad_enabled(train):
            logits = model(tokens[:, :-1], positions, masks)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        if train:
            (loss / plan.num_microbatches).backward()
        total += float(loss) / plan.num_microbatches
    if train:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU: build and one forward (FlexAttention has no "
                                                             "CPU backward); times nothing")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from meshplan.plan import Plan

    if not args.plan.is_file():
        print(f"error: --plan {args.plan}: no such file (plan it first: meshplan plan ... --out PLAN)", file=sys.stderr)
        return 2
    plan = Plan.load(args.plan)
    if plan.world_size != 1 or plan.model.name not in FLAVORS:
        print(f"error: --plan must be a one-GPU plan of {', '.join(FLAVORS)} (got {plan.model.name} on "
              f"{plan.world_size} ranks)", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    import torchtitan

    model, vocab, mode = build(plan, device)
    if args.smoke:
        loss = step(model, None, vocab, plan, device, train=False)
        print(f"smoke: torchtitan {torchtitan.__version__} built {plan.model.name} ({mode} recompute), forward "
              f"loss {loss:.3f}")
        return 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    tokens_per_step = plan.train.global_batch * plan.train.seq_len
    times = []
    for i in range(args.steps):
        if i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        loss = step(model, optimizer, vocab, plan, device)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
        print(f"step {i + 1}: loss {loss:.3f}, {times[-1]:.3f} s", flush=True)
    step_s = statistics.median(times[args.warmup:])
    result = {"torchtitan": torchtitan.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0), "model": plan.model.name, "recompute": mode,
              "micro_batch": plan.micro_batch, "num_microbatches": plan.num_microbatches,
              "seq_len": plan.train.seq_len, "compile": plan.compile, "step_time_s": step_s,
              "tokens_per_s": tokens_per_step / step_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "reserved_memory_gib": torch.cuda.max_memory_reserved() / 2**30}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
