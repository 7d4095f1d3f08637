"""Ring attention on the fused kernels with zig-zag chunks (launcher/runtime/context_parallel.py): the token
layout tiles the sequence with equal causal work per rank, and over 2-4 gloo ranks the forward and the
gradients equal the causal attention of the whole sequence in one process."""

import json

import pytest
import torch

from meshplan.launcher.runtime.context_parallel import sequence_positions, zigzag_block
from runtime_helpers import job_env, run_forked_job


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_positions_tile_the_sequence_and_balance_the_causal_work(cp):
    seq = 16 * cp
    held = [sequence_positions(seq, r, cp, "ring") for r in range(cp)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seq))
    # keys each rank's queries attend to under the causal mask, summed over every hop: equal on every rank
    work = []
    for rank, mine in enumerate(held):
        half = len(mine) // 2
        total = 0
        for step in range(cp):
            theirs = held[(rank - step) % cp]
            rows, cols, causal = zigzag_block(step, rank, half)
            q_pos, k_pos = mine[rows], theirs[cols]
            visible = (k_pos[None, :] <= q_pos[:, None])
            if causal:
                total += int(visible.sum())
            else:   # a non-causal hop attends to every key it is given: all of them must be visible
                assert bool(visible.all())
                total += visible.numel()
            # and the keys left out of the hop are all invisible to the rows left out or given
            hidden = torch.ones(len(theirs), dtype=torch.bool)
            hidden[cols] = False
            assert not bool((theirs[hidden][None, :] <= q_pos[:, None]).any())
            skipped = torch.ones(len(mine), dtype=torch.bool)
            skipped[rows] = False
            assert not bool((theirs[None, :] <= mine[skipped][:, None]).any())
        work.append(total)
    assert len(set(work)) == 1
    assert sum(work) == seq * (seq + 1) // 2


def test_ulysses_and_cp1_keep_contiguous_chunks():
    assert torch.equal(sequence_positions(32, 1, 4, "ulysses"), torch.arange(8, 16))
    assert torch.equal(sequence_positions(32, 0, 1, "ring"), torch.arange(32))


RING_CASES = {   # name: (cp, heads, kv_heads, dtype, tolerance)
    "cp2": (2, 4, 4, "float32", 1e-5),
    "cp4-gqa3": (4, 6, 2, "float32", 1e-5),       # 3 query heads per key/value head
    "cp3-odd": (3, 8, 2, "float32", 1e-5),        # an odd ring
    "cp4-bf16": (4, 8, 2, "bfloat16", 3e-2),      # K/V travel in bf16; merged in fp32
}


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case of RING_CASES in one torchrun job of 4 ranks (tests/ring_attention_job.py), each on the first
    cp ranks: per case, each rank's errors against one process."""
    out = tmp_path_factory.mktemp("ring-attention")
    world = max(cp for cp, *_ in RING_CASES.values())
    cases = [f"{name}:{cp}:{heads}:{kv}:{16 * cp}:{dtype}" for name, (cp, heads, kv, dtype, _) in RING_CASES.items()]
    proc = run_forked_job(world, "ring_attention_job.py", [str(out), *cases], out, job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: [json.loads((out / name / f"result{r}.json").read_text()) for r in range(cp)]
            for name, (cp, *_) in RING_CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RING_CASES))
def test_ring_attention_equals_one_process(name, ring_results):
    cp, _, _, dtype, tolerance = RING_CASES[name]
    assert len(ring_results[name]) == cp
    for result in ring_results[name]:
        errors = {k: result[k] for k in ("out", "dq", "dk", "dv")}
        assert max(errors.values()) < tolerance, errors
        assert set(result["dtypes"]) == {f"torch.{dtype}"}


@pytest.mark.slow
def test_check_of_a_long_ring_plan_holds_no_score_tensor():
    """``meshplan check`` of Llama 3.2 1B's shape at seq 131072 over cp 8 (ring), two of its blocks and one
    sequence: every rank holds 16384 tokens; the scores of the heads over them, [1, 32, 16384, 16384] in bf16,
    would be 16 GiB in one tensor (a ring attention materialising them per hop); the largest tensor of the step
    is the vocabulary's fp32 embedding, 1 GiB."""
    import dataclasses

    from meshplan.launcher.check import check_rank
    from meshplan.planner.search import search
    from meshplan.spec import TrainSpec, load_cluster, load_model

    model = dataclasses.replace(load_model("llama3.2-1b"), layers=2)
    plan = search(model, load_cluster("dgx-h100:1"), TrainSpec(1, 131072, "bf16", "adamw"),
                  {"cp": 8, "cp_kind": "ring", "tp": 1, "pp": 1}, top=1).plans[0]
    result = check_rank(plan, 0)
    local = 131072 // 8
    scores = plan.model.heads * local * local * 2
    embedding = plan.model.vocab * plan.model.hidden * 4
    assert result.measured["largest_tensor"] == pytest.approx(embedding, rel=0.01), result.measured
    assert result.measured["largest_tensor"] < scores / 8
