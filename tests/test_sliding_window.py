"""An attention window (``ModelSpec.sliding_window``) read from a Hugging Face config is kept, and a sequence
longer than it is refused in one line by ``plan`` and by ``launch``: meshplan computes full causal attention,
which equals the window's only up to the window's length."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.errors import InputError
from meshplan.launcher.checks import check_supported
from meshplan.spec import ModelSpec, from_hf_config
from runtime_helpers import make_plan, TINY_LLAMA

# Mistral 7B v0.1's config.json, narrowed (the fields meshplan reads)
MISTRAL = {"model_type": "mistral", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False}


def _read(config: dict) -> ModelSpec:
    return from_hf_config(config, Path("m/config.json"))


def test_the_window_is_read_where_the_family_applies_it():
    assert _read(MISTRAL).sliding_window == 4096
    assert _read({**MISTRAL, "sliding_window": None}).sliding_window == 0       # Mistral v0.2 and later
    qwen = {**MISTRAL, "model_type": "qwen2"}
    assert _read(qwen).sliding_window == 0                                      # use_sliding_window unset
    assert _read({**qwen, "use_sliding_window": True}).sliding_window == 4096
    assert _read({**MISTRAL, "model_type": "llama"}).sliding_window == 0        # Llama has no window


def test_model_files_keep_a_window_and_omit_none():
    windowed = _read(MISTRAL)
    assert windowed.to_dict()["sliding_window"] == 4096
    assert ModelSpec.from_dict(windowed.to_dict()) == windowed
    assert "sliding_window" not in TINY_LLAMA.to_dict()
    with pytest.raises(InputError, match="sliding_window"):
        dataclasses.replace(TINY_LLAMA, sliding_window=-1)


def test_plan_refuses_a_sequence_longer_than_the_window(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(MISTRAL))
    plan = lambda seq: CliRunner().invoke(app, ["plan", "--model", str(model), "--cluster", "dgx-h100:1",  # noqa: E731
                                                "--global-batch", "8", "--seq-len", str(seq)])
    assert plan(4096).exit_code == 0
    refused = plan(8192)
    errors = [line for line in refused.stderr.strip().splitlines() if not line.startswith("assuming ")]
    assert refused.exit_code == 2 and len(errors) == 1, refused.output
    assert errors[0].startswith("error: --seq-len: 8192") and "sliding_window 4096" in errors[0]


def test_launch_refuses_a_plan_longer_than_the_window():
    windowed = dataclasses.replace(TINY_LLAMA, sliding_window=16)
    check_supported(make_plan(model=windowed, seq_len=16))
    with pytest.raises(InputError, match="plan.train.seq_len.*sliding_window 16"):
        check_supported(make_plan(model=windowed, seq_len=32))


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_an_export_keeps_the_window(kind):
    """``--save-hf``'s config.json of a windowed model says its window, as transformers and meshplan read it."""
    transformers = pytest.importorskip("transformers")
    from meshplan.launcher.runtime import hf_format

    spec = _read({**MISTRAL, "model_type": kind, "use_sliding_window": True})
    config = hf_format.hf_config(spec, "float32", 4096)
    assert config["model_type"] == kind and _read(config).sliding_window == 4096
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    loaded = transformers.AutoConfig.for_model(kind, **fields)
    assert loaded.sliding_window == 4096
    assert hf_format.hf_config(_read({**MISTRAL, "sliding_window": None}), "float32", 4096)["model_type"] == "llama"
