"""Done-when 3: the profiler's bytes per layer held for backward match what the runtime's own model holds, within
5%, for none / selective / full recompute.

The profiler measures one per-rank block in isolation (``profiler/phases/compute.py: layer_memory``). The reference here
is the runtime's whole model (``build_model`` + ``parallelize.apply_ac``, as ``train.py`` builds it): the live bytes
a forward of N layers leaves behind minus those of N - 2 layers, halved. Both use the live-bytes net growth of
``kernels/measure.py: peak_tracked_bytes``: ``saved_tensors_hooks`` do not see what a full-recompute checkpoint
keeps (its input), the allocator does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from meshplan.launcher.runtime import parallelize as par
from meshplan.launcher.runtime.kernels.measure import peak_tracked_bytes
from meshplan.launcher.runtime.model import build_model
from meshplan.profiler.worker import layer_memory
from meshplan.spec import MODEL_PRESETS, ModelSpec

SEQ, MICRO_BATCH = 64, 2


def runtime_bytes_per_layer(spec: ModelSpec, mode: str, layers: int = 4) -> float:
    """(net live bytes after a forward of ``layers`` blocks - of ``layers - 2`` blocks) / 2."""
    def net(n: int) -> int:
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(spec, layers=n), SEQ, "cpu")
        par.apply_ac(model, lambda _layer: mode)
        model.set_positions(torch.arange(SEQ))
        model.train()
        tokens = torch.randint(0, spec.vocab, (MICRO_BATCH, SEQ))
        _, grown, out = peak_tracked_bytes(lambda: model(tokens))
        del out
        return grown

    return (net(layers) - net(layers - 2)) / 2


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_profiled_layer_memory_matches_the_runtime(preset, mode):
    spec = MODEL_PRESETS[preset]
    profiled = layer_memory(spec, 1, MICRO_BATCH, SEQ, torch.device("cpu"), torch.float32, mode)["net_bytes"]
    runtime = runtime_bytes_per_layer(spec, mode)
    assert runtime > 0
    assert profiled == pytest.approx(runtime, rel=0.05), f"{preset} {mode}: profiled {profiled} runtime {runtime}"


def test_recompute_modes_order_memory():
    spec = MODEL_PRESETS["tiny-llama"]
    got = {m: layer_memory(spec, 1, MICRO_BATCH, SEQ, torch.device("cpu"), torch.float32, m)["net_bytes"]
           for m in ("none", "selective", "full")}
    assert got["none"] > got["selective"] > got["full"] > 0
    # full recompute keeps the block's input, which the next block's checkpoint holds: one activation
    assert got["full"] == MICRO_BATCH * SEQ * spec.hidden * 4
