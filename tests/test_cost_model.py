"""Each cost-model term against the numbers of the paper it comes from."""

import math

import pytest

from meshplan.spec import ModelSpec, load_cluster, load_model
from meshplan.planner import comm, flops, memory

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
    got = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=False, flash=False)
    assert got == pytest.approx(korthikanti(S, B, 12288, 96, t))


@pytest.mark.parametrize("t", [2, 8])
def test_activation_bytes_match_korthikanti_tp_sp(t):
    got = memory.activation_bytes_per_layer(GPT, S, B, tp=t, sp=True, flash=False)
    assert got == pytest.approx(korthikanti(S, B, 12288, 96, t, sp=True))


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
    # measured peak 0.643 GiB fused (chunked) and 11.742 GiB unfused
    fused = memory.logits_bytes(8192, 128256, "fp32", True, hidden=1024) / 2**30
    unfused = memory.logits_bytes(8192, 128256, "fp32", False, hidden=1024) / 2**30
    assert fused == pytest.approx(0.643, abs=0.001)
    assert unfused == pytest.approx(11.742, abs=0.001)
    assert fused < unfused / 4
