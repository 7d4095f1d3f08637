"""The kernel phase (GPU ranks): each fused op in each implementation the runtime has here, forward + backward
at the model's widths on one rank's tokens, and its largest difference from eager.

Ops and implementations are the runtime's (``launcher/runtime/kernels``): ``norm`` (RMSNorm over
``[tokens, hidden]``), ``swiglu`` (over ``[tokens, ffn_hidden]``), ``rope`` (q and k of one sequence,
``[1, tokens, heads, head_dim]``), ``loss`` (head + cross-entropy over ``[tokens, hidden]`` and the whole
vocabulary); ``fused`` (meshplan's Triton kernels), ``liger`` (liger-kernel's, where it imports) and, in the
full profile, ``compile`` (torch.compile of the reference norm, SwiGLU and rotary). An implementation that
raises is recorded with its error and left out of the choice; one that differs from eager beyond
``planner/kernels.MAX_KERNEL_ERROR`` is recorded and not chosen (planner/kernels.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from meshplan.launcher.runtime import kernels as K
from meshplan.planner.compute import FUSED_PASSES
from meshplan.planner.kernels import KERNEL_OPS
from meshplan.profiler.phases.timing import SAMPLE_S, lower_quartile, time_reps
from meshplan.profiler.progress import Progress
from meshplan.spec import ModelSpec

TIMED_IMPLS = ("fused", "liger")
# torch.compile of the reference, timed in the full profile only (each op's compilation takes seconds) and
# not for the loss (whose reference keeps the whole [tokens, vocab] logits: a memory choice, the planner's)
COMPILED_OPS = tuple(FUSED_PASSES)
ERROR_CHARS = 200     # an implementation's error, as recorded: its first line, cut here


def available_impls(device: torch.device) -> tuple[str, ...]:
    """The implementations that can run on ``device``: both on CUDA where liger-kernel imports, else fused."""
    if not K.fused_available(device):
        return ()
    return TIMED_IMPLS if K.liger.import_error() is None else ("fused",)


def op_inputs(spec: ModelSpec, op: str, tokens: int, device, dtype) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The tensors ``op`` differentiates (requiring grad) and the fixed ones, at one rank's widths (tp 1)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    if op == "norm":
        return (rand(tokens, spec.hidden), rand(spec.hidden, scale=0.1)), {}
    if op == "swiglu":
        return (rand(tokens, spec.ffn_hidden), rand(tokens, spec.ffn_hidden)), {}
    if op == "rope":
        half = spec.head_dim // 2
        angles = torch.arange(tokens, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(half) / half)
        return ((rand(1, tokens, spec.heads, spec.head_dim), rand(1, tokens, spec.kv_heads, spec.head_dim)),
                {"cos": angles.cos().to(device), "sin": angles.sin().to(device)})
    targets = torch.randint(0, spec.vocab, (tokens,), generator=gen).to(device)
    return (rand(tokens, spec.hidden), rand(spec.vocab, spec.hidden, scale=spec.hidden ** -0.5)), {"targets": targets}


def op_call(op: str, impl: str, inputs: tuple[torch.Tensor, ...], fixed: dict) -> Callable[[], Any]:
    """A closure running ``op`` forward in ``impl`` (``compile``: torch.compile of the reference)."""
    if impl == "compile":
        return torch.compile(op_call(op, "reference", inputs, fixed))
    if op == "norm":
        return lambda: K.rms_norm(inputs[0], inputs[1], impl=impl)
    if op == "swiglu":
        return lambda: K.swiglu(*inputs, impl=impl)
    if op == "rope":   # fresh q and k each call, as after the projections (measure_op takes their copy off)
        return lambda: K.apply_rotary(inputs[0] * 1, inputs[1] * 1, fixed["cos"], fixed["sin"], impl=impl)
    return lambda: K.linear_cross_entropy(inputs[0], inputs[1], fixed["targets"], impl=impl)


def forward_backward(fn: Callable[[], Any], inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Outputs and input gradients of ``fn`` (backward of all-ones), the gradients cleared after."""
    for t in inputs:
        t.grad = None
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    got = [o.detach() for o in outs] + [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return got


def max_error(fn: Callable[[], Any], reference: Callable[[], Any], inputs: tuple[torch.Tensor, ...]) -> float:
    """Largest difference from the eager reference over the outputs and the inputs' gradients, each relative to
    the reference's largest magnitude: a kernel that runs but computes the wrong thing shows here."""
    worst = 0.0
    for got, want in zip(forward_backward(fn, inputs), forward_backward(reference, inputs)):
        want = want.float()
        worst = max(worst, ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return worst


def timed(fn: Callable[[], Any], inputs: tuple[torch.Tensor, ...], device, reps: int) -> float:
    """Forward + backward seconds of ``fn``, the lower quartile of ``reps`` samples."""
    return lower_quartile(time_reps(lambda: forward_backward(fn, inputs), device, reps, sample_seconds=SAMPLE_S))


def measure_op(spec: ModelSpec, op: str, impl: str, tokens: int, device, dtype, reps: int) -> dict:
    """One row of the kernel table: ``seconds`` (forward + backward, lower quartile) and ``max_error``, or the
    ``error`` that stopped it. The rotary's fresh q and k (one copy each, and its backward) are timed alone
    and taken off (``setup_seconds``)."""
    row: dict[str, Any] = {"op": op, "impl": impl, "tokens": tokens}
    try:
        inputs, fixed = op_inputs(spec, op, tokens, device, dtype)
        call = op_call(op, impl, inputs, fixed)
        row["max_error"] = max_error(call, op_call(op, "reference", inputs, fixed), inputs)
        seconds = timed(call, inputs, device, reps)
        if op == "rope":
            row["setup_seconds"] = timed(lambda: (inputs[0] * 1, inputs[1] * 1), inputs, device, reps)
            seconds -= row["setup_seconds"]
        if seconds <= 0:
            raise RuntimeError(f"{seconds:.3g} s after the setup: too short to time")
        row["seconds"] = seconds
    except Exception as exc:    # a kernel that does not build or run here is recorded, not chosen
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return {"op": op, "impl": impl, "tokens": tokens, "error": f"{type(exc).__name__}: {first_line}"[:ERROR_CHARS]}
    return row


def kernel_phase(spec: ModelSpec, tokens: int, device, dtype, reps: int, progress: Progress | None = None,
                 compiled: bool = True) -> list[dict]:
    """Every op in every implementation that can run here (none on CPU ranks: Triton runs on GPUs), and with
    ``compiled`` torch.compile of the reference norm, SwiGLU and rotary; the progress bar names each as it is
    timed (the first call of each builds its kernels)."""
    if device.type != "cuda":
        return []
    todo = [(op, impl) for op in KERNEL_OPS for impl in available_impls(device)]
    todo += [(op, "compile") for op in COMPILED_OPS if compiled]
    rows = []
    for done, (op, impl) in enumerate(todo):
        if progress is not None:
            progress.update(done, len(todo), f"kernels {op}/{impl}")
        rows.append(measure_op(spec, op, impl, tokens, device, dtype, reps))
    torch.cuda.empty_cache()
    return rows
