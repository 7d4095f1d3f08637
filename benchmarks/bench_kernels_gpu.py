"""Benchmark each fused kernel against eager PyTorch, ``torch.compile`` of the same reference and liger-kernel,
on one GPU.

    python benchmarks/bench_kernels_gpu.py                 # on a CUDA machine (H100 in the issue); prints Markdown
    python benchmarks/bench_kernels_gpu.py --shapes llama3-70b   # Llama 3 70B's widths
    python benchmarks/bench_kernels_gpu.py --json out.json # also write the rows as JSON
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py --smoke   # CPU: tiny shapes, checks the script runs;
                                                                        # its timings mean nothing

For each kernel and each of ``eager`` (the reference), ``compile`` (``torch.compile`` of the reference),
``fused`` (meshplan's Triton kernel) and ``liger`` (liger-kernel's RMSNorm, SiLU-mul, RoPE and fused linear
cross-entropy where ``liger_kernel`` imports, called as a plan's ``kernels: {op: liger}`` calls them, through
``launcher/runtime/kernels/liger.py``) it measures the median time of the forward and of forward + backward, the peak
memory above the inputs (``torch.cuda.max_memory_allocated``), and for the memory-bound kernels (RMSNorm, SwiGLU,
rotary) the achieved bandwidth: the minimum bytes the op must move (read inputs once, write outputs once, see
``min_bytes``) over the time, next to the device's copy bandwidth measured here (a large device-to-device
``copy_``: 2 * bytes / time). For the linear + cross-entropy (matmul-bound) it reports TFLOP/s (6*T*h*V per
forward + backward) instead. Shapes: Llama 3 8B (default) or 70B widths, one 8192-token sequence, bf16.

The last column is each implementation's largest difference from eager over the outputs and input gradients
(relative to eager's largest magnitude), so a kernel that compiles but computes the wrong thing shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from meshplan.launcher.runtime.kernels import apply_rotary, linear_cross_entropy, rms_norm, swiglu
from meshplan.launcher.runtime.kernels.reference import (linear_cross_entropy_reference, rms_norm_reference,
                                                         rotary_reference, swiglu_reference)
from meshplan.profiler.phases.kernels import max_error


def timed(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, warmup: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, warmup, reps)


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# (hidden, ffn, heads, kv heads, head dim, vocabulary) of the Llama 3 models (Meta's model cards / params.json)
SHAPES = {"llama3-8b": (4096, 14336, 32, 8, 128, 128256), "llama3-70b": (8192, 28672, 64, 8, 128, 128256)}


def liger_imports() -> bool:
    """Whether liger-kernel imports here (it is the ``gpu`` extra; the GPU suite carries its wheel)."""
    from meshplan.launcher.runtime.kernels import liger

    return liger.import_error() is None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim, args.vocab = SHAPES[args.shapes]

    if args.smoke:
        args.tokens, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim, args.vocab = 16, 32, 48, 4, 2, 8, 100
        args.warmup, args.reps, args.dtype = 1, 2, "float32"
        args.no_compile = True
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernels_gpu: no CUDA device here (use --smoke to check the script on CPU)")
        device = "cuda"
    dtype = getattr(torch, args.dtype)
    b = torch.empty((), dtype=dtype).element_size()
    t, h, f, nh, nkv, hd, v = (args.tokens, args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim,
                               args.vocab)
    seq = t                                   # one sequence of T tokens: q is [1, T, heads, head_dim]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, grad=True):
        x = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    x, w_norm = rand(t, h), rand(h, scale=0.1).detach().add_(1).requires_grad_()
    gate, up = rand(t, f), rand(t, f)
    q_in, k_in = rand(1, seq, nh, hd), rand(1, seq, nkv, hd)
    inv = 10000.0 ** (-torch.arange(hd // 2, dtype=torch.float32) / (hd // 2))
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    hidden, w_head = rand(t, h), rand(v, h, scale=h ** -0.5)
    targets = torch.randint(0, v, (t,), generator=gen).to(device)

    liger = device == "cuda" and liger_imports()
    compiled = {} if args.no_compile else {
        "norm": torch.compile(rms_norm_reference), "swiglu": torch.compile(swiglu_reference),
        "rope": torch.compile(rotary_reference), "loss": torch.compile(linear_cross_entropy_reference)}

    def variants(kernel: str) -> dict[str, Callable[[], object]]:
        if kernel == "norm":
            out = {"eager": lambda: rms_norm(x, w_norm, impl="reference"),
                   "fused": lambda: rms_norm(x, w_norm, impl="fused")}
            if compiled:
                out["compile"] = lambda: compiled["norm"](x, w_norm)
        elif kernel == "swiglu":
            out = {"eager": lambda: swiglu(gate, up, impl="reference"),
                   "fused": lambda: swiglu(gate, up, impl="fused")}
            if compiled:
                out["compile"] = lambda: compiled["swiglu"](gate, up)
        elif kernel == "rope":   # q*1, k*1: fresh activations each call, as after the qkv projection
            out = {"eager": lambda: apply_rotary(q_in * 1, k_in * 1, cos, sin, impl="reference"),
                   "fused": lambda: apply_rotary(q_in * 1, k_in * 1, cos, sin, impl="fused")}
            if compiled:
                out["compile"] = lambda: compiled["rope"](q_in * 1, k_in * 1, cos, sin)
        else:
            out = {"eager": lambda: linear_cross_entropy(hidden, w_head, targets, impl="reference"),
                   "fused": lambda: linear_cross_entropy(hidden, w_head, targets, impl="fused")}
            if compiled:
                out["compile"] = lambda: compiled["loss"](hidden, w_head, targets)
        if liger:   # through the runtime's adapters (kernels/liger.py), so the table checks what a plan runs
            out["liger"] = {
                "norm": lambda: rms_norm(x, w_norm, impl="liger"),
                "swiglu": lambda: swiglu(gate, up, impl="liger"),
                "rope": lambda: apply_rotary(q_in * 1, k_in * 1, cos, sin, impl="liger"),
                "loss": lambda: linear_cross_entropy(hidden, w_head, targets, impl="liger"),
            }[kernel]
        return out

    inputs = {"norm": (x, w_norm), "swiglu": (gate, up), "rope": (q_in, k_in), "loss": (hidden, w_head)}
    # minimum bytes moved (forward, backward): read each input once, write each output once
    min_bytes = {
        "norm": (2 * t * h * b, 3 * t * h * b),                       # fwd: x -> y; bwd: x, dy -> dx (+ dw partials)
        "swiglu": (3 * t * f * b, 5 * t * f * b),                     # fwd: g, u -> o; bwd: g, u, do -> dg, du
        "rope": (2 * t * (nh + nkv) * hd * b, 2 * t * (nh + nkv) * hd * b),  # read + write q, k (and dq, dk)
        "loss": (None, None),
    }
    loss_flops = 6 * t * h * v

    bw = copy_bandwidth(device, 1 << 30 if device == "cuda" else 1 << 22, args.warmup, args.reps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke: timings meaningless)"
    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; T={t} h={h} ffn={f} heads={nh}/{nkv}x{hd} "
          f"V={v}; measured copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| kernel | impl | fwd (ms) | fwd+bwd (ms) | fwd+bwd speedup vs eager | achieved (GB/s or TFLOP/s) | "
          "% of copy bw | peak mem above inputs (MiB) | max err vs eager (out, grads) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for kernel in ("norm", "swiglu", "rope", "loss"):
        eager_total = None
        order = ("eager", "compile", "fused", "liger")
        for impl, fn in sorted(variants(kernel).items(), key=lambda kv: order.index(kv[0])):
            def fwd_bwd(fn=fn, kernel=kernel):
                out = fn()
                outs = out if isinstance(out, tuple) else (out,)
                grads = [torch.ones_like(o) for o in outs]
                torch.autograd.backward(outs, grads)
                for inp in inputs[kernel]:
                    inp.grad = None

            with torch.no_grad():
                fwd_s = timed(fn, device, args.warmup, args.reps)
            total_s = timed(fwd_bwd, device, args.warmup, args.reps)
            eager_total = total_s if impl == "eager" else eager_total
            peak = peak_bytes(fwd_bwd, device)
            error = max_error(fn, variants(kernel)["eager"], inputs[kernel])
            fwd_b, bwd_b = min_bytes[kernel]
            if fwd_b is not None:
                achieved = (fwd_b + bwd_b) / total_s
                achieved_txt, pct = f"{achieved / 1e9:.0f} GB/s", f"{100 * achieved / bw:.0f}%"
            else:
                achieved = loss_flops / total_s
                achieved_txt, pct = f"{achieved / 1e12:.1f} TFLOP/s", "-"
            row = {"kernel": kernel, "impl": impl, "fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": total_s * 1e3,
                   "speedup_vs_eager": eager_total / total_s, "achieved": achieved,
                   "copy_bandwidth": bw, "peak_bytes": peak, "max_error": error}
            rows.append(row)
            peak_txt = f"{peak / 2 ** 20:.0f}" if peak is not None else "-"
            print(f"| {kernel} | {impl} | {fwd_s * 1e3:.3f} | {total_s * 1e3:.3f} | {eager_total / total_s:.2f}x | "
                  f"{achieved_txt} | {pct} | {peak_txt} | {error:.2e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "dtype": args.dtype, "shapes": args.shapes, "tokens": t,
                       "copy_bandwidth": bw, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
