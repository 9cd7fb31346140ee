"""Memory layouts the optimizer's native kernels can walk as one flat array.

The AdamW and clipping kernels take a data pointer and an element count: they
visit the ``numel`` elements in memory order. That is right for any tensor
whose elements fill its memory span exactly once (contiguous, channels_last,
channels_last_3d, a transposed weight, ...) as long as every tensor updated
together (param, grad, moments, master copy) maps each index to the same
offset, i.e. has the same layout.
"""
from __future__ import annotations

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """True when ``t``'s elements occupy exactly ``numel`` consecutive slots of memory, in some dimension
    order (non-overlapping and dense): a strided tensor that is contiguous, channels_last, permuted, ...

    Args:
        t: any tensor. Returns False for sparse / non-strided layouts, slices with gaps (``x[:, ::2]``),
            expanded (stride 0) and overlapping views.
    """
    if t.layout != torch.strided:
        return False
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` (same shape) put every index at the same memory offset: equal strides on
    every dimension longer than 1 (a size-1 dimension's stride never matters)."""
    sa, sb = a.stride(), b.stride()
    if sa == sb:
        return True
    return a.shape == b.shape and all(x == y for n, x, y in zip(a.shape, sa, sb) if n != 1)


def like(p: Tensor, dtype: torch.dtype, values: Tensor) -> Tensor:
    """A new tensor on ``p``'s device in ``p``'s layout (when ``p`` is dense; otherwise a dense one) holding
    ``values`` (same shape as ``p``, any dtype, device and layout) converted to ``dtype``."""
    return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(values)
