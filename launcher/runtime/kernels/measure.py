"""Two CPU-friendly memory measurements used by the tests and ``benchmarks/bench_loss_memory.py``.

* :func:`peak_tracked_bytes` runs a function under ``torch.profiler`` with ``profile_memory=True`` and replays
  the allocator's ``[memory]`` events (every allocation and free of the CPU or CUDA allocator, with its size) in
  time order: the peak of the running sum is the peak of live tensor bytes *above what was live at the start*.
  This needs no CUDA and counts exactly what the caching-free CPU allocator hands out.
* :func:`saved_tensor_bytes` runs a forward under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the
  storages autograd keeps for backward (each storage once), separating those of given input tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_tracked_bytes(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """Run ``fn()``; return ``(peak, net, result)``: the peak and the end value of live bytes allocated during
    the call minus those freed (both relative to the start), and fn's result."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live, result


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_tensor_bytes(fn: Callable[[], Any], inputs: Iterable[torch.Tensor] = ()) -> dict[str, Any]:
    """Bytes autograd keeps for backward while running ``fn()`` (a forward).

    Returns ``{"total": bytes of all distinct saved storages, "inputs": of which belong to ``inputs``,
    "other": total - inputs, "result": fn's result}``. A storage saved twice (e.g. x by two ops) counts once.
    """
    input_keys = {_storage_key(t) for t in inputs}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = sum(seen.values())
    from_inputs = sum(n for k, n in seen.items() if k in input_keys)
    return {"total": total, "inputs": from_inputs, "other": total - from_inputs, "result": result}
