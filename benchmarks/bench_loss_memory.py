"""Peak memory of the LM-head loss: unfused (full logits) vs fused (chunked linear + cross-entropy), on CPU.

    python benchmarks/bench_loss_memory.py                       # 8192 tokens x 128256 vocab, hidden 1024, fp32
    python benchmarks/bench_loss_memory.py --tokens 2048 --hidden 512 --dtype bfloat16

Method: one forward + backward of each implementation runs under ``torch.profiler`` with ``profile_memory=True``;
the allocator's ``[memory]`` events (each allocation and free, with its size) are replayed in time order and the
peak of the running sum is the peak of live tensor bytes above what was live before the step
(``meshplan.launcher.runtime.kernels.measure.peak_tracked_bytes``). Inputs (hidden, weight, targets) exist before
the step and are not counted; the gradients ``hidden.grad`` and ``weight.grad`` are, in both implementations.

It also prints what the documented formulas (docs/kernels.md) predict, for the planner's memory model to match:

    reference peak = 12 * T * V                     (backward: fp32 log-probs + fp32 nll grad + fp32 log-softmax grad)
    fused peak     = (T + V) * h * b + chunk * V * c  (stored grad_hidden and grad_weight + one chunk's logits work;
                     c = b + 4 (+4 if b != 4) for the PyTorch chunk math, c = b for the Triton chunk kernels)

with T tokens, V the vocabulary (this rank's shard), h hidden, b the bytes of the hidden/weight dtype.
The unfused fp32 run at the default size needs ~13 GiB of RAM; it is skipped (and said so) if that is not free.
"""

from __future__ import annotations

import argparse
import time

import torch

from meshplan.launcher.runtime.kernels import default_chunk_tokens, fused_available, linear_cross_entropy
from meshplan.launcher.runtime.kernels import cross_entropy as CE
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes

GIB = 1024 ** 3


def predicted_peak(impl: str, tokens: int, vocab: int, hidden: int, b: int, chunk: int, backend: str) -> int:
    if impl == "reference":
        return 12 * tokens * vocab
    per_logit = b if backend == "triton" else b + 4 + (4 if b != 4 else 0)
    return (tokens + vocab) * hidden * b + chunk * vocab * per_logit


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: default_chunk_tokens(T, h, V)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="run the unfused path even if RAM looks short")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    b = torch.empty((), dtype=dtype).element_size()
    t, v, h = args.tokens, args.vocab, args.hidden
    chunk = args.chunk_tokens or default_chunk_tokens(t, h, v)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if fused_available(device) else "torch"
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=gen).to(device)

    print(f"linear + cross-entropy, T={t} tokens, V={v} vocab, h={h}, {args.dtype}, device={device}, "
          f"threads={args.threads}; fused: chunk={chunk} tokens, chunk math={backend}")
    rows, peaks, losses = [], {}, {}
    for impl in ("fused", "reference"):
        pred = predicted_peak(impl, t, v, h, b, chunk, backend)
        avail = mem_available()
        if impl == "reference" and not args.force and avail is not None and avail < pred * 1.15 + 2 * GIB:
            print(f"  skipping reference: it needs ~{pred / GIB:.1f} GiB, {avail / GIB:.1f} GiB available (--force)")
            continue
        hidden.grad = weight.grad = None

        def step():
            if impl == "fused":
                loss = CE.chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, backend=backend)
            else:
                loss = linear_cross_entropy(hidden, weight, targets, impl="reference")
            loss.backward()
            return loss.detach()

        start = time.perf_counter()
        peak, _, loss = peak_tracked_bytes(step)
        seconds = time.perf_counter() - start
        peaks[impl], losses[impl] = peak, float(loss)
        rows.append((impl, peak, pred, seconds, float(loss)))

    print(f"\n| path | measured peak (GiB) | predicted peak (GiB) | error | step (s) | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl, peak, pred, seconds, loss in rows:
        name = "unfused (reference: full logits)" if impl == "reference" else f"fused (chunked, {backend} chunk math)"
        print(f"| {name} | {peak / GIB:.3f} | {pred / GIB:.3f} | {(peak - pred) / pred:+.1%} | {seconds:.1f} | "
              f"{loss:.5f} |")
    if len(peaks) == 2:
        ratio = peaks["fused"] / peaks["reference"]
        saving = peaks["reference"] - peaks["fused"]
        pred_saving = (predicted_peak("reference", t, v, h, b, chunk, backend)
                       - predicted_peak("fused", t, v, h, b, chunk, backend))
        print(f"\nfused / unfused peak: {ratio:.4f} ({'below' if ratio < 0.25 else 'NOT below'} a quarter)")
        print(f"saving: measured {saving / GIB:.3f} GiB, predicted {pred_saving / GIB:.3f} GiB, "
              f"error {(pred_saving - saving) / saving:+.2%} ({'within' if abs(pred_saving - saving) <= 0.1 * saving else 'NOT within'} 10%)")
        print(f"loss difference: {abs(losses['fused'] - losses['reference']):.2e}")


if __name__ == "__main__":
    main()
