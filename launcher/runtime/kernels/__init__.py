"""Fused kernels for training, each with the plain-PyTorch reference it is tested against.

Every public function takes ``impl``:

* ``"reference"``: eager PyTorch (``reference.py``), runs anywhere;
* ``"fused"``: the Triton kernel (``fused_functions.py`` around ``triton_kernels.py``); needs ``triton`` and
  either the tensors on a CUDA device or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, what CI uses).
  Otherwise a RuntimeError says why. Fake and meta tensors (``meshplan check``) need no Triton.
  Exception: ``linear_cross_entropy(impl="fused")`` is the *chunked* loss (``cross_entropy.py``), whose memory
  saving is plain PyTorch chunking; it runs everywhere and uses the Triton chunk kernels when they can run;
* ``"auto"``: ``fused`` when it can run here, else ``reference``;
* ``"liger"``: liger-kernel's kernel of the same op (``liger.py``; the ``gpu`` extra), on CUDA or under
  ``TRITON_INTERPRET=1``; otherwise a RuntimeError says why. Fake and meta tensors take the fused Functions
  for the norm, SwiGLU and rotary (liger's keep the same tensors for backward) and a shape-only mirror of
  liger's loss (``liger.ShapeOnlyLoss``).

The runtime reads the choice per kernel from ``Plan.kernels`` (``norm``, ``swiglu``, ``rope``, ``loss``);
:func:`kernels_from_plan` binds it. Fused AdamW and flash SDPA are PyTorch's own (see the two ``*_available``
helpers). ``docs/kernels.md`` lists the bytes each implementation keeps for backward, for the planner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from meshplan.launcher.checks import triton_interprets
from meshplan.plan import KERNEL_NAMES

from . import liger
from .cross_entropy import chunked_linear_cross_entropy, default_chunk_tokens
from .reference import (copy_to_group, linear_cross_entropy_reference, rms_norm_reference, rotary_reference,
                        swiglu_reference, _check_rotary)

__all__ = [
    "IMPLS", "rms_norm", "swiglu", "apply_rotary", "linear_cross_entropy", "fused_adamw_available",
    "sdpa_flash_available", "triton_available", "fused_available", "resolve_impl", "kernels_from_plan",
    "KernelSet", "default_chunk_tokens", "chunk_backend",
]

IMPLS = ("fused", "reference", "auto", "liger")


_TRITON_IMPORT: list[str | None] = []   # memo of _triton_import_error, a plain global that dynamo reads as a constant


def _triton_import_error() -> str | None:
    """None when triton imports, else why not. Memoized in a module global, not ``functools.lru_cache``:
    torch.compile ignores a cache wrapper and traces the import itself, which on an H200 broke the graph of
    every compiled block at triton's ``getenv_bool`` (:func:`kernels_from_plan` fills the memo eagerly)."""
    if not _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_IMPORT.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_IMPORT.append(f"{type(exc).__name__}: {exc}")
    return _TRITON_IMPORT[0]


def triton_available() -> bool:
    """``triton`` imports and can run somewhere here: a CUDA device is present or ``TRITON_INTERPRET=1``."""
    return _triton_import_error() is None and (torch.cuda.is_available() or triton_interprets())


def _why_not_fused(device: torch.device | None) -> str | None:
    """None when the Triton kernels can run on tensors of ``device``, else the reason."""
    err = _triton_import_error()
    if err is not None:
        return f"triton is not importable ({err}); `pip install triton` or use impl='reference'/'auto'"
    if triton_interprets():
        return None
    if device is not None and device.type == "cuda":
        return None
    where = "no CUDA device is present" if not torch.cuda.is_available() else f"the tensors are on {device}"
    return f"{where} and TRITON_INTERPRET=1 is not set; use impl='reference'/'auto' or move the tensors to CUDA"


def fused_available(device: torch.device | str | None = None) -> bool:
    """Whether ``impl="fused"`` (the Triton kernels) can run on tensors of ``device`` here."""
    return _why_not_fused(torch.device(device) if device is not None else None) is None


def _shape_only(t: torch.Tensor | None) -> bool:
    """Fake or meta tensors (``meshplan check``): the fused Functions run without launching a kernel."""
    from torch._subclasses.fake_tensor import FakeTensor

    return t is not None and (t.is_meta or isinstance(t, FakeTensor))


def _why_not_liger(device: torch.device | None) -> str | None:
    """None when liger-kernel's kernels can run on tensors of ``device`` here, else the reason."""
    err = liger.import_error()
    if err is not None:
        return f"liger-kernel is not importable ({err}); {liger.INSTALL_HINT}"
    return _why_not_fused(device)


def resolve_impl(impl: str, device: torch.device | None = None, kernel: str = "kernel",
                 tensor: torch.Tensor | None = None) -> str:
    """``fused``, ``reference`` or ``liger`` for ``impl`` in :data:`IMPLS` (raises if fused or liger cannot
    run). A fake/meta ``tensor`` takes the fused path for ``fused``, ``auto`` and ``liger`` alike, with or
    without Triton: only shapes flow, nothing launches (``fused_functions`` imports Triton only to launch a
    kernel on real tensors), and liger's norm, SwiGLU and rotary keep what the fused Functions keep."""
    if impl not in IMPLS:
        raise ValueError(f"{kernel}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference"
    if _shape_only(tensor):
        return "fused"
    if impl == "liger":
        why = _why_not_liger(device)
        if why is not None:
            raise RuntimeError(f"{kernel}(impl='liger') cannot run: {why}")
        return "liger"
    why = _why_not_fused(device)
    if why is None:
        return "fused"
    if impl == "auto":
        return "reference"
    raise RuntimeError(f"{kernel}(impl='fused') cannot run: {why}")


# --- the kernels ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "reference") -> torch.Tensor:
    """RMSNorm over the last dim, ``x * rsqrt(mean(x^2) + eps) * weight``, in fp32, returned in ``x.dtype``.
    A DTensor ``x`` (sequence parallel: rows sharded, the weight replicated) is normed on its local shard
    (:func:`_rms_norm_on_shards`)."""
    if _is_dtensor(x):
        return _rms_norm_on_shards(x, weight, eps, impl)
    chosen = resolve_impl(impl, x.device, "rms_norm", x)
    if chosen == "reference":
        return rms_norm_reference(x, weight, eps)
    if chosen == "liger":
        return liger.rms_norm(x, weight, eps)
    from .fused_functions import RMSNormFunction
    return RMSNormFunction.apply(x, weight, eps)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _rms_norm_on_shards(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
    """RMSNorm of a DTensor whose rows are sharded (``Shard`` on a dimension other than the last, as sequence
    parallelism leaves the residual stream) or replicated, on a one-dimensional mesh: the kernel runs on the
    local shard, each rank's weight gradient covers its rows only and is summed over the mesh's group (where
    the rows are sharded), and the output is a DTensor placed like ``x``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = x.device_mesh, x.placements
    if mesh.ndim != 1 or not (isinstance(placements[0], Replicate) or
                              (isinstance(placements[0], Shard) and placements[0].dim % x.ndim != x.ndim - 1)):
        raise ValueError(f"rms_norm: a DTensor input must be row-sharded or replicated on a 1-D mesh, got "
                         f"{placements} on a {mesh.ndim}-D mesh")
    if isinstance(placements[0], Shard) and not _is_dtensor(weight):
        raise ValueError("rms_norm: a row-sharded DTensor input needs a replicated DTensor weight (its gradient "
                         "is summed over the mesh); distribute the weight with Replicate()")
    w = weight.to_local() if _is_dtensor(weight) else weight
    if isinstance(placements[0], Shard):
        w = copy_to_group(w, mesh.get_group())      # each rank's rows give part of the weight's gradient
    y = rms_norm(x.to_local(), w, eps, impl)
    return DTensor.from_local(y, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "reference") -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU's gate·up product). The fused kernel computes in fp32 and rounds once."""
    chosen = resolve_impl(impl, gate.device, "swiglu", gate)
    if chosen == "reference":
        return swiglu_reference(gate, up)
    if chosen == "liger":
        return liger.swiglu(gate, up)
    from .fused_functions import SwiGLUFunction
    return SwiGLUFunction.apply(gate, up)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 impl: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on q [batch, seq, heads, head_dim] and k [batch, seq, kv_heads, head_dim].

    Convention: rotate-half ("GPT-NeoX", also Hugging Face Llama): dimension ``i`` is paired with ``i + d/2``;
    ``cos``/``sin`` are ``[seq, head_dim//2]`` with ``cos[s, i] = cos(s * base^(-2i/d))``, and
    ``out = cat(x1*cos - x2*sin, x2*cos + x1*sin)`` for ``x1, x2 = x[..., :d/2], x[..., d/2:]``.

    ``reference`` returns new tensors. ``fused`` rotates q and k *in place* and returns them (autograd-correct
    through ``mark_dirty``); it copies first only when it must (a leaf that requires grad, or a last dim that is
    not contiguous). ``liger`` also rotates in place the storage it is given (liger's Function does not mark
    it dirty), so it gets the same copies. Always use the returned tensors.
    """
    _check_rotary(q, k, cos, sin)
    chosen = resolve_impl(impl, q.device, "apply_rotary", q)
    if chosen == "reference":
        return rotary_reference(q, k, cos, sin)

    def writable(x: torch.Tensor) -> torch.Tensor:
        if (x.is_leaf and x.requires_grad) or x.stride(-1) != 1 or _view_autograd_forbids_inplace(x):
            return x.clone(memory_format=torch.contiguous_format)
        return x

    if chosen == "liger":
        return liger.apply_rotary(writable(q), writable(k), cos, sin)
    from .fused_functions import RotaryFunction

    return RotaryFunction.apply(writable(q), cos, sin), RotaryFunction.apply(writable(k), cos, sin)


def _view_autograd_forbids_inplace(x: torch.Tensor) -> bool:
    """A view autograd will not let a custom Function modify in place: one made from a custom Function's
    output (e.g. the local tensor of a DTensor, under tensor parallelism) or in no-grad/inference mode
    (found by ``meshplan check`` on a TP plan with the fused rotary)."""
    if not (x.requires_grad and x._is_view()):
        return False
    from torch._C._autograd import CreationMeta, _get_creation_meta

    return _get_creation_meta(x) != CreationMeta.DEFAULT


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, impl: str = "reference",
                         process_group=None, chunk_tokens: int | None = None, ignore_index: int = -100,
                         reduce_hidden_grad: bool = True) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` over tokens whose target is not ``ignore_index``.

    hidden: ``[tokens, h]`` (leading dims are flattened); weight: ``[vocab_local, h]``, this rank's vocabulary
    shard when ``process_group`` is given (group rank r holds rows ``[r*vocab_local, (r+1)*vocab_local)``);
    targets: ``[tokens]`` *global* vocabulary ids. Returns an fp32 scalar, equal on every rank of the group.

    ``reference`` materializes the ``[tokens, vocab_local]`` logits (max / sum-exp / target logit all-reduced
    over the group). ``fused`` is chunked over ``chunk_tokens`` tokens (default :func:`default_chunk_tokens`)
    and computes both gradients in the forward, so the full logits never exist; it runs everywhere (the
    chunking is PyTorch) and uses the Triton chunk kernels when ``fused_available``. ``auto`` is ``fused``.
    ``liger`` is liger-kernel's fused linear cross-entropy, for a whole head only (no ``process_group``).

    With a group and ``reduce_hidden_grad`` (default) the hidden gradient is all-reduced over the group, so it
    is the full (unsharded) gradient on every rank; pass False when the caller's collective already sums it.
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, targets, process_group, ignore_index,
                                              reduce_hidden_grad)
    if impl == "liger":
        if process_group is not None:
            raise ValueError("linear_cross_entropy(impl='liger'): liger's loss has no vocabulary-parallel form; "
                             "use impl='fused' for a vocabulary-sharded head")
        shape_only = _shape_only(hidden)
        if not shape_only:
            resolve_impl(impl, hidden.device, "linear_cross_entropy", hidden)
        return liger.linear_cross_entropy(hidden, weight, targets, ignore_index, shape_only)
    return chunked_linear_cross_entropy(hidden, weight, targets, process_group, chunk_tokens, ignore_index,
                                        reduce_hidden_grad, chunk_backend(hidden))


def chunk_backend(hidden: torch.Tensor) -> str:
    """The chunked loss's chunk math for ``hidden``: ``triton`` where the kernels run, else ``torch``; fake/meta
    tensors (``meshplan check``) take the PyTorch chunk math, which allocates what the Triton path does."""
    return "triton" if fused_available(hidden.device) and not _shape_only(hidden) else "torch"


# --- PyTorch's own fused kernels -----------------------------------------------------------------------------

def fused_adamw_available() -> bool:
    """True when ``torch.optim.AdamW(..., fused=True)`` should be used: CUDA only (by contract)."""
    return torch.cuda.is_available()


def sdpa_flash_available() -> bool:
    """True when SDPA can pick its flash-attention backend: CUDA, an sm80+ device, and the backend enabled."""
    if not torch.cuda.is_available():
        return False
    if not torch.backends.cuda.flash_sdp_enabled():
        return False
    checker = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if checker is not None and not checker():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


# --- binding the plan's choices ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelSet:
    """The four kernels with the implementation the plan chose bound in (``Plan.kernels``)."""

    impls: Mapping[str, str]
    norm: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    rope: Callable[..., Any]
    loss: Callable[..., torch.Tensor]


def kernels_from_plan(kernels: Mapping[str, str] | None) -> KernelSet:
    """Bind ``{"norm"|"swiglu"|"rope"|"loss": one of IMPLS}`` (missing names: reference)."""
    chosen = {name: "reference" for name in KERNEL_NAMES}
    for name, impl in (kernels or {}).items():
        if name not in chosen:
            raise ValueError(f"kernels.{name}: unknown kernel; known: {', '.join(chosen)}")
        if impl not in IMPLS:
            raise ValueError(f"kernels.{name}: impl must be one of {IMPLS}, got {impl!r}")
        chosen[name] = impl
    _triton_import_error()   # fill the memos here, eagerly, before any compiled block asks
    if "liger" in chosen.values():
        liger.import_error()
    return KernelSet(
        impls=dict(chosen),
        norm=functools.partial(rms_norm, impl=chosen["norm"]),
        swiglu=functools.partial(swiglu, impl=chosen["swiglu"]),
        rope=functools.partial(apply_rotary, impl=chosen["rope"]),
        loss=functools.partial(linear_cross_entropy, impl=chosen["loss"]),
    )
