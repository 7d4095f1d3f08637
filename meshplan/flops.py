"""Parameter counts and FLOPs of a decoder-only transformer: the one place meshplan counts them.

The planner prices plans with these counts and the runtime reports MFU with ``model_flops_per_token``, so they
live in the nouns (``meshplan.planner.flops`` re-exports them).

Conventions (documented once, used everywhere):
    * A matmul of [m, k] x [k, n] costs 2*m*k*n FLOPs.
    * Backward costs twice the forward of every matmul (data gradient + weight gradient).
    * "Model FLOPs" (for tflops_per_gpu and MFU) count forward + backward once, no recompute, and count
      causal attention *halved* (only the lower triangle of the score matrix is useful work; this is what
      flash attention executes). ``model_flops_per_token(..., causal_halving=False)`` gives the Megatron-LM
      convention (attention in full) used by its published MFU numbers, so both can be compared.
"""

from __future__ import annotations

from meshplan.spec import ModelSpec


def attention_params_per_layer(m: ModelSpec) -> int:
    """q and o projections h*q_width each (q_width = heads*head_dim, h unless head_dim says otherwise); k and
    v h*kv_width each; biases if the model has them (q, k and v only with ``qkv_bias``); the per-head q and k
    norms (``qk_norm``)."""
    weights = 2 * m.hidden * m.q_width + 2 * m.hidden * m.kv_width
    biases = (m.q_width + 2 * m.kv_width) if m.attention_biases else 0
    return weights + biases + (m.hidden if m.bias else 0) + 2 * qk_norm_params(m)


def qk_norm_params(m: ModelSpec) -> int:
    """One of the two per-head norms of ``qk_norm`` (a scale of width head_dim, plus a bias for LayerNorm with
    biases); 0 without them."""
    return m.head_dim * (2 if (m.norm == "layernorm" and m.bias) else 1) if m.qk_norm else 0


def kv_params_per_layer(m: ModelSpec) -> int:
    """The k and v projections of one block: h*kv_width weights each, and their biases."""
    return 2 * m.kv_width * (m.hidden + (1 if m.attention_biases else 0))


def kv_heads_per_rank(m: ModelSpec, tp: int) -> float:
    """Key/value heads one tensor-parallel rank holds: ``kv_heads / tp``, or one whole head when tp exceeds
    the key/value heads and each is replicated over ``tp / kv_heads`` ranks (every rank holds the head its
    ``heads / tp`` query heads use)."""
    return max(m.kv_heads / tp, 1.0)


def mlp_params_per_layer(m: ModelSpec) -> int:
    """GELU: two matmuls h*f and f*h; SwiGLU: gate, up (h*f) and down (f*h)."""
    matmuls = 3 if m.mlp == "swiglu" else 2
    biases = (m.ffn_hidden * (matmuls - 1) + m.hidden) if m.bias else 0
    return matmuls * m.hidden * m.ffn_hidden + biases


def expert_params(m: ModelSpec) -> int:
    """One routed expert: a SwiGLU of width ``moe.expert_ffn_hidden`` (gate, up, down: 3*h*f_e)."""
    return 3 * m.hidden * m.moe.expert_ffn_hidden if m.moe else 0


def router_params(m: ModelSpec) -> int:
    """The router's h*E scores, and the shared experts' h-wide sigmoid gate (Qwen2-MoE)."""
    return m.hidden * m.moe.experts + (m.hidden if m.moe.shared_expert_gate else 0) if m.moe else 0


def shared_expert_params(m: ModelSpec) -> int:
    """The shared experts: one SwiGLU of width ``moe.shared_ffn_hidden``."""
    return 3 * m.hidden * m.moe.shared_ffn_hidden if m.moe else 0


def moe_params_per_layer(m: ModelSpec) -> int:
    """An MoE block's MLP: router + E routed experts + shared experts."""
    return router_params(m) + m.moe.experts * expert_params(m) + shared_expert_params(m) if m.moe else 0


def norm_params(m: ModelSpec) -> int:
    """One norm: a scale of width h, plus a bias for LayerNorm with biases."""
    return m.hidden * (2 if (m.norm == "layernorm" and m.bias) else 1)


def params_per_layer(m: ModelSpec, layer: int | None = None) -> int:
    """One transformer block: attention + MLP (the experts' in an MoE block) + two norms. ``layer=None``: a
    dense block, or for an MoE model the mean over its blocks."""
    if layer is None and m.moe is not None:
        return round(sum(params_per_layer(m, i) for i in range(m.layers)) / m.layers)
    mlp = moe_params_per_layer(m) if layer is not None and m.is_moe_layer(layer) else mlp_params_per_layer(m)
    return attention_params_per_layer(m) + mlp + 2 * norm_params(m)


def position_params(m: ModelSpec, seq_len: int) -> int:
    """A learned positions table (max_seq_len x h; none for rotary positions)."""
    return (m.max_seq_len or seq_len) * m.hidden if m.position == "learned" else 0


def embedding_params(m: ModelSpec, seq_len: int) -> int:
    """Token embedding V*h, plus a positions table for learned positions."""
    return m.vocab * m.hidden + position_params(m, seq_len)


def head_params(m: ModelSpec) -> int:
    """Final norm + LM head (V*h unless tied to the embedding)."""
    return norm_params(m) + (0 if m.tied_embeddings else m.vocab * m.hidden)


def total_params(m: ModelSpec, seq_len: int) -> int:
    return sum(params_per_layer(m, i) for i in range(m.layers)) + embedding_params(m, seq_len) + head_params(m)


def active_params(m: ModelSpec, seq_len: int) -> int:
    """Parameters one token's forward uses: ``total_params`` with ``top_k`` of the ``experts`` routed experts."""
    idle = m.moe_layer_count * (m.moe.experts - m.moe.top_k) * expert_params(m) if m.moe else 0
    return total_params(m, seq_len) - idle


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def layer_matmul_flops_per_token(m: ModelSpec, moe: bool = False) -> float:
    """Forward FLOPs of the weight matmuls of one block, per token: 2 * (weights of the linears a token
    uses). ``moe``: the block's MLP is the mixture of experts (``moe_mlp_flops_per_token``)."""
    attention = 2 * (2 * m.hidden * m.q_width + 2 * m.hidden * m.kv_width)
    if moe:
        return attention + moe_mlp_flops_per_token(m)
    return attention + 2 * (3 if m.mlp == "swiglu" else 2) * m.hidden * m.ffn_hidden


def moe_mlp_flops_per_token(m: ModelSpec) -> float:
    """Forward FLOPs of an MoE MLP per token: the router 2*h*E, ``top_k`` routed experts 2*3*h*f_e each, the
    shared experts 2*3*h*f_s (Megatron-LM's ``num_floating_point_operations``: routed experts counted at
    ``moe_router_topk``, megatron/training/training.py)."""
    moe = m.moe
    return 2.0 * m.hidden * (moe.experts + 3 * moe.top_k * moe.expert_ffn_hidden + 3 * moe.shared_ffn_hidden
                             + (1 if moe.shared_expert_gate else 0))


def attention_core_flops_per_token(m: ModelSpec, seq_len: int, causal_halving: bool = True) -> float:
    """Forward FLOPs of QK^T and PV per token: 2 matmuls of 2*s*q_width each -> 4*s*q_width (Narayanan et al.
    2021, appendix, where q_width = h). With causal masking only half the score matrix is useful."""
    full = 4.0 * seq_len * m.q_width
    return full / 2 if causal_halving else full


def head_flops_per_token(m: ModelSpec) -> float:
    """Forward FLOPs of the LM head per token: 2*h*V."""
    return 2.0 * m.hidden * m.vocab


def model_flops_per_token(m: ModelSpec, seq_len: int, causal_halving: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), no recompute.

    Equals Megatron-LM's ``num_floating_point_operations`` / tokens with ``causal_halving=False``:
    12*l*h^2*((1 + g/a + s/h)*q/h + f/h*(3/2 if swiglu) + V/(2*l*h)) per token, q the query width
    ``heads * kv_channels`` (Narayanan et al. 2021, generalised to GQA, SwiGLU and ``--kv-channels`` as in
    megatron/training/training.py). The ``qk_norm`` norms are memory-bound and count no FLOPs.
    """
    matmuls = sum(layer_matmul_flops_per_token(m, m.is_moe_layer(i)) for i in range(m.layers))
    attention = m.layers * attention_core_flops_per_token(m, seq_len, causal_halving)
    return 3.0 * (matmuls + attention + head_flops_per_token(m))


def model_flops_per_iteration(m: ModelSpec, seq_len: int, global_batch: int, causal_halving: bool = True) -> float:
    return model_flops_per_token(m, seq_len, causal_halving) * seq_len * global_batch
