"""GPT-NeoX and Pythia: what their block computes beside GPT-2's -- rotary positions on part of each head
(``rotary_dim``), the attention and the MLP side by side (``parallel_residual``), the erf GELU (``gelu: exact``)
-- read from Hugging Face configs of transformers 4 and 5, checked, planned, measured by ``meshplan check`` and
exported to Megatron-LM; what a config asks for and the model does not compute is refused in one line.
Weights in and out against transformers' GPTNeoXForCausalLM: tests/test_hf_weights.py."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.errors import InputError
from meshplan.export import to_megatron_args
from meshplan.launcher.runtime import hf_format
from meshplan.launcher.runtime.model import apply_rotary, count_parameters, rotary_tables
from meshplan.plan import Plan
from meshplan.planner import memory
from meshplan.spec import MODEL_PRESETS, ModelSpec, from_hf_config
from test_cli_plan import assert_one_line_error
from test_export import flat_plan, megatron_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from neox_block_bytes import measured_block_bytes  # noqa: E402  (the benchmark's one-block measurement)

# Total parameters, embedding and head included: Biderman et al. 2023 (Pythia), table 1 and the model cards;
# Black et al. 2022 (GPT-NeoX-20B), table 1.
PUBLISHED_PARAMETERS = {"pythia-1b": 1_011_781_632, "pythia-6.9b": 6_857_302_016, "gpt-neox-20b": 20_554_567_680}
PYTHIA = MODEL_PRESETS["pythia-1b"]


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_parameter_counts_and_transformers_shapes(name):
    spec = MODEL_PRESETS[name]
    assert count_parameters(spec, 2048) == PUBLISHED_PARAMETERS[name]
    config = transformers.GPTNeoXConfig(**hf_format.hf_config(spec, "float32", 2048))
    with torch.device("meta"):
        model = transformers.GPTNeoXForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert model.gpt_neox.layers[0].attention.rotary_ndims == spec.rotary_width == spec.head_dim // 4
    assert from_hf_config(hf_format.hf_config(spec, "float32", 2048), _path(name)) == dataclasses.replace(spec)


def _path(name: str) -> Path:
    return Path(name) / "config.json"


def test_transformers_4_names_are_read():
    """Pythia's config.json on the Hub (transformers 4): ``rotary_pct``, ``rotary_emb_base``, no rope_parameters."""
    config = {"model_type": "gpt_neox", "hidden_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 16,
              "intermediate_size": 8192, "vocab_size": 50304, "rotary_pct": 0.25, "rotary_emb_base": 10000,
              "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    assert from_hf_config(config, _path("pythia-1b")) == PYTHIA
    other = from_hf_config({**config, "rotary_pct": 0.5, "rotary_emb_base": 500, "use_parallel_residual": False,
                            "hidden_act": "gelu_new"}, _path("x"))
    assert (other.rotary_dim, other.rope_theta, other.parallel_residual, other.gelu) == (128, 500.0, False, "tanh")


@pytest.mark.parametrize("edit,field", [
    (dict(rotary_dim=3), "rotary_dim"), (dict(rotary_dim=512), "rotary_dim"), (dict(gelu="quick"), "gelu"),
    (dict(rotary_dim=8, position="learned", max_seq_len=64), "rotary_dim"), (dict(parallel_residual="sometimes"),
                                                                              "parallel_residual")])
def test_bad_model_fields_name_the_field(edit, field):
    with pytest.raises(InputError) as error:
        ModelSpec.from_dict({**PYTHIA.to_dict(), **edit})
    assert str(error.value.field).endswith(field)


def test_defaults_keep_model_files_as_they_were():
    """A whole-head rotary is spelled 0; the new fields are left out of a model file at their defaults, so the
    plans of every other preset are unchanged; a NeoX model's file reads back equal."""
    assert dataclasses.replace(PYTHIA, rotary_dim=PYTHIA.head_dim).rotary_dim == 0
    for name in ("llama3-8b", "gpt2", "mixtral-8x7b"):
        assert not {"gelu", "rotary_dim", "parallel_residual"} & set(MODEL_PRESETS[name].to_dict())
    assert ModelSpec.from_dict(PYTHIA.to_dict()) == PYTHIA


@pytest.mark.parametrize("head_dim,rotary", [(64, 16), (44, 30), (46, 26)])
def test_rotary_share_turns_back_into_the_rotated_width(head_dim, rotary):
    """transformers' ``int(head_dim * partial_rotary_factor)`` and Megatron-LM's ``int(kv_channels *
    rotary_percent)`` give back the rotated width from the share the exports write (30 / 44 times 44 is
    29.999... in floating point)."""
    spec = ModelSpec(name="x", layers=1, hidden=4 * head_dim, heads=4, vocab=8, rotary_dim=rotary)
    written = hf_format.hf_config(spec, "float32", 64)["rope_parameters"]["partial_rotary_factor"]   # Phi-3's
    exported = megatron_parser().parse_args(to_megatron_args(flat_plan(model=dataclasses.replace(
        spec, layers=32)))).rotary_percent
    assert int(head_dim * spec.rotary_share) == int(head_dim * written) == int(head_dim * exported) == rotary
    assert dataclasses.replace(spec, rotary_dim=0).rotary_share == 1.0


def test_partial_rotary_rotates_the_leading_features_only():
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
    cos, sin = rotary_tables(torch.arange(8), 4)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    assert torch.equal(q_out[..., 4:], q[..., 4:]) and torch.equal(k_out[..., 4:], k[..., 4:])
    whole_q, _ = apply_rotary(q[..., :4], k[..., :4], cos, sin)
    assert torch.equal(q_out[..., :4], whole_q) and not torch.allclose(q_out[..., :4], q[..., :4])


def test_fused_partial_rotary_equals_the_reference(monkeypatch):
    """The Triton rotary (under its interpreter here) on the rotated features, forward and backward."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(2, 8, 4, 16, requires_grad=True)
    k = torch.randn(2, 8, 2, 16, requires_grad=True)
    cos, sin = rotary_tables(torch.arange(8), 4)
    outputs, grads = [], []
    for impl in ("reference", "fused"):
        out = apply_rotary(q * 1, k * 1, cos, sin, impl)
        outputs.append(out)
        grads.append(torch.autograd.grad(sum((o * o).sum() for o in out), (q, k)))
    for a, b in zip(outputs[0] + grads[0], outputs[1] + grads[1]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parallel,tp", [(True, 1), (True, 2), (False, 1)])
def test_check_measures_what_the_planner_keeps_per_block(parallel, tp):
    """One Pythia-1B block at seq 4096 in bf16 (two blocks minus one; benchmarks/neox_block_bytes.py prints
    every recompute mode): the parallel block keeps the block input once for both LayerNorms, one ``s x b x h`` (/ tp under SP) less than the sequential one."""
    spec = dataclasses.replace(PYTHIA, parallel_residual=parallel)
    measured = measured_block_bytes(spec, tp, "none", 4096)
    predicted = memory.activation_bytes_per_layer(spec, 4096, 1, tp=tp, sp=tp > 1, act_bytes=2, fused_norm=True)
    assert abs(predicted - measured) <= 0.01 * measured, (predicted / 2**20, measured / 2**20)
    sequential = memory.activation_bytes_per_layer(dataclasses.replace(spec, parallel_residual=False), 4096, 1,
                                                   tp=tp, sp=tp > 1, act_bytes=2, fused_norm=True)
    assert sequential - predicted == (2 * 4096 * PYTHIA.hidden / tp if parallel else 0)


def test_yarn_is_read_kept_in_plan_files_and_named_where_megatron_cannot_take_it(tmp_path):
    """A YaRN config (DeepSeek's mscale pair): the attention factor transformers derives, a model file that
    reads back equal; the Megatron export keeps plain rotary and says so."""
    path = _config_file(tmp_path, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "mscale": 0.707, "mscale_all_dim": 0.707, "partial_rotary_factor": 0.25})
    config = json.loads(open(path).read())
    spec = from_hf_config(config, _path("yarn"))
    assert spec.rope_scaling.attention_factor == 1.0 and spec.rope_scaling.factor == 40.0
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    plain = from_hf_config({**config, "rope_parameters": {**config["rope_parameters"], "mscale": None}},
                           _path("yarn"))
    assert plain.rope_scaling.attention_factor == pytest.approx(0.1 * math.log(40.0) + 1.0)
    warnings: list[str] = []
    args = to_megatron_args(flat_plan(model=dataclasses.replace(spec, layers=32)), warnings)
    assert "--use-rope-scaling" not in args and any("YaRN" in w for w in warnings), warnings


def test_megatron_export_says_what_megatron_computes():
    """--rotary-percent for the rotated share; Megatron-Core's bias-GELU fusion is the tanh form, so the erf
    GELU turns it off; parallel residual has no Megatron-Core option and is named in a warning."""
    warnings: list[str] = []
    pythia = dataclasses.replace(PYTHIA, layers=32)
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(model=pythia), warnings))
    assert ns.rotary_percent == 0.25 and ns.no_bias_gelu_fusion and not ns.swiglu
    assert ns.normalization == "LayerNorm" and not ns.disable_bias_linear
    assert any("parallel_residual" in w for w in warnings), warnings
    gpt2 = dataclasses.replace(MODEL_PRESETS["gpt2"], layers=32)
    warnings = []
    ns = megatron_parser().parse_args(to_megatron_args(flat_plan(model=gpt2), warnings))
    assert not ns.no_bias_gelu_fusion and ns.rotary_percent is None
    assert not any("gelu" in w.lower() or "parallel_residual" in w for w in warnings), warnings


def _config_file(tmp_path, **changes):
    config = {**hf_format.hf_config(dataclasses.replace(PYTHIA, layers=4), "float32", 2048), **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("changes,words", [
    (dict(attention_bias=False), ["attention_bias", "MLP projections"]),
    (dict(hidden_act="relu"), ["hidden_act", "'relu'"]),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "partial_rotary_factor": 0.25}),
     ["rope_scaling", "'dynamic'", "remove rope_scaling"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.25}),
     ["rope_scaling.original_max_position_embeddings", "missing"]),
])
def test_plan_refuses_what_the_model_does_not_compute(tmp_path, changes, words):
    result = CliRunner().invoke(app, ["plan", "--model", _config_file(tmp_path, **changes), "--cluster",
                                      "dgx-h100:1", "--global-batch", "8", "--seq-len", "2048"])
    assert_one_line_error(result, 2, *words)


def test_plan_of_a_neox_model_directory_and_preset(tmp_path):
    """``--model`` takes a Hugging Face model directory (its config.json); one without is refused in one line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["plan", "--model", str(empty), "--cluster", "dgx-h100:1"])
    assert_one_line_error(result, 2, "--model", "directory without a config.json")
    _config_file(tmp_path)
    for model in (str(tmp_path), "pythia-6.9b"):
        out = tmp_path / "plan.yaml"
        result = CliRunner().invoke(app, ["plan", "--model", model, "--cluster", "dgx-h100:1", "--global-batch",
                                          "64", "--seq-len", "2048", "--top", "1", "--out", str(out)])
        assert result.exit_code == 0, result.output
        planned = Plan.load(out).model
        assert planned.parallel_residual and planned.gelu == "exact" and planned.rotary_width == planned.head_dim // 4
