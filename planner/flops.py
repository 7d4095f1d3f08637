"""Parameter counts and FLOPs: the formula lives in the nouns (``meshplan/flops.py``), which the runtime reads
too; the planner's modules import it from here."""

from meshplan.flops import (attention_core_flops_per_token, attention_params_per_layer, embedding_params,
                            head_flops_per_token, head_params, kv_heads_per_rank, kv_params_per_layer,
                            active_params, expert_params, moe_mlp_flops_per_token, moe_params_per_layer,
                            router_params, shared_expert_params,
                            layer_matmul_flops_per_token, mlp_params_per_layer,
                            model_flops_per_iteration, model_flops_per_token, norm_params, params_per_layer,
                            position_params, qk_norm_params, total_params)

__all__ = ["attention_core_flops_per_token", "attention_params_per_layer", "embedding_params",
           "head_flops_per_token", "head_params", "kv_heads_per_rank", "kv_params_per_layer",
           "active_params", "expert_params", "moe_mlp_flops_per_token", "moe_params_per_layer",
           "router_params", "shared_expert_params",
           "layer_matmul_flops_per_token", "mlp_params_per_layer",
           "model_flops_per_iteration", "model_flops_per_token", "norm_params", "params_per_layer",
           "position_params", "qk_norm_params", "total_params"]
