"""The dtype of the vocabulary-parallel head passes (``launcher/runtime/vocab_parallel.py``): a 16-bit GPU plan
runs them in bf16, as its stages compute and as the planner prices them; the shards and their gradient
accumulators stay fp32. Before, every pass of such a plan ran its chunk GEMMs in fp32 (the shards' dtype; the
helper thread that serves them has no autocast). One process, a one-rank gloo group: the pass's arithmetic, not
its communication (tests/test_runtime_vocab_parallel.py runs whole jobs)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from meshplan.launcher.runtime import train as rt
from meshplan.launcher.runtime import vocab_parallel as vp
from runtime_helpers import make_plan


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _pass(plan, group, compute_dtype, hidden, targets, head):
    shard = SimpleNamespace(tok_embeddings=SimpleNamespace(weight=head), rows=lambda: (0, head.shape[0]),
                            head_local=lambda: head)
    groups = SimpleNamespace(group=group)
    runner = vp.VocabParallel(plan, groups, shard, {"pp": 1, "tp": 0}, compute_dtype)
    runner._grads = [torch.zeros(head.shape, dtype=torch.float32)]
    loss, grad_hidden = runner._head_pass(hidden.to(runner.compute_dtype), targets)
    return runner, loss, grad_hidden, runner._grads[-1]


def test_a_sixteen_bit_gpu_plan_runs_its_head_passes_in_bf16(one_rank_group):
    plan = make_plan(pp=2, vocab_parallel=True)
    gen = torch.Generator().manual_seed(3)
    tokens, vocab = plan.micro_batch * plan.train.seq_len, plan.model.vocab
    hidden = torch.randn(tokens, plan.model.hidden, generator=gen)
    head = torch.randn(vocab, plan.model.hidden, generator=gen) * plan.model.hidden ** -0.5
    targets = torch.randint(0, vocab, (tokens,), generator=gen)

    full, loss32, gh32, gw32 = _pass(plan, one_rank_group, None, hidden, targets, head)
    half, loss16, gh16, gw16 = _pass(plan, one_rank_group, torch.bfloat16, hidden, targets, head)
    assert full.compute_dtype == torch.float32 and half.compute_dtype == torch.bfloat16
    assert gh32.dtype == torch.float32 and gh16.dtype == torch.bfloat16   # reduced back in the compute dtype
    assert gw16.dtype == torch.float32                                    # the accumulator stays fp32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()        # noqa: E731
    assert 0 < rel(gh16, gh32) < 3e-2 and 0 < rel(gw16, gw32) < 3e-2     # bf16 rounding, not equality

    # which plans get it: 16-bit on CUDA only; CPU jobs and fp32 plans keep the shards' dtype
    bf16 = dataclasses.replace(plan, train=dataclasses.replace(plan.train, precision="bf16"))
    shard = SimpleNamespace(groups=SimpleNamespace(group=one_rank_group))
    meshes = SimpleNamespace(coords={"pp": 0, "tp": 0})
    picked = {(p.train.precision, device): rt.make_vocab_parallel(p, meshes, [(rt.VOCAB_PART, shard)],
                                                                   device)._compute_dtype
              for p in (plan, bf16) for device in ("cpu", "cuda")}
    assert picked == {("fp32", "cpu"): None, ("fp32", "cuda"): None, ("bf16", "cpu"): None,
                      ("bf16", "cuda"): torch.bfloat16}
