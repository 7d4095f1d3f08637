"""Parameter counts and FLOPs: the formula lives in the nouns (``meshplan/flops.py``), which the runtime reads
too; the planner's modules import it from here."""

from meshplan.flops import (attention_core_flops_per_token, attention_params_per_layer, embedding_params,
                            head_flops_per_token, head_params, kv_heads_per_rank, kv_params_per_layer,
                            layer_matmul_flops_per_token, mlp_params_per_layer,
                            model_flops_per_iteration, model_flops_per_token, norm_params, params_per_layer,
                            position_params, total_params)

__all__ = ["attention_core_flops_per_token", "attention_params_per_layer", "embedding_params",
           "head_flops_per_token", "head_params", "kv_heads_per_rank", "kv_params_per_layer",
           "layer_matmul_flops_per_token", "mlp_params_per_layer",
           "model_flops_per_iteration", "model_flops_per_token", "norm_params", "params_per_layer",
           "position_params", "total_params"]
