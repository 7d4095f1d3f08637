"""Models whose heads are not ``hidden / heads`` wide and whose q/k heads are normed (Qwen3): the spec reads
them from a config.json, counts their parameters as the published model cards and ``transformers`` do, and
the planner's time, memory and exports follow the query width ``heads * head_dim``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meshplan import flops
from meshplan.errors import InputError
from meshplan.planner import compute, memory
from meshplan.spec import MODEL_PRESETS, ModelSpec, from_hf_config

# Qwen/Qwen3-0.6B and Qwen/Qwen3-30B-A3B config.json (the fields meshplan reads).
QWEN3_0_6B = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
              "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 1000000.0,
                 "rms_norm_eps": 1e-6, "hidden_act": "silu", "num_experts": 128, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "router_aux_loss_coef": 0.001}

# The Qwen3 model cards: "Number of Parameters" and "Number of Parameters (Non-Embedding)", in billions,
# rounded to the digits shown; Qwen3-30B-A3B's card also gives 3.3B activated.
PUBLISHED = {"qwen3-0.6b": (0.6, 0.44), "qwen3-8b": (8.2, 6.95), "qwen3-32b": (32.8, 31.2),
             "qwen3-30b-a3b": (30.5, 29.9)}


def test_a_qwen3_config_keeps_its_head_dim_and_qk_norms():
    m = from_hf_config(QWEN3_0_6B, Path("Qwen3-0.6B/config.json"))
    assert (m.head_dim, m.q_width, m.kv_width, m.qk_norm) == (128, 2048, 1024, True)
    assert dataclasses.replace(m, name="qwen3-0.6b") == MODEL_PRESETS["qwen3-0.6b"]
    moe = from_hf_config(QWEN3_30B_A3B, Path("Qwen3-30B-A3B/config.json"))
    assert dataclasses.replace(moe, name="qwen3-30b-a3b") == MODEL_PRESETS["qwen3-30b-a3b"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_qwen3_presets_have_the_published_parameter_counts(name):
    m = MODEL_PRESETS[name]
    total, non_embedding = PUBLISHED[name]
    embedding = m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
    shown = lambda published: len(str(published).split(".")[1])      # noqa: E731  (the card's decimals)
    assert round(flops.total_params(m, 4096) / 1e9, shown(total)) == total
    assert round((flops.total_params(m, 4096) - embedding) / 1e9, shown(non_embedding)) == non_embedding
    if m.moe is not None:
        assert abs(flops.active_params(m, 4096) / 1e9 - 3.3) < 0.1     # 3.35 by count, "3.3B" on the card


@pytest.mark.parametrize("config", [QWEN3_0_6B, QWEN3_30B_A3B], ids=["qwen3", "qwen3_moe"])
def test_parameter_count_equals_transformers(config):
    """The count of every parameter, q/k norms and ``head_dim``-wide projections included, equals the one of
    ``transformers``' own model built (without memory) from the same config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kind = transformers.Qwen3Config if config["model_type"] == "qwen3" else transformers.Qwen3MoeConfig
    model_class = transformers.Qwen3ForCausalLM if config["model_type"] == "qwen3" else \
        transformers.Qwen3MoeForCausalLM
    fields = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        reference = model_class(kind(**fields))
    counted = sum(p.numel() for p in reference.parameters())    # a tied head is one parameter
    assert flops.total_params(from_hf_config(config, Path("m/config.json")), 4096) == counted


def test_model_flops_follow_megatron_with_kv_channels():
    """megatron/training/training.py num_floating_point_operations with ``--kv-channels``: the query
    projection size q = heads * kv_channels enters as 12 l h^2 ((1 + g/a + s/h) q/h + 3/2 f/h + V/(2 l h))."""
    m, s = MODEL_PRESETS["qwen3-32b"], 4096
    l, h, a, g, f, v = m.layers, m.hidden, m.heads, m.kv_heads, m.ffn_hidden, m.vocab
    q_ratio = m.heads * m.head_dim / h
    megatron = 12 * l * h * h * ((1 + g / a + s / h) * q_ratio + 1.5 * f / h + v / (2 * l * h))
    assert flops.model_flops_per_token(m, s, causal_halving=False) == pytest.approx(megatron, rel=1e-12)


def test_the_query_width_sets_the_gemms_attention_and_activations():
    """A model whose q is twice hidden: its QKV and output-projection GEMMs, its attention FLOPs and the
    q/k/v/attention-output bytes it keeps grow with q, its residual-stream tensors do not."""
    base = ModelSpec(name="narrow", layers=2, hidden=1024, heads=16, kv_heads=8, vocab=1000)
    wide = dataclasses.replace(base, name="wide", head_dim=128)
    tokens, tp = 4096, 2
    qkv_base, out_base = compute.layer_matmul_shapes(base, tokens, tp)[:2]
    qkv_wide, out_wide = compute.layer_matmul_shapes(wide, tokens, tp)[:2]
    assert qkv_wide[2] == 2 * qkv_base[2] and out_wide[1] == 2 * out_base[1]
    assert compute.layer_matmul_shapes(wide, tokens, tp)[2:] == compute.layer_matmul_shapes(base, tokens, tp)[2:]
    assert flops.attention_core_flops_per_token(wide, 4096) == 2 * flops.attention_core_flops_per_token(base, 4096)
    kept = {m.name: memory.activation_bytes_per_layer(m, 4096, 1, tp=tp, sp=True) for m in (base, wide)}
    sbh = 4096 * 1024 * 2
    # q, k, v (k, v half of q) and the attention output double: (1 + 2 * 0.5 + 1) sbh / tp more
    assert kept["wide"] - kept["narrow"] == pytest.approx(3 * sbh / tp)
    assert memory.activation_bytes_per_layer(wide, 4096, 1, tp=tp, recompute="full", sp=True) == \
        memory.activation_bytes_per_layer(base, 4096, 1, tp=tp, recompute="full", sp=True)


def test_qk_norms_are_priced_and_replicated_over_tensor_parallel_ranks():
    from meshplan.planner.block import layer_params_per_rank

    plain = MODEL_PRESETS["qwen3-8b"]
    normed, unnormed = plain, dataclasses.replace(plain, qk_norm=False)
    assert flops.params_per_layer(normed) - flops.params_per_layer(unnormed) == 2 * plain.head_dim
    for tp in (1, 4, 8):     # the q and k norm weights are whole on every tensor-parallel rank
        assert layer_params_per_rank(normed, tp) - layer_params_per_rank(unnormed, tp) == 2 * plain.head_dim
    s, tp = 8192, 4
    q_and_k = s * (plain.q_width + plain.kv_width) / tp
    for fused, per_element in ((True, 2), (False, 4 + 2)):
        extra = (memory.activation_bytes_per_layer(normed, s, 1, tp=tp, sp=True, fused_norm=fused)
                 - memory.activation_bytes_per_layer(unnormed, s, 1, tp=tp, sp=True, fused_norm=fused))
        assert extra == pytest.approx(per_element * q_and_k)
    moved = (compute.elementwise_bytes_per_layer(normed, s, tp, True, True, 2)
             - compute.elementwise_bytes_per_layer(unnormed, s, tp, True, True, 2))
    assert moved == pytest.approx(2 * 2 * q_and_k)          # a fused norm reads and writes q and k once


@pytest.mark.parametrize("fields, field", [
    ({"hidden": 1000, "heads": 16}, "heads"),
    ({"hidden": 1024, "heads": 16, "head_dim": 65}, "head_dim"),
])
def test_bad_head_shapes_are_one_line(fields, field):
    with pytest.raises(InputError, match=field):
        ModelSpec(name="m", layers=2, vocab=100, **fields)


def test_head_dim_round_trips_and_stays_out_of_default_files():
    wide = MODEL_PRESETS["qwen3-0.6b"]
    assert wide.to_dict()["head_dim"] == 128 and ModelSpec.from_dict(wide.to_dict()) == wide
    assert "head_dim" not in MODEL_PRESETS["llama3-8b"].to_dict()
    assert ModelSpec(name="m", layers=1, hidden=1000, heads=8, vocab=10, head_dim=96).q_width == 768


def test_qwen_moe_configs_name_experts_either_way_and_default_to_unnormalised_top_k():
    """The Hub's Qwen3-MoE configs say ``num_experts``, ``transformers`` 5 saves ``num_local_experts``; a config
    without ``norm_topk_prob`` is read as ``transformers`` reads it (False)."""
    hub = from_hf_config(QWEN3_30B_A3B, Path("m/config.json"))
    saved = {k: v for k, v in QWEN3_30B_A3B.items() if k not in ("num_experts", "norm_topk_prob")}
    local = from_hf_config({**saved, "num_local_experts": 128}, Path("m/config.json"))
    assert hub.moe.experts == local.moe.experts == 128
    assert hub.moe.normalize_top_k and not local.moe.normalize_top_k
