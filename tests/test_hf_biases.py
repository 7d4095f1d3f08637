"""The biases a Hugging Face config switches on are the biases meshplan plans, exports and loads: Llama's
``attention_bias`` with ``mlp_bias`` is ``bias``; Qwen2-MoE's ``qkv_bias`` switches its q/k/v biases; biases
on some projections and not the others are refused in one line (by ``plan`` and ``--init-from``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshplan import flops
from meshplan.cli import app
from meshplan.errors import InputError
from meshplan.export import to_megatron_args
from meshplan.export_torchtitan import shape_words
from meshplan.launcher.runtime import hf_format
from meshplan.plan import Plan
from meshplan.spec import ModelSpec, from_hf_config

# a small Llama config.json (the fields meshplan reads)
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000, "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 64}
QWEN2_MOE = {**LLAMA, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256}


def _read(config: dict) -> ModelSpec:
    return from_hf_config(config, Path("m/config.json"))


def test_llama_attention_and_mlp_biases_are_biases_on_every_projection():
    biased = _read({**LLAMA, "attention_bias": True, "mlp_bias": True})
    plain = _read(LLAMA)
    assert biased.bias and not plain.bias and not biased.qkv_bias
    h, f, layers = 256, 688, 2
    q_k_v_o = 256 + 2 * 128 + 256           # q width 256, k and v 4 heads of 32
    assert flops.total_params(biased, 64) - flops.total_params(plain, 64) == layers * (q_k_v_o + 2 * f + h)


def test_the_bias_count_equals_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = {**LLAMA, "attention_bias": True, "mlp_bias": True}
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in config.items() if k != "model_type"}))
    assert flops.total_params(_read(config), 64) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("config,field", [
    ({**LLAMA, "attention_bias": True}, "attention_bias"),
    ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
    ({**QWEN3, "attention_bias": True}, "attention_bias"),           # Qwen3 has no MLP biases
    ({**QWEN2_MOE, "model_type": "qwen3_moe", "attention_bias": True}, "attention_bias"),
], ids=["llama-attention", "llama-mlp", "qwen3", "qwen3-moe"])
def test_biases_on_some_projections_only_are_refused_by_name(config, field):
    with pytest.raises(InputError, match=f"{field}.*projections only.*bias: true") as err:
        _read(config)
    assert "\n" not in str(err.value)


def test_fields_a_family_does_not_read_change_nothing():
    """transformers builds Mistral and Qwen2 with fixed biases whatever the config says."""
    assert not _read({**LLAMA, "model_type": "mistral", "attention_bias": True}).bias
    qwen2 = _read({**LLAMA, "model_type": "qwen2", "attention_bias": True, "mlp_bias": True})
    assert qwen2.qkv_bias and not qwen2.bias


def test_qwen2_moe_reads_its_qkv_bias_switch():
    assert _read(QWEN2_MOE).qkv_bias                             # transformers' default: on
    assert not _read({**QWEN2_MOE, "qkv_bias": False}).qkv_bias


def test_exports_carry_the_biases():
    biased = _read({**LLAMA, "attention_bias": True, "mlp_bias": True})
    config = hf_format.hf_config(biased, "float32", 64)
    assert config["model_type"] == "llama" and config["attention_bias"] and config["mlp_bias"]
    assert "biases on every projection" in shape_words(biased)
    assert "q/k/v biases" in shape_words(_read({**LLAMA, "model_type": "qwen2"}))
    unbiased_moe = _read({**QWEN2_MOE, "qkv_bias": False})
    assert hf_format.hf_config(unbiased_moe, "float32", 64)["qkv_bias"] is False


def _plan(model: Path, *args: str):
    return CliRunner().invoke(app, ["plan", "--model", str(model), "--cluster", "dgx-h100:1", "--global-batch", "8",
                                    "--seq-len", "512", *args])


def test_megatron_export_keeps_the_linear_biases(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps({**LLAMA, "attention_bias": True, "mlp_bias": True}))
    result = _plan(model, "--out", str(tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    args = to_megatron_args(Plan.load(tmp_path / "plan.yaml"))
    assert "--disable-bias-linear" not in args and "--add-qkv-bias" not in args


def test_plan_refuses_a_partial_bias_config_in_one_line(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps({**LLAMA, "attention_bias": True}))
    result = _plan(model)
    errors = [line for line in result.stderr.strip().splitlines() if not line.startswith("assuming ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert errors[0].startswith(f"error: --model {model}: attention_bias") and "Traceback" not in result.output
