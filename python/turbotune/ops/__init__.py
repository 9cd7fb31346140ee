"""Fused kernels. Each op lives in its own module with its PyTorch reference,
its Triton kernels, its launcher and its ``torch.library`` registration
(namespace ``turbotune``)."""
from .layer_norm import layer_norm, layer_norm_ref

__all__ = ["layer_norm", "layer_norm_ref"]
