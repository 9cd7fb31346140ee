"""Public functions of the attention op: argument checks, seeds, then the registered op."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ... import backend
from .ops import ATTENTION_FWD, ATTENTION_VARLEN_FWD
from .philox import check_dropout_range, check_offset, draw_seed
from .reference import reject_key_padding_mask


def _check_qkv(fn: str, q, k, v, ndim: int, layout: str):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{fn}: {name} must have shape {layout}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k must share the head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"{fn}: head dim D must be >= 1")


def _check_common(fn: str, dropout_p, softmax_scale, deterministic, dropout_offset) -> None:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"{fn}: softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"{fn}: deterministic must be a bool, got {type(deterministic).__name__}")
    check_offset(fn, dropout_offset)


def _check_attention_mask(fn: str, mask, b: int, lk: int, device) -> None:
    if not isinstance(mask, Tensor) or mask.shape != (b, lk):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{fn}: attention_mask must have shape (B, Lk) = ({b}, {lk}), got {got}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{fn}: attention_mask must be bool or 0/1 integers (True/1 = real token), got dtype "
                        f"{mask.dtype}; pass an additive float mask as attn_bias")
    if mask.device != device:
        raise ValueError(f"{fn}: attention_mask is on {mask.device} but q is on {device}")


def _check_bias(fn: str, bias, shape4, device) -> Tensor:
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"{fn}: attn_bias must be a floating tensor, got {got}")
    try:
        ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, shape4) == shape4
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: attn_bias must be broadcastable to (B, H, Lq, Lk) = {shape4}, got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{fn}: attn_bias is on {bias.device} but q is on {device}")
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias


@reject_key_padding_mask
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    dropout_seed: Optional[int] = None,
    dropout_offset: int = 0,
    deterministic: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled dot-product attention with padding mask, bias, causal and dropout.

    Args:
        q: ``(B, H, Lq, D)`` float32 / float16 / bfloat16 / float64 (the SDPA layout;
            any strides, e.g. a transposed ``(B, L, H, D)`` projection).
        k, v: ``(B, H, Lk, D)``, same dtype and device as ``q``.
        attention_mask: ``(B, Lk)`` bool or 0/1 integers, **True/1 = a real token
            to attend** (Hugging Face's ``attention_mask``, exactly what the tokenizer
            returns); None = every key. (``key_padding_mask=`` raises a ``TypeError``:
            it was renamed, and ``torch.nn.MultiheadAttention``'s mask of that name
            has the opposite meaning.)
        attn_bias: additive float bias broadcastable to ``(B, H, Lq, Lk)`` (``-inf``
            entries mask). When it requires grad, its gradient (summed over the
            broadcast dimensions) is computed on every path.
        dropout_p: attention-probability dropout in ``[0, 1)``; apply only in
            training (pass 0.0 in eval). ``Lq * Lk`` must stay below ``2**34``.
        causal: mask keys ``j > i + (Lk - Lq)`` (bottom-right aligned).
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, H, Lq)`` fp32 (natural log;
            ``-inf`` for rows with no key).
        dropout_seed, dropout_offset: Philox key (``[0, 2**63)``) and counter offset
            (``[0, 2**32)``) of the dropout mask; default seed: drawn from torch's CPU
            generator (so ``torch.manual_seed`` reproduces a run).
        deterministic: on the GPU, compute dQ in a second kernel instead of fp32
            atomics (bit-reproducible backward, about two more matmuls per tile).

    Returns:
        ``out`` ``(B, H, Lq, D)`` in ``q``'s dtype (laid out like ``q``), or
        ``(out, lse)``. Rows with no key to attend are zeros.

    Gradients flow to ``q``, ``k``, ``v`` and ``attn_bias``. Runs the Triton kernels
    on a GPU; on CPU tensors what ``turbotune.backend`` chooses (native > ATen's
    flash kernel > the PyTorch reference; dropout and bias gradients use the
    reference unless a native kernel handles them). float64 always runs the
    reference in fp64 math. Every path applies the same dropout mask.
    """
    fn = "attention"
    _check_qkv(fn, q, k, v, 4, "(B, H, L, D)")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        raise ValueError(f"{fn}: k must have shape ({b}, {h}, Lk, {d}) to match q, got {tuple(k.shape)}")
    lk = k.shape[2]
    _check_common(fn, dropout_p, softmax_scale, deterministic, dropout_offset)
    if attention_mask is not None:
        _check_attention_mask(fn, attention_mask, b, lk, q.device)
    if attn_bias is not None:
        attn_bias = _check_bias(fn, attn_bias, (b, h, lq, lk), q.device)
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    p = float(dropout_p)
    if p > 0.0:
        check_dropout_range(fn, b * h, lq * lk, "Lq * Lk")
    seed = draw_seed(fn, p, dropout_seed)
    out, lse, _ = ATTENTION_FWD(q, k, v, attention_mask, attn_bias, p, bool(causal), scale, seed,
                                int(dropout_offset), deterministic)
    return (out, lse) if return_lse else out


def _validate_cu_seqlens(fn: str, cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int,
                         max_k: int) -> None:
    """Host-side checks of packed-sequence boundaries (one device sync for CUDA tensors)."""
    for name, cu, total, mx, mx_name, rows in (("cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q", "q"),
                                               ("cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k", "k")):
        c = cu.cpu().to(torch.int64)
        if c[0].item() != 0:
            raise ValueError(f"{fn}: {name} must start at 0, got {c[0].item()}")
        if c[-1].item() != total:
            raise ValueError(f"{fn}: {name} must end at the token count {total} ({rows}.shape[0]), "
                             f"got {c[-1].item()}")
        lens = c[1:] - c[:-1]
        if lens.numel():
            bad = torch.nonzero(lens < 0)
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"{fn}: {name} must be non-decreasing, but {name}[{i + 1}] = {c[i + 1].item()} < "
                                 f"{name}[{i}] = {c[i].item()}")
            longest = int(lens.max())
            if longest > mx:
                raise ValueError(f"{fn}: {mx_name} = {mx} is smaller than the longest sequence in {name} "
                                 f"({longest}, sequence {int(lens.argmax())})")


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    dropout_seed: Optional[int] = None,
    dropout_offset: int = 0,
    deterministic: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences (no padding anywhere).

    Args:
        q: ``(total_q, H, D)`` float32 / float16 / bfloat16 / float64: the sequences'
            tokens concatenated (see :func:`turbotune.padding.unpad_input`).
        k, v: ``(total_k, H, D)``.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 cumulative lengths: start at 0,
            non-decreasing, end at ``total_q`` / ``total_k``; sequence ``b`` is rows
            ``cu[b]:cu[b+1]``; lengths may be 0.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (upper bounds).
        dropout_p, causal, softmax_scale, return_lse, dropout_seed, dropout_offset,
        deterministic: as in :func:`attention` (causal is per sequence; with dropout
            ``max_seqlen_q * max_seqlen_k`` must stay below ``2**34``).

    Returns:
        ``out`` ``(total_q, H, D)``, or ``(out, lse)`` with lse fp32 ``(H, total_q)``.

    ``cu_seqlens`` and ``max_seqlen`` are validated (``ValueError``) on CPU tensors
    always, and on CUDA tensors when ``TURBOTUNE_CHECK=1`` (it costs a device
    synchronisation, so it is off by default there). Unchecked invalid values give
    meaningless results but never make a kernel read or write outside the tensors.
    """
    fn = "attention_varlen"
    _check_qkv(fn, q, k, v, 3, "(total, H, D)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{fn}: k must have q's head count {q.shape[1]}, got shape {tuple(k.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype != torch.int32:
            got = f"{tuple(cu.shape)} {cu.dtype}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"{fn}: {name} must be a (B + 1,) int32 tensor, got {got}")
        if cu.device != q.device:
            raise ValueError(f"{fn}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length (B + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    for name, mx in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(mx, int) or isinstance(mx, bool) or mx < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {mx!r}")
    _check_common(fn, dropout_p, softmax_scale, deterministic, dropout_offset)
    if q.device.type == "cpu" or backend.checks_enabled():
        _validate_cu_seqlens(fn, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    p = float(dropout_p)
    if p > 0.0:
        check_dropout_range(fn, (cu_seqlens_q.numel() - 1) * q.shape[1], max_seqlen_q * max_seqlen_k,
                            "max_seqlen_q * max_seqlen_k")
    seed = draw_seed(fn, p, dropout_seed)
    out, lse = ATTENTION_VARLEN_FWD(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), p, bool(causal), scale, seed,
        int(dropout_offset), deterministic,
    )
    return (out, lse) if return_lse else out
