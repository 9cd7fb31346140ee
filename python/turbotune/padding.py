"""Remove and restore padding: the varlen recipe for BERT-style batches.

A padded batch ``hidden`` of shape ``(B, L, ...)`` with an ``attention_mask``
``(B, L)`` (Hugging Face's: bool or 0/1, True/1 = real token -- the same mask
:func:`turbotune.ops.attention` takes as ``attention_mask``) becomes a packed ``(nnz, ...)`` tensor of the
real tokens in row-major order, plus ``cu_seqlens`` (``(B + 1,)`` int32, the
cumulative lengths starting at 0) and ``max_seqlen`` -- exactly what
:func:`turbotune.ops.attention_varlen` takes. :func:`pad_input` scatters the
packed rows back (zeros elsewhere). Both are differentiable.

The mask does not need to be right-padded: any set of kept positions works,
and tokens keep their order within each row.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["unpad_input", "pad_input", "seqlens_to_cu_seqlens"]


def _check_mask(fn: str, attention_mask: Tensor, batch: int, seqlen: int) -> Tensor:
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"{fn}: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, seqlen):
        raise ValueError(f"{fn}: attention_mask must have shape (B, L) = ({batch}, {seqlen}), "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"{fn}: attention_mask must be bool or 0/1 integers, got dtype {attention_mask.dtype}")
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def seqlens_to_cu_seqlens(seqlens: Tensor) -> Tensor:
    """``(B,)`` integer lengths (>= 0) -> ``(B + 1,)`` int32 cumulative lengths starting at 0."""
    if not isinstance(seqlens, Tensor):
        raise TypeError(f"seqlens_to_cu_seqlens: seqlens must be a torch.Tensor, got {type(seqlens).__name__}")
    if seqlens.is_floating_point() or seqlens.is_complex() or seqlens.dtype == torch.bool:
        raise TypeError(f"seqlens_to_cu_seqlens: seqlens must hold integer lengths, got dtype {seqlens.dtype}")
    if seqlens.device.type == "cpu" and seqlens.numel() and bool((seqlens < 0).any()):
        raise ValueError(f"seqlens_to_cu_seqlens: seqlens must be >= 0, got {seqlens.min().item()}")
    cu = torch.zeros(seqlens.numel() + 1, dtype=torch.int32, device=seqlens.device)
    cu[1:] = torch.cumsum(seqlens.reshape(-1), 0, dtype=torch.int32)
    return cu


def unpad_input(hidden: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Keep the real tokens of a padded batch.

    Args:
        hidden: ``(B, L, ...)`` any dtype.
        attention_mask: ``(B, L)`` bool or 0/1 integers, True/1 = real token.

    Returns:
        ``(packed, indices, cu_seqlens, max_seqlen)``: ``packed`` ``(nnz, ...)``
        the kept rows of ``hidden.reshape(B * L, ...)``; ``indices`` ``(nnz,)``
        int64 their flat positions; ``cu_seqlens`` ``(B + 1,)`` int32;
        ``max_seqlen`` a Python int (one host sync on GPU).
    """
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        raise ValueError(f"unpad_input: hidden must be a tensor of shape (B, L, ...), got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    b, l = hidden.shape[:2]
    mask = _check_mask("unpad_input", attention_mask, b, l)
    if mask.device != hidden.device:
        raise ValueError(f"unpad_input: attention_mask is on {mask.device} but hidden is on {hidden.device}")
    seqlens = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    max_seqlen = int(seqlens.max().item()) if b > 0 else 0
    cu_seqlens = seqlens_to_cu_seqlens(seqlens)
    packed = hidden.reshape(b * l, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of :func:`unpad_input`: ``(nnz, ...)`` -> ``(batch, seqlen, ...)`` with zeros at padding.

    Args:
        packed: ``(nnz, ...)``.
        indices: ``(nnz,)`` int64 flat positions in ``[0, batch * seqlen)`` (from :func:`unpad_input`).
        batch, seqlen: the padded shape.
    """
    if not isinstance(packed, Tensor) or packed.dim() < 1:
        raise ValueError("pad_input: packed must be a tensor of shape (nnz, ...)")
    if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.numel() != packed.shape[0]:
        raise ValueError(f"pad_input: indices must be a 1-D tensor with nnz = {packed.shape[0]} entries, got "
                         f"{tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"pad_input: indices must be int64 (or int32), got {indices.dtype}")
    if indices.device != packed.device:
        raise ValueError(f"pad_input: indices is on {indices.device} but packed is on {packed.device}")
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pad_input: {name} must be an int, got {type(value).__name__}")
    if batch < 0 or seqlen < 0:
        raise ValueError(f"pad_input: batch and seqlen must be >= 0, got {batch}, {seqlen}")
    if batch * seqlen >= 2**63:
        raise ValueError(f"pad_input: batch * seqlen = {batch * seqlen} does not fit in int64")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_copy(0, indices.to(torch.int64), packed)
    return out.view(batch, seqlen, *packed.shape[1:])
