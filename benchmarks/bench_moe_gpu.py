"""Time the routed experts of one MoE MLP on one GPU: meshplan's three grouped GEMMs (``torch._grouped_mm``,
bf16) against one GEMM per expert and weight, next to the planner's price of the same GEMMs.

    python benchmarks/bench_moe_gpu.py                  # CUDA: Mixtral 8x7B's and Qwen3-30B-A3B's experts
    python benchmarks/bench_moe_gpu.py --json out.json  # also write the rows as JSON (benchmarks/gpu_suite.sh)
    python benchmarks/bench_moe_gpu.py --smoke          # CPU: tiny shapes, checks the script runs; its timings
                                                        # mean nothing

Every expert of the model is on the one device (ep 1), in bf16, as launcher/runtime/moe.py ``GroupedExperts``
holds them. ``--tokens`` tokens (default 8192, one sequence) each go to ``top_k`` experts drawn uniformly (a
balanced router), so each expert gets about ``tokens * top_k / experts`` rows. For each implementation a row
gives the median forward and forward + backward milliseconds, the achieved TFLOP/s (``6 * rows * h * f`` forward,
three times that with backward), the planner's forward milliseconds for the same GEMMs (planner/moe.py
``matmul_sequence`` and ``sequence_time`` at the rates of ``--cluster``'s device, bf16; the planner prices the
backward at twice the forward) and the largest difference from the per-expert outputs and input gradients,
relative to their largest magnitude.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import timed  # noqa: E402  (the same median-of-reps timer as the kernel table)

from meshplan.launcher.runtime.moe import GroupedExperts  # noqa: E402
from meshplan.planner import compute, moe  # noqa: E402
from meshplan.spec import MODEL_PRESETS, MoESpec, ModelSpec, load_cluster  # noqa: E402

MODELS = ("mixtral-8x7b", "qwen3-30b-a3b")
SMOKE = ModelSpec(name="smoke-moe", layers=1, hidden=64, heads=4, vocab=256,
                  moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32))


def balanced_counts(tokens: int, experts: int, top_k: int, generator: torch.Generator) -> list[int]:
    """Rows per expert when every token picks ``top_k`` distinct experts uniformly."""
    picks = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    return torch.bincount(picks.flatten(), minlength=experts).tolist()


def planned_forward_s(spec: ModelSpec, tokens: int, rows: int, grouped: bool, rates: compute.Rates) -> float:
    """The planner's seconds for the experts' forward GEMMs alone (the router and shared experts left out)."""
    experts_only = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, shared_experts=0, shared_ffn_hidden=0,
                                                                     shared_expert_gate=False))
    shapes = moe.matmul_sequence(experts_only, tokens, rows, spec.moe.experts, grouped)[1:]    # [0]: the router
    return moe.sequence_time(shapes, rates)


def measure(spec: ModelSpec, tokens: int, device: str, rates: compute.Rates, warmup: int, reps: int) -> list[dict]:
    """One row per implementation for ``spec``'s experts (see the module doc)."""
    m = spec.moe
    generator = torch.Generator().manual_seed(0)
    counts = balanced_counts(tokens, m.experts, m.top_k, generator)
    rows = sum(counts)
    experts = GroupedExperts(m.experts, spec.hidden, m.expert_ffn_hidden).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for weight in experts.parameters():
            weight.normal_(0.0, 0.02)
    x = torch.randn(rows, spec.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(rows, spec.hidden, device=device, dtype=torch.bfloat16)
    device_counts = torch.tensor(counts, device=device)
    results, outputs = [], {}
    for impl in ("per-expert", "grouped"):
        experts.grouped = impl == "grouped"
        arg = device_counts if experts.grouped else counts

        def forward() -> torch.Tensor:
            return experts(x, arg)

        def forward_backward() -> None:
            forward().backward(grad_out)

        x.grad = None
        out = forward()
        out.backward(grad_out)
        outputs[impl] = (out.detach().float(), x.grad.detach().float())
        with torch.no_grad():
            fwd = timed(forward, device, warmup, reps)
        fwd_bwd = timed(forward_backward, device, warmup, reps)
        flops = 6.0 * rows * spec.hidden * m.expert_ffn_hidden
        results.append({"model": spec.name, "impl": impl, "experts": m.experts, "rows": rows,
                        "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fwd_bwd * 1e3, "tflops": 3 * flops / fwd_bwd / 1e12,
                        "predicted_fwd_ms": planned_forward_s(spec, tokens, rows, experts.grouped, rates) * 1e3})
    for row in results:
        row["max_error"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                               for a, b in zip(outputs[row["impl"]], outputs["per-expert"]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--cluster", default="dgx-h100:1", help="the device whose planned rates are shown")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the script runs, nothing more")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_moe_gpu: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    specs = [SMOKE] if args.smoke else [MODEL_PRESETS[name] for name in MODELS]
    tokens = 64 if args.smoke else args.tokens
    rates = compute.achieved_rates(load_cluster(args.cluster), "bf16")
    rows = [r for spec in specs for r in measure(spec, tokens, device, rates, args.warmup, args.reps)]
    print(f"MoE experts, {tokens} tokens, bf16, {device}; planned at {args.cluster}'s rates:\n")
    print("| model | impl | experts | rows | fwd ms | fwd+bwd ms | TFLOP/s | planned fwd ms | max err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['impl']} | {r['experts']} | {r['rows']} | {r['fwd_ms']:.3f} | "
              f"{r['fwd_bwd_ms']:.3f} | {r['tflops']:.1f} | {r['predicted_fwd_ms']:.3f} | {r['max_error']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "dtype": "bf16", "device": device,
                                         "cluster": args.cluster, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
