"""Drop-in ``torch.nn`` modules backed by turbotune's kernels."""
from .layer_norm import LayerNorm

__all__ = ["LayerNorm"]
