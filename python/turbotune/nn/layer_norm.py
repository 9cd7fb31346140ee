"""``turbotune.nn.LayerNorm``: a drop-in ``torch.nn.LayerNorm`` on the fused kernel."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with the same parameters and ``state_dict`` keys,
    running :func:`turbotune.ops.layer_norm`.

    ``forward(x)`` returns ``LN(x)``; ``forward(x, residual)`` returns
    ``(LN(x + residual), x + residual)`` in one fused pass. Normalizing over
    more than the last dimension falls back to ``torch.nn.LayerNorm``.
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):  # type: ignore[override]
        if len(self.normalized_shape) != 1:
            if residual is not None:
                x = x + residual
                return super().forward(x), x
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> "LayerNorm":
        """A ``LayerNorm`` sharing ``module``'s parameters (no copy: optimizer state stays valid)."""
        if not isinstance(module, torch.nn.LayerNorm):
            raise TypeError(f"from_torch: module must be a torch.nn.LayerNorm, got {type(module).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.normalized_shape = tuple(module.normalized_shape)
        new.eps = module.eps
        new.elementwise_affine = module.elementwise_affine
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.train(module.training)
        return new
