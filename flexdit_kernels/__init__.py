"""Triton kernels for FlexDiT, each beside its pure-PyTorch reference, registered as `torch.ops.flexdit.*`."""
from ._dispatch import (backend, get_backend, interpreting, kernels_active, last_route, set_backend, triton_only,
                        triton_only_active, use_triton)
from ._tune import export_decisions, tune_decisions, tuning
from ._attention import attention, attention_backward_ref, attention_path, attention_ref
from ._adaln import (
    gated_residual, gated_residual_backward_ref, gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_backward_ref, gated_residual_layernorm_modulate_ref, gated_residual_ref,
    layernorm_modulate, layernorm_modulate_backward_ref, layernorm_modulate_ref, silu, silu_backward_ref, silu_ref,
)
from ._token_mean import token_mean, token_mean_backward_ref, token_mean_ref
from ._token_pool import pool_matrix, token_pool, token_pool_backward_ref, token_pool_ref
from ._upsample_add import parent_index, upsample_add, upsample_add_backward_ref, upsample_add_ref

__all__ = [
    "attention", "attention_ref", "attention_backward_ref", "attention_path",
    "layernorm_modulate", "layernorm_modulate_ref", "layernorm_modulate_backward_ref",
    "gated_residual", "gated_residual_ref", "gated_residual_backward_ref",
    "gated_residual_layernorm_modulate", "gated_residual_layernorm_modulate_ref",
    "gated_residual_layernorm_modulate_backward_ref",
    "silu", "silu_ref", "silu_backward_ref",
    "token_mean", "token_mean_ref", "token_mean_backward_ref",
    "token_pool", "token_pool_ref", "token_pool_backward_ref", "pool_matrix",
    "upsample_add", "upsample_add_ref", "upsample_add_backward_ref", "parent_index",
    "backend", "get_backend", "set_backend", "use_triton", "kernels_active", "interpreting", "triton_only",
    "triton_only_active",
    "tuning", "last_route", "tune_decisions", "export_decisions",
]
