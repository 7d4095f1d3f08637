"""Each cost-model term against the numbers of the paper it comes from."""

import math
import random

import pytest

from meshplan.spec import ModelSpec, load_cluster, load_model
from meshplan.planner import comm, evaluate, flops, memory

GPT = ModelSpec(name="korthikanti-gpt", layers=1, hidden=12288, heads=96, vocab=51200, mlp="gelu", norm="layernorm",
                position="learned", bias=True, dropout=0.1)
S, B = 2048, 1


def korthikanti(s, b, h, a, t=1, sp=False, selective=False):
    if selective:
        return 34 * s * b * h / t
    if sp:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_activation_bytes_match_korthikanti_tp(t):
    got = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=False, flash=False, fused_norm=True)
    assert got == pytest.approx(korthikanti(S, B, 12288, 96, t))


@pytest.mark.parametrize("t", [2, 8])
def test_activation_bytes_match_korthikanti_tp_sp(t):
    """The paper's count is Megatron-LM's sequence parallelism, which keeps each linear's input sharded."""
    got = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=True, flash=False, fused_norm=True,
                                            gathered_linear_inputs=False)
    assert got == pytest.approx(korthikanti(S, B, 12288, 96, t, sp=True))


@pytest.mark.parametrize("t", [2, 8])
def test_dtensor_sequence_parallel_keeps_the_gathered_linear_inputs(t):
    """DTensor SP (meshplan's runtime, torchtitan) keeps the all-gathered inputs of the QKV and MLP-in linears:
    2 x 2sbh instead of 2 x 2sbh/t (measured by meshplan check, tests/test_check.py)."""
    megatron = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=True, fused_norm=True,
                                                 gathered_linear_inputs=False)
    dtensor = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=True, fused_norm=True)
    assert dtensor - megatron == pytest.approx(2 * 2 * S * B * 12288 * (1 - 1 / t))


def test_reference_norm_keeps_its_fp32_input_and_its_output():
    fused = memory.activation_bytes_per_layer(GPT, S, B, fused_norm=True)
    reference = memory.activation_bytes_per_layer(GPT, S, B, fused_norm=False)
    assert reference - fused == pytest.approx(2 * 4 * S * B * 12288)     # (4 + 2) - 2 bytes, two norms


def test_full_recompute_keeps_only_the_layer_input():
    assert memory.activation_bytes_per_layer(GPT, S, B, tp=8, sp=True, recompute="full") == pytest.approx(2 * S * B * 12288 / 8)


def test_selective_keeps_less_than_korthikanti_selective_and_flash_drops_the_score_matrix():
    ours = memory.activation_bytes_per_layer(GPT, S, B, tp=8, sp=True, flash=False, recompute="selective")
    assert ours < korthikanti(S, B, 12288, 96, 8, selective=True)
    no_flash = memory.activation_bytes_per_layer(GPT, S, B, tp=8, sp=True, flash=False)
    flash = memory.activation_bytes_per_layer(GPT, S, B, tp=8, sp=True, flash=True)
    assert no_flash - flash == pytest.approx(5 * 96 * S * S * B / 8 - 4 * 96 * S * B / 8)


def test_zero_stages_reproduce_the_zero_paper():
    paper = memory.StateBytes(param=2, grad=2, optimizer=12, compute_copy=0)
    got = [sum(memory.model_state_bytes(7.5e9, z, 64, paper).values()) / 1e9 for z in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.06)


def test_megatron_flops_formula_reproduces_the_published_iteration_time():
    # Megatron-Core 1.7B: 192 x 4096 tokens at 408.8 TFLOP/s on 48 GPUs -> 0.45 s (public-runs.yaml)
    m = ModelSpec(name="1.7b", layers=24, hidden=2048, heads=16, vocab=131072, mlp="gelu", norm="layernorm", bias=True)
    total = flops.model_flops_per_iteration(m, 4096, 192, causal_halving=False)
    assert total / (408.8e12 * 48) == pytest.approx(0.45, abs=0.005)
    assert flops.model_flops_per_iteration(m, 4096, 192) < total   # causal halving counts less


def test_parameter_counts_of_known_models():
    assert flops.total_params(load_model("llama3-8b"), 8192) / 1e9 == pytest.approx(8.03, abs=0.01)
    assert flops.total_params(load_model("llama3-70b"), 8192) / 1e9 == pytest.approx(70.6, abs=0.1)
    assert flops.total_params(load_model("llama3-405b"), 8192) / 1e9 == pytest.approx(405.9, abs=0.5)
    assert flops.total_params(load_model("gpt2"), 1024) / 1e6 == pytest.approx(124.4, abs=0.1)


def test_pipeline_in_flight_microbatches():
    assert memory.microbatches_in_flight("1f1b", 8, 0, 32) == 8
    assert memory.microbatches_in_flight("1f1b", 8, 7, 32) == 1
    assert memory.microbatches_in_flight("gpipe", 8, 3, 32) == 32
    # Korthikanti et al. 2022 sec 4.2.3: interleaved first rank holds p + (p - 1)/v
    assert memory.microbatches_in_flight("interleaved", 8, 0, 32, 4) == pytest.approx(8 + 7 / 4)


def test_interleaved_order_matches_in_flight_formula_and_torch_counts():
    for pp, m, v in ((4, 8, 2), (8, 8, 2), (16, 64, 4), (4, 4, 3)):
        for rank in range(pp):
            ops = memory.interleaved_1f1b_order(pp, rank, m, v)
            assert sum(k == "F" for k, _ in ops) == sum(k == "B" for k, _ in ops) == m * v
            assert all(sum(1 for k, c in ops if k == "B" and c == chunk) == m for chunk in range(v))
            live = held = 0
            for kind, _ in ops:
                live += 1 if kind == "F" else 0
                held = max(held, live)
                live -= 1 if kind == "B" else 0
            assert held == pytest.approx(memory.microbatches_in_flight("interleaved", pp, rank, m, v) * v)


def test_schedule_peak_counts_accumulators_only_while_they_exist():
    # m = p = 2, v = 2 on rank 0: F0 F0 F1 F1 (all in flight), then B1 B1 (chunk 1's accumulators, reduced at
    # its last backward) before B0 B0 creates chunk 0's: the two chunks' accumulators never coexist.
    ops = memory.interleaved_1f1b_order(2, 0, 2, 2)
    assert ops == [("F", 0), ("F", 0), ("F", 1), ("F", 1), ("B", 1), ("B", 1), ("B", 0), ("B", 0)]
    ops = memory.OpOrder.of(ops)
    peak, live, grads, extra = memory.schedule_peak(ops, [1.0, 1.0], [10.0, 10.0], [1.0, 1.0], [0.0, 0.0], 0.5)
    assert (peak, live, grads, extra) == (4 + 10 + 0.5, 4.0, 10.0, 0.5)
    peak, *_ = memory.schedule_peak(ops, [1.0, 1.0], [10.0, 30.0], [1.0, 1.0], [0.0, 0.0], 0.0)
    assert peak == 4 + 30      # the larger chunk's accumulators at the most micro-batches in flight
    peak, *_ = memory.schedule_peak(ops, [1.0, 1.0], [30.0, 10.0], [1.0, 1.0], [0.0, 0.0], 0.0)
    assert peak == 2 + 1 + 30  # chunk 0's, later: two micro-batches left, chunk 1's shard


def _replayed_peak(ops, activations, accumulators, reduced, at_forward, in_backward):
    """schedule_peak's documented rule as a plain loop over the ops."""
    live = gradients = 0.0
    backwards: dict[int, int] = {}
    per_chunk = sum(kind == "B" for kind, chunk in ops if chunk == 0) or 1
    best = (0.0, 0.0, 0.0, 0.0)
    for kind, chunk in ops:
        if kind == "F":
            live += activations[chunk]
            extra = at_forward[chunk]
        else:
            if chunk not in backwards:
                gradients += accumulators[chunk]
            backwards[chunk] = backwards.get(chunk, 0) + 1
            extra = in_backward
        if live + gradients + extra > best[0]:
            best = (live + gradients + extra, live, gradients, extra)
        if kind == "B":
            live -= activations[chunk]
            if backwards[chunk] == per_chunk:
                gradients += reduced[chunk] - accumulators[chunk]
    return best


@pytest.mark.parametrize("pp,m,v", [(2, 2, 2), (4, 8, 2), (4, 6, 3), (8, 16, 4), (3, 7, 2)])
def test_schedule_peak_equals_the_replayed_loop_bit_for_bit(pp, m, v):
    rng = random.Random(pp * 100 + m * 10 + v)
    for rank in range(pp):
        ops = memory.interleaved_1f1b_order(pp, rank, m, v)
        for _ in range(5):
            args = ([rng.uniform(0, 3) for _ in range(v)], [rng.uniform(0, 40) for _ in range(v)],
                    [rng.uniform(0, 5) for _ in range(v)], [rng.uniform(0, 2) for _ in range(v)], rng.uniform(0, 2))
            assert memory.schedule_peak(memory.interleaved_op_order(pp, rank, m, v), *args) == _replayed_peak(ops, *args)


def test_pipeline_receive_buffers_follow_torch_pipelining():
    # one activation buffer per micro-batch for every stage but the first, one gradient buffer for every
    # stage but the last (measured by meshplan check: 448 on both end ranks of Megatron's 462B, pp16 v4 m64)
    assert memory.pipeline_receive_buffers(16, 0, 64, 4) == memory.pipeline_receive_buffers(16, 15, 64, 4) == 448
    assert memory.pipeline_receive_buffers(4, 0, 8) == 8 and memory.pipeline_receive_buffers(4, 3, 8) == 8
    assert memory.pipeline_receive_buffers(4, 1, 8) == 16
    assert memory.pipeline_receive_buffers(1, 0, 8) == 0


def test_pipeline_receive_buffers_per_transfer_are_one_each_way():
    # Megatron allocates every receive: one activation and one gradient in transit, whatever m and v
    assert memory.pipeline_receive_buffers(16, 0, 64, 4, "per_transfer") == 2
    assert memory.pipeline_receive_buffers(4, 1, 8, 1, "per_transfer") == 2
    assert memory.pipeline_receive_buffers(1, 0, 8, 1, "per_transfer") == 0


def test_gathered_weights_and_unsharded_gradients_follow_fsdp2():
    b = memory.state_bytes("bf16", "adamw")
    # ZeRO 3 gathers the root unit for the loss and two blocks more during the backward
    assert memory.gathered_weight_bytes(100, 3, 10, b, root_params=5, during_backward=False) == 2 * 5
    assert memory.gathered_weight_bytes(100, 3, 10, b, root_params=5) == 2 * (20 + 5)
    assert memory.gathered_weight_bytes(100, 1, 10, b, root_params=5, during_backward=False) == 2 * 100
    assert memory.unsharded_grad_bytes(100, 10, b, accumulates_unsharded=True) == (400, 0)
    assert memory.unsharded_grad_bytes(100, 10, b, accumulates_unsharded=False) == (0, (2 + 4) * 10)
    assert memory.step_peak_phases(3.0, 5.0) == 5.0


def test_collectives_follow_nccl_busbw_factors():
    cluster = load_cluster("dgx-h100:4")
    link = comm.group_link(cluster, 8, 1)
    assert not link.crosses_nodes and link.busbw == 370e9
    size = 1e9
    assert comm.allreduce_time(size, link) == pytest.approx(2 * 7 / 8 * size / 370e9 + 5e-6 * 3)
    assert comm.allgather_time(size, link) == pytest.approx(7 / 8 * size / 370e9 + 5e-6 * 3)


def test_placement_decides_the_link():
    cluster = load_cluster("dgx-h100:16")
    order, degrees = ("pp", "dp", "cp", "tp"), {"pp": 2, "dp": 8, "cp": 1, "tp": 8}
    tp = comm.group_link(cluster, 8, comm.group_stride(order, degrees, "tp"))
    dp = comm.group_link(cluster, 8, comm.group_stride(order, degrees, "dp"))
    assert not tp.crosses_nodes and tp.busbw == 370e9
    assert dp.crosses_nodes and dp.busbw == 47e9          # one member per node: one NIC
    wide = comm.group_link(cluster, 16, 2)                 # 4 members per node drive 4 NICs
    assert wide.crosses_nodes and wide.busbw == 4 * 47e9


def test_logits_memory_matches_the_measured_loss_kernels():
    # benchmarks/bench_loss_memory.py, 8192 tokens x 128256 vocab, h = 1024, fp32 (docs/kernels.md):
    # measured peak 0.765 GiB fused (chunked, 256-token chunks) and 11.742 GiB unfused
    fused = memory.logits_bytes(8192, 128256, "fp32", True, hidden=1024) / 2**30
    unfused = memory.logits_bytes(8192, 128256, "fp32", False, hidden=1024) / 2**30
    assert fused == pytest.approx(0.765, abs=0.001)
    assert unfused == pytest.approx(11.742, abs=0.001)
    assert fused < unfused / 4


# ------------------------------------------------------------------------------------------------
# pipeline schedules: the closed forms against a dependency simulation of the schedules' op order
# ------------------------------------------------------------------------------------------------

def _schedule_ops(schedule, p, m, v, rank):
    """Rank ``rank``'s ops in order, as torch.distributed.pipelining runs them (Megatron-LM's orders):
    GPipe all forwards then all backwards; 1F1B p - rank - 1 warm-up forwards; interleaved
    (v - 1) p + 2 (p - rank - 1) warm-up chunk forwards, chunks visited p micro-batches at a time."""
    if schedule == "gpipe":
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    total = m * v
    warmup = min(total, p - rank - 1 if v == 1 else (v - 1) * p + 2 * (p - rank - 1))

    def fwd(k):
        return ("F", ((k // p) % v) * p + rank, (k // (p * v)) * p + k % p)

    def bwd(k):
        return ("B", (v - 1 - (k // p) % v) * p + rank, (k // (p * v)) * p + k % p)

    ops = [fwd(k) for k in range(warmup)]
    for k in range(warmup, total):
        ops += [fwd(k), bwd(k - warmup)]
    return ops + [bwd(k) for k in range(total - warmup, total)]


def _simulate(schedule, rank_time, m, v, hop):
    """Makespan when a stage's forward waits for the previous stage's forward and its backward for the next
    stage's backward (plus one hop when they are on different ranks), sends are asynchronous, and each rank
    runs its ops in order. Forward takes 1/3 of a rank's time, backward 2/3, split evenly over its chunks."""
    p = len(rank_time)
    stages = p * v
    ops = {r: _schedule_ops(schedule, p, m, v, r) for r in range(p)}
    done, clock, nxt = {}, [0.0] * p, [0] * p
    moved = True
    while moved:
        moved = False
        for r in range(p):
            while nxt[r] < len(ops[r]):
                kind, stage, mb = ops[r][nxt[r]]
                if kind == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                else:
                    deps = [("F", stage, mb)] + ([("B", stage + 1, mb)] if stage < stages - 1 else [])
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] + (hop if d[1] != stage else 0.0) for d in deps])
                clock[r] = start + rank_time[r] / v * (1 / 3 if kind == "F" else 2 / 3)
                done[(kind, stage, mb)] = clock[r]
                nxt[r] += 1
                moved = True
    assert all(nxt[r] == len(ops[r]) for r in range(p)), "schedule deadlocked"
    return max(clock)


SCHEDULES_UNDER_TEST = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)]


@pytest.mark.parametrize("schedule,v", SCHEDULES_UNDER_TEST)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_pipeline_makespan_matches_the_schedule_simulation(schedule, v, p, rounds):
    m = p * rounds
    assert evaluate.pipeline_makespan(schedule, [1.0] * p, m, v) == pytest.approx(_simulate(schedule, [1.0] * p, m, v, 0))


def test_interleaving_halves_the_fill_drain_when_microbatches_equal_stages():
    # torchtitan's default (as many micro-batches as pipeline ranks), p = 8: (2p - 1) T against (p + (p - 1)/2) T
    one_f_one_b = evaluate.pipeline_makespan("1f1b", [1.0] * 8, 8, 1)
    interleaved = evaluate.pipeline_makespan("interleaved", [1.0] * 8, 8, 2)
    assert one_f_one_b == 15 and interleaved == 11.5
    assert one_f_one_b / interleaved == pytest.approx(1.304, abs=1e-3)
    # with 32 micro-batches the same two schedules are only 10% apart
    assert (evaluate.pipeline_makespan("1f1b", [1.0] * 8, 32, 1)
            / evaluate.pipeline_makespan("interleaved", [1.0] * 8, 32, 2)) == pytest.approx(39 / 35.5)


@pytest.mark.parametrize("schedule,v", SCHEDULES_UNDER_TEST)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("rounds", [1, 4])
@pytest.mark.parametrize("hop", [0.02, 0.1])
def test_pipeline_p2p_on_the_critical_path_matches_the_schedule_simulation(schedule, v, p, rounds, hop):
    m, times = p * rounds, [1.0] * p
    predicted = (evaluate.pipeline_makespan(schedule, times, m, v)
                 + evaluate.pipeline_p2p_exposed(schedule, times, m, v, hop))
    simulated = _simulate(schedule, times, m, v, hop)
    assert predicted == pytest.approx(simulated, rel=1e-9 if schedule == "gpipe" else 0.035)


def test_pipeline_p2p_is_hidden_in_the_interleaved_steady_state_but_not_in_1f1b():
    times, hop, p, m = [1.0] * 8, 0.01, 8, 64
    one_f_one_b = evaluate.pipeline_p2p_exposed("1f1b", times, m, 1, hop)
    assert one_f_one_b == pytest.approx(2 * (p - 1) * hop + (m - 1) * 2 * hop * (p - 1) / p)
    # interleaved: only the fill and drain cross the p*v - 1 boundaries; the extra warm-up hides the rest
    assert evaluate.pipeline_p2p_exposed("interleaved", times, m, 2, hop) == pytest.approx(2 * (2 * p - 1) * hop)
    assert evaluate.pipeline_p2p_exposed("gpipe", times, m, 1, hop) == pytest.approx(2 * (p - 1) * hop)
    assert evaluate.pipeline_p2p_exposed("1f1b", [1.0], m, 1, hop) == 0.0


def test_a_pipeline_stage_reduces_its_gradients_after_the_schedule():
    """meshplan's runtime (torch.distributed.pipelining) reduces a stage's data-parallel gradients in one
    REDUCE_GRAD after its last backward: only the pipeline's drain can hide it, and rank 0, finishing last,
    has none. Megatron's overlapped reduction (the public runs) hides it under the last backward instead.
    Without a pipeline both are the same."""
    import dataclasses

    from meshplan.engines import MESHPLAN
    from meshplan.spec import TrainSpec

    model, cluster, train = load_model("llama3-8b"), load_cluster("dgx-h100:2"), TrainSpec(64, 4096, "bf16")
    overlapped = dataclasses.replace(MESHPLAN, pipeline_grad_sync="overlapped")   # that behaviour alone
    ours, megatron = evaluate.Context(model, cluster, train), evaluate.Context(model, cluster, train, overlapped)
    assert ours.pipeline_grad_sync == "after_schedule"
    for zero in (0, 1, 3):
        piped = evaluate.Config(dp=2, tp=4, pp=2, cp=1, micro_batch=1, schedule="1f1b", zero=zero)
        a, b = evaluate.evaluate(piped, ours), evaluate.evaluate(piped, megatron)
        assert a.time_breakdown["dp_comm"] > b.time_breakdown["dp_comm"] * 1.3, zero
        assert a.iteration_s - b.iteration_s == pytest.approx(
            a.time_breakdown["dp_comm"] - b.time_breakdown["dp_comm"], rel=1e-9)
        flat = evaluate.Config(dp=4, tp=4, pp=1, cp=1, micro_batch=1, zero=zero)
        assert evaluate.evaluate(flat, ours).iteration_s == evaluate.evaluate(flat, megatron).iteration_s
