"""Fused kernels. Each op lives in its own module with its PyTorch reference,
its Triton kernels, its launcher and its ``torch.library`` registration
(namespace ``turbotune``)."""
from .attention import attention, attention_dropout_mask, attention_ref, attention_varlen, attention_varlen_ref
from .batch_norm import batch_norm_act, batch_norm_act_ref
from .layer_norm import layer_norm, layer_norm_ref

__all__ = [
    "attention",
    "attention_dropout_mask",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
    "batch_norm_act",
    "batch_norm_act_ref",
    "layer_norm",
    "layer_norm_ref",
]
from .cross_entropy import cross_entropy, cross_entropy_ref  # noqa: E402
from .gelu import bias_gelu, bias_gelu_ref, linear_gelu  # noqa: E402

__all__ += ["bias_gelu", "bias_gelu_ref", "cross_entropy", "cross_entropy_ref", "linear_gelu"]
