"""The inputs of a plan: ModelSpec, ClusterSpec (DeviceSpec, LinkSpec) and TrainSpec.

Plain frozen dataclasses that round-trip through YAML/JSON (``to_dict`` / ``from_dict``), each with a
``schema_version``. This module imports nothing heavy (no torch): the planner runs on a laptop.

Units in files are the ones people read on spec sheets (GiB, TFLOP/s, GB/s, microseconds); the planner
converts to bytes, FLOP/s and seconds at its edge.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from meshplan.errors import InputError
from meshplan.measured import MeasuredProfile

SCHEMA_VERSION = 1

MLP_KINDS = ("gelu", "swiglu")
GELU_FORMS = ("tanh", "exact")
NORM_KINDS = ("layernorm", "rmsnorm")
POSITION_KINDS = ("learned", "rope")
ROUTER_SCORES = ("softmax", "sigmoid")
PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
OPTIMIZERS = ("adamw", "adam", "sgd")


# ----------------------------------------------------------------------------------------------
# generic (de)serialisation with one-line errors
# ----------------------------------------------------------------------------------------------

def _check_keys(cls, data: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, Mapping):
        raise InputError(where, f"expected a mapping of keys to values, got {type(data).__name__}",
                         "write it as 'key: value' lines")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}.{unknown[0]}", "unknown key",
                         f"known keys: {', '.join(sorted(known))}")


def _as_int(value: Any, where: str, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(where, f"expected a whole number, got {value!r}", f"give an integer >= {minimum}")
    try:
        number = int(value) if not isinstance(value, float) else value
    except ValueError:
        raise InputError(where, f"expected a whole number, got {value!r}", f"give an integer >= {minimum}") from None
    if isinstance(number, float):
        if not number.is_integer():
            raise InputError(where, f"expected a whole number, got {value!r}", f"give an integer >= {minimum}")
        number = int(number)
    if number < minimum:
        raise InputError(where, f"must be >= {minimum}, got {number}", f"give an integer >= {minimum}")
    if maximum is not None and number > maximum:
        raise InputError(where, f"must be <= {maximum}, got {number}", f"give an integer <= {maximum}")
    return number


def _as_float(value: Any, where: str, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool):
        raise InputError(where, f"expected a number, got {value!r}", "give a positive number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(where, f"expected a number, got {value!r}", "give a positive number") from None
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        raise InputError(where, f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}",
                         "give a positive number")
    return number


def _as_choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    text = str(value).lower()
    if text not in choices:
        raise InputError(where, f"unknown value {value!r}", f"choose one of: {', '.join(choices)}")
    return text


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise InputError(where, f"expected true or false, got {value!r}", "write true or false")


def load_structured_file(path: str | os.PathLike, what: str) -> Any:
    """Read a YAML or JSON file, turning every failure into a one-line InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError(what, f"no such file: {p}", "check the path")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(what, f"cannot read {p}: {exc}", "give a readable UTF-8 YAML or JSON file") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        if line is None:
            line = getattr(exc, "lineno", None)
            where = f" at line {line}" if line else ""
        else:
            where = f" at line {line + 1}"
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise InputError(what, f"{p} is not valid {kind}{where}", f"fix the {kind} syntax") from None
    if not isinstance(data, Mapping):
        raise InputError(what, f"{p} does not hold a mapping of keys to values", "write it as 'key: value' lines")
    return data


# ----------------------------------------------------------------------------------------------
# ModelSpec
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer: everything the cost model and the runtime need.

    Fields:
        name: a label, shown in reports.
        layers: number of transformer blocks.
        hidden: model width h.
        heads: attention (query) heads a; ``hidden % heads == 0`` unless ``head_dim`` is given.
        head_dim: the width d of one attention head; default ``hidden / heads``. Qwen3 0.6B/4B/32B and the
            Qwen3-MoE models set it so that the query width ``heads * head_dim`` (:attr:`q_width`) differs
            from ``hidden``: q, k, v project ``hidden`` to ``heads * d`` (k, v: ``kv_heads * d``) and the
            output projection ``heads * d`` back to ``hidden``. Even, for rotary positions.
        kv_heads: key/value heads (grouped-query attention); defaults to ``heads``; must divide ``heads``.
        ffn_hidden: MLP inner width f. Default: ``4*hidden`` for gelu; for swiglu Llama's rule
            ``256 * ceil((8/3*hidden) / 256)``.
        vocab: vocabulary size V.
        mlp: ``gelu`` (two matmuls) or ``swiglu`` (gate, up, down: three matmuls).
        gelu: the GELU of a ``gelu`` MLP: ``tanh``, Hendrycks & Gimpel's tanh approximation (GPT-2's
            ``gelu_new``, Hugging Face ``gelu_pytorch_tanh``, Megatron-Core's bias-GELU fusion), or ``exact``,
            the erf form (GPT-NeoX's; Megatron-Core's ``F.gelu`` without the fusion). The same cost either way.
        norm: ``layernorm`` or ``rmsnorm``.
        position: ``learned`` (a max_seq_len x hidden table) or ``rope`` (no parameters).
        tied_embeddings: the LM head reuses the input embedding matrix.
        bias: every linear layer of the blocks and every LayerNorm has biases (GPT-2/GPT-3, Megatron's default;
            a Llama config with ``attention_bias`` and ``mlp_bias``; RMSNorm has none); Llama has none.
        qkv_bias: the query, key and value projections (only those) have biases (Qwen2).
        qk_norm: every query and key head is normed over its ``head_dim`` before rotary positions, with one
            weight of width ``head_dim`` for the queries and one for the keys per block (Qwen3; Megatron-Core
            ``--qk-layernorm``). The norm is the model's ``norm``.
        norm_eps: the epsilon of every norm (Hugging Face ``rms_norm_eps`` / ``layer_norm_epsilon``).
        rope_theta: the rotary base (Su et al. 2021: 10000; Llama 3: 500000).
        rope_scaling: Llama 3's frequency-dependent rotary scaling (:class:`RopeScaling`), YaRN's
            (:class:`YarnScaling`), or ``None``.
        rotary_dim: the leading features of every query and key head that rotary positions rotate, in the
            "rotate half" layout within them; the rest pass unrotated. 0: all of ``head_dim``. GPT-NeoX and
            Pythia rotate a quarter (Hugging Face ``partial_rotary_factor`` / ``rotary_pct``; Megatron-LM
            ``--rotary-percent``). Even, at most ``head_dim``.
        parallel_residual: the attention and the MLP both read the block's input,
            ``out = x + attn(norm1(x)) + mlp(norm2(x))`` (GPT-NeoX, GPT-J; Hugging Face ``use_parallel_residual``),
            instead of the MLP reading the attention's sum. The same cost either way.
        dropout: dropout probability on attention and residual branches (0 for Llama-style models).
        max_seq_len: positions table size for ``learned``; 0 means the training sequence length.
        sliding_window: the positions a query attends to, its own included, in the blocks that attend within a
            window (Mistral 7B v0.1: 4096; Hugging Face ``sliding_window``); 0: every earlier position. meshplan
            plans and runs full causal attention, which a window at least as long as the sequence equals: a
            longer sequence is refused (:meth:`check_sequence`).
        moe: the mixture-of-experts layout (:class:`MoESpec`) of the blocks whose MLP is a set of experts, or
            ``None`` for a dense model.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int = 0
    ffn_hidden: int = 0
    mlp: str = "swiglu"
    gelu: str = "tanh"
    norm: str = "rmsnorm"
    position: str = "rope"
    tied_embeddings: bool = False
    bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: "RopeScaling | YarnScaling | None" = None
    rotary_dim: int = 0
    parallel_residual: bool = False
    dropout: float = 0.0
    max_seq_len: int = 0
    sliding_window: int = 0
    moe: "MoESpec | None" = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        where = f"model '{self.name}'"
        if isinstance(self.moe, Mapping):
            object.__setattr__(self, "moe", MoESpec.from_dict(self.moe, f"{where}: moe"))
        object.__setattr__(self, "qkv_bias", _as_bool(self.qkv_bias, f"{where}: qkv_bias"))
        object.__setattr__(self, "qk_norm", _as_bool(self.qk_norm, f"{where}: qk_norm"))
        object.__setattr__(self, "norm_eps", _as_float(self.norm_eps, f"{where}: norm_eps"))
        object.__setattr__(self, "rope_theta", _as_float(self.rope_theta, f"{where}: rope_theta"))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", rope_scaling_from_dict(self.rope_scaling,
                                                                            f"{where}: rope_scaling"))
        for key in ("layers", "hidden", "heads", "vocab"):
            object.__setattr__(self, key, _as_int(getattr(self, key), f"{where}: {key}", 1, 10**9))
        object.__setattr__(self, "mlp", _as_choice(self.mlp, f"{where}: mlp", MLP_KINDS))
        object.__setattr__(self, "gelu", _as_choice(self.gelu, f"{where}: gelu", GELU_FORMS))
        object.__setattr__(self, "parallel_residual", _as_bool(self.parallel_residual, f"{where}: parallel_residual"))
        object.__setattr__(self, "norm", _as_choice(self.norm, f"{where}: norm", NORM_KINDS))
        object.__setattr__(self, "position", _as_choice(self.position, f"{where}: position", POSITION_KINDS))
        object.__setattr__(self, "tied_embeddings", _as_bool(self.tied_embeddings, f"{where}: tied_embeddings"))
        object.__setattr__(self, "bias", _as_bool(self.bias, f"{where}: bias"))
        dropout = _as_float(self.dropout, f"{where}: dropout", 0.0, strict=False)
        if dropout >= 1.0:
            raise InputError(f"{where}: dropout", f"must be below 1, got {dropout}", "give a probability in [0, 1)")
        object.__setattr__(self, "dropout", dropout)
        kv = self.kv_heads or self.heads
        object.__setattr__(self, "kv_heads", _as_int(kv, f"{where}: kv_heads", 1, 10**6))
        self._set_head_dim(where)
        self._set_rotary_dim(where)
        if self.heads % self.kv_heads:
            raise InputError(f"{where}: kv_heads", f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}",
                             "pick kv_heads that divide heads")
        ffn = self.ffn_hidden or default_ffn_hidden(self.hidden, self.mlp)
        object.__setattr__(self, "ffn_hidden", _as_int(ffn, f"{where}: ffn_hidden", 1, 10**9))
        object.__setattr__(self, "max_seq_len", _as_int(self.max_seq_len, f"{where}: max_seq_len", 0, 10**9))
        object.__setattr__(self, "sliding_window", _as_int(self.sliding_window, f"{where}: sliding_window", 0,
                                                           10**9))
        if self.moe is not None:
            self.moe.check_layers(self.layers, f"{where}: moe.layers")
            if self.moe.experts > 1 and self.mlp != "swiglu":
                raise InputError(f"{where}: mlp", "experts are SwiGLU MLPs in every model meshplan reads",
                                 "use mlp: swiglu for a model with a moe section")
        if self.schema_version != SCHEMA_VERSION:
            raise InputError(f"{where}: schema_version", f"unsupported version {self.schema_version}",
                             f"this meshplan reads version {SCHEMA_VERSION}")

    def _set_head_dim(self, where: str) -> None:
        """``head_dim`` as given (even under rotary positions), or ``hidden / heads``."""
        if not self.head_dim:
            if self.hidden % self.heads:
                raise InputError(f"{where}: heads", f"hidden {self.hidden} is not divisible by heads {self.heads}",
                                 "pick heads that divide hidden, or give head_dim")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
            return
        object.__setattr__(self, "head_dim", _as_int(self.head_dim, f"{where}: head_dim", 1, 10**6))
        if self.position == "rope" and self.head_dim % 2:
            raise InputError(f"{where}: head_dim", f"{self.head_dim} is odd; rotary positions rotate pairs",
                             "give an even head_dim")

    def _set_rotary_dim(self, where: str) -> None:
        """``rotary_dim`` as given (even, at most ``head_dim``, under rotary positions only), 0 for all."""
        rotary = _as_int(self.rotary_dim, f"{where}: rotary_dim", 0, 10**6)
        if rotary == self.head_dim:
            rotary = 0                      # every feature: the default, one spelling
        if rotary and self.position != "rope":
            raise InputError(f"{where}: rotary_dim", f"{rotary} with position {self.position!r}",
                             "leave rotary_dim out, or use position: rope")
        if rotary % 2 or rotary > self.head_dim:
            raise InputError(f"{where}: rotary_dim", f"{rotary} is {'odd' if rotary % 2 else 'wider than head_dim'} "
                             f"({self.head_dim})", "give an even width of at most head_dim, or 0 for all of it")
        object.__setattr__(self, "rotary_dim", rotary)

    @property
    def rotary_width(self) -> int:
        """The features of each query and key head that rotary positions rotate (``rotary_dim`` or all)."""
        return self.rotary_dim or self.head_dim

    @property
    def rotary_share(self) -> float:
        """The rotated share of each head as the factor that ``int(head_dim * share)`` (transformers'
        ``partial_rotary_factor``, Megatron-LM's ``--rotary-percent``) turns back into :attr:`rotary_width`."""
        share = self.rotary_width / self.head_dim
        if int(self.head_dim * share) != self.rotary_width:
            share = (self.rotary_width + 0.5) / self.head_dim
        return share

    @property
    def q_width(self) -> int:
        """The width of all query heads together, ``heads * head_dim`` (the attention output's too); equals
        ``hidden`` unless ``head_dim`` says otherwise."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """The width of all key (or value) heads together, ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer``'s MLP is the mixture of experts (``moe.layers``)."""
        return layer in self.moe_layer_ids

    @functools.cached_property
    def moe_layer_ids(self) -> frozenset[int]:
        """The blocks whose MLP is the mixture of experts (computed once: the planner asks per block)."""
        if self.moe is None:
            return frozenset()
        return frozenset(i for i in range(self.layers) if self.moe.is_moe_layer(i))

    @property
    def moe_layer_count(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def attention_biases(self) -> bool:
        """The query, key and value projections have biases (``bias`` or ``qkv_bias``)."""
        return self.bias or self.qkv_bias

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.head_dim * self.heads == self.hidden:
            del out["head_dim"]             # the default, hidden / heads: files without it stay as they were
        for field, default in (("sliding_window", 0), ("gelu", "tanh"), ("rotary_dim", 0),
                               ("parallel_residual", False)):
            if out[field] == default:
                del out[field]              # the default: files without the field stay as they were
        if self.moe is None:
            del out["moe"]                  # dense models' files stay as they were
        else:
            out["moe"] = self.moe.to_dict()
        return out

    def check_sequence(self, seq_len: int, field: str = "--seq-len") -> None:
        """A sequence longer than the attention window is refused in one line: meshplan computes full causal
        attention, which differs from the window's beyond it."""
        if 0 < self.sliding_window < seq_len:
            raise InputError(field, f"{seq_len} is longer than model {self.name!r}'s attention window "
                             f"(sliding_window {self.sliding_window}), which meshplan does not compute",
                             f"train at {self.sliding_window} tokens or fewer, or give a model YAML with "
                             "sliding_window: 0 (full causal attention)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> "ModelSpec":
        _check_keys(cls, data, where)
        missing = [k for k in ("name", "layers", "hidden", "heads", "vocab") if k not in data]
        if missing:
            raise InputError(f"{where}.{missing[0]}", "missing", "add it to the model file")
        return cls(**dict(data))


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary scaling (``rope_type: llama3`` in Hugging Face configs): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, and the band between is interpolated.

    Fields:
        factor: the stretch of the low frequencies (8 for Llama 3.1, 32 for Llama 3.2).
        low_freq_factor, high_freq_factor: the band edges as fractions of the original context (1 and 4).
        original_max_position_embeddings: the context the model was first trained at (8192).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "RopeScaling":
        _check_keys(cls, data, where)
        try:
            return cls(factor=_as_float(data["factor"], f"{where}.factor"),
                       low_freq_factor=_as_float(data["low_freq_factor"], f"{where}.low_freq_factor"),
                       high_freq_factor=_as_float(data["high_freq_factor"], f"{where}.high_freq_factor"),
                       original_max_position_embeddings=_as_int(data["original_max_position_embeddings"],
                                                                f"{where}.original_max_position_embeddings"))
        except KeyError as exc:
            raise InputError(f"{where}.{exc.args[0]}", "missing", "give all four Llama 3 scaling fields") from None


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
    Models"; Hugging Face ``rope_type: yarn``, transformers' ``_compute_yarn_parameters``). Pair ``i`` of ``d``
    rotated features blends the interpolated frequency ``f_i / factor`` and the original ``f_i`` with a ramp
    over the dimensions between the correction range ``[low, high]`` (the dimensions that turn ``beta_fast``
    and ``beta_slow`` times over ``original_max_position_embeddings`` positions, rounded out when ``truncate``);
    ``cos`` and ``sin`` are multiplied by ``attention_factor``.

    Fields:
        factor: the context extension (Qwen2.5's long-context recipe: 4).
        original_max_position_embeddings: the context the model was first trained at.
        beta_fast, beta_slow: the correction range's rotations (the paper's 32 and 1).
        attention_factor: the scale of ``cos`` and ``sin``; a config without it gets the paper's
            ``0.1 ln(factor) + 1`` (DeepSeek's ``mscale`` / ``mscale_all_dim``: the ratio of two such terms).
        truncate: round the correction range outwards to whole dimensions (transformers' default).
        rope_type: ``yarn``, so that a model file names the kind of scaling.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True
    rope_type: str = "yarn"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "YarnScaling":
        _check_keys(cls, data, where)
        try:
            factor = _as_float(data["factor"], f"{where}.factor")
            original = _as_int(data["original_max_position_embeddings"], f"{where}.original_max_position_embeddings")
        except KeyError as exc:
            raise InputError(f"{where}.{exc.args[0]}", "missing", "give YaRN's factor and "
                             "original_max_position_embeddings") from None
        return cls(factor, original, _as_float(data.get("beta_fast", 32.0), f"{where}.beta_fast"),
                   _as_float(data.get("beta_slow", 1.0), f"{where}.beta_slow"),
                   _as_float(data.get("attention_factor", yarn_attention_factor(factor)), f"{where}.attention_factor"),
                   _as_bool(data.get("truncate", True), f"{where}.truncate"))


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's ``cos``/``sin`` scale, ``0.1 * mscale * ln(factor) + 1`` (1 when ``factor`` <= 1; Peng et al. 2023,
    eq. 21 with transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_scaling_from_dict(data: Mapping[str, Any], where: str) -> "RopeScaling | YarnScaling":
    """A model file's ``rope_scaling``: YaRN's when it names ``rope_type: yarn``, Llama 3's otherwise."""
    if isinstance(data, Mapping) and data.get("rope_type") == "yarn":
        return YarnScaling.from_dict(data, where)
    return RopeScaling.from_dict(data, where)


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024):
    a router scores every token against ``experts`` SwiGLU experts and sends it to its ``top_k`` best; the
    outputs are summed with the router's weights; shared experts (Qwen2-MoE, DeepSeekMoE) see every token.

    Fields:
        experts: routed experts per MoE block (E).
        top_k: experts each token is sent to (k).
        expert_ffn_hidden: the inner width of one routed expert (Mixtral: 14336; Qwen2-MoE: 1408).
        shared_experts: experts every token passes through, 0 for none.
        shared_ffn_hidden: the inner width of all shared experts together (one SwiGLU of this width; Qwen2-MoE's
            ``shared_expert_intermediate_size``, DeepSeek's ``n_shared_experts * moe_intermediate_size``).
        shared_expert_gate: the shared experts' output is scaled by a sigmoid gate of the token (Qwen2-MoE).
        layers: which blocks are MoE: ``None`` for all, else the sorted block indices (a YAML file may give an
            integer N: every N-th block, counting from the N-th, as Qwen2-MoE's ``decoder_sparse_step``).
            The other blocks keep the dense MLP of width ``ModelSpec.ffn_hidden``.
        router_score: ``softmax`` (Mixtral, Qwen) or ``sigmoid`` (DeepSeek-V3) over the experts' logits.
        normalize_top_k: the top-k weights are renormalised to sum to 1 (Mixtral, Qwen3-MoE: yes;
            Qwen2-MoE: no).
        aux_loss_coeff: the load-balancing loss coefficient (Switch Transformer's ``alpha * E * sum f_i P_i``,
            Fedus et al. 2021), 0 for none.
        capacity_factor: tokens an expert accepts, as a multiple of its even share, the rest dropped (GShard);
            0 for dropless (every routed token is computed: Megatron-Core's dropless dispatcher, Mixtral).
    """

    experts: int
    top_k: int
    expert_ffn_hidden: int
    shared_experts: int = 0
    shared_ffn_hidden: int = 0
    shared_expert_gate: bool = False
    layers: tuple[int, ...] | None = None
    router_score: str = "softmax"
    normalize_top_k: bool = True
    aux_loss_coeff: float = 0.01
    capacity_factor: float = 0.0

    def __post_init__(self) -> None:
        where = "moe"
        object.__setattr__(self, "experts", _as_int(self.experts, f"{where}.experts", 1, 1 << 20))
        object.__setattr__(self, "top_k", _as_int(self.top_k, f"{where}.top_k", 1, self.experts))
        object.__setattr__(self, "expert_ffn_hidden", _as_int(self.expert_ffn_hidden, f"{where}.expert_ffn_hidden"))
        object.__setattr__(self, "shared_experts", _as_int(self.shared_experts, f"{where}.shared_experts", 0))
        object.__setattr__(self, "shared_ffn_hidden", _as_int(self.shared_ffn_hidden, f"{where}.shared_ffn_hidden", 0))
        if bool(self.shared_experts) != bool(self.shared_ffn_hidden):
            raise InputError(f"{where}.shared_ffn_hidden", f"shared_experts {self.shared_experts} with "
                             f"shared_ffn_hidden {self.shared_ffn_hidden}", "give both, or neither")
        object.__setattr__(self, "shared_expert_gate", _as_bool(self.shared_expert_gate, f"{where}.shared_expert_gate"))
        object.__setattr__(self, "router_score", _as_choice(self.router_score, f"{where}.router_score", ROUTER_SCORES))
        object.__setattr__(self, "normalize_top_k", _as_bool(self.normalize_top_k, f"{where}.normalize_top_k"))
        object.__setattr__(self, "aux_loss_coeff", _as_float(self.aux_loss_coeff, f"{where}.aux_loss_coeff",
                                                             strict=False))
        object.__setattr__(self, "capacity_factor", _as_float(self.capacity_factor, f"{where}.capacity_factor",
                                                              strict=False))
        if self.layers is not None and not isinstance(self.layers, int):
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise InputError(f"{where}.layers", f"expected a list of block indices or an integer, got "
                                 f"{self.layers!r}", "write layers: [1, 3, 5] or layers: 2")
            object.__setattr__(self, "layers", tuple(sorted({_as_int(x, f"{where}.layers", 0) for x in self.layers})))

    def check_layers(self, count: int, where: str) -> None:
        """The block indices exist in a model of ``count`` blocks (and a frequency becomes its list)."""
        if isinstance(self.layers, int):
            step = _as_int(self.layers, where)
            object.__setattr__(self, "layers", tuple(range(step - 1, count, step)))
        if self.layers is not None:
            if not self.layers or self.layers[-1] >= count:
                raise InputError(where, f"{list(self.layers)} names no block or one beyond the model's {count}",
                                 f"give indices in [0, {count})")
            if len(self.layers) == count:
                object.__setattr__(self, "layers", None)

    def is_moe_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "MoESpec":
        _check_keys(cls, data, where)
        missing = [k for k in ("experts", "top_k", "expert_ffn_hidden") if k not in data]
        if missing:
            raise InputError(f"{where}.{missing[0]}", "missing", "give experts, top_k and expert_ffn_hidden")
        try:
            return cls(**dict(data))
        except InputError as error:
            raise InputError(f"{where}{str(error.field)[3:]}", error.problem, error.fix) from None


def default_ffn_hidden(hidden: int, mlp: str) -> int:
    """MLP width when none is given: 4h for GELU (Vaswani et al. 2017); for SwiGLU Llama's
    ``multiple_of * ceil(int(2/3 * 4h) / multiple_of)`` with multiple_of = 256 (Touvron et al. 2023)."""
    if mlp == "gelu":
        return 4 * hidden
    return 256 * math.ceil(int(2 * 4 * hidden / 3) / 256)


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, tied=False, **rest):
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn,
                     vocab=vocab, mlp="swiglu", norm="rmsnorm", position="rope", tied_embeddings=tied, **rest)


def _llama3(factor: float) -> dict[str, Any]:
    """Llama 3.1 / 3.2's rotary base and scaling, from their config.json."""
    return dict(rope_theta=500000.0, rope_scaling=RopeScaling(factor, 1.0, 4.0, 8192))


_QWEN2 = dict(qkv_bias=True, norm_eps=1e-6, rope_theta=1000000.0)   # Qwen2.5 config.json
_QWEN3 = dict(qk_norm=True, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0)   # Qwen3 config.json


def _gpt(name, layers, hidden, heads, vocab, max_seq_len, tied=True):
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, vocab=vocab, mlp="gelu",
                     norm="layernorm", position="learned", tied_embeddings=tied, bias=True,
                     max_seq_len=max_seq_len)


def _neox(name, layers, hidden, heads, vocab):
    """GPT-NeoX (Black et al. 2022) and Pythia (Biderman et al. 2023): GELU (erf) MLP of 4h, LayerNorm, biases,
    a quarter of each head rotated (``rotary_pct`` 0.25), parallel residual, untied head."""
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, vocab=vocab, mlp="gelu", gelu="exact",
                     norm="layernorm", position="rope", bias=True, rotary_dim=hidden // heads // 4,
                     parallel_residual=True)


# Shapes from each model's published config.json / paper.
MODEL_PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _gpt("gpt2", 12, 768, 12, 50257, 1024),                           # Radford et al. 2019, HF gpt2
        _gpt("gpt3-175b", 96, 12288, 96, 50257, 2048),                    # Brown et al. 2020, Table 2.1
        _neox("pythia-1b", 16, 2048, 8, 50304),                           # EleutherAI/pythia-1b
        _neox("pythia-6.9b", 32, 4096, 32, 50432),                        # EleutherAI/pythia-6.9b
        _neox("gpt-neox-20b", 44, 6144, 64, 50432),                       # EleutherAI/gpt-neox-20b
        _llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000),             # Touvron et al. 2023b
        _llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000),
        _llama("llama2-70b", 80, 8192, 64, 8, 28672, 32000),
        _llama("llama3.2-1b", 16, 2048, 32, 8, 8192, 128256, tied=True, **_llama3(32.0)),  # meta-llama/Llama-3.2-1B
        _llama("llama3-8b", 32, 4096, 32, 8, 14336, 128256, **_llama3(8.0)),             # Llama 3.1 config.json
        _llama("llama3-70b", 80, 8192, 64, 8, 28672, 128256, **_llama3(8.0)),
        _llama("llama3-405b", 126, 16384, 128, 8, 53248, 128256, **_llama3(8.0)),
        _llama("mistral-7b", 32, 4096, 32, 8, 14336, 32000),             # mistralai/Mistral-7B-v0.1
        _llama("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, **_QWEN2),  # Qwen/Qwen2.5-7B
        _llama("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, **_QWEN2),  # Qwen/Qwen2.5-72B
        _llama("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, rope_theta=1e6,      # mistralai/Mixtral-8x7B-v0.1
               moe=MoESpec(experts=8, top_k=2, expert_ffn_hidden=14336, aux_loss_coeff=0.02)),
        _llama("mixtral-8x22b", 56, 6144, 48, 8, 16384, 32000, rope_theta=1e6,     # mistralai/Mixtral-8x22B-v0.1
               moe=MoESpec(experts=8, top_k=2, expert_ffn_hidden=16384, aux_loss_coeff=0.001)),
        _llama("qwen2-moe-a2.7b", 24, 2048, 16, 16, 5632, 151936, **_QWEN2,        # Qwen/Qwen1.5-MoE-A2.7B
               moe=MoESpec(experts=60, top_k=4, expert_ffn_hidden=1408, shared_experts=1, shared_ffn_hidden=5632,
                           shared_expert_gate=True, normalize_top_k=False, aux_loss_coeff=0.001)),
        _llama("qwen3-0.6b", 28, 1024, 16, 8, 3072, 151936, tied=True, **_QWEN3),   # Qwen/Qwen3-0.6B
        _llama("qwen3-8b", 36, 4096, 32, 8, 12288, 151936, **_QWEN3),              # Qwen/Qwen3-8B
        _llama("qwen3-32b", 64, 5120, 64, 8, 25600, 151936, **_QWEN3),             # Qwen/Qwen3-32B
        _llama("qwen3-30b-a3b", 48, 2048, 32, 4, 6144, 151936, **_QWEN3,           # Qwen/Qwen3-30B-A3B
               moe=MoESpec(experts=128, top_k=8, expert_ffn_hidden=768, aux_loss_coeff=0.001)),
        # Tiny models for CPU launches and tests.
        _llama("tiny-llama", 4, 64, 4, 2, 176, 256),
        _llama("tiny-moe", 4, 64, 4, 2, 176, 256, moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=64)),
        _gpt("tiny-gpt", 4, 64, 4, 256, 256),
    ]
}


def hf_rope_scaling(data: Mapping[str, Any], params: Mapping[str, Any], where: str
                    ) -> "RopeScaling | YarnScaling | None":
    """The scaling of a config's rotary parameters ``params`` (see :func:`_hf_rotary`): Llama 3's, YaRN's or
    none; another type is refused in one line (:func:`refuse_rope_type`). YaRN without a factor
    takes ``max_position_embeddings / original_max_position_embeddings`` and without an attention factor the
    one transformers derives (``mscale`` and ``mscale_all_dim`` where given), as transformers does."""
    kind = refuse_rope_type(data, where)
    field = f"{where}: rope_scaling"
    if kind == "llama3":
        return RopeScaling.from_dict({k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                            "original_max_position_embeddings") if k in params}, field)
    if kind != "yarn":
        return None
    if "original_max_position_embeddings" not in params:
        raise InputError(f"{field}.original_max_position_embeddings", "missing", "give the context the model was "
                         "first trained at, as transformers requires for yarn")
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or data.get("max_position_embeddings", original) / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all)
                     if mscale and mscale_all else yarn_attention_factor(factor))
    return YarnScaling.from_dict({"factor": factor, "original_max_position_embeddings": original,
                                  "beta_fast": params.get("beta_fast") or 32.0,
                                  "beta_slow": params.get("beta_slow") or 1.0, "attention_factor": attention,
                                  "truncate": params.get("truncate", True)}, field)


def hf_rope_type(data: Mapping[str, Any]) -> str:
    """The rotary scaling type a Hugging Face config names (``default`` when none)."""
    params = {**(data.get("rope_scaling") or {}), **(data.get("rope_parameters") or {})}
    return str(params.get("rope_type", params.get("type", "default")))


ROPE_TYPES = ("default", "llama3", "yarn")     # the rotary scalings meshplan's model computes


def refuse_rope_type(data: Mapping[str, Any], where: str) -> str:
    """The config's rotary scaling type when meshplan's model computes it (none, Llama 3's or YaRN's); one
    line otherwise. Time and memory do not depend on it, so the fix offered is to plan without it."""
    kind = hf_rope_type(data)
    if kind not in ROPE_TYPES:
        raise InputError(f"{where}: rope_scaling", f"rotary scaling {kind!r} is not computed by meshplan's model "
                         f"(it computes {', '.join(ROPE_TYPES[1:])} and none)", "to plan, remove rope_scaling from "
                         "the config (the time and memory are the same); train this model with its own engine")
    return kind


def _sparse_layers(layers: int, step: int, dense: Any, first_dense: int) -> tuple[int, ...] | None:
    """The MoE blocks of a Hugging Face config: every ``step``-th block (Qwen's ``decoder_sparse_step``,
    DeepSeek's ``moe_layer_freq``, counted as ``(i + 1) % step == 0`` in Qwen and ``i % step == 0`` past
    ``first_k_dense_replace`` in DeepSeek: equal at step 1), less ``mlp_only_layers`` and the first dense ones."""
    dense_set = set(dense or ())
    chosen = tuple(i for i in range(first_dense, layers) if (i + 1) % step == 0 and i not in dense_set)
    return None if len(chosen) == layers else chosen


def hf_moe(data: Mapping[str, Any], kind: str, where: str) -> "MoESpec | None":
    """The MoE part of a Mixtral, Qwen2-MoE / Qwen3-MoE or DeepSeek-V2/V3 ``config.json``."""
    layers = data["num_hidden_layers"]
    if kind == "mixtral":
        return MoESpec(experts=data["num_local_experts"], top_k=data["num_experts_per_tok"],
                       expert_ffn_hidden=data["intermediate_size"],
                       aux_loss_coeff=data.get("router_aux_loss_coef", 0.001))
    if kind in ("qwen2_moe", "qwen3_moe"):
        shared = data.get("shared_expert_intermediate_size") or 0
        # the Hub's configs name the expert count num_experts; transformers 5 saves it as num_local_experts
        experts = data["num_experts"] if "num_experts" in data or "num_local_experts" not in data \
            else data["num_local_experts"]
        return MoESpec(experts=experts, top_k=data["num_experts_per_tok"],
                       expert_ffn_hidden=data["moe_intermediate_size"], shared_experts=1 if shared else 0,
                       shared_ffn_hidden=shared, shared_expert_gate=bool(shared),
                       layers=_sparse_layers(layers, data.get("decoder_sparse_step", 1), data.get("mlp_only_layers"), 0),
                       normalize_top_k=bool(data.get("norm_topk_prob", False)),     # transformers' default
                       aux_loss_coeff=data.get("router_aux_loss_coef", 0.001))
    if kind in ("deepseek_v2", "deepseek_v3"):
        shared = data.get("n_shared_experts") or 0
        return MoESpec(experts=data["n_routed_experts"], top_k=data["num_experts_per_tok"],
                       expert_ffn_hidden=data["moe_intermediate_size"], shared_experts=shared,
                       shared_ffn_hidden=shared * data["moe_intermediate_size"],
                       layers=_sparse_layers(layers, data.get("moe_layer_freq", 1), (),
                                             data.get("first_k_dense_replace", 0)),
                       router_score=data.get("scoring_func", "softmax"),
                       normalize_top_k=bool(data.get("norm_topk_prob", False)),
                       aux_loss_coeff=data.get("aux_loss_alpha", 0.001))
    return None


def hf_partial_bias(data: Mapping[str, Any], kind: str) -> tuple[str, str] | None:
    """``(config.json field, the projections that have biases)`` of a config that gives some projections biases
    and not the others, which no ModelSpec holds: Llama's ``attention_bias`` (q, k, v and o) without its
    ``mlp_bias`` (gate, up and down) or the other way round, Qwen3's ``attention_bias`` (Qwen3 has no MLP
    biases), GPT-NeoX's ``attention_bias: false`` (its MLP and norms keep theirs). None when there is none."""
    if kind == "gpt_neox":
        return None if data.get("attention_bias", True) else ("attention_bias", "MLP")
    attention = kind in ("llama", "qwen3", "qwen3_moe") and bool(data.get("attention_bias", False))
    mlp = kind == "llama" and bool(data.get("mlp_bias", False))
    if attention == mlp:
        return None
    return ("attention_bias", "attention") if attention else ("mlp_bias", "MLP")


def _hf_biases(data: Mapping[str, Any], kind: str, where: str) -> dict[str, bool]:
    """The bias fields of a Llama-family config: Qwen2's q/k/v biases (always; Qwen2-MoE's unless its
    ``qkv_bias`` is false), and ``bias`` for Llama's ``attention_bias`` with ``mlp_bias`` (every projection;
    RMSNorm has no bias). Other families' configs do not switch biases on (transformers ignores the fields)."""
    if kind == "qwen2":
        return {"qkv_bias": True}
    if kind == "qwen2_moe":
        return {"qkv_bias": bool(data.get("qkv_bias", True))}
    refuse_partial_bias(data, kind, where)
    return {"bias": kind == "llama" and bool(data.get("attention_bias", False))}


def refuse_partial_bias(data: Mapping[str, Any], kind: str, where: str) -> None:
    """One line for a config whose biases no ModelSpec holds (:func:`hf_partial_bias`)."""
    partial = hf_partial_bias(data, kind)
    if partial is not None:
        field, which = partial
        raise InputError(f"{where}: {field}", f"{field} {data.get(field)} gives biases to the {which} projections "
                         "only, which meshplan's model does not hold", "write a meshplan model YAML with bias: true "
                         "(biases on every projection) or bias: false (none); either prices this model within its "
                         "bias vectors")


HF_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")     # transformers' names of the tanh form


def hf_gelu(activation: str, field: str, where: str) -> str:
    """``ModelSpec.gelu`` of a Hugging Face activation name: ``gelu`` is the erf form, the names of
    :data:`HF_TANH_GELU` the tanh approximation; another activation is refused in one line."""
    if activation == "gelu":
        return "exact"
    if activation in HF_TANH_GELU:
        return "tanh"
    raise InputError(f"{where}: {field}", f"activation {activation!r} is not computed by meshplan's model",
                     f"meshplan computes gelu (exact) and {', '.join(HF_TANH_GELU)} (the tanh form)")


def _hf_rotary(data: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
    """``rotary_dim``, ``rope_theta`` and ``rope_scaling`` of a Hugging Face config, from ``rope_parameters``
    (transformers 5) or the fields before it (``rope_theta`` + ``rope_scaling``; GPT-NeoX's ``rotary_emb_base``
    and ``rotary_pct``). The share of each head rotated is GPT-NeoX's (transformers' default 0.25) and Phi-3's
    ``partial_rotary_factor`` (Phi-4-mini: 0.75); the other families rotate every feature. transformers
    rotates ``int(head_dim * share)`` features. Scaling: :func:`hf_rope_scaling`."""
    params = {**(data.get("rope_scaling") or {}), **(data.get("rope_parameters") or {})}
    theta = params.get("rope_theta", data.get("rope_theta", data.get("rotary_emb_base", 10000.0)))
    share = 1.0
    if kind == "gpt_neox":
        share = params.get("partial_rotary_factor", data.get("partial_rotary_factor", data.get("rotary_pct", 0.25)))
    elif kind == "phi3":
        share = params.get("partial_rotary_factor") or data.get("partial_rotary_factor") or 1.0
    head_dim = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
    return {"rotary_dim": int(head_dim * float(share)), "rope_theta": theta,
            "rope_scaling": hf_rope_scaling(data, params, where)}


SLIDING_WINDOW_TYPES = ("mistral", "mixtral", "phi3")    # their config's sliding_window applies without a switch


def hf_sliding_window(data: Mapping[str, Any], kind: str) -> int:
    """The attention window of a Hugging Face config (``ModelSpec.sliding_window``): Mistral's and Mixtral's
    ``sliding_window`` applies as given, the Qwen families' only under ``use_sliding_window``; 0 for none."""
    if kind in SLIDING_WINDOW_TYPES or data.get("use_sliding_window"):
        return int(data.get("sliding_window") or 0)
    return 0


MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")     # RMSNorm of each q and k head (Qwen3Attention q_norm, k_norm)


def from_hf_config(data: Mapping[str, Any], path: Path) -> ModelSpec:
    """Translate a Hugging Face ``config.json`` (Llama, Mistral, Qwen2/3, Phi-3, Mixtral, Qwen2/3-MoE, GPT-2,
    GPT-NeoX) into a ModelSpec."""
    where = f"--model {path}"
    kind = str(data.get("model_type", "")).lower()
    name = path.parent.name or kind or "hf-model"
    try:
        if kind in ("deepseek_v2", "deepseek_v3") and data.get("kv_lora_rank"):
            raise InputError(f"{where}: kv_lora_rank", f"{kind}'s multi-head latent attention (kv_lora_rank "
                             f"{data['kv_lora_rank']}) is not modelled by meshplan",
                             "write a meshplan model YAML with grouped-query attention of the same size and this "
                             "config's moe section")
        if kind in ("llama", "mistral", "qwen2", "qwen3", "phi3", *MOE_MODEL_TYPES):
            act = str(data.get("hidden_act", "silu"))
            if act not in ("silu", "swish"):
                raise InputError(f"{where}: hidden_act", f"{act!r} is not supported for {kind}", "use silu (SwiGLU)")
            return ModelSpec(
                name=name, layers=data["num_hidden_layers"], hidden=data["hidden_size"],
                heads=data["num_attention_heads"], kv_heads=data.get("num_key_value_heads") or 0,
                head_dim=data.get("head_dim") or 0, qk_norm=kind in QK_NORM_MODEL_TYPES,
                ffn_hidden=data["intermediate_size"], vocab=data["vocab_size"], mlp="swiglu", norm="rmsnorm",
                position="rope", tied_embeddings=bool(data.get("tie_word_embeddings", False)),
                norm_eps=data.get("rms_norm_eps", 1e-6), moe=hf_moe(data, kind, where),
                sliding_window=hf_sliding_window(data, kind),
                **_hf_biases(data, kind, where), **_hf_rotary(data, kind, where),
            )
        if kind == "gpt2":
            hidden = data["n_embd"]
            return ModelSpec(
                name=name, layers=data["n_layer"], hidden=hidden, heads=data["n_head"],
                ffn_hidden=data.get("n_inner") or 4 * hidden, vocab=data["vocab_size"], mlp="gelu",
                gelu=hf_gelu(str(data.get("activation_function", "gelu_new")), "activation_function", where),
                norm="layernorm", position="learned", tied_embeddings=bool(data.get("tie_word_embeddings", True)),
                bias=True, max_seq_len=data.get("n_positions", 0), norm_eps=data.get("layer_norm_epsilon", 1e-5),
            )
        if kind == "gpt_neox":
            refuse_partial_bias(data, kind, where)
            return ModelSpec(
                name=name, layers=data["num_hidden_layers"], hidden=data["hidden_size"],
                heads=data["num_attention_heads"], ffn_hidden=data["intermediate_size"], vocab=data["vocab_size"],
                mlp="gelu", gelu=hf_gelu(str(data.get("hidden_act", "gelu")), "hidden_act", where), norm="layernorm",
                position="rope", tied_embeddings=bool(data.get("tie_word_embeddings", False)), bias=True,
                norm_eps=data.get("layer_norm_eps", 1e-5),
                parallel_residual=bool(data.get("use_parallel_residual", True)), **_hf_rotary(data, kind, where),
            )
    except KeyError as exc:
        raise InputError(f"{where}: {exc.args[0]}", "missing from config.json", "give a complete Hugging Face config") from None
    raise InputError(f"{where}: model_type", f"unsupported model_type {kind!r}",
                     "supported: llama, mistral, qwen2, qwen3, phi3, mixtral, qwen2_moe, qwen3_moe, gpt2, gpt_neox; "
                     "or write a meshplan model YAML")


def load_model(source: str | None) -> ModelSpec:
    """A preset name, a meshplan model YAML/JSON, a Hugging Face ``config.json`` or the model directory holding it."""
    if source is None:
        return MODEL_PRESETS["llama3-8b"]
    if source in MODEL_PRESETS:
        return MODEL_PRESETS[source]
    p = Path(source)
    if not p.exists():
        close = [n for n in MODEL_PRESETS if source.lower().replace("_", "-") in n]
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError("--model", f"{source!r} is neither a preset nor a file",
                         f"{hint}presets: {', '.join(MODEL_PRESETS)}")
    if p.is_dir():      # a Hugging Face model directory: its config.json
        if not (p / "config.json").is_file():
            raise InputError("--model", f"{p} is a directory without a config.json",
                             "give a Hugging Face model directory, its config.json, a model YAML or a preset")
        p = p / "config.json"
    data = load_structured_file(p, "--model")
    if "model_type" in data or "num_hidden_layers" in data or "n_layer" in data:
        return from_hf_config(data, p)
    if "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    return ModelSpec.from_dict(data, where=f"--model {p}")


# ----------------------------------------------------------------------------------------------
# ClusterSpec
# ----------------------------------------------------------------------------------------------

def default_precision(kind: str) -> str:
    """The training precision when none is asked for, by device kind (``DeviceSpec.kind``): fp32 on CPU ranks
    (the only one they train in), bf16 on GPUs."""
    return "fp32" if kind == "cpu" else "bf16"


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator.

    Fields:
        name: e.g. ``H100-SXM5-80GB``.
        memory_gib: device memory in GiB (2**30 bytes), as ``torch.cuda.get_device_properties`` reports.
        peak_tflops: dense 16-bit (bf16/fp16) tensor-core peak, TFLOP/s, from the vendor's spec sheet.
        memory_bandwidth_gbps: HBM bandwidth, GB/s (1e9 bytes/s).
        peak_tflops_fp32: dense fp32 peak used when training in fp32 (0: peak_tflops / 2, TF32 tensor cores).
        peak_tflops_fp8: dense fp8 peak for fp8 matmuls (0: 2 * peak_tflops, as on Hopper).
        kind: ``gpu`` or ``cpu`` (CPU processes: fp32 only, gloo).
    """

    name: str
    memory_gib: float
    peak_tflops: float
    memory_bandwidth_gbps: float
    peak_tflops_fp32: float = 0.0
    peak_tflops_fp8: float = 0.0
    kind: str = "gpu"

    def __post_init__(self) -> None:
        w = f"gpu '{self.name}'"
        object.__setattr__(self, "memory_gib", _as_float(self.memory_gib, f"{w}: memory_gib"))
        object.__setattr__(self, "peak_tflops", _as_float(self.peak_tflops, f"{w}: peak_tflops"))
        object.__setattr__(self, "memory_bandwidth_gbps",
                           _as_float(self.memory_bandwidth_gbps, f"{w}: memory_bandwidth_gbps"))
        object.__setattr__(self, "peak_tflops_fp32",
                           _as_float(self.peak_tflops_fp32, f"{w}: peak_tflops_fp32", strict=False))
        object.__setattr__(self, "peak_tflops_fp8",
                           _as_float(self.peak_tflops_fp8, f"{w}: peak_tflops_fp8", strict=False))
        object.__setattr__(self, "kind", _as_choice(self.kind, f"{w}: kind", ("gpu", "cpu")))

    def peak_flops(self, precision: str) -> float:
        """Dense peak in FLOP/s for matmuls in ``precision``."""
        if precision == "fp32":
            return 1e12 * (self.peak_tflops_fp32 or self.peak_tflops / 2)
        if precision == "fp8":
            return 1e12 * (self.peak_tflops_fp8 or 2 * self.peak_tflops)
        return 1e12 * self.peak_tflops


@dataclass(frozen=True)
class LinkSpec:
    """One level of the interconnect, as seen by one GPU.

    Fields:
        bandwidth_gbps: achievable bus bandwidth per GPU in GB/s, in nccl-tests' "busbw" convention
            (what a ring all-reduce sustains per rank); for inter-node links, per NIC (one NIC per GPU).
        latency_us: per-step latency alpha of a collective on this level, microseconds.
    """

    bandwidth_gbps: float
    latency_us: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidth_gbps", _as_float(self.bandwidth_gbps, "bandwidth_gbps"))
        object.__setattr__(self, "latency_us", _as_float(self.latency_us, "latency_us", strict=False))


@dataclass(frozen=True)
class ClusterSpec:
    """The machines a job runs on.

    Fields:
        name: a label (``dgx-h100:32``).
        nodes: number of nodes.
        gpus_per_node: ranks per node.
        gpu: the device, see DeviceSpec.
        intra_node: the link inside a node (NVLink/NVSwitch), see LinkSpec.
        inter_node: the link between nodes (InfiniBand/RoCE per GPU NIC), see LinkSpec.
        measured: tables written by ``meshplan profile`` (achieved compute rates, fitted links, per-pair
            bandwidth matrix, raw samples), kept verbatim as the file holds them (they are what is written back
            and hashed). The planner reads them typed, through :attr:`profile`.
    """

    name: str
    nodes: int
    gpus_per_node: int
    gpu: DeviceSpec
    intra_node: LinkSpec
    inter_node: LinkSpec
    measured: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", _as_int(self.nodes, f"cluster '{self.name}': nodes", 1, 10**6))
        object.__setattr__(self, "gpus_per_node",
                           _as_int(self.gpus_per_node, f"cluster '{self.name}': gpus_per_node", 1, 4096))

    @property
    def default_precision(self) -> str:
        """The training precision when none is asked for (:func:`default_precision`)."""
        return default_precision(self.gpu.kind)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def profile(self) -> MeasuredProfile:
        """``measured`` read once by the measured profile's loader (``meshplan/measured.py``), kept with the spec
        (nothing writes into a built spec's ``measured``); a malformed field raises an InputError naming it."""
        cached = self.__dict__.get("_profile")
        if cached is None:
            cached = MeasuredProfile.from_dict(self.measured, f"cluster '{self.name}': measured")
            object.__setattr__(self, "_profile", cached)
        return cached

    def __hash__(self) -> int:
        """``measured`` is a dict: hash its JSON form, once (the planner's caches hash the cluster on every
        lookup: 130,000 times in a 16,384-GPU search; nothing writes into a built spec's ``measured``)."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.nodes, self.gpus_per_node, self.gpu, self.intra_node, self.inter_node,
                           json.dumps(self.measured, sort_keys=True, default=str)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "cluster") -> "ClusterSpec":
        _check_keys(cls, data, where)
        for key in ("name", "nodes", "gpus_per_node", "gpu", "intra_node"):
            if key not in data:
                raise InputError(f"{where}.{key}", "missing", "add it to the cluster file")
        values = dict(data)
        values["gpu"] = _sub(DeviceSpec, values["gpu"], f"{where}.gpu")
        values["intra_node"] = _sub(LinkSpec, values["intra_node"], f"{where}.intra_node")
        inter = values.get("inter_node")
        if inter is None:
            if _as_int(values["nodes"], f"{where}.nodes") > 1:
                raise InputError(f"{where}.inter_node", "missing for a multi-node cluster",
                                 "add inter_node {bandwidth_gbps, latency_us}")
            inter = values["intra_node"]
        values["inter_node"] = _sub(LinkSpec, inter, f"{where}.inter_node")
        values["measured"] = dict(values.get("measured") or {})
        profile = MeasuredProfile.from_dict(values["measured"], f"{where}.measured")   # checked at the edge
        spec = cls(**values)
        object.__setattr__(spec, "_profile", profile)
        return spec


def _sub(cls, data: Any, where: str):
    if isinstance(data, cls):
        return data
    _check_keys(cls, data, where)
    try:
        return cls(**dict(data))
    except InputError as exc:
        raise InputError(f"{where}.{exc.field}", exc.problem, exc.fix) from None
    except TypeError as exc:
        raise InputError(where, f"incomplete: {exc}", f"give all of: {', '.join(f.name for f in dataclasses.fields(cls))}") from None


# Device figures from vendor spec sheets (dense, no sparsity). memory_gib as the driver reports it.
DEVICE_PRESETS: dict[str, DeviceSpec] = {
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16 dense, 19.5 fp32 (156 TF32), 2039 GB/s HBM2e.
    "a100": DeviceSpec("A100-SXM4-80GB", 80.0, 312.0, 2039.0, peak_tflops_fp32=156.0, peak_tflops_fp8=312.0),
    # NVIDIA H100 datasheet (SXM5 80GB): 989.4 TFLOP/s bf16 dense, 1978.9 fp8, 3350 GB/s HBM3; 81559 MiB.
    "h100": DeviceSpec("H100-SXM5-80GB", 79.6, 989.4, 3350.0, peak_tflops_fp32=494.7, peak_tflops_fp8=1978.9),
    # NVIDIA H200 datasheet (SXM 141GB): same compute as H100 SXM, 4800 GB/s HBM3e; 143771 MiB.
    "h200": DeviceSpec("H200-SXM-141GB", 140.4, 989.4, 4800.0, peak_tflops_fp32=494.7, peak_tflops_fp8=1978.9),
}

# Link figures: nccl-tests busbw (../shared/benchmarks/public-runs.yaml `collective_bandwidth`);
# latencies: NCCL's base per-step latency on NVLink (~5 us) and over IB with one switch hop (~10 us).
CLUSTER_PRESETS: dict[str, tuple[DeviceSpec, LinkSpec, LinkSpec]] = {
    "dgx-a100": (DEVICE_PRESETS["a100"], LinkSpec(230.0, 5.0), LinkSpec(23.0, 10.0)),   # 8x HDR 200 Gb/s
    "dgx-h100": (DEVICE_PRESETS["h100"], LinkSpec(370.0, 5.0), LinkSpec(47.0, 10.0)),   # 8x NDR 400 Gb/s
    "dgx-h200": (DEVICE_PRESETS["h200"], LinkSpec(370.0, 5.0), LinkSpec(47.0, 10.0)),   # 8x NDR 400 Gb/s
}
CLUSTER_GPUS_PER_NODE = 8


def _localhost_cluster(ranks: int) -> ClusterSpec:
    """``localhost:N``: this machine's GPUs (from nvidia-smi) or N CPU processes when it has none."""
    gpus = _local_gpus()
    if gpus:
        name, mem_gib = gpus[0]
        if ranks > len(gpus):
            raise InputError("--cluster", f"localhost:{ranks} asks for {ranks} ranks but this machine has {len(gpus)} GPUs",
                             f"use localhost:{len(gpus)} or fewer")
        base = next((d for k, d in DEVICE_PRESETS.items() if k in name.lower()), DEVICE_PRESETS["h100"])
        device = dataclasses.replace(base, name=name, memory_gib=mem_gib)
        return ClusterSpec(f"localhost:{ranks}", 1, ranks, device, LinkSpec(370.0, 5.0), LinkSpec(370.0, 5.0))
    total_gib = _system_memory_gib()
    # A CPU process: fp32 only. Peak is a rough default (one AVX2 core ~ 0.05 TFLOP/s fp32);
    # run `meshplan profile` to measure it. Memory: the machine's RAM shared by the ranks.
    cores = max(1, (os.cpu_count() or 1) // ranks)
    device = DeviceSpec("cpu", max(0.5, total_gib / ranks), 0.05 * cores, 20.0, peak_tflops_fp32=0.05 * cores,
                        kind="cpu")
    # gloo over loopback: a few GB/s and tens of microseconds per message.
    link = LinkSpec(2.0, 50.0)
    return ClusterSpec(f"localhost:{ranks}", 1, ranks, device, link, link)


def _local_gpus() -> list[tuple[str, float]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, mib = [x.strip() for x in line.split(",")[:2]]
        gpus.append((name, float(mib) / 1024))
    return gpus


def _system_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 16.0


def load_cluster(source: str | None) -> ClusterSpec:
    """``PRESET:NODES`` (dgx-a100, dgx-h100, dgx-h200), ``localhost:N`` or a cluster YAML/JSON file."""
    if source is None:
        source = "dgx-h100:1"
    if ":" in source and not Path(source).exists():
        preset, _, count = source.partition(":")
        n = _as_int(count, f"--cluster {source}", 1, 10**6) if count.strip().lstrip("-").isdigit() else None
        if n is None:
            raise InputError("--cluster", f"{source!r}: {count!r} is not a whole number",
                             "write PRESET:NODES, e.g. dgx-h100:4")
        if preset == "localhost":
            return _localhost_cluster(n)
        if preset not in CLUSTER_PRESETS:
            raise InputError("--cluster", f"unknown cluster preset {preset!r}",
                             f"presets: {', '.join(CLUSTER_PRESETS)}, localhost; or give a cluster YAML")
        device, intra, inter = CLUSTER_PRESETS[preset]
        return ClusterSpec(source, n, CLUSTER_GPUS_PER_NODE, device, intra, inter)
    p = Path(source)
    if source in CLUSTER_PRESETS:
        raise InputError("--cluster", f"{source!r} needs a node count", f"write {source}:NODES, e.g. {source}:4")
    if not p.exists():
        raise InputError("--cluster", f"{source!r} is neither PRESET:NODES nor a file",
                         f"presets: {', '.join(CLUSTER_PRESETS)}, localhost:N")
    data = load_structured_file(p, "--cluster")
    if "cluster" in data and isinstance(data["cluster"], Mapping):
        data = data["cluster"]
    return ClusterSpec.from_dict(data, where=f"--cluster {p}")


# ----------------------------------------------------------------------------------------------
# TrainSpec
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSpec:
    """What one training iteration is.

    Fields:
        global_batch: sequences per optimizer step (all data-parallel ranks, all micro-batches).
        seq_len: tokens per sequence.
        precision: ``bf16``/``fp16`` (fp32 master weights, 16-bit compute), ``fp32``, or ``fp8``
            (fp8 matmuls with bf16 elsewhere, as torchtitan's float8 linears).
        optimizer: ``adamw``/``adam`` (two fp32 moments per parameter) or ``sgd`` (one momentum buffer).
    """

    global_batch: int
    seq_len: int
    precision: str = "bf16"
    optimizer: str = "adamw"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_batch", _as_int(self.global_batch, "--global-batch", 1, 10**8))
        object.__setattr__(self, "seq_len", _as_int(self.seq_len, "--seq-len", 1, 10**8))
        object.__setattr__(self, "precision", _as_choice(self.precision, "--precision", PRECISIONS))
        object.__setattr__(self, "optimizer", _as_choice(self.optimizer, "--optimizer", OPTIMIZERS))

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "train") -> "TrainSpec":
        _check_keys(cls, data, where)
        return cls(**dict(data))
