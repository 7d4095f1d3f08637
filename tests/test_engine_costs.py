"""The time terms that differ by engine (meshplan/engines.py), each against the formula it implies."""

import dataclasses

import pytest

from meshplan.engines import MEGATRON, MESHPLAN, TORCHTITAN
from meshplan.spec import ClusterSpec, load_cluster, load_model
from meshplan.planner import block, comm, compute
from meshplan.planner.block import BlockCompute
from meshplan.planner.host import host_model

H100 = load_cluster("dgx-h100:4")
LLAMA = load_model("llama3-8b")


def _links(cluster: ClusterSpec, tp: int = 8):
    return comm.group_link(cluster, tp, 1)


def test_megatron_regathers_each_column_parallel_input_in_backward():
    """Keeping the sharded input adds exactly one all-gather per column-parallel input (QKV, MLP-in) to the
    backward, and nothing to the forward."""
    link = _links(H100)
    c = BlockCompute(1e-3, 0.0, 0.0, 0.0, 1.0, 5e-4)
    activation = 64e6
    waits = dataclasses.replace(MEGATRON, tp_backward_async=False)
    keeps_gathered = dataclasses.replace(waits, sp_saved_input="gathered")
    fwd_s, bwd_s = block.tp_comm_time(activation, activation, 8, link, False, 1e-3, c, H100, host_model(H100), waits)
    fwd_g, bwd_g = block.tp_comm_time(activation, activation, 8, link, False, 1e-3, c, H100, host_model(H100),
                                      keeps_gathered)
    assert fwd_s == pytest.approx(fwd_g)
    assert bwd_s - bwd_g == pytest.approx(2 * comm.allgather_time(activation, link))


def test_megatron_backward_collectives_hide_under_the_gemm_they_run_beside():
    """Async backward: the regather shows past the input-gradient GEMM, the reduce-scatter past the
    weight-gradient GEMM; waited for, everything shows."""
    ag, rs, regather = 3.0, 2.0, 6.0
    assert block.tp_backward_time(ag, rs, regather, 5.0, True, 0.0) == pytest.approx(2 * ag + 1.0 + 0.0)
    assert block.tp_backward_time(ag, rs, regather, 1.0, True, 0.0) == pytest.approx(2 * ag + 5.0 + 3.0)
    assert block.tp_backward_time(ag, rs, regather, 5.0, False, 0.0) == pytest.approx(2 * ag + 2 * rs + regather)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_overlap_hides_all_but_one_chunk_up_to_the_gemm(tp):
    """Decomposed collectives: c / tp always shows, the rest only past the window."""
    assert block.decomposed_exposed(8.0, 100.0, tp) == pytest.approx(8.0 / tp)
    assert block.decomposed_exposed(8.0, 1.0, tp) == pytest.approx(8.0 / tp + 8.0 * (tp - 1) / tp - 1.0)
    assert block.decomposed_exposed(0.0, 1.0, tp) == 0.0


def test_overlapped_communication_is_hidden_up_to_the_compute_it_overlaps():
    assert comm.exposed_time(3.0, 5.0) == 0.0
    assert comm.exposed_time(5.0, 3.0) == pytest.approx(2.0)
    assert comm.exposed_time(5.0, 3.0, 1.0) == pytest.approx(5.0)


def test_a_gpu_gemm_takes_the_larger_of_compute_and_memory_time():
    rates = compute.achieved_rates(H100, "bf16")
    for m, k, n in [(8192, 4096, 4096), (16, 8192, 8192), (1 << 20, 64, 64)]:
        flops_s = 2 * m * n * k / rates.matmul
        bytes_s = 2 * (m * k + k * n + m * n) / rates.memory
        assert compute.matmul_time(m, k, n, rates) == pytest.approx(max(flops_s, bytes_s))


def test_a_cpu_gemm_adds_compute_and_memory_time():
    cpu = load_cluster("localhost:4")
    rates = compute.achieved_rates(cpu, "fp32")
    m, k, n = 512, 256, 256
    expected = 2 * m * n * k / rates.matmul + 4 * (m * k + k * n + m * n) / rates.memory
    assert compute.matmul_time(m, k, n, rates) == pytest.approx(expected)


def test_devices_are_rated_by_generation():
    a100, h100, h200 = (load_cluster(f"{p}:1") for p in ("dgx-a100", "dgx-h100", "dgx-h200"))
    assert [compute.device_generation(c.gpu) for c in (a100, h100, h200)] == ["ampere", "hopper", "hopper"]
    # the H200 is the H100's die at the same clocks: the same matmul rate, more memory bandwidth
    assert compute.achieved_rates(h200, "bf16").matmul == compute.achieved_rates(h100, "bf16").matmul
    assert compute.achieved_rates(h200, "bf16").memory > compute.achieved_rates(h100, "bf16").memory
    # FlashAttention-2 reaches 35% of an H100, cuDNN's Hopper kernels more; on Ampere both run FA2's kernels
    assert (compute.achieved_rates(h100, "bf16", "flash2").attention
            < compute.achieved_rates(h100, "bf16", "cudnn").attention)
    assert (compute.achieved_rates(a100, "bf16", "flash2").attention
            == compute.achieved_rates(a100, "bf16", "cudnn").attention)
    assert compute.achieved_rates(a100, "bf16").matmul / 312e12 == pytest.approx(0.65)


def _selective(engine, tp=1, tp_overlap=False):
    tokens = 8192.0
    c = block.block_compute(LLAMA, H100, _train(), tp, 1, 1, True, engine.attention_kernel)
    link = _links(H100, tp)
    activation = tokens * LLAMA.hidden * 2
    costs = block.recompute_seconds(LLAMA, H100, _train(), tokens, tp, c, activation, link, tp_overlap, 1.0,
                                    engine, c.attn_fwd)
    return costs["selective"], c, link, activation


def _train():
    from meshplan.spec import TrainSpec
    return TrainSpec(64, 8192, "bf16", "adamw")


def test_megatron_selective_recompute_reruns_only_the_attention_core():
    selective, c, _, _ = _selective(MEGATRON)
    assert selective == pytest.approx(c.attn_fwd)


def test_torchtitan_op_policy_recomputes_the_unsaved_matmuls_elementwise_and_gathers():
    """Every other mm saved (wq, wv, w1, w2 kept; wk, wo, w3 recomputed), the elementwise ops re-run, and
    under sequence parallel the two all-gathers (not on the save list) run again."""
    plain, c, _, _ = _selective(TORCHTITAN)
    rates = compute.achieved_rates(H100, "bf16")
    matmuls = sum(compute.matmul_time(m, k, n, rates) for m, k, n in
                  compute.selective_recompute_shapes(LLAMA, 8192.0, 1))
    assert plain == pytest.approx(matmuls + c.ew_fwd)
    sp, c8, link, activation = _selective(TORCHTITAN, tp=8)
    matmuls8 = sum(compute.matmul_time(m, k, n, rates) for m, k, n in
                   compute.selective_recompute_shapes(LLAMA, 8192.0, 8))
    assert sp == pytest.approx(matmuls8 + c8.ew_fwd + 2 * comm.allgather_time(activation, link))
    overlapped, *_ = _selective(TORCHTITAN, tp=8, tp_overlap=True)
    gathers = 2 * comm.allgather_time(activation, link)
    assert overlapped == pytest.approx(matmuls8 + c8.ew_fwd + block.decomposed_exposed(gathers, matmuls8, 8))


def test_meshplan_selective_recompute_is_unchanged_by_the_engine_profiles():
    ours, *_ = _selective(MESHPLAN, tp=8)
    titan, *_ = _selective(TORCHTITAN, tp=8)
    assert ours == pytest.approx(titan)        # the same policy, the runtime's
    overlapped, *_ = _selective(MESHPLAN, tp=8, tp_overlap=True)
    assert overlapped < ours


def test_flash_ring_hides_each_hop_under_its_step():
    link = comm.group_link(H100, 4, 1)
    kv = 8192 * 2 * LLAMA.kv_heads * LLAMA.head_dim * 2
    hop = comm.p2p_time(kv, link)
    fwd, bwd = block.ring_flash_time(LLAMA, 8192, 1, 4, link, 2, 100 * hop, 250 * hop)
    assert fwd == 0.0
    assert bwd == pytest.approx(hop)                       # only the accumulators' hop home shows
    fwd, bwd = block.ring_flash_time(LLAMA, 8192, 1, 4, link, 2, 0.0, 0.0)
    assert fwd == pytest.approx(3 * hop)
    assert bwd == pytest.approx(3 * comm.p2p_time(2 * kv, link) + hop)


def test_every_engine_prices_ring_attention_on_flash_kernels():
    args = (LLAMA, H100, _train(), 1, 4, 1, "ring", False, True, True, ("pp", "dp", "cp", "tp"), 1, 1)
    costs = {e.name: block.layer_cost(*args, engine=e) for e in (MESHPLAN, MEGATRON, TORCHTITAN)}
    assert costs["meshplan"].cp_comm == pytest.approx(costs["torchtitan"].cp_comm)


def test_an_all_to_all_across_nodes_moves_through_each_gpus_own_nic():
    cluster = load_cluster("dgx-h100:4")
    link = comm.group_link(cluster, 16, 2)                  # 4 members per node, 4 nodes
    assert link.crosses_nodes and link.per_node == 4
    s = 1e9
    off = (16 - 4) / 16 * s / (cluster.inter_node.bandwidth_gbps * 1e9)
    on = 3 / 16 * s / (cluster.intra_node.bandwidth_gbps * 1e9)
    expected = max(off, on) + cluster.inter_node.latency_us * 1e-6 * 4
    assert comm.alltoall_time(s, link) == pytest.approx(expected)
    # a ring collective over the same group still spreads over the node's NICs
    assert comm.allgather_time(s, link) < comm.alltoall_time(s, link)


def test_fp8_gathers_move_one_byte_an_element_where_the_engine_casts_first():
    assert block.gather_bytes_ratio(TORCHTITAN, "fp8", 2) == 0.5
    assert block.gather_bytes_ratio(MEGATRON, "fp8", 2) == 0.5
    assert block.gather_bytes_ratio(MESHPLAN, "fp8", 2) == 1.0
    assert block.gather_bytes_ratio(TORCHTITAN, "bf16", 2) == 1.0
