"""Hugging Face checkpoints as meshplan reads and writes them: the name map per family, the checks a
``--init-from`` directory must pass, and the ``config.json`` written for an export.

Torch-free (``meshplan launch`` runs every check here before starting torchrun); the tensors themselves are
read and written by ``hf_weights.py``.

Families and where each meshplan parameter lives (``{i}``: the block index)::

    meshplan                          llama / mistral / qwen2 / qwen3      gpt2 (Conv1D: stored [in, out])
    tok_embeddings.weight             model.embed_tokens.weight            wte.weight
    pos_embeddings.weight             -                                    wpe.weight
    layers.{i}.attention_norm.*       model.layers.{i}.input_layernorm.*   h.{i}.ln_1.*
    layers.{i}.attention.wq/wk/wv.*   ...self_attn.q_proj/k_proj/v_proj.*  h.{i}.attn.c_attn.* (q | k | v columns)
    layers.{i}.attention.q_norm.*     ...self_attn.q_norm.* (qwen3)        -
    layers.{i}.attention.k_norm.*     ...self_attn.k_norm.* (qwen3)        -
    layers.{i}.attention.wo.*         ...self_attn.o_proj.*                h.{i}.attn.c_proj.*
    layers.{i}.ffn_norm.*             ...post_attention_layernorm.*        h.{i}.ln_2.*
    layers.{i}.feed_forward.w1/w3/w2  ...mlp.gate_proj/up_proj/down_proj   h.{i}.mlp.c_fc / - / c_proj
    norm.*                            model.norm.*                         ln_f.*
    output.weight (untied)            lm_head.weight                       lm_head.weight

GPT-NeoX (``gpt_neox``) under ``gpt_neox.``: ``embed_in``, ``layers.{i}.input_layernorm`` /
``post_attention_layernorm``, ``attention.query_key_value`` (q, k and v rows of each head in turn: head ``j``'s
q rows are ``3 j d .. 3 j d + d - 1``), ``attention.dense``, ``mlp.dense_h_to_4h`` / ``dense_4h_to_h``,
``final_layer_norm``; the untied head is ``embed_out`` (no prefix).

Qwen3 is Llama with a norm of every query and key head (``qk_norm``, a weight of width ``head_dim`` each) and no
q/k/v biases; Qwen2 has the biases and no such norms. A mixture-of-experts block (``mixtral``, ``qwen2_moe``,
``qwen3_moe``) keeps its dense sibling's attention and norm names (qwen3_moe: qwen3's; a dense block of
Qwen2-MoE / Qwen3-MoE: the llama MLP names); its MLP, under ``model.layers.{i}.``::

    meshplan feed_forward.      mixtral block_sparse_moe.     qwen2_moe and qwen3_moe mlp.
    router.*                    gate.*                        gate.*
    experts.w1 / w3 / w2        experts.{e}.w1 / w3 / w2      experts.{e}.gate_proj / up_proj / down_proj
    shared_experts.w1/w3/w2.*   -                             shared_expert.gate_proj / up_proj / down_proj.*
    shared_gate.*               -                             shared_expert_gate.*

Qwen3-MoE has no shared expert: only the router and expert rows apply to it.

meshplan's ``experts.*`` are stacked ``[experts, out, in]``: row ``e`` is checkpoint expert ``{e}``'s ``.weight``.

GPT-2 checkpoints written by ``GPT2LMHeadModel`` prefix every name with ``transformer.``; the original
OpenAI upload does not; both are read. Rotary models store q/k in the "rotate half" layout meshplan uses, so
no permutation is needed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshplan.errors import InputError
from meshplan.spec import (HF_TANH_GELU, ROPE_TYPES, SLIDING_WINDOW_TYPES, ModelSpec, YarnScaling, from_hf_config,
                           hf_partial_bias, hf_rope_type, hf_sliding_window)

FIELD = "--init-from"
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", *MOE_TYPES)
FAMILIES = (*LLAMA_TYPES, "gpt2", "gpt_neox")
EXPERT = "{expert}"     # where a stacked expert weight's checkpoint key names the expert
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# the fields of a ModelSpec that fix the weights' shapes and values (name, dropout and the like do not)
WEIGHT_FIELDS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "mlp", "norm",
                 "position", "tied_embeddings", "bias", "qkv_bias", "qk_norm", "norm_eps", "rope_theta",
                 "rope_scaling", "gelu", "rotary_dim", "parallel_residual")
GELU_FIELDS = {"gpt2": ("activation_function", "gelu_new"), "gpt_neox": ("hidden_act", "gelu")}  # field, default
# the fields of a MoESpec that fix the weights' shapes and what the router computes with them
MOE_WEIGHT_FIELDS = ("experts", "top_k", "expert_ffn_hidden", "shared_experts", "shared_ffn_hidden",
                     "shared_expert_gate", "router_score", "normalize_top_k")


@dataclass(frozen=True)
class Source:
    """Where one meshplan tensor's values are in the checkpoint.

    ``key``: the checkpoint tensor (for stacked experts, with :data:`EXPERT` where the expert's index goes:
    row ``e`` of the meshplan tensor is checkpoint tensor ``key`` of expert ``e``). ``transposed``: stored
    ``[in, out]`` (GPT-2's Conv1D). ``parts`` > 1: the stored tensor holds that many meshplan tensors
    (q, k and v), this one part ``part``: GPT-2's ``c_attn`` side by side (``head_stride`` 0: this tensor's
    output rows, columns when transposed, elements for a vector, start at ``offset``), GPT-NeoX's
    ``query_key_value`` head by head (meshplan row ``r`` is stored row ``(r // head_dim) * head_stride +
    offset + r % head_dim``), Phi-3's ``qkv_proj`` and ``gate_up_proj`` one after the other (parts of
    different widths: ``fused_rows``, the stored tensor's output rows, says how many it holds; 0 for ``parts``
    times this tensor's)."""

    key: str
    transposed: bool = False
    offset: int = 0
    parts: int = 1
    part: int = 0
    head_stride: int = 0
    fused_rows: int = 0

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.key

    def expert_key(self, expert: int) -> str:
        return self.key.replace(EXPERT, str(expert))


_LLAMA_NAMES = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
_GPT2_NAMES = {
    "attention_norm": "ln_1", "ffn_norm": "ln_2", "attention.wo": "attn.c_proj", "feed_forward.w1": "mlp.c_fc",
    "feed_forward.w2": "mlp.c_proj",
}
_QKV_PARTS = {"attention.wq": 0, "attention.wk": 1, "attention.wv": 2}
_NEOX_NAMES = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attention.wo": "attention.dense",
    "feed_forward.w1": "mlp.dense_h_to_4h", "feed_forward.w2": "mlp.dense_4h_to_h",
}
_MOE_NAMES = {
    "mixtral": {"feed_forward.router": "block_sparse_moe.gate",
                "feed_forward.experts.w1": f"block_sparse_moe.experts.{EXPERT}.w1.weight",
                "feed_forward.experts.w3": f"block_sparse_moe.experts.{EXPERT}.w3.weight",
                "feed_forward.experts.w2": f"block_sparse_moe.experts.{EXPERT}.w2.weight"},
    "qwen2_moe": {"feed_forward.router": "mlp.gate",
                  "feed_forward.experts.w1": f"mlp.experts.{EXPERT}.gate_proj.weight",
                  "feed_forward.experts.w3": f"mlp.experts.{EXPERT}.up_proj.weight",
                  "feed_forward.experts.w2": f"mlp.experts.{EXPERT}.down_proj.weight",
                  "feed_forward.shared_experts.w1": "mlp.shared_expert.gate_proj",
                  "feed_forward.shared_experts.w3": "mlp.shared_expert.up_proj",
                  "feed_forward.shared_experts.w2": "mlp.shared_expert.down_proj",
                  "feed_forward.shared_gate": "mlp.shared_expert_gate"},
    "qwen3_moe": {"feed_forward.router": "mlp.gate",
                  "feed_forward.experts.w1": f"mlp.experts.{EXPERT}.gate_proj.weight",
                  "feed_forward.experts.w3": f"mlp.experts.{EXPERT}.up_proj.weight",
                  "feed_forward.experts.w2": f"mlp.experts.{EXPERT}.down_proj.weight"},
}
_TOP = {
    "llama": {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"},
    "gpt2": {"tok_embeddings": "wte", "pos_embeddings": "wpe", "norm": "ln_f", "output": "lm_head"},
    "gpt_neox": {"tok_embeddings": "gpt_neox.embed_in", "norm": "gpt_neox.final_layer_norm", "output": "embed_out"},
}


def source_of(name: str, family: str, spec: ModelSpec, gpt2_prefix: str = "transformer.") -> Source:
    """The checkpoint location of meshplan parameter ``name`` (canonical: no wrapper prefixes)."""
    module, leaf = name.rsplit(".", 1)
    kind = family if family in ("gpt2", "gpt_neox") else "llama"
    prefix = gpt2_prefix if kind == "gpt2" else ""
    if module in _TOP[kind]:
        top = _TOP[kind][module]
        return Source(f"{prefix if module != 'output' else ''}{top}.{leaf}")
    parts = module.split(".")
    if parts[0] != "layers" or len(parts) < 3:
        raise KeyError(name)
    block, inner = parts[1], ".".join(parts[2:])
    if kind == "llama":
        moe_names = _MOE_NAMES.get(family, {})
        if f"{inner}.{leaf}" in moe_names:                   # stacked experts: no ``.weight`` leaf
            return Source(f"model.layers.{block}.{moe_names[f'{inner}.{leaf}']}")
        if inner in moe_names:
            return Source(f"model.layers.{block}.{moe_names[inner]}.{leaf}")
        if family == "phi3" and inner in _PHI3_PARTS:
            return phi3_source(block, inner, leaf, spec)
        return Source(f"model.layers.{block}.{_LLAMA_NAMES[inner]}.{leaf}")
    if kind == "gpt_neox":
        if inner in _QKV_PARTS:
            part = _QKV_PARTS[inner]
            return Source(f"gpt_neox.layers.{block}.attention.query_key_value.{leaf}", offset=part * spec.head_dim,
                          parts=3, part=part, head_stride=3 * spec.head_dim)
        return Source(f"gpt_neox.layers.{block}.{_NEOX_NAMES[inner]}.{leaf}")
    if inner in _QKV_PARTS:
        part = _QKV_PARTS[inner]
        return Source(f"{prefix}h.{block}.attn.c_attn.{leaf}", transposed=leaf == "weight",
                      offset=part * spec.hidden, parts=3, part=part)
    return Source(f"{prefix}h.{block}.{_GPT2_NAMES[inner]}.{leaf}", transposed=leaf == "weight")


_PHI3_PARTS = {"attention.wq": ("self_attn.qkv_proj", 0), "attention.wk": ("self_attn.qkv_proj", 1),
               "attention.wv": ("self_attn.qkv_proj", 2), "feed_forward.w1": ("mlp.gate_up_proj", 0),
               "feed_forward.w3": ("mlp.gate_up_proj", 1)}


def phi3_source(block: str, inner: str, leaf: str, spec: ModelSpec) -> Source:
    """Phi-3's fused projections: q, k and v rows one after the other in ``qkv_proj`` (``q_width``, then
    ``kv_width`` each), gate then up in ``gate_up_proj`` (``ffn_hidden`` each)."""
    key, part = _PHI3_PARTS[inner]
    if key.endswith("qkv_proj"):
        widths = (spec.q_width, spec.kv_width, spec.kv_width)
    else:
        widths = (spec.ffn_hidden, spec.ffn_hidden)
    return Source(f"model.layers.{block}.{key}.{leaf}", offset=sum(widths[:part]), parts=len(widths), part=part,
                  fused_rows=sum(widths))


def stored_rows(src: Source, head_dim: int, first: int, end: int) -> list[tuple[int, int]]:
    """The stored row ranges that hold meshplan rows ``[first, end)`` of ``src``'s tensor, in order: one range,
    or one per head it touches for a tensor stored head by head (``head_stride``)."""
    if not src.head_stride:
        return [(first + src.offset, end + src.offset)]
    ranges = []
    while first < end:
        head, within = divmod(first, head_dim)
        stop = min(end, (head + 1) * head_dim)
        start = head * src.head_stride + src.offset + within
        ranges.append((start, start + stop - first))
        first = stop
    return ranges


def family_of(config: dict[str, Any], where: str = FIELD) -> str:
    """The family of a Hugging Face ``config.json``; an unknown one is one line naming ``model_type``."""
    kind = str(config.get("model_type", "")).lower()
    if kind not in FAMILIES:
        raise InputError(f"{where}: config.json model_type", f"{kind or 'none'!r} is not an architecture meshplan "
                         "loads", f"supported: {', '.join(FAMILIES)}")
    return kind


def _refuse_unmodelled(config: dict[str, Any], family: str, where: str, seq_len: int | None) -> None:
    """Features of the checkpoint's architecture the reference model does not compute: one line each. A
    sliding attention window is refused only when it is shorter than the sequences (``seq_len``; unknown:
    refused), since a window at least as long as the sequence changes nothing."""
    problems = []
    partial_bias = hf_partial_bias(config, family)
    if partial_bias:
        problems.append((partial_bias[0], f"biases on the {partial_bias[1]} projections only"))
    window = hf_sliding_window(config, family)
    if window and (seq_len is None or window < seq_len):
        field = "sliding_window" if family in SLIDING_WINDOW_TYPES else "use_sliding_window"
        problems.append((field, f"sliding-window attention ({window} tokens, shorter than the sequence)"))
    if family != "gpt2" and hf_rope_type(config) not in ROPE_TYPES:
        problems.append(("rope_scaling", f"rotary scaling {hf_rope_type(config)!r}"))
    if family in GELU_FIELDS:
        field, default = GELU_FIELDS[family]
        act = config.get(field, default)
        if act not in ("gelu", *HF_TANH_GELU):
            problems.append((field, f"activation {act!r} (meshplan computes gelu and the tanh forms)"))
    if family == "gpt2":
        if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
            problems.append(("scale_attn_by_inverse_layer_idx", "per-layer attention scaling"))
    if problems:
        field, what = problems[0]
        raise InputError(f"{where}: config.json {field}", f"the checkpoint uses {what}, which meshplan's model "
                         "does not compute", "train this model with its own engine")


def read_config(directory: Path, where: str = FIELD, seq_len: int | None = None
                ) -> tuple[dict[str, Any], str, ModelSpec]:
    """``(config.json as read, family, its ModelSpec)``; what the model does not compute at sequence length
    ``seq_len`` is refused."""
    path = directory / "config.json"
    if not directory.is_dir():
        raise InputError(where, f"no such directory: {directory}", "give a Hugging Face model directory")
    if not path.is_file():
        raise InputError(where, f"{directory} has no config.json", "give a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: config.json", f"unreadable: {exc}", "restore the file") from None
    family = family_of(config, where)
    _refuse_unmodelled(config, family, where, seq_len)
    return config, family, from_hf_config(config, path)


def check_matches_plan(checkpoint: ModelSpec, planned: ModelSpec, where: str = FIELD) -> None:
    """The plan's model must be the checkpoint's: the first field that differs, in one line."""
    fields = WEIGHT_FIELDS + (("max_seq_len",) if planned.position == "learned" else ())
    pairs = [(field, getattr(checkpoint, field), getattr(planned, field)) for field in fields]
    if checkpoint.moe is None or planned.moe is None:
        pairs.append(("moe", checkpoint.moe, planned.moe))
    else:
        pairs += [(f"moe.{field}", getattr(checkpoint.moe, field), getattr(planned.moe, field))
                  for field in MOE_WEIGHT_FIELDS]
        pairs.append(("moe.layers", checkpoint.moe_layer_ids, planned.moe_layer_ids))
    for field, have, want in pairs:
        if have != want:
            if isinstance(have, frozenset):
                have, want = sorted(have), sorted(want)
            raise InputError(f"{where}: {field}", f"the checkpoint has {field} {have}, the plan's model {want}",
                             "plan with --model <checkpoint>/config.json")


def parameter_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of the one-process reference model (``model.py``), torch-free."""
    h, f, hd = spec.hidden, spec.ffn_hidden, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (spec.vocab, h)}
    if spec.position == "learned":
        shapes["pos_embeddings.weight"] = (spec.max_seq_len, h)

    def linear(name: str, out: int, inp: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def norm(name: str, width: int = h) -> None:
        shapes[f"{name}.weight"] = (width,)
        if spec.norm == "layernorm" and spec.bias:
            shapes[f"{name}.bias"] = (width,)

    for i in range(spec.layers):
        block = f"layers.{i}"
        norm(f"{block}.attention_norm")
        linear(f"{block}.attention.wq", spec.q_width, h, spec.attention_biases)
        linear(f"{block}.attention.wk", spec.kv_width, h, spec.attention_biases)
        linear(f"{block}.attention.wv", spec.kv_width, h, spec.attention_biases)
        linear(f"{block}.attention.wo", h, spec.q_width, spec.bias)
        if spec.qk_norm:
            norm(f"{block}.attention.q_norm", hd)
            norm(f"{block}.attention.k_norm", hd)
        norm(f"{block}.ffn_norm")
        if spec.is_moe_layer(i):
            moe_shapes(spec, f"{block}.feed_forward", shapes)
            continue
        linear(f"{block}.feed_forward.w1", f, h, spec.bias)
        if spec.mlp == "swiglu":
            linear(f"{block}.feed_forward.w3", f, h, spec.bias)
        linear(f"{block}.feed_forward.w2", h, f, spec.bias)
    norm("norm")
    if not spec.tied_embeddings:
        shapes["output.weight"] = (spec.vocab, h)
    return shapes


def moe_shapes(spec: ModelSpec, prefix: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """An MoE block's parameters (runtime/moe.py ``MoE``, all experts in one process) added to ``shapes``."""
    moe, h = spec.moe, spec.hidden
    assert moe is not None
    shapes[f"{prefix}.router.weight"] = (moe.experts, h)
    f = moe.expert_ffn_hidden
    shapes.update({f"{prefix}.experts.w1": (moe.experts, f, h), f"{prefix}.experts.w2": (moe.experts, h, f),
                   f"{prefix}.experts.w3": (moe.experts, f, h)})
    if moe.shared_experts:
        s = moe.shared_ffn_hidden
        shapes.update({f"{prefix}.shared_experts.w1.weight": (s, h), f"{prefix}.shared_experts.w2.weight": (h, s),
                       f"{prefix}.shared_experts.w3.weight": (s, h)})
    if moe.shared_expert_gate:
        shapes[f"{prefix}.shared_gate.weight"] = (1, h)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without torch."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def weight_files(directory: Path, where: str = FIELD) -> dict[str, Path]:
    """``{tensor name: file}`` from the index (sharded) or the single ``model.safetensors``; a shard the
    index names but the directory lacks is an error."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{where}: {INDEX}", f"unreadable: {exc}", "restore the index file") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise InputError(where, f"shard {missing[0]} is missing ({len(missing)} of "
                             f"{len(set(weight_map.values()))} shards)", "download the whole checkpoint")
        return {name: directory / f for name, f in weight_map.items()}
    single = directory / SINGLE
    if single.is_file():
        return {name: single for name in safetensors_header(single)}
    raise InputError(where, f"{directory} holds no {SINGLE} or {INDEX}",
                     "give a directory written by save_pretrained (safetensors)")


def gpt2_prefix(files: dict[str, Path]) -> str:
    return "transformer." if "transformer.wte.weight" in files else ""


def expected_shapes(spec: ModelSpec, family: str, files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """``{checkpoint tensor: shape}`` the plan's model needs (fused GPT-2 tensors whole)."""
    prefix = gpt2_prefix(files)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in parameter_shapes(spec).items():
        src = source_of(name, family, spec, prefix)
        if src.per_expert:
            shapes.update({src.expert_key(e): tuple(shape[1:]) for e in range(shape[0])})
            continue
        if src.transposed:
            shape = shape[::-1]
        if src.parts > 1:               # the fused tensor whole: its output dimension holds every part
            rows = src.fused_rows or (shape[-1] if src.transposed else shape[0]) * src.parts
            shape = (*shape[:-1], rows) if src.transposed else (rows, *shape[1:])
        shapes[src.key] = tuple(shape)
    return shapes


def check_checkpoint(directory: Path, planned: ModelSpec, seq_len: int | None = None, where: str = FIELD) -> str:
    """Every check ``--init-from`` needs before a rank starts; returns the family. The architecture is known
    and computed exactly at ``seq_len``, the model is the plan's, every tensor the plan needs is in a shard
    that exists, with the right shape."""
    _, family, spec = read_config(directory, where, seq_len)
    check_matches_plan(spec, planned, where)
    files = weight_files(directory, where)
    headers: dict[Path, dict[str, Any]] = {}
    for key, shape in expected_shapes(planned, family, files).items():
        if key not in files:
            raise InputError(where, f"the checkpoint has no tensor {key}", "give a complete checkpoint of this model")
        header = headers.setdefault(files[key], safetensors_header(files[key]))
        if key not in header:
            raise InputError(where, f"{files[key].name} does not hold {key}, though the index says so",
                             "download the checkpoint again")
        have = tuple(header[key]["shape"])
        if have != shape:
            raise InputError(where, f"{key} has shape {list(have)}, the plan's model needs {list(shape)}",
                             "plan with --model <checkpoint>/config.json")
    return family


def hf_family_for(spec: ModelSpec) -> str:
    """The Hugging Face architecture that holds ``spec`` exactly, for an export. The per-head q/k norms
    (``qk_norm``) are Qwen3's, the q/k/v biases (``qkv_bias``) Qwen2's: no family holds both. Biases on every
    projection (``bias``) are Llama's ``attention_bias`` with ``mlp_bias``."""
    if spec.qk_norm and spec.qkv_bias:
        raise InputError("--save-hf: model.qk_norm", f"model {spec.name!r} has both q/k norms (qk_norm) and q/k/v "
                         "biases (qkv_bias), which no Hugging Face architecture holds together (qwen3: the norms, "
                         "qwen2: the biases)", "keep the DCP checkpoint")
    rotary_swiglu = (spec.mlp == "swiglu" and spec.norm == "rmsnorm" and spec.position == "rope"
                     and not spec.parallel_residual)
    llama_like = rotary_swiglu and not spec.bias
    if spec.moe is not None:
        return _hf_moe_family(spec, llama_like and not spec.rotary_dim)
    if llama_like and spec.rotary_dim and not spec.qk_norm and not spec.qkv_bias and spec.rope_scaling is None:
        return "phi3"                                   # rotary on part of each head
    if llama_like and not spec.rotary_dim:
        return "qwen3" if spec.qk_norm else "qwen2" if spec.qkv_bias else "mistral" if spec.sliding_window else "llama"
    if rotary_swiglu and not spec.qk_norm and not spec.sliding_window and not spec.rotary_dim:
        return "llama"                                  # attention_bias and mlp_bias
    gpt_like = (spec.mlp == "gelu" and spec.norm == "layernorm" and spec.bias and not spec.qk_norm
                and spec.q_width == spec.hidden and not spec.sliding_window)
    if gpt_like and spec.position == "learned" and spec.tied_embeddings and not spec.parallel_residual:
        return "gpt2"
    if gpt_like and spec.position == "rope" and spec.kv_heads == spec.heads:
        return "gpt_neox"
    raise InputError("--save-hf", f"no Hugging Face architecture holds model {spec.name!r} exactly "
                     "(llama: SwiGLU, RMSNorm, rotary, biases on every projection or none; qwen2: q/k/v biases; "
                     "qwen3: q/k norms; phi3: Llama's without biases, rotary on part of each head, no rotary "
                     "scaling; gpt2: GELU, LayerNorm, learned positions, biases, tied head, no q/k norms, "
                     "head_dim hidden/heads; gpt_neox: gpt2's block with rotary positions, no grouped-query "
                     "attention)", "keep the DCP checkpoint")


def _hf_moe_family(spec: ModelSpec, llama_like: bool) -> str:
    """The mixture-of-experts architecture that holds ``spec`` exactly (see :func:`hf_family_for`)."""
    moe = spec.moe
    assert moe is not None
    if llama_like and moe.router_score == "softmax" and moe.dropless and not spec.tied_embeddings:
        if spec.qk_norm and not moe.shared_experts:
            return "qwen3_moe"
        if (not spec.qk_norm and not spec.qkv_bias and not moe.shared_experts and moe.normalize_top_k
                and spec.moe_layer_count == spec.layers):
            return "mixtral"
        if not spec.qk_norm and moe.shared_experts == 1 and moe.shared_expert_gate:
            return "qwen2_moe"                          # its qkv_bias switches the q/k/v biases
    raise InputError("--save-hf", f"no Hugging Face architecture meshplan writes holds the mixture of experts "
                     f"{spec.name!r} exactly (mixtral: every block MoE, no shared experts, top-k renormalised, "
                     "no biases; qwen2_moe: one gated shared expert, no q/k norms; qwen3_moe: q/k norms, no shared "
                     "expert; all softmax routing, untied head)", "keep the DCP checkpoint")


def hf_config(spec: ModelSpec, dtype: str, max_positions: int) -> dict[str, Any]:
    """The ``config.json`` of an export of ``spec`` (``dtype``: ``float32`` or ``bfloat16``;
    ``max_positions``: the context a rotary model was trained at, the plan's sequence length)."""
    family = hf_family_for(spec)
    gelu = "gelu_new" if spec.gelu == "tanh" else "gelu"
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": spec.hidden,
                "n_layer": spec.layers, "n_head": spec.heads, "n_inner": spec.ffn_hidden, "vocab_size": spec.vocab,
                "n_positions": spec.max_seq_len, "layer_norm_epsilon": spec.norm_eps,
                "activation_function": gelu, "tie_word_embeddings": True, "resid_pdrop": spec.dropout,
                "embd_pdrop": spec.dropout, "attn_pdrop": spec.dropout, "torch_dtype": dtype}
    if family == "gpt_neox":
        return neox_config(spec, dtype, max_positions, gelu)
    rope = rope_parameters(spec)
    arch = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "phi3": "Phi3ForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}.get(family, "LlamaForCausalLM")
    config = {"architectures": [arch], "model_type": family, "hidden_size": spec.hidden,
              "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
              "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "intermediate_size": spec.ffn_hidden,
              "vocab_size": spec.vocab, "hidden_act": "silu", "rms_norm_eps": spec.norm_eps,
              "tie_word_embeddings": spec.tied_embeddings, "attention_bias": spec.bias, "mlp_bias": spec.bias,
              "max_position_embeddings": max_positions, "rope_theta": spec.rope_theta,
              "rope_scaling": None if spec.rope_scaling is None else dict(rope), "rope_parameters": rope,
              "attention_dropout": 0.0, "torch_dtype": dtype}
    if family == "phi3":
        # Phi3Config's token ids default to Phi-3's vocabulary (32000), an embedding row a smaller one lacks
        config.update(original_max_position_embeddings=max_positions, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)
    return {**config, **window_config(spec, family), **moe_config(spec, family)}


def rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """The ``rope_parameters`` of an export's ``config.json``: the base, the rotated share where rotary covers
    part of each head (``partial_rotary_factor``: ModelSpec.rotary_share), and Llama 3's or YaRN's scaling."""
    share = {"partial_rotary_factor": spec.rotary_share} if spec.rotary_dim else {}
    return {**_rope_scaling_parameters(spec), **share}


def _rope_scaling_parameters(spec: ModelSpec) -> dict[str, Any]:
    scaling = spec.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": spec.rope_theta}
    if isinstance(scaling, YarnScaling):
        fields = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                  "truncate")
        return {"rope_type": "yarn", "rope_theta": spec.rope_theta, **{k: getattr(scaling, k) for k in fields}}
    return {"rope_type": "llama3", "rope_theta": spec.rope_theta,
            **{k: getattr(scaling, k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}}


def neox_config(spec: ModelSpec, dtype: str, max_positions: int, gelu: str) -> dict[str, Any]:
    """GPT-NeoX's ``config.json`` for ``spec``, with the rotary share and base under both transformers 5's names
    (``rope_parameters``) and transformers 4's (``rotary_pct``, ``rotary_emb_base``); the share:
    ``ModelSpec.rotary_share``."""
    share = spec.rotary_share
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": spec.hidden,
            "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
            "intermediate_size": spec.ffn_hidden, "vocab_size": spec.vocab, "hidden_act": gelu,
            "layer_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tied_embeddings,
            "use_parallel_residual": spec.parallel_residual, "attention_bias": True,
            "max_position_embeddings": max_positions, "rotary_pct": share, "rotary_emb_base": spec.rope_theta,
            "rope_parameters": {**rope_parameters(spec), "partial_rotary_factor": share},
            "hidden_dropout": spec.dropout, "attention_dropout": spec.dropout, "torch_dtype": dtype}


def window_config(spec: ModelSpec, family: str) -> dict[str, Any]:
    """The attention window of an export's ``config.json`` (``spec.sliding_window``, read back by
    meshplan.spec.hf_sliding_window): the ``sliding_window`` of Mistral, Mixtral and Phi-3; the Qwen families'
    switched on in every block."""
    window = spec.sliding_window or None
    if family in SLIDING_WINDOW_TYPES:
        return {"sliding_window": window}
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return {"use_sliding_window": bool(window), "sliding_window": window, "max_window_layers": 0}
    return {}


def moe_config(spec: ModelSpec, family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of an export's ``config.json`` (none for a dense family)."""
    moe = spec.moe
    if family == "mixtral":
        assert moe is not None
        return {"num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": moe.expert_ffn_hidden, "router_aux_loss_coef": moe.aux_loss_coeff}
    if family == "qwen2_moe":
        assert moe is not None
        return {"num_experts": moe.experts, "num_experts_per_tok": moe.top_k,
                "moe_intermediate_size": moe.expert_ffn_hidden,
                "shared_expert_intermediate_size": moe.shared_ffn_hidden,
                "norm_topk_prob": moe.normalize_top_k, "router_aux_loss_coef": moe.aux_loss_coeff,
                "decoder_sparse_step": 1, "qkv_bias": spec.qkv_bias,
                "mlp_only_layers": [i for i in range(spec.layers) if not spec.is_moe_layer(i)]}
    if family == "qwen3_moe":
        assert moe is not None
        return {"num_experts": moe.experts, "num_experts_per_tok": moe.top_k,
                "moe_intermediate_size": moe.expert_ffn_hidden, "norm_topk_prob": moe.normalize_top_k,
                "router_aux_loss_coef": moe.aux_loss_coeff, "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i in range(spec.layers) if not spec.is_moe_layer(i)]}
    return {}


def prepare_output(out: Path, overwrite: bool, field: str = "--save-hf") -> None:
    """An output directory that exists (and is not empty) needs ``overwrite``; nothing is removed here."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(field, f"{out} exists", "pass --overwrite to replace it, or name a new directory")
