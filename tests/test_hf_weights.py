"""Hugging Face weights in (``--init-from``) and out (``--save-hf``, ``meshplan export-hf``).

Tiny models are made by ``transformers`` here (random weights, ``save_pretrained``): Llama, Qwen2, Qwen3 (per-head
q/k norms, heads x head_dim wider than hidden), GPT-2, GPT-NeoX (partial rotary, parallel residual, erf GELU; and
the other choice of each), Phi-3 (fused q/k/v and gate/up projections), YaRN rotary scaling, and the mixtures of
experts Mixtral, Qwen2-MoE (with a dense block and a gated shared expert) and Qwen3-MoE (a dense block, top-k not
renormalised). One process: the loaded
model's logits equal ``transformers``' for every family; an export of a DCP checkpoint loads with
``from_pretrained`` and gives the same logits; every bad input is one line before a rank starts. One torchrun
job (slow): for each layout the first step's loss after ``--init-from`` equals ``transformers``' loss on the
same batch, and after 3 steps the ``--save-hf`` checkpoint's logits equal those of meshplan's final weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from meshplan.launcher.runtime import hf_format
from meshplan.launcher.runtime.hf_weights import HFReader, export_hf, load_hf_weights, load_dcp_model
from meshplan.launcher.runtime.model import build_model, repeat_heads
from meshplan.spec import MODEL_PRESETS, load_model
from runtime_helpers import _layout_job, make_plan, read_metrics

SEQ = 32
TOLERANCE = 1e-5
LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
# Qwen3: 4 heads of 32 over 2 key/value heads, so q is 128 wide on a hidden of 64
QWEN3 = dict(head_dim=32)
NEOX = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=SEQ)
# GPT-NeoX's other choices: the MLP reading the attention's sum, half of each head rotated, the tanh GELU, tied
NEOX_SEQUENTIAL = dict(use_parallel_residual=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                     "partial_rotary_factor": 0.5},
                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
# YaRN over a context 4 x the 8 positions "first trained" (the test sequences are 32 long); DeepSeek's mscale pair
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8}
YARN_MSCALE_ROPE = {**YARN_ROPE, "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16, "partial_rotary_factor": 0.5}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _save(model, directory: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **kwargs)
    return directory


def _random_biases(model):
    """``model`` with nonzero biases (where it has any), so that reading them is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def _random_head_norms(model):
    """``model`` with q/k norm weights other than ones (and each other), so that reading them is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def make_hf(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random ``transformers`` model of family ``kind`` saved in ``directory``."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=256, n_positions=SEQ,
                                         **overrides)
        return _save(transformers.GPT2LMHeadModel(config), directory)
    if kind == "gpt_neox":     # transformers' defaults: parallel residual, a quarter of each head rotated, erf GELU
        config = transformers.GPTNeoXConfig(**{**NEOX, **overrides})
        return _save(_random_biases(transformers.GPTNeoXForCausalLM(config)), directory, max_shard_size="40KB")
    if kind == "phi3":         # q, k, v in one qkv_proj, gate and up in one gate_up_proj; half of each head rotated
        config = transformers.Phi3Config(**{**LLAMA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                                            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5}, **overrides})
        return _save(transformers.Phi3ForCausalLM(config), directory, max_shard_size="40KB")
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**LLAMA, **overrides}))
        return _save(_random_biases(model), directory)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**{**LLAMA, "intermediate_size": 64, "num_local_experts": 4,
                                               "num_experts_per_tok": 2, **overrides})
        return _save(transformers.MixtralForCausalLM(config), directory, max_shard_size="40KB")
    if kind == "qwen2_moe":     # block 1 dense, the others 4 experts and a gated shared expert
        config = transformers.Qwen2MoeConfig(**{**LLAMA, "moe_intermediate_size": 64, "num_experts": 4,
                                                "num_experts_per_tok": 2, "shared_expert_intermediate_size": 96,
                                                "mlp_only_layers": [1], **overrides})
        return _save(_random_biases(transformers.Qwen2MoeForCausalLM(config)), directory)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**LLAMA, **QWEN3, **overrides}))
        return _save(_random_head_norms(model), directory, max_shard_size="40KB")
    if kind == "qwen3_moe":     # block 2 dense, the others 4 experts, top-k weights as the softmax gives them
        config = transformers.Qwen3MoeConfig(**{**LLAMA, **QWEN3, "moe_intermediate_size": 64, "num_experts": 4,
                                                "num_experts_per_tok": 2, "norm_topk_prob": False,
                                                "mlp_only_layers": [2], **overrides})
        return _save(_random_head_norms(transformers.Qwen3MoeForCausalLM(config)), directory)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
    return _save(_random_biases(model), directory, max_shard_size="40KB")


def hf_model(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()


def meshplan_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.set_positions(torch.arange(tokens.shape[1]))
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama-tied": make_hf("llama", root / "llama-tied", tie_word_embeddings=True),
        "llama3-rope": make_hf("llama", root / "llama3-rope", rope_parameters=LLAMA3_ROPE),
        "llama-biases": make_hf("llama", root / "llama-biases", attention_bias=True, mlp_bias=True),
        "qwen2": make_hf("qwen2", root / "qwen2"),
        "gpt2": make_hf("gpt2", root / "gpt2"),
        "gpt2-erf-gelu": make_hf("gpt2", root / "gpt2-erf-gelu", activation_function="gelu"),
        "neox": make_hf("gpt_neox", root / "neox"),
        "neox-sequential": make_hf("gpt_neox", root / "neox-sequential", **NEOX_SEQUENTIAL),
        "qwen2-yarn": make_hf("qwen2", root / "qwen2-yarn", rope_parameters=YARN_ROPE),
        "phi3": make_hf("phi3", root / "phi3"),
        "neox-yarn": make_hf("gpt_neox", root / "neox-yarn", rope_parameters=YARN_MSCALE_ROPE),
        "mixtral": make_hf("mixtral", root / "mixtral"),
        "qwen2-moe": make_hf("qwen2_moe", root / "qwen2-moe"),
        "qwen3": make_hf("qwen3", root / "qwen3"),
        "qwen3-moe": make_hf("qwen3_moe", root / "qwen3-moe"),
    }


# ----------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt", "qwen2.5-7b", "llama3-8b", "gpt2", "tiny-moe",
                                  "qwen2-moe-a2.7b", "qwen3-0.6b", "qwen3-30b-a3b"])
def test_parameter_shapes_match_the_model(name):
    spec = MODEL_PRESETS[name]
    model = build_model(spec, 64, "meta")
    assert hf_format.parameter_shapes(spec) == {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["llama-tied", "llama3-rope", "llama-biases", "qwen2", "gpt2", "gpt2-erf-gelu",
                                  "neox", "neox-sequential", "qwen2-yarn", "neox-yarn", "phi3", "mixtral",
                                  "qwen2-moe", "qwen3", "qwen3-moe"])
def test_loaded_weights_give_transformers_logits(checkpoints, name):
    directory = checkpoints[name]
    spec = load_model(str(directory / "config.json"))
    assert hf_format.check_checkpoint(directory, spec)
    model = build_model(spec, SEQ, "meta")
    model.to_empty(device="cpu")
    load_hf_weights(model, HFReader(directory, spec))
    tokens = torch.randint(0, spec.vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    expected = hf_model(directory)(tokens).logits.detach()
    assert (meshplan_logits(model, tokens) - expected).abs().max() <= TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("name", ["llama3-rope", "qwen2-yarn", "neox-yarn"])
def test_rope_scaling_changes_the_logits(checkpoints, name):
    """The scaled frequencies are in use: the same weights with plain rotary give logits further from the
    scaled ones than the tolerance the comparisons with transformers allow."""
    spec = load_model(str(checkpoints[name] / "config.json"))
    assert spec.rope_scaling is not None
    import dataclasses
    plain = dataclasses.replace(spec, rope_scaling=None)
    tokens = torch.randint(0, spec.vocab, (1, SEQ), generator=torch.Generator().manual_seed(2))
    logits = []
    for s in (spec, plain):
        model = build_model(s, SEQ, "meta")
        model.to_empty(device="cpu")
        load_hf_weights(model, HFReader(checkpoints[name], s))
        logits.append(meshplan_logits(model, tokens))
    assert (logits[0] - logits[1]).abs().max() > 10 * TOLERANCE * logits[0].abs().max()


def _dcp_of(model, directory: Path, kv_copies: int = 1, ep: int = 1) -> Path:
    """A DCP checkpoint of ``model`` as a run writes one (``model.<name>``), key/value heads repeated
    ``kv_copies`` times as a tp > kv_heads run holds them, stacked experts in ``ep`` pieces named as an
    expert-parallel run's ranks save theirs (``<name>@ep<r>of<ep>``)."""
    import torch.distributed.checkpoint as dcp

    state = {}
    for name, value in model.state_dict().items():
        if kv_copies > 1 and name.rsplit(".", 2)[-2] in ("wk", "wv"):
            value = repeat_heads(value, kv_copies, model.spec.head_dim)
        if ep > 1 and ".experts.w" in name:
            state.update({f"{name}@ep{r}of{ep}": piece.clone() for r, piece in enumerate(value.chunk(ep))})
            continue
        state[name] = value.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(directory), no_dist=True)
    return directory


@pytest.mark.parametrize("name,kv_copies,ep", [("llama-tied", 2, 1), ("llama-biases", 2, 1), ("qwen2", 1, 1),
                                               ("gpt2", 1, 1), ("gpt2-erf-gelu", 1, 1), ("neox", 1, 1),
                                               ("neox-sequential", 1, 1), ("qwen2-yarn", 1, 1), ("neox-yarn", 1, 1),
                                               ("phi3", 2, 1),
                                               ("mixtral", 1, 2), ("qwen2-moe", 1, 1),
                                               ("qwen3", 2, 1), ("qwen3-moe", 1, 2)])
def test_export_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path, name, kv_copies, ep):
    spec = load_model(str(checkpoints[name] / "config.json"))
    model = build_model(spec, SEQ, "meta")
    model.to_empty(device="cpu")
    load_hf_weights(model, HFReader(checkpoints[name], spec))
    with torch.no_grad():                      # weights no checkpoint holds: the export is not a copy
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = export_hf(_dcp_of(model, tmp_path / "dcp", kv_copies, ep), spec, tmp_path / "out", max_positions=SEQ,
                    max_shard_bytes=64 * 1024)
    index = json.loads((out / hf_format.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1           # sharded, with an index
    assert not list(tmp_path.glob("*.partial"))
    tokens = torch.randint(0, spec.vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    expected = meshplan_logits(model, tokens)
    assert (hf_model(out)(tokens).logits.detach() - expected).abs().max() <= TOLERANCE * expected.abs().max()


# ----------------------------------------------------------------------------------------------
# bad input: one line, before any rank starts
# ----------------------------------------------------------------------------------------------

def _refused(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _launch_refused(args: list, *needles):
    """``meshplan launch ARGS`` in this process (every refusal comes before torchrun): one line, exit 2."""
    from typer.testing import CliRunner

    from meshplan.cli import app

    result = CliRunner().invoke(app, ["launch", *map(str, args)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _plan_for(directory: Path, tmp_path: Path, **edits) -> Path:
    import dataclasses
    spec = dataclasses.replace(load_model(str(directory / "config.json")), **edits)
    path = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}.yaml"
    make_plan(model=spec, dp=2).save(path)
    return path


def _edit_config(source: Path, target: Path, **changes) -> Path:
    import shutil
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_bad_checkpoints_are_refused_in_one_line(checkpoints, tmp_path):
    llama = checkpoints["llama-tied"]
    plan = _plan_for(llama, tmp_path)
    launch = lambda *args: [plan, "--steps", "1", "--no-check", *args]  # noqa: E731
    _launch_refused(launch("--init-from", tmp_path / "nowhere"), "--init-from", "no such directory")
    _launch_refused([_plan_for(llama, tmp_path, norm_eps=1e-5), "--steps", "1", "--no-check", "--init-from", llama],
                    "--init-from: norm_eps", "--model")
    bert = _edit_config(llama, tmp_path / "bert", model_type="bert")
    _launch_refused(launch("--init-from", bert), "model_type", "'bert'", "supported")
    mistral = _edit_config(llama, tmp_path / "mistral", model_type="mistral", sliding_window=16)
    _launch_refused(launch("--init-from", mistral), "sliding_window", "16 tokens, shorter than the sequence")
    wide = _edit_config(llama, tmp_path / "wide", model_type="mistral", sliding_window=32)   # = seq 32: exact
    assert hf_format.check_checkpoint(wide, load_model(str(wide / "config.json")), seq_len=32) == "mistral"
    _launch_refused([_plan_for(llama, tmp_path, ffn_hidden=64), "--steps", "1", "--no-check", "--init-from",
                     _edit_config(llama, tmp_path / "ffn", intermediate_size=64)],
                    "mlp.gate_proj.weight has shape [176, 64]")
    shard = sorted(llama.glob("model-*.safetensors"))[1].name
    missing = _edit_config(llama, tmp_path / "missing")
    (missing / shard).unlink()
    _launch_refused(launch("--init-from", missing), f"shard {shard} is missing")
    exists = tmp_path / "exists"
    (exists / "x").mkdir(parents=True)
    _launch_refused(launch("--save-hf", exists), "--save-hf", "--overwrite")
    import dataclasses
    mixtral = checkpoints["mixtral"]
    top1 = dataclasses.replace(load_model(str(mixtral / "config.json")).moe, top_k=1)
    _launch_refused([_plan_for(mixtral, tmp_path, moe=top1), "--steps", "1", "--no-check", "--init-from", mixtral],
                    "--init-from: moe.top_k", "the checkpoint has moe.top_k 2, the plan's model 1")
    relu = _edit_config(checkpoints["gpt2"], tmp_path / "relu", activation_function="relu")
    gpt_plan = _plan_for(checkpoints["gpt2"], tmp_path)
    _launch_refused([gpt_plan, "--steps", "1", "--no-check", "--init-from", relu], "activation_function", "'relu'")
    longrope = _edit_config(checkpoints["phi3"], tmp_path / "longrope", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    _launch_refused([_plan_for(checkpoints["phi3"], tmp_path), "--steps", "1", "--no-check", "--init-from", longrope],
                    "--init-from: config.json rope_scaling", "'longrope'")
    neox = checkpoints["neox"]
    _launch_refused([_plan_for(neox, tmp_path, parallel_residual=False), "--steps", "1", "--no-check", "--init-from",
                     neox], "--init-from: parallel_residual", "the checkpoint has parallel_residual True")
    dynamic = _edit_config(neox, tmp_path / "dynamic", rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                        "partial_rotary_factor": 0.25})
    _launch_refused([_plan_for(neox, tmp_path), "--steps", "1", "--no-check", "--init-from", dynamic],
                    "--init-from: config.json rope_scaling", "'dynamic'")


# ----------------------------------------------------------------------------------------------
# every layout (one torchrun job of 4 ranks)
# ----------------------------------------------------------------------------------------------

# Each layout is here for a way of reading or writing weights (a shard kind, a fused tensor, a family);
# context parallelism holds the weights whole and is here once, with the partial rotary positions it splits.
LAYOUTS = {
    "dp2-pp2-vocab-parallel": ("llama", dict(dp=2, pp=2, vocab_parallel=True)),
    "dp4-zero3": ("llama", dict(dp=4, zero=3)),
    "gpt2-tied-tp2-pp2": ("gpt2", dict(tp=2, pp=2)),
    "mixtral-dp2-tp2-ep2": ("mixtral", dict(dp=2, tp=2, ep=2)),
    "qwen2-moe-dp2-pp2-ep2-zero3": ("qwen2_moe", dict(dp=2, pp=2, ep=2, zero=3)),
    "qwen3-tp4-replicated-kv": ("qwen3", dict(tp=4)),     # q/k norms replicated, a copy of one KV head per rank
    "neox-tp2-cp2-ring": ("gpt_neox", dict(tp=2, cp=2, cp_kind="ring")),   # partial YaRN rotary on zig-zag chunks
    "phi3-dp2-tp2-zero3": ("phi3", dict(dp=2, tp=2, zero=3)),   # shards of q, k, v and gate, up in fused tensors
}
STEPS = 3


EVAL_BATCHES = 2


def _token_files(root: Path) -> tuple[Path, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    train, held_out = root / "train.bin", root / "eval.bin"
    rng.integers(0, 256, 50_000).astype(np.uint16).tofile(train)
    rng.integers(0, 256, 5_000).astype(np.uint16).tofile(held_out)
    return train, held_out


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-layouts")
    sources = {"llama": make_hf("llama", root / "llama", seed=4), "gpt2": make_hf("gpt2", root / "gpt2", seed=5),
               "mixtral": make_hf("mixtral", root / "mixtral", seed=6),
               "qwen2_moe": make_hf("qwen2_moe", root / "qwen2_moe", seed=7),
               "qwen3": make_hf("qwen3", root / "qwen3", seed=8),
               "gpt_neox": make_hf("gpt_neox", root / "gpt_neox", seed=9, rope_parameters=YARN_MSCALE_ROPE),
               "phi3": make_hf("phi3", root / "phi3", seed=10)}
    train, held_out = _token_files(root)
    paths = []
    for name, (family, layout) in LAYOUTS.items():
        spec = load_model(str(sources[family] / "config.json"))
        plan_path = root / name / "plan.yaml"
        plan_path.parent.mkdir()
        make_plan(model=spec, **layout).save(plan_path)
        plan_path.with_suffix(".run.json").write_text(json.dumps({
            "init_from": str(sources[family]), "save_hf": str(plan_path.parent / "hf"),
            "checkpoint_dir": str(plan_path.parent / "ckpt"), "lr": 1e-2, "data": str(train),
            "eval_data": str(held_out), "eval_batches": EVAL_BATCHES}))
        paths.append(plan_path)
    from meshplan.plan import Plan
    _layout_job([Plan.load(p) for p in paths], paths, STEPS)
    return root, sources


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_init_from_and_save_hf_in_every_layout(layout_runs, name):
    from meshplan.launcher.runtime import checkpoint as ckpt
    from meshplan.launcher.runtime.data import EvalTokens, make_source
    from meshplan.plan import Plan

    root, sources = layout_runs
    family, _ = LAYOUTS[name]
    plan = Plan.load(root / name / "plan.yaml")
    length = plan.train.seq_len + 1
    batch = make_source(plan.model.vocab, 0, str(root / "train.bin"), None, length).batch(1, plan.train.global_batch,
                                                                                         length)
    tokens, targets = batch[:, :-1], batch[:, 1:]
    start = hf_model(sources[family])
    expected = F.cross_entropy(start(tokens).logits.detach().flatten(0, 1), targets.flatten()).item()
    records = read_metrics(root / name / "plan.jsonl")
    assert len(records) == STEPS
    assert abs(records[0]["loss"] - expected) <= TOLERANCE * expected, (records[0]["loss"], expected)

    kept = json.loads((sources[family] / "config.json").read_text())      # the start's config is carried over
    written = json.loads((root / name / "hf" / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in kept.items() if k not in ("dtype", "torch_dtype")}
    assert (root / name / "hf" / "generation_config.json").is_file()
    final = load_dcp_model(ckpt.find_latest(root / name / "ckpt")[0], plan.model, plan.train.seq_len)
    logits = meshplan_logits(final, tokens)
    exported = hf_model(root / name / "hf")(tokens).logits.detach()
    assert (exported - logits).abs().max() <= TOLERANCE * logits.abs().max()
    assert (exported - start(tokens).logits.detach()).abs().max() > 1e-3      # trained, not the start

    held_out = EvalTokens(root / "eval.bin", plan.model.vocab, "uint16", plan.train.global_batch, length, 16)
    assert held_out.batches > EVAL_BATCHES and "eval_loss" not in records[0]     # --eval-batches caps it
    losses = []
    for i in range(EVAL_BATCHES):
        window = held_out.eval_batch(i)
        logits = meshplan_logits(final, window[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).item())
    expected_eval = sum(losses) / len(losses)
    assert abs(records[-1]["eval_loss"] - expected_eval) <= TOLERANCE * expected_eval


@pytest.mark.slow
def test_export_hf_command_converts_a_run_checkpoint(layout_runs, tmp_path):
    """``meshplan export-hf`` on a --checkpoint-dir of the Qwen3 tp 4 run (key/value heads held twice): the same
    weights as --save-hf wrote, in bf16 when asked; an existing --out needs --overwrite."""
    import subprocess
    import sys

    root, _ = layout_runs
    run = root / "qwen3-tp4-replicated-kv"
    command = [sys.executable, "-m", "meshplan.cli", "export-hf", str(run / "ckpt"), "--plan", str(run / "plan.yaml"),
               "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _refused(subprocess.run(command, capture_output=True, text=True), "--out", "--overwrite")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
    tokens = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(5))
    fp32 = hf_model(run / "hf")(tokens).logits.detach()
    bf16 = hf_model(tmp_path / "bf16")(tokens).logits.detach().float()
    assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max()
