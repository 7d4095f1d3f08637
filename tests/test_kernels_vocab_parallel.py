"""Vocabulary-parallel linear + cross-entropy on 4 gloo ranks (CPU) against the unsharded loss.

Each rank holds rows ``[r*V/w, (r+1)*V/w)`` of the LM-head weight and the full (replicated) hidden states and
targets. The loss must equal the unsharded ``F.cross_entropy`` on every rank, the hidden gradient must be the full
one (all-reduced by default; partial sums that add up to it with ``reduce_hidden_grad=False``), and the weight
gradient must be this rank's rows of the full one. Checked for the reference, the chunked loss with the PyTorch
chunk math, and (under ``TRITON_INTERPRET=1``) with the Triton chunk kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _worker(rank: int, world: int, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        # a file store in the test's folder: no port to race the other test worker's jobs for
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
        from meshplan.launcher.runtime.kernels import cross_entropy as CE
        from meshplan.launcher.runtime.kernels import linear_cross_entropy

        tokens, hidden_size, vocab = 29, 12, 4 * 37          # odd token count; V/4 = 37 (odd) rows per rank
        gen = torch.Generator().manual_seed(7)
        hidden_full = torch.randn(tokens, hidden_size, generator=gen)
        weight_full = torch.randn(vocab, hidden_size, generator=gen) * hidden_size ** -0.5
        targets = torch.randint(0, vocab, (tokens,), generator=gen)
        targets[3::6] = -100
        grad_scale = 1.7

        h0 = hidden_full.clone().requires_grad_()
        w0 = weight_full.clone().requires_grad_()
        want = F.cross_entropy(h0 @ w0.t(), targets)
        want_gh, want_gw = torch.autograd.grad(want * grad_scale, (h0, w0))

        v_local = vocab // world
        rows = slice(rank * v_local, (rank + 1) * v_local)
        variants = {
            "reference": lambda h, w, reduce: linear_cross_entropy(
                h, w, targets, impl="reference", process_group=dist.group.WORLD, reduce_hidden_grad=reduce),
            "chunked-torch": lambda h, w, reduce: CE.chunked_linear_cross_entropy(
                h, w, targets, process_group=dist.group.WORLD, chunk_tokens=8, reduce_hidden_grad=reduce,
                backend="torch"),
        }
        if importlib.util.find_spec("triton") is not None:
            variants["chunked-triton"] = lambda h, w, reduce: linear_cross_entropy(
                h, w, targets, impl="fused", process_group=dist.group.WORLD, chunk_tokens=5,
                reduce_hidden_grad=reduce)
        errors = {}
        for name, fn in variants.items():
            for reduce in (True, False):
                h = hidden_full.clone().requires_grad_()
                w = weight_full[rows].clone().requires_grad_()
                loss = fn(h, w, reduce)
                gh, gw = torch.autograd.grad(loss * grad_scale, (h, w))
                if not reduce:                               # partial hidden gradients add up to the full one
                    dist.all_reduce(gh)
                errors[f"{name}/reduce={reduce}"] = {
                    "loss": _rel(loss, want), "grad_hidden": _rel(gh, want_gh), "grad_weight": _rel(gw, want_gw[rows])}
        result["errors"] = errors
        dist.destroy_process_group()
    except Exception:  # reported to the parent through the file, which fails the test with the traceback
        result["traceback"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow   # 4 spawned gloo processes, each importing torch and running the Triton interpreter
def test_vocab_parallel_loss_matches_unsharded(tmp_path):
    world = 4
    mp.spawn(_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "traceback" not in result, result["traceback"]
        expected = {"reference", "chunked-torch"} | ({"chunked-triton"} if HAS_TRITON else set())
        assert {k.split("/")[0] for k in result["errors"]} == expected
        for variant, errs in result["errors"].items():
            for what, err in errs.items():
                assert err < TOL, f"rank {rank} {variant} {what}: relative error {err:.2e}"
