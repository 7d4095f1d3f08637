"""The reference transformer: a plain ``nn.Module`` built from a :class:`meshplan.spec.ModelSpec`.

Two families share one skeleton (torchtitan style, parallelism is applied from outside):

* Llama: RMSNorm, rotary positions (RoPE), grouped-query attention, SwiGLU MLP, no biases.
* GPT:   LayerNorm, learned positions, multi-head attention, GELU MLP, biases, usually tied embeddings.
  GPT-NeoX is GPT with rotary positions on part of each head (``rotary_dim``), the erf GELU and the
  attention and MLP side by side (``parallel_residual``).

Options on either: q/k/v biases (Qwen2), a head width ``head_dim`` apart from ``hidden / heads`` and a norm of
every query and key head (Qwen3's ``q_norm`` / ``k_norm``), a mixture of experts in place of the MLP (``moe.py``).

Names are what the rest of the runtime relies on: ``tok_embeddings``, ``pos_embeddings``, ``layers.<i>``
(an ``nn.ModuleDict`` keyed by the *global* block index, so a pipeline stage that keeps blocks 4..7 still
calls them ``layers.4`` .. ``layers.7``), ``norm`` and ``output``. Weights are initialised by parameter name
(:func:`init_weights`), so every plan — whatever it shards or deletes — starts from the weights a single
process would have.

Every elementwise building block is a small function taking ``impl`` (``reference`` or ``fused``) so the
kernels of ``meshplan.launcher.runtime.kernels`` plug in with one line each.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshplan.plan import FUSED_IMPLS
from meshplan.spec import ModelSpec, RopeScaling, YarnScaling

try:  # the fused kernels live in their own package; the reference ops below are the fallback
    from meshplan.launcher.runtime import kernels as _kernels
except ImportError:  # pragma: no cover - depends on which helper landed first
    _kernels = None


# ----------------------------------------------------------------------------------------------
# small ops, one per kernel (reference implementation here, fused through the kernels package)
# ----------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "reference") -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * weight``, computed in fp32."""
    if impl in FUSED_IMPLS and _kernels is not None:
        return _kernels.rms_norm(x, weight, eps, impl)
    x32 = x.float()         # one fp32 copy, kept for backward by pow and mul (the planner counts 4 + b bytes)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "reference") -> torch.Tensor:
    """SwiGLU activation (Shazeer 2020): ``silu(gate) * up``."""
    if impl in FUSED_IMPLS and _kernels is not None:
        return _kernels.swiglu(gate, up, impl)
    return F.silu(gate) * up


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 impl: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding (Su et al. 2021), "rotate half" layout.

    ``q``/``k``: ``(batch, seq, heads, head_dim)``; ``cos``/``sin``: ``(seq, rotary // 2)``. A ``rotary``
    narrower than ``head_dim`` (``ModelSpec.rotary_dim``, GPT-NeoX) rotates each head's first ``rotary``
    features, "rotate half" within them, and passes the rest through.
    """
    rotary = 2 * cos.shape[-1]
    if rotary < q.shape[-1]:
        q_rot, k_rot = apply_rotary(q[..., :rotary].contiguous(), k[..., :rotary].contiguous(), cos, sin, impl)
        return torch.cat((q_rot, q[..., rotary:]), -1), torch.cat((k_rot, k[..., rotary:]), -1)
    if impl in FUSED_IMPLS and _kernels is not None:
        return _kernels.apply_rotary(q, k, cos, sin, impl)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)

    return rotate(q), rotate(k)


def rotary_tables(positions: torch.Tensor, rotary: int, theta: float = 10000.0,
                  scaling: RopeScaling | YarnScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` of shape ``(len(positions), rotary // 2)`` for the given absolute positions, ``rotary``
    the features rotated (``ModelSpec.rotary_width``): frequency ``theta^(-2i/rotary)`` for pair ``i``,
    rescaled by Llama 3's rule or YaRN's when ``scaling`` is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary, 2, device=positions.device, dtype=torch.float32) / rotary))
    scale = 1.0
    if isinstance(scaling, YarnScaling):
        inv_freq, scale = yarn_scaled_frequencies(inv_freq, scaling, theta), scaling.attention_factor
    elif scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos() * scale, angles.sin() * scale


def yarn_scaled_frequencies(inv_freq: torch.Tensor, scaling: YarnScaling, theta: float) -> torch.Tensor:
    """YaRN's frequencies (:class:`meshplan.spec.YarnScaling`): pair ``i`` keeps ``f_i`` below the correction
    range, takes ``f_i / factor`` above it, and blends the two linearly inside it. The range's ends are the
    dimensions ``d ln(L / (2 pi r)) / (2 ln theta)`` that turn ``r`` = ``beta_fast`` and ``beta_slow`` times
    over the original context ``L`` (``d`` the rotated features; transformers' ``find_correction_range``)."""
    dim = 2 * inv_freq.shape[0]

    def dimension(rotations: float) -> float:
        return dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                   # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rotary scaling (Meta's reference ``apply_scaling``; Hugging Face ``rope_type: llama3``):
    wavelengths above ``L / low_freq_factor`` (``L`` the original context) divide their frequency by
    ``factor``, wavelengths below ``L / high_freq_factor`` keep it, and the band between interpolates with
    ``s = (L / wavelength - low) / (high - low)``: ``(1 - s) * f / factor + s * f``."""
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= original / scaling.high_freq_factor) & (wavelength <= original / scaling.low_freq_factor)
    return torch.where(in_band, interpolated, scaled)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over ``(batch, heads, seq, head_dim)`` through ``scaled_dot_product_attention``
    (flash kernels on CUDA and CPU). Grouped-query attention (fewer k/v heads than q heads) goes to SDPA's
    ``enable_gqa``, so k and v are saved for backward un-repeated (what the planner's memory model counts)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.impl = "reference"
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.impl)


def make_norm(spec: ModelSpec, width: int | None = None) -> nn.Module:
    """The model's norm (``spec.norm``, eps ``spec.norm_eps``) over the last ``width`` features (default
    ``hidden``; ``head_dim`` for the per-head q/k norms)."""
    width = spec.hidden if width is None else width
    if spec.norm == "rmsnorm":
        return RMSNorm(width, spec.norm_eps)
    return nn.LayerNorm(width, eps=spec.norm_eps, bias=spec.bias)


AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention. ``core`` computes causal attention on
    ``(batch, heads, seq, head_dim)``; context parallelism swaps it for Ulysses or ring attention.
    Head counts are read from the projections' output widths, so tensor parallelism (which shards them)
    needs no change here. ``kv_replicas`` > 1: ``wk`` and ``wv`` hold each key/value head that many times in
    a row (tensor parallel over more ranks than key/value heads, parallelize.replicate_kv_heads).
    ``spec.qk_norm``: ``q_norm`` and ``k_norm`` (the model's norm over ``head_dim``) norm every query and key
    head before rotary positions, as Qwen3 does."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.head_dim = spec.head_dim
        self.rope = spec.position == "rope"
        self.rope_impl = "reference"
        self.wq = nn.Linear(spec.hidden, spec.q_width, bias=spec.attention_biases)
        self.wk = nn.Linear(spec.hidden, spec.kv_width, bias=spec.attention_biases)
        self.wv = nn.Linear(spec.hidden, spec.kv_width, bias=spec.attention_biases)
        self.wo = nn.Linear(spec.q_width, spec.hidden, bias=spec.bias)
        self.q_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.k_norm = make_norm(spec, spec.head_dim) if spec.qk_norm else None
        self.core: AttentionCore = causal_attention
        self.kv_replicas = 1

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rotary(q, k, rope[0], rope[1], self.rope_impl)
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU (``w2(silu(w1 x) * w3 x)``) or GELU (``w2(gelu(w1 x))``, ``spec.gelu``: tanh or erf) MLP."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gated = spec.mlp == "swiglu"
        self.gelu_approximate = "tanh" if spec.gelu == "tanh" else "none"
        self.swiglu_impl = "reference"
        self.w1 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.w2 = nn.Linear(spec.ffn_hidden, spec.hidden, bias=spec.bias)
        self.w3 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias) if self.gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_impl))
        return self.w2(F.gelu(self.w1(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """Pre-norm transformer block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``, or with
    ``spec.parallel_residual`` ``out = x + attn(norm(x)) + mlp(norm(x))`` (two norms of their own, GPT-NeoX);
    the MLP is a mixture of experts (moe.MoE) in the blocks ``spec.is_moe_layer(layer)`` names."""

    def __init__(self, spec: ModelSpec, layer: int = 0):
        super().__init__()
        self.attention_norm = make_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = make_norm(spec)
        if spec.is_moe_layer(layer):
            from meshplan.launcher.runtime.moe import MoE
            self.feed_forward: nn.Module = MoE(spec)
        else:
            self.feed_forward = FeedForward(spec)
        self.dropout = spec.dropout
        self.parallel_residual = spec.parallel_residual

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = x + F.dropout(self.attention(self.attention_norm(x), rope), self.dropout, self.training)
        mlp_input = x if self.parallel_residual else h
        return h + F.dropout(self.feed_forward(self.ffn_norm(mlp_input)), self.dropout, self.training)


class TiedHead(nn.Module):
    """LM head that reuses the input embedding matrix (``logits = x @ E^T``); owns no parameter."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


class Transformer(nn.Module):
    """Decoder-only transformer. ``forward`` takes token ids ``(batch, seq)`` on the stage that holds the
    embedding, hidden states ``(batch, seq, hidden)`` on later pipeline stages, and returns logits on the
    stage with the head (hidden states otherwise).

    ``positions`` holds the absolute positions of the tokens this rank sees (``arange(seq)`` unless context
    parallelism gives it a chunk); set it with :meth:`set_positions` after the model is materialised.
    """

    def __init__(self, spec: ModelSpec, max_seq_len: int):
        super().__init__()
        self.spec = spec
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings: nn.Embedding | None = None
        if spec.position == "learned":
            self.pos_embeddings = nn.Embedding(spec.max_seq_len or max_seq_len, spec.hidden)
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in range(spec.layers)})
        self.norm: nn.Module | None = make_norm(spec)
        self.tied = spec.tied_embeddings
        self.output: nn.Module | None = TiedHead() if self.tied else nn.Linear(spec.hidden, spec.vocab, bias=False)
        # Embedding kept only to serve as the tied head's weight (a last pipeline stage without the input embedding).
        self.head_embedding_only = False
        # Loss-path switches (set by the runtime from the plan, see train.make_loss_fn / vocab_parallel.py):
        # output_hidden: return the final-normed hidden states instead of logits (a fused loss does head + loss);
        # embedded_input: the input is token embeddings computed elsewhere (vocabulary parallel across pipeline
        # ranks); positions and dropout are still applied here.
        self.output_hidden = False
        self.embedded_input = False
        self.positions: torch.Tensor | None = None
        self.rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_positions(self, positions: torch.Tensor) -> None:
        """Absolute positions of this rank's tokens (a 1-D LongTensor)."""
        self.positions = positions
        if self.spec.position == "rope":
            self.rope_cache = rotary_tables(positions, self.spec.rotary_width, self.spec.rope_theta,
                                            self.spec.rope_scaling)

    def head_weight(self) -> torch.Tensor:
        """The LM head matrix ``[vocab, hidden]`` (the embedding when tied); a vocabulary-sharded DTensor under TP."""
        return self.tok_embeddings.weight if self.tied else self.output.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embeds = self.tok_embeddings is not None and not self.head_embedding_only
        if embeds or self.embedded_input:
            h = self.tok_embeddings(x) if embeds else x
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(self.positions[None, :])
            h = F.dropout(h, self.spec.dropout, self.training)
        else:
            h = x
        for block in self.layers.values():
            h = block(h, self.rope_cache)
        if self.norm is not None:
            h = self.norm(h)
            if self.output_hidden:      # the loss function applies the head (fused / vocabulary-parallel loss)
                return _local_tensor(h)
        if self.output is not None:
            h = self.output(h, self.tok_embeddings.weight) if self.tied else self.output(h)
        return h


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (sequence-sharded) DTensor as a tensor of its own, the tensor itself otherwise.
    ``DTensor.to_local`` returns a view; returned from a module that FSDP2 wraps, an in-place op on that view
    would drop FSDP2's pre-backward hook and skip the all-gather of the parameters for backward. A copy of
    the local shard (one ``[batch, seq / tp, hidden]`` tensor, freed with the view) closes that door."""
    to_local = getattr(t, "to_local", None)
    return to_local().clone() if to_local is not None else t


def build_model(spec: ModelSpec, max_seq_len: int, device: str | torch.device = "meta") -> Transformer:
    """The full model; on the meta device by default (no memory until the plan has been applied)."""
    with torch.device(device):
        return Transformer(spec, max_seq_len)


def keep_only(model: Transformer, first: int, end: int, *, embedding: bool, head: bool,
              vocab_elsewhere: bool = False) -> Transformer:
    """Cut ``model`` down to one pipeline stage: blocks ``[first, end)``, the embedding if ``embedding``,
    the final norm and head if ``head``. A tied head on a stage without the embedding keeps a copy of the
    embedding matrix (same name, same initial values); the runtime keeps the copies' gradients summed.
    ``vocab_elsewhere`` (vocabulary parallel across pipeline ranks): no stage keeps a vocabulary matrix; the
    first stage takes token embeddings (and still adds positions), the last outputs the normed hidden states."""
    for name in list(model.layers.keys()):
        if not first <= int(name) < end:
            del model.layers[name]
    if vocab_elsewhere:
        model.tok_embeddings = None
        model.output = None
        model.embedded_input = embedding
        model.output_hidden = head
        if not embedding:
            model.pos_embeddings = None
        if not head:
            model.norm = None
        return model
    if not embedding:
        model.pos_embeddings = None
        if head and model.tied:
            model.head_embedding_only = True
        else:
            model.tok_embeddings = None
    if not head:
        model.norm = None
        model.output = None
    return model


# ----------------------------------------------------------------------------------------------
# deterministic initialisation by parameter name
# ----------------------------------------------------------------------------------------------

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")


def canonical_name(name: str) -> str:
    """A parameter's name in the unwrapped model (drops activation-checkpoint / compile / DDP prefixes)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class InitConfig:
    """How weights are drawn. ``std`` for embeddings and projections (GPT-2 / Megatron: 0.02); output
    projections of each block (``wo``, ``w2``, each routed expert's ``experts.w2.<e>``) use
    ``std / sqrt(2 * layers)`` (GPT-2's residual scaling)."""

    seed: int = 0
    std: float = 0.02


def initial_value(name: str, shape: tuple[int, ...], spec: ModelSpec, config: InitConfig,
                  device: torch.device) -> torch.Tensor:
    """The full initial tensor of parameter ``name`` (canonical), the same in every process and plan:
    drawn from a generator seeded by ``(seed, crc32(name))``."""
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    if "norm" in owner:
        return torch.ones(shape, device=device)
    std = config.std
    if owner in ("wo", "w2"):
        std = config.std / math.sqrt(2 * spec.layers)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=gen_device)
    generator.manual_seed((config.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    value = torch.randn(shape, generator=generator, device=gen_device) * std
    return value.to(device)


def replicated_kv_params(module: nn.Module) -> dict[str, int]:
    """``{parameter name: copies}`` of the key/value projections whose heads are held ``copies`` times
    (:attr:`Attention.kv_replicas` > 1), names as ``module.named_parameters`` gives them."""
    found = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, Attention) and sub.kv_replicas > 1:
            for proj in ("wk", "wv"):
                for leaf, _ in getattr(sub, proj).named_parameters():
                    found[f"{prefix}.{proj}.{leaf}" if prefix else f"{proj}.{leaf}"] = sub.kv_replicas
    return found


def repeat_heads(value: torch.Tensor, copies: int, head_dim: int) -> torch.Tensor:
    """``value`` (rows = heads x head_dim) with each head's rows repeated ``copies`` times in a row."""
    heads = value.shape[0] // head_dim
    return value.reshape(heads, head_dim, *value.shape[1:]).repeat_interleave(copies, 0).reshape(
        heads * copies * head_dim, *value.shape[1:])


def expert_row_params(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{parameter name: (start, total)}`` of stacked expert weights holding rows ``start ..`` of ``total``
    (an expert-parallel rank's experts, moe.GroupedExperts.expert_rows), names as ``named_parameters`` gives."""
    found = {}
    for prefix, sub in module.named_modules():
        rows = getattr(sub, "expert_rows", None)
        if rows is not None:
            for leaf, _ in sub.named_parameters(recurse=False):
                found[f"{prefix}.{leaf}" if prefix else leaf] = rows
    return found


def expert_initial_value(name: str, start: int, shape: tuple[int, ...], spec: ModelSpec, config: InitConfig,
                         device: torch.device) -> torch.Tensor:
    """Rows ``start .. start + shape[0] - 1`` of stacked expert weights ``name``: expert ``e`` is drawn as
    parameter ``<name>.<e>`` (:func:`initial_value`), so a rank draws only its own experts."""
    return torch.stack([initial_value(f"{name}.{e}", shape[1:], spec, config, device)
                        for e in range(start, start + shape[0])])


@torch.no_grad()
def init_weights(module: nn.Module, spec: ModelSpec, config: InitConfig, device: torch.device) -> None:
    """Fill every parameter of ``module`` (possibly sharded DTensors, possibly a pipeline stage) with its
    slice of :func:`initial_value`; replicated key/value heads get their head's value in every copy; an
    expert-parallel rank's experts get their rows of the full stacked tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    replicated = replicated_kv_params(module)
    expert_rows = expert_row_params(module)
    for name, param in module.named_parameters():
        full_shape = param.shape  # a DTensor reports its global shape
        copies = replicated.get(name, 1)
        if name in expert_rows:
            full = expert_initial_value(canonical_name(name), expert_rows[name][0], tuple(full_shape), spec, config,
                                        device)
        else:
            full = initial_value(canonical_name(name), (full_shape[0] // copies, *full_shape[1:]), spec, config,
                                 device)
        if copies > 1:
            full = repeat_heads(full, copies, spec.head_dim)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


def count_parameters(spec: ModelSpec, max_seq_len: int) -> int:
    """Parameters of the full model (the tied head counted once)."""
    model = build_model(spec, max_seq_len, "meta")
    return sum(p.numel() for p in model.parameters())
