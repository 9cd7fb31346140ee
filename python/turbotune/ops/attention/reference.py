"""Plain-PyTorch attention: the definition of the semantics, the CPU fallback
and the tests' reference.

Everything computes in fp32 (fp64 for fp64 inputs) and applies the kernels'
own dropout mask (:mod:`.philox`). The four functions :func:`forward`,
:func:`backward`, :func:`varlen_forward` and :func:`varlen_backward` are the
signatures every CPU implementation of the op shares (see :mod:`.cpu`);
:func:`attention_ref` / :func:`attention_varlen_ref` are the public,
autograd-differentiable versions.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .philox import keep_mask_ref

RENAMED = (
    "key_padding_mask was renamed to attention_mask, with Hugging Face's convention: (B, Lk), bool or 0/1, "
    "True/1 = a real token to attend (what the tokenizer returns). Note torch.nn.MultiheadAttention's "
    "key_padding_mask means the opposite (True = ignore): pass attention_mask=~key_padding_mask for one of those."
)


def reject_key_padding_mask(fn):
    """Make ``fn(..., key_padding_mask=...)`` raise a ``TypeError`` explaining the rename."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "key_padding_mask" in kwargs:
            raise TypeError(f"{fn.__name__}(): {RENAMED}")
        return fn(*args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def probs(q: Tensor, k: Tensor, attention_mask: Optional[Tensor], attn_bias: Optional[Tensor], causal: bool,
          scale: float) -> Tuple[Tensor, Tensor]:
    """Softmax probabilities ``(B, H, Lq, Lk)`` (fp32/fp64) with every mask applied, and the
    log-sum-exp ``(B, H, Lq)``. Fully masked rows give zeros and ``lse = -inf``."""
    cd = compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(cd)
    lq, lk = q.shape[-2], k.shape[-2]
    valid = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device).view(-1, 1)
        j = torch.arange(lk, device=q.device).view(1, -1)
        valid = j <= i + (lk - lq)
    valid = valid.expand(s.shape)
    if attention_mask is not None:
        valid = valid & (attention_mask != 0).view(attention_mask.shape[0], 1, 1, lk)
    s = s.masked_fill(~valid, float("-inf"))
    if lk == 0:
        return s, torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = torch.where(denom == 0, torch.full_like(denom, float("-inf")), m + torch.log(denom)).squeeze(-1)
    return p, lse


def dense_keep(b: int, h: int, lq: int, lk: int, dropout_p: float, seed: int, offset: int, device,
               dropout_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The keep mask ``(B, H, Lq, Lk)`` of a dense call (None without dropout)."""
    if dropout_p == 0.0:
        return None
    if dropout_mask is not None:
        return dropout_mask.to(device=device, dtype=torch.bool)
    bh = torch.arange(b * h, device=device)
    return keep_mask_ref(seed, offset, bh, lq, lk, dropout_p, device).view(b, h, lq, lk)


def forward(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], attn_bias: Optional[Tensor],
            dropout_p: float, causal: bool, scale: float, seed: int, offset: int,
            dropout_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Dense forward. q ``(B, H, Lq, D)``, k/v ``(B, H, Lk, D)``, attention_mask ``(B, Lk)``
    bool/int (True/1 = attend) or None, attn_bias broadcastable 4-D or None.
    Returns ``(out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32)``."""
    cd = compute_dtype(q.dtype)
    p, lse = probs(q, k, attention_mask, attn_bias, causal, scale)
    b, h, lq, lk = p.shape
    keep = dense_keep(b, h, lq, lk, dropout_p, seed, offset, q.device, dropout_mask)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(cd))
    return out.to(q.dtype), lse.to(torch.float32)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Optional[Tensor],
             attention_mask: Optional[Tensor], attn_bias: Optional[Tensor], dropout_p: float, causal: bool,
             scale: float, seed: int, offset: int, bias_grad: bool = False,
             dropout_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Dense backward, the math the kernels implement. ``lse`` is accepted for a common
    signature but not used (the probabilities are recomputed in fp32/fp64).
    Returns ``(dq, dk, dv, dbias)``; dbias has ``attn_bias``'s shape (summed over its
    broadcast dimensions) when ``bias_grad``, else None."""
    cd = compute_dtype(q.dtype)
    p, _ = probs(q, k, attention_mask, attn_bias, causal, scale)
    b, h, lq, lk = p.shape
    keep = dense_keep(b, h, lq, lk, dropout_p, seed, offset, q.device, dropout_mask)
    do, vf = dout.to(cd), v.to(cd)
    z = p if keep is None else p * keep / (1.0 - dropout_p)
    dv = torch.matmul(z.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    if keep is not None:
        dp = dp * keep / (1.0 - dropout_p)
    delta = (do * out.to(cd)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(cd)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cd)) * scale
    dbias = None
    if bias_grad and attn_bias is not None:
        dbias = ds.sum_to_size(attn_bias.shape).to(attn_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _varlen_slices(cu_q: Tensor, cu_k: Tensor) -> List[Tuple[int, int, int, int]]:
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _varlen_keep(b: int, heads: int, lq: int, lk: int, dropout_p: float, seed: int, offset: int, device):
    if dropout_p == 0.0:
        return None
    bh = torch.arange(b * heads, (b + 1) * heads, device=device)
    return keep_mask_ref(seed, offset, bh, lq, lk, dropout_p, device).unsqueeze(0)


def _heads_first(*ts: Tensor) -> List[Tensor]:
    return [t.transpose(0, 1).unsqueeze(0) for t in ts]


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                   dropout_p: float, causal: bool, scale: float, seed: int, offset: int) -> Tuple[Tensor, Tensor]:
    """Varlen forward: q ``(total_q, H, D)``, k/v ``(total_k, H, D)``, cu ``(B + 1,)`` int32
    (validated; ``max_q`` / ``max_k`` are not needed here: the lengths come from ``cu``).
    Returns ``(out (total_q, H, D), lse (H, total_q) fp32)``."""
    heads = q.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_q, cu_k)):
        if qe == qs:
            continue
        qb, kb, vb = _heads_first(q[qs:qe], k[ks:ke], v[ks:ke])
        keep = _varlen_keep(b, heads, qe - qs, ke - ks, dropout_p, seed, offset, q.device)
        o, l = forward(qb, kb, vb, None, None, dropout_p, causal, scale, seed, offset, keep)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def varlen_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Optional[Tensor],
                    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, dropout_p: float, causal: bool,
                    scale: float, seed: int, offset: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Varlen backward: ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (``lse`` unused)."""
    heads = q.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_q, cu_k)):
        if qe == qs or ke == ks:
            continue
        qb, kb, vb, ob, dob = _heads_first(q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe], dout[qs:qe])
        keep = _varlen_keep(b, heads, qe - qs, ke - ks, dropout_p, seed, offset, q.device)
        g = backward(dob, qb, kb, vb, ob, None, None, None, dropout_p, causal, scale, seed, offset,
                     dropout_mask=keep)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (t[0].transpose(0, 1) for t in g[:3])
    return dq, dk, dv


@reject_key_padding_mask
def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """Plain-PyTorch attention (differentiable by autograd, the bias included), computed
    in fp32 (fp64 for fp64 inputs) and returned in ``q``'s dtype.

    Same contract as :func:`~turbotune.ops.attention`. Dropout uses the kernels'
    Philox mask for ``(dropout_seed, dropout_offset)``, or ``dropout_mask``
    (``(B, H, Lq, Lk)`` bool, True = keep) when given.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return forward(q, k, v, attention_mask, attn_bias, dropout_p, causal, scale, dropout_seed, dropout_offset,
                   dropout_mask)[0]


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
) -> Tensor:
    """Plain-PyTorch varlen attention (differentiable by autograd): each packed
    sequence attends only to itself. Same contract as :func:`~turbotune.ops.attention_varlen`."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    heads = q.shape[1]
    pieces = []
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_seqlens_q, cu_seqlens_k)):
        qb, kb, vb = _heads_first(q[qs:qe], k[ks:ke], v[ks:ke])
        keep = _varlen_keep(b, heads, qe - qs, ke - ks, dropout_p, dropout_seed, dropout_offset, q.device)
        o = attention_ref(qb, kb, vb, dropout_p=dropout_p, causal=causal, softmax_scale=scale, dropout_mask=keep)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces, 0) if pieces else torch.zeros_like(q)
