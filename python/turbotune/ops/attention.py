"""Fused attention for BERT-style training: padding mask, additive bias, causal,
packed variable lengths, dropout, forward and backward.

``attention(q, k, v, ...)`` computes ``softmax(q k^T * scale + bias + mask) v``
on the SDPA layout ``(B, H, L, D)``; ``attention_varlen(...)`` does the same on
packed ``(total, H, D)`` tensors whose sequences are delimited by
``cu_seqlens`` (see :mod:`turbotune.padding`).

This module holds everything about the op:

- :func:`attention_ref` / :func:`attention_varlen_ref` and the explicit
  backward :func:`_attention_backward_ref`: plain PyTorch in fp32 (fp64 for
  fp64 inputs), the CPU default and the tests' reference. They use the very
  same dropout mask as the kernels (see *Dropout* below);
- the Triton kernels, FlashAttention-2 style: a forward with an online softmax
  in fp32 that saves the log-sum-exp; a ``delta = rowsum(dO * O)`` preprocess;
  a ``dK/dV`` kernel (one program per key block, looping over query blocks)
  and a ``dQ`` kernel (one program per query block, looping over key blocks),
  so no atomics are needed and results are deterministic;
- the ``torch.library`` ops ``turbotune::attention_fwd`` / ``attention_bwd``
  / ``attention_varlen_fwd`` / ``attention_varlen_bwd`` with fake
  implementations and autograd;
- the public functions :func:`attention`, :func:`attention_varlen` and the
  debug helper :func:`attention_dropout_mask`.

Semantics shared by every path
------------------------------
- ``key_padding_mask`` (``(B, Lk)``, bool or 0/1 ints): True/1 = attend (the
  Hugging Face ``attention_mask`` convention).
- ``causal``: query ``i`` sees keys ``j <= i + (Lk - Lq)`` (aligned to the
  bottom-right corner, as FlashAttention; identical to SDPA's ``is_causal``
  when ``Lq == Lk``).
- A query row with no key to attend (all masked) produces zeros, never NaN;
  its log-sum-exp is ``-inf`` and its gradients are zero.
- Dropout: counter-based Philox-4x32-10 keyed by ``(seed, offset)`` and the
  position ``(b * H + h, n = i * Lk + j)`` of each attention probability
  (word ``n % 4`` of the Philox block with counter ``(n // 4, b * H + h,
  offset, 0)``), so the backward regenerates the mask instead of storing it,
  the same seed gives the same result, and the CPU reference reproduces the
  kernels' mask bit for bit.
  An element is kept when the top 24 bits of its Philox word are
  ``>= round(p * 2**24)``; kept probabilities are scaled by ``1 / (1 - p)``.
  With ``seed=None`` a seed is drawn from torch's default CPU generator (so
  ``torch.manual_seed`` makes runs reproducible). Philox counters are 32-bit:
  ``Lq * Lk`` must stay below ``2**34`` per head.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import backend
from ._op import FusedOp
from ._triton import HAS_TRITON, next_power_of_2, tl, triton

OP = "attention"
MAX_HEAD_DIM = 256  # the Triton kernels handle 1..256 (padded to a power of two >= 16)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_RNG_BITS = 24

backend.register_op(
    OP,
    triton_dtypes=backend.FLOATS,
    summary="fused attention: padding mask, bias, causal, varlen, dropout (forward and backward)",
)


# ----------------------------------------------------------------------------- dropout RNG (torch side)

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mul32(a: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * b`` for uint32 values held in int64 (no overflow)."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00 = a0 * b0
    mid = a1 * b0 + a0 * b1 + (p00 >> 16)
    hi = (a1 * b1 + (mid >> 16)) & _M32
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    return hi, lo


def _philox4(seed: int, c0: Tensor, c1: Tensor, c2: int, c3: int = 0, rounds: int = 10):
    """The four output words of Philox-4x32 (Triton's ``tl.philox``), uint32 values held in int64."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = c0.to(torch.int64) & _M32
    c1 = torch.broadcast_to(c1.to(torch.int64) & _M32, c0.shape)
    c2 = torch.full_like(c0, c2 & _M32)
    c3 = torch.full_like(c0, c3 & _M32)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _dropout_threshold(p: float) -> int:
    return int(round(p * (1 << _RNG_BITS)))


_CHUNK = 1 << 16  # Philox counters per step: keeps the ~250 elementwise passes in cache


def _keep_mask_ref(seed: int, offset: int, bh: Tensor, lq: int, lk: int, p: float, device) -> Tensor:
    """Keep mask ``(len(bh), lq, lk)`` bool for the (flattened) heads ``bh``.

    Position ``n = i * lk + j`` of head ``bh`` uses word ``n % 4`` of Philox block
    ``(n // 4, bh, offset, 0)`` keyed by ``seed`` -- the kernels' ``_dropout_keep``.
    """
    n = lq * lk
    blocks = (n + 3) // 4
    threshold = _dropout_threshold(p)
    bh = bh.to(device=device, dtype=torch.int64).reshape(-1)
    out = torch.empty(bh.numel(), blocks * 4, dtype=torch.bool, device=device)
    if out.numel() == 0:
        return out[:, :n].reshape(bh.numel(), lq, lk)
    per_step = max(1, _CHUNK // blocks)
    for s0 in range(0, bh.numel(), per_step):
        heads = bh[s0:s0 + per_step].view(-1, 1)
        for b0 in range(0, blocks, _CHUNK):
            ctr = torch.arange(b0, min(blocks, b0 + _CHUNK), device=device, dtype=torch.int64).view(1, -1)
            words = torch.stack(_philox4(seed, ctr.expand(heads.shape[0], -1), heads, offset), dim=-1)
            keep = (words >> (32 - _RNG_BITS)) >= threshold  # (heads, ctr, 4) -> positions 4*ctr + w
            out[s0:s0 + heads.shape[0], 4 * b0:4 * b0 + keep.shape[1] * 4] = keep.reshape(heads.shape[0], -1)
    return out[:, :n].reshape(bh.numel(), lq, lk)


def attention_dropout_mask(
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int = 0,
    *,
    device: Union[str, torch.device] = "cpu",
    use_kernel: Optional[bool] = None,
) -> Tensor:
    """Debug path: the keep-mask ``(batch, heads, seqlen_q, seqlen_k)`` bool that
    :func:`attention` applies for ``(dropout_p, seed, offset)``.

    With ``use_kernel=True`` (default: when the Triton backend is selected for
    ``device``) the mask is produced by a Triton kernel that calls the same
    ``_dropout_keep`` function as the attention kernels; otherwise by the
    PyTorch Philox used by the reference. Both are bit-identical. For a varlen
    batch, sequence ``b`` uses ``mask[b, :, :len_q[b], :len_k[b]]`` of a call
    with ``seqlen_q = len_q[b]`` and ``seqlen_k = len_k[b]`` (the position
    counter is ``i * len_k + j``).
    """
    device = torch.device(device)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_mask: dropout_p must be in [0, 1), got {dropout_p}")
    if use_kernel is None:
        use_kernel = backend.select(OP, device, torch.float32).impl == backend.TRITON
    if use_kernel:
        if not HAS_TRITON:
            raise backend.BackendUnavailable("attention_dropout_mask: use_kernel=True needs triton")
        out = torch.empty(batch * heads, seqlen_q, seqlen_k, dtype=torch.uint8, device=device)
        if out.numel():
            bm, bn = 32, 32
            _dropout_mask_kernel[(triton.cdiv(seqlen_q, bm), triton.cdiv(seqlen_k, bn), batch * heads)](
                out, seqlen_q, seqlen_k, _dropout_threshold(dropout_p), seed, offset, BLOCK_M=bm, BLOCK_N=bn,
            )
        return out.view(batch, heads, seqlen_q, seqlen_k).bool()
    bh = torch.arange(batch * heads, device=device)
    return _keep_mask_ref(seed, offset, bh, seqlen_q, seqlen_k, dropout_p, device).view(
        batch, heads, seqlen_q, seqlen_k
    )


# ----------------------------------------------------------------------------- reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs_ref(q, k, kpm, bias, causal, scale):
    """Softmax probabilities (fp32/fp64) with every mask applied; fully masked rows are 0.
    Returns ``(p, lse)``."""
    cd = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(cd)
    lq, lk = q.shape[-2], k.shape[-2]
    valid = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device).view(-1, 1)
        j = torch.arange(lk, device=q.device).view(1, -1)
        valid = j <= i + (lk - lq)
    valid = valid.expand(s.shape)
    if kpm is not None:
        valid = valid & (kpm != 0).view(kpm.shape[0], 1, 1, lk)
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


def _dense_keep(b, h, lq, lk, dropout_p, seed, offset, device, dropout_mask):
    if dropout_p == 0.0:
        return None
    if dropout_mask is not None:
        return dropout_mask.to(device=device, dtype=torch.bool)
    bh = torch.arange(b * h, device=device)
    return _keep_mask_ref(seed, offset, bh, lq, lk, dropout_p, device).view(b, h, lq, lk)


def _attention_forward_ref(q, k, v, kpm, bias, dropout_p, causal, scale, seed, offset, dropout_mask=None):
    """``(out, lse)``: out in q's dtype, lse fp32 ``(B, H, Lq)``."""
    cd = _compute_dtype(q.dtype)
    p, lse = _probs_ref(q, k, kpm, bias, causal, scale)
    b, h, lq, lk = p.shape
    keep = _dense_keep(b, h, lq, lk, dropout_p, seed, offset, q.device, dropout_mask)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(cd))
    return out.to(q.dtype), lse.to(torch.float32)


def _attention_backward_ref(dout, q, k, v, out, kpm, bias, dropout_p, causal, scale, seed, offset, dropout_mask=None):
    """Explicit gradients ``(dq, dk, dv)`` (the math the kernels implement)."""
    cd = _compute_dtype(q.dtype)
    p, _ = _probs_ref(q, k, kpm, bias, causal, scale)
    b, h, lq, lk = p.shape
    keep = _dense_keep(b, h, lq, lk, dropout_p, seed, offset, q.device, dropout_mask)
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_seed: int = 0,
    dropout_offset: int = 0,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """Plain-PyTorch attention (differentiable by autograd), computed in fp32
    (fp64 for fp64 inputs) and returned in ``q``'s dtype.

    Same contract as :func:`attention`. Dropout uses the kernels' Philox mask
    for ``(dropout_seed, dropout_offset)``, or ``dropout_mask`` (``(B, H, Lq,
    Lk)`` bool, True = keep) when given.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cd = _compute_dtype(q.dtype)
    p, _ = _probs_ref(q, k, key_padding_mask, attn_bias, causal, scale)
    b, h, lq, lk = p.shape
    keep = _dense_keep(b, h, lq, lk, dropout_p, dropout_seed, dropout_offset, q.device, dropout_mask)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p, v.to(cd)).to(q.dtype)


def _varlen_slices(cu_q: Tensor, cu_k: Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _varlen_forward_ref(q, k, v, cu_q, cu_k, dropout_p, causal, scale, seed, offset):
    heads = q.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_q, cu_k)):
        if qe == qs:
            continue
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
        keep = None
        if dropout_p > 0:
            bh = torch.arange(b * heads, (b + 1) * heads, device=q.device)
            keep = _keep_mask_ref(seed, offset, bh, qe - qs, ke - ks, dropout_p, q.device).unsqueeze(0)
        o, l = _attention_forward_ref(qb, kb, vb, None, None, dropout_p, causal, scale, seed, offset, keep)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[:, qs:qe] = l[0]
    return out, lse


def _varlen_backward_ref(dout, q, k, v, out, cu_q, cu_k, dropout_p, causal, scale, seed, offset):
    heads = q.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_q, cu_k)):
        if qe == qs or ke == ks:
            continue
        qb, kb, vb, ob, dob = (
            t.transpose(0, 1).unsqueeze(0) for t in (q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe], dout[qs:qe])
        )
        keep = None
        if dropout_p > 0:
            bh = torch.arange(b * heads, (b + 1) * heads, device=q.device)
            keep = _keep_mask_ref(seed, offset, bh, qe - qs, ke - ks, dropout_p, q.device).unsqueeze(0)
        g = _attention_backward_ref(dob, qb, kb, vb, ob, None, None, dropout_p, causal, scale, seed, offset, keep)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (t[0].transpose(0, 1) for t in g)
    return dq, dk, dv


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
    sequence attends only to itself. Same contract as :func:`attention_varlen`."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    heads = q.shape[1]
    pieces = []
    for b, (qs, qe, ks, ke) in enumerate(_varlen_slices(cu_seqlens_q, cu_seqlens_k)):
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
        keep = None
        if dropout_p > 0:
            bh = torch.arange(b * heads, (b + 1) * heads, device=q.device)
            keep = _keep_mask_ref(dropout_seed, dropout_offset, bh, qe - qs, ke - ks, dropout_p, q.device)
            keep = keep.unsqueeze(0)
        o = attention_ref(qb, kb, vb, dropout_p=dropout_p, causal=causal, softmax_scale=scale, dropout_mask=keep)
        pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces, 0) if pieces else torch.zeros_like(q)


# ----------------------------------------------------------------------------- Triton kernels

_INTERPRET = backend.interpreter_enabled()

if HAS_TRITON:

    def _fwd_configs():
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (64, 128, 4, 2), (128, 32, 4, 4), (64, 32, 4, 4), (32, 32, 4, 1),
            ]
        ]

    def _bwd_configs():
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [
                (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
                (32, 128, 4, 2), (64, 32, 4, 3), (16, 64, 4, 3), (32, 32, 4, 1),
            ]
        ]

    def _prune_for_head_dim(configs, named_args, **kwargs):
        """Large head dims do not fit 128x128 tiles in shared memory: drop those configs."""
        d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64))
        keep = [c for c in configs if not (d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)]
        return keep or configs[:1]

    # The dropout seed/offset must stay runtime integers (Triton turns an int argument equal
    # to 1 into a compile-time constant, which some versions' tl.philox cannot take as a seed).
    _NO_SPECIALIZE = ["seed", "rng_offset"]

    _AUTOTUNE_KEY = ["q_bucket", "k_bucket", "BLOCK_D", "IS_VARLEN", "HAS_KPM", "HAS_BIAS", "CAUSAL", "HAS_DROPOUT"]

    @triton.jit
    def _dropout_keep(seed, rng_offset, bh, offs_i, offs_j, seqlen_k, threshold):
        """Keep mask for the tile of positions ``offs_i`` (query rows, axis 0 of the
        tile when shaped ``[:, None]``) x ``offs_j`` (keys); the caller passes them
        already broadcast to the tile's shape."""
        pos = offs_i.to(tl.int64) * seqlen_k + offs_j
        z64 = pos * 0
        c0 = (pos >> 2).to(tl.uint32)
        c1 = (z64 + bh).to(tl.uint32)
        c2 = (z64 + rng_offset).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0)
        w = pos & 3  # position n uses word n % 4 of Philox block n // 4
        r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
        return (r >> 8).to(tl.int32) >= threshold

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _dropout_mask_kernel(OUT, seqlen_q, seqlen_k, threshold, seed, rng_offset,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(2)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None] + offs_n[None, :] * 0,
                             offs_n[None, :] + offs_m[:, None] * 0, seqlen_k, threshold)
        base = bh.to(tl.int64) * seqlen_q * seqlen_k
        ptr = OUT + base + offs_m[:, None].to(tl.int64) * seqlen_k + offs_n[None, :]
        tl.store(ptr, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))

    @triton.jit
    def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
        if IS_VARLEN:
            q_start = tl.load(CU_Q + b).to(tl.int64)
            q_len = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
            k_start = tl.load(CU_K + b).to(tl.int64)
            k_len = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
        else:
            q_start = (b * 0).to(tl.int64)
            q_len = seqlen_q
            k_start = q_start
            k_len = seqlen_k
        return q_start, q_len, k_start, k_len

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, KPM, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, som, sod,
        slb, slh, slm,
        skpmb, skpmn,
        sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, head_dim,
        qk_scale, threshold, dropout_scale, seed, rng_offset,
        q_bucket, k_bucket,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
        if start_m < q_len:
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_nb = tl.arange(0, BLOCK_N)
            m_ok = offs_m < q_len
            d_ok = offs_d < head_dim
            q_ptr = Q + b64 * sqb + h64 * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd
            q = tl.load(q_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            k_base = K + b64 * skb + h64 * skh + k_start * skn
            v_base = V + b64 * svb + h64 * svh + k_start * svn

            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            end_n = k_len
            if CAUSAL:
                end_n = tl.minimum(k_len, start_m + BLOCK_M + diag)
            if HAS_KPM:  # keys after the last attended one are skipped (padding costs nothing)
                end_n = tl.minimum(end_n, tl.load(KVLEN + b))
            for start_n in range(0, end_n, BLOCK_N):
                offs_n = start_n + offs_nb
                n_ok = offs_n < k_len
                kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                if DOT_F32:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
                valid = n_ok[None, :] & m_ok[:, None]
                if HAS_BIAS:
                    bias = tl.load(BIAS + b64 * sbb + h64 * sbh + offs_m[:, None].to(tl.int64) * sbm
                                   + offs_n[None, :] * sbn, mask=valid, other=0.0).to(tl.float32)
                    s += bias * 1.4426950408889634
                if HAS_KPM:
                    kpm = tl.load(KPM + b64 * skpmb + offs_n * skpmn, mask=n_ok, other=0)
                    valid = valid & (kpm != 0)[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if HAS_DROPOUT:
                    keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None] + offs_n[None, :] * 0,
                                         offs_n[None, :] + offs_m[:, None] * 0, k_len, threshold)
                    p = tl.where(keep, p, 0.0)
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_F32:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            out = acc * (dropout_scale / l_safe)[:, None]
            o_ptr = O + b64 * sob + h64 * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :] * sod
            tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
            lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
            tl.store(LSE + b64 * slb + h64 * slh + (q_start + offs_m) * slm, lse, mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, sdb, sdh, sdm,
                             H, M, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """DELTA[b, h, m] = sum_d O[b, h, m, d] * DO[b, h, m, d] for strided 4-D views."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m[:, None] < M) & (offs_d[None, :] < head_dim)
        rows = offs_m[:, None].to(tl.int64)
        o = tl.load(O + b * sob + h * soh + rows * som + offs_d[None, :] * sod, mask=msk, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + h * sdoh + rows * sdom + offs_d[None, :] * sdod, mask=msk,
                     other=0.0).to(tl.float32)
        tl.store(DELTA + b * sdb + h * sdh + offs_m * sdm, tl.sum(o * do, 1), mask=offs_m < M)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, KPM, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sdob, sdoh, sdom, sdod,
        slb, slh, slm,
        sdkb, sdkh, sdkn, sdkd,
        sdvb, sdvh, sdvn, sdvd,
        skpmb, skpmn,
        sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, head_dim,
        qk_scale, sm_scale, threshold, dropout_scale, seed, rng_offset,
        q_bucket, k_bucket,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
        if start_n < k_len:
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            offs_mb = tl.arange(0, BLOCK_M)
            n_ok = offs_n < k_len
            d_ok = offs_d < head_dim
            nd_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b64 * skb + h64 * skh + (k_start + offs_n[:, None]) * skn + offs_d[None, :] * skd,
                        mask=nd_ok, other=0.0)
            v = tl.load(V + b64 * svb + h64 * svh + (k_start + offs_n[:, None]) * svn + offs_d[None, :] * svd,
                        mask=nd_ok, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            key_ok = n_ok
            if HAS_KPM:
                kpm = tl.load(KPM + b64 * skpmb + offs_n * skpmn, mask=n_ok, other=0)
                key_ok = key_ok & (kpm != 0)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            lo = 0
            if CAUSAL:
                lo = tl.maximum(start_n - diag, 0)
                lo = (lo // BLOCK_M) * BLOCK_M
            q_base = Q + b64 * sqb + h64 * sqh + q_start * sqm
            do_base = DO + b64 * sdob + h64 * sdoh + q_start * sdom
            l_base = LSE + b64 * slb + h64 * slh + q_start * slm
            d_base = DELTA + b64 * slb + h64 * slh + q_start * slm
            hi = q_len
            if HAS_KPM:  # a block of padding keys only needs its zero gradients written
                hi = tl.where(start_n < tl.load(KVLEN + b), q_len, 0)
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_mb
                m_ok = offs_m < q_len
                md_ok = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=md_ok, other=0.0)
                if DOT_F32:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(l_base + offs_m * slm, mask=m_ok, other=0.0)
                lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                delta = tl.load(d_base + offs_m * slm, mask=m_ok, other=0.0)
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (N, M)
                valid = key_ok[:, None] & m_ok[None, :]
                if HAS_BIAS:
                    bias = tl.load(BIAS + b64 * sbb + h64 * sbh + offs_m[None, :].to(tl.int64) * sbm
                                   + offs_n[:, None] * sbn, mask=valid, other=0.0).to(tl.float32)
                    st += bias * 1.4426950408889634
                if CAUSAL:
                    valid = valid & (offs_n[:, None] <= offs_m[None, :] + diag)
                pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (N, M)
                if HAS_DROPOUT:
                    keep = _dropout_keep(seed, rng_offset, bh, offs_m[None, :] + offs_n[:, None] * 0,
                                         offs_n[:, None] + offs_m[None, :] * 0, k_len, threshold)
                    zt = tl.where(keep, pt * dropout_scale, 0.0)
                    dpt = tl.where(keep, dpt * dropout_scale, 0.0)
                else:
                    zt = pt
                dv += tl.dot(zt.to(do.dtype), do, input_precision=DOT_PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
            dk = dk * sm_scale
            tl.store(DK + b64 * sdkb + h64 * sdkh + (k_start + offs_n[:, None]) * sdkn + offs_d[None, :] * sdkd,
                     dk.to(DK.dtype.element_ty), mask=nd_ok)
            tl.store(DV + b64 * sdvb + h64 * sdvh + (k_start + offs_n[:, None]) * sdvn + offs_d[None, :] * sdvd,
                     dv.to(DV.dtype.element_ty), mask=nd_ok)

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, KPM, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sdob, sdoh, sdom, sdod,
        slb, slh, slm,
        sdqb, sdqh, sdqm, sdqd,
        skpmb, skpmn,
        sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, head_dim,
        qk_scale, sm_scale, threshold, dropout_scale, seed, rng_offset,
        q_bucket, k_bucket,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
        if start_m < q_len:
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_nb = tl.arange(0, BLOCK_N)
            m_ok = offs_m < q_len
            d_ok = offs_d < head_dim
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b64 * sqb + h64 * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
                        mask=md_ok, other=0.0)
            do = tl.load(DO + b64 * sdob + h64 * sdoh + (q_start + offs_m[:, None]) * sdom + offs_d[None, :] * sdod,
                         mask=md_ok, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + b64 * slb + h64 * slh + (q_start + offs_m) * slm, mask=m_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + b64 * slb + h64 * slh + (q_start + offs_m) * slm, mask=m_ok, other=0.0)
            k_base = K + b64 * skb + h64 * skh + k_start * skn
            v_base = V + b64 * svb + h64 * svh + k_start * svn
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            end_n = k_len
            if CAUSAL:
                end_n = tl.minimum(k_len, start_m + BLOCK_M + diag)
            if HAS_KPM:  # keys after the last attended one are skipped (padding costs nothing)
                end_n = tl.minimum(end_n, tl.load(KVLEN + b))
            for start_n in range(0, end_n, BLOCK_N):
                offs_n = start_n + offs_nb
                n_ok = offs_n < k_len
                kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                vt = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None] * svd,
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                if DOT_F32:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
                valid = n_ok[None, :] & m_ok[:, None]
                if HAS_BIAS:
                    bias = tl.load(BIAS + b64 * sbb + h64 * sbh + offs_m[:, None].to(tl.int64) * sbm
                                   + offs_n[None, :] * sbn, mask=valid, other=0.0).to(tl.float32)
                    s += bias * 1.4426950408889634
                if HAS_KPM:
                    kpm = tl.load(KPM + b64 * skpmb + offs_n * skpmn, mask=n_ok, other=0)
                    valid = valid & (kpm != 0)[None, :]
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
                p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, vt, input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None] + offs_n[None, :] * 0,
                                         offs_n[None, :] + offs_m[:, None] * 0, k_len, threshold)
                    dp = tl.where(keep, dp * dropout_scale, 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
            dq = dq * sm_scale
            tl.store(DQ + b64 * sdqb + h64 * sdqh + (q_start + offs_m[:, None]) * sdqm + offs_d[None, :] * sdqd,
                     dq.to(DQ.dtype.element_ty), mask=md_ok)


    def _tuned(kernel, configs):
        return triton.autotune(configs=configs, key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune_for_head_dim})(kernel)

    # Autotuned launchers (GPU: several configs; interpreter: one). TURBOTUNE_AUTOTUNE=0 uses
    # the fixed configs below instead (fewer compilations, e.g. for test runs on a GPU).
    _attn_fwd_tuned = _tuned(_attn_fwd_kernel, _fwd_configs())
    _attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv_kernel, _bwd_configs())
    _attn_bwd_dq_tuned = _tuned(_attn_bwd_dq_kernel, _bwd_configs())


def _fixed_config(dtype: torch.dtype, block_d: int) -> dict:
    """The block config used when autotuning is off: small enough for any GPU's shared memory."""
    if _INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if block_d * (4 if dtype == torch.float32 else 2) > 256:  # fp32 D > 64, or D > 128
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _autotune_enabled() -> bool:
    return os.environ.get("TURBOTUNE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _launch(tuned, plain, fixed, grid, *args, **kwargs):
    if _autotune_enabled():
        return tuned[grid](*args, **kwargs)
    return plain[grid](*args, **kwargs, **fixed)


# ----------------------------------------------------------------------------- launchers


def _block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _bucket(n: int) -> int:
    return next_power_of_2(max(int(n), 16))


def _dot_f32(dtype: torch.dtype, device: torch.device) -> bool:
    # The interpreter computes bf16 wrongly (raw uint16 values): upcast right after loading.
    return dtype == torch.float32 or device.type != "cuda"


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would lose ~3 digits); fp16/bf16: the MMA default.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rng_args(dropout_p: float):
    if dropout_p > 0.0:
        return _dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
    return 0, 1.0


def _mask_args(kpm: Optional[Tensor], bias: Optional[Tensor], shape4, dummy: Tensor):
    b, h, lq, lk = shape4
    if kpm is not None:
        kpm_b = kpm if kpm.dtype == torch.bool else (kpm != 0)
        kpm_t = kpm_b.view(torch.uint8)
        kpm_strides = (kpm_t.stride(0), kpm_t.stride(1))
        # per batch row: one past the last attended key (0 when none)
        pos = torch.arange(1, lk + 1, device=kpm_b.device, dtype=torch.int32)
        kv_len = torch.where(kpm_b, pos, torch.zeros_like(pos)).amax(dim=1).to(torch.int32)
    else:
        kpm_t, kpm_strides, kv_len = dummy, (0, 0), dummy
    if bias is not None:
        bias_t = bias.expand(b, h, lq, lk)
        bias_strides = tuple(bias_t.stride())
    else:
        bias_t, bias_strides = dummy, (0, 0, 0, 0)
    return kpm_t, kv_len, kpm_strides, bias_t, bias_strides


def _fwd_triton(q, k, v, kpm, bias, dropout_p, causal, scale, seed, offset, cu_q=None, cu_k=None, max_q=0, max_k=0,
                out_like=None):
    """Dense: q (B, H, Lq, D); varlen: q (total_q, H, D). Returns (out, lse); out is laid
    out like ``out_like`` (default ``q``), as the fake implementation promises."""
    varlen = cu_q is not None
    out = torch.empty_like(q if out_like is None else out_like)
    if varlen:
        total_q, heads, d = q.shape
        batch = cu_q.numel() - 1
        lq, lk = max_q, max_k
        lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
        qs = (0, q.stride(1), q.stride(0), q.stride(2))
        ks = (0, k.stride(1), k.stride(0), k.stride(2))
        vs = (0, v.stride(1), v.stride(0), v.stride(2))
        os_ = (0, out.stride(1), out.stride(0), out.stride(2))
        ls = (0, lse.stride(0), lse.stride(1))
    else:
        batch, heads, lq, d = q.shape
        lk = k.shape[2]
        lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
        qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
        ls = lse.stride()
    if out.numel() == 0 or batch * heads == 0 or lq == 0:
        return out, lse.fill_(float("-inf"))
    if lk == 0:
        out.zero_()
        return out, lse.fill_(float("-inf"))
    kpm_t, kv_len, kpm_s, bias_t, bias_s = _mask_args(kpm, bias, (batch, heads, lq, lk), lse)
    threshold, dscale = _rng_args(dropout_p)
    cu_q_t = cu_q if varlen else lse
    cu_k_t = cu_k if varlen else lse

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)

    _launch(
        _attn_fwd_tuned, _attn_fwd_kernel, _fixed_config(q.dtype, _block_d(d)), grid,
        q, k, v, out, lse, kpm_t, kv_len, bias_t, cu_q_t, cu_k_t,
        *qs, *ks, *vs, *os_, *ls, *kpm_s, *bias_s,
        heads, lq, lk, d,
        scale * _LOG2E, threshold, dscale, seed, offset,
        _bucket(lq), _bucket(lk),
        IS_VARLEN=varlen, HAS_KPM=kpm is not None, HAS_BIAS=bias is not None, CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0, DOT_F32=_dot_f32(q.dtype, q.device), DOT_PREC=_dot_prec(q.dtype),
        BLOCK_D=_block_d(d),
    )
    return out, lse


def _delta(out: Tensor, dout: Tensor, lse: Tensor, varlen: bool) -> Tensor:
    """rowsum(dO * O) in fp32, laid out like ``lse`` (reads any strides, no copies)."""
    d = out.shape[-1]
    if varlen:  # (total, H, D) viewed as (1, H, total, D); lse is (H, total)
        o4, do4 = out.permute(1, 0, 2).unsqueeze(0), dout.permute(1, 0, 2).unsqueeze(0)
    else:
        o4, do4 = out, dout
    _, heads, m, _ = o4.shape
    delta = torch.empty_like(lse)
    d4 = delta.unsqueeze(0) if varlen else delta
    if delta.numel():
        bm = 64
        _attn_bwd_preprocess[(triton.cdiv(m, bm), o4.shape[0] * heads)](
            o4, do4, d4, *o4.stride(), *do4.stride(), *d4.stride(), heads, m, d, BLOCK_M=bm, BLOCK_D=_block_d(d),
        )
    return delta


def _bwd_triton(dout, q, k, v, out, lse, kpm, bias, dropout_p, causal, scale, seed, offset,
                cu_q=None, cu_k=None, max_q=0, max_k=0, grads_like=None):
    varlen = cu_q is not None
    like = grads_like if grads_like is not None else (q, k, v)
    dq, dk, dv = (torch.empty_like(t) for t in like)
    if varlen:
        _, heads, d = q.shape
        batch = cu_q.numel() - 1
        lq, lk = max_q, max_k

        def st(t):
            return (0, t.stride(1), t.stride(0), t.stride(2))

        ls = (0, lse.stride(0), lse.stride(1))
    else:
        batch, heads, lq, d = q.shape
        lk = k.shape[2]

        def st(t):
            return tuple(t.stride())

        ls = lse.stride()
    if batch * heads == 0 or lq == 0 or lk == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = _delta(out, dout, lse, varlen)
    kpm_t, kv_len, kpm_s, bias_t, bias_s = _mask_args(kpm, bias, (batch, heads, lq, lk), lse)
    threshold, dscale = _rng_args(dropout_p)
    cu_q_t = cu_q if varlen else lse
    cu_k_t = cu_k if varlen else lse
    common = dict(
        IS_VARLEN=varlen, HAS_KPM=kpm is not None, HAS_BIAS=bias is not None, CAUSAL=causal,
        HAS_DROPOUT=dropout_p > 0.0, DOT_F32=_dot_f32(q.dtype, q.device), DOT_PREC=_dot_prec(q.dtype),
        BLOCK_D=_block_d(d),
    )
    tail = (heads, lq, lk, d, scale * _LOG2E, scale, threshold, dscale, seed, offset, _bucket(lq), _bucket(lk))
    _launch(
        _attn_bwd_dkdv_tuned, _attn_bwd_dkdv_kernel, _fixed_config(q.dtype, _block_d(d)),
        lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads),
        q, k, v, dout, lse, delta, dk, dv, kpm_t, kv_len, bias_t, cu_q_t, cu_k_t,
        *st(q), *st(k), *st(v), *st(dout), *ls, *st(dk), *st(dv), *kpm_s, *bias_s,
        *tail, **common,
    )
    _launch(
        _attn_bwd_dq_tuned, _attn_bwd_dq_kernel, _fixed_config(q.dtype, _block_d(d)),
        lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads),
        q, k, v, dout, lse, delta, dq, kpm_t, kv_len, bias_t, cu_q_t, cu_k_t,
        *st(q), *st(k), *st(v), *st(dout), *ls, *st(dq), *kpm_s, *bias_s,
        *tail, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- CPU fast path

# Without dropout, the CPU default path runs ATen's fused flash-attention CPU kernel
# (what SDPA uses on CPU) with our masks folded into one additive mask; it returns
# the log-sum-exp we need. With dropout the reference above runs (our Philox mask).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_flash_ok(q: Tensor, k: Tensor, bias: Optional[Tensor], dropout_p: float) -> bool:
    return (
        _CPU_FLASH is not None and _CPU_FLASH_BWD is not None and q.device.type == "cpu" and dropout_p == 0.0
        and q.shape[-2] > 0 and k.shape[-2] > 0 and q.shape[0] * q.shape[1] > 0
        and (bias is None or bias.dtype == q.dtype)
        and os.environ.get("TURBOTUNE_ATTENTION_CPU_FLASH", "1") != "0"
    )


def _additive_mask(q, k, kpm, bias, causal) -> Optional[Tensor]:
    """kpm, bias and causal folded into one additive mask broadcastable to (B, H, Lq, Lk), q's dtype."""
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    m = bias
    if kpm is not None:
        pad = torch.zeros(b, 1, 1, lk, dtype=q.dtype, device=q.device).masked_fill(
            ~(kpm != 0).view(b, 1, 1, lk), float("-inf"))
        m = pad if m is None else m + pad
    if causal:
        i = torch.arange(lq, device=q.device).view(-1, 1)
        j = torch.arange(lk, device=q.device).view(1, -1)
        c = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(j > i + (lk - lq), float("-inf"))
        m = c if m is None else m + c
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)
    return m


def _cpu_flash_forward(q, k, v, kpm, bias, causal, scale):
    mask = _additive_mask(q, k, kpm, bias, causal)
    out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    lse = lse.to(torch.float32)
    if mask is not None:  # the ATen kernel reports 0 for rows with no key; we promise -inf
        empty = torch.isneginf(mask).all(dim=-1).expand(lse.shape)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse.contiguous()


def _cpu_flash_backward(dout, q, k, v, out, lse, kpm, bias, causal, scale):
    mask = _additive_mask(q, k, kpm, bias, causal)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # exp(-inf - 0) = 0 for rows with no key
    return _CPU_FLASH_BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------- torch.library ops


def _use_triton(q: Tensor) -> bool:
    return backend.select(OP, q.device, q.dtype).impl == backend.TRITON and q.shape[-1] <= MAX_HEAD_DIM


def _inner_contig(t: Tensor) -> Tensor:
    """The kernels take any strides, but a unit-stride head dim keeps loads coalesced."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], attn_bias: Optional[Tensor],
    dropout_p: float, causal: bool, softmax_scale: float, seed: int, offset: int,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``: out like ``q`` (same strides), lse fp32 ``(B, H, Lq)`` (natural log)."""
    if not _use_triton(q):
        if _cpu_flash_ok(q, k, attn_bias, dropout_p):
            out, lse = _cpu_flash_forward(q, k, v, key_padding_mask, attn_bias, causal, softmax_scale)
        else:
            out, lse = _attention_forward_ref(q, k, v, key_padding_mask, attn_bias, dropout_p, causal,
                                              softmax_scale, seed, offset)
        if out.stride() == q.stride() or q.numel() == 0:  # the fake promises q's layout
            return out, lse.contiguous()
        res = torch.empty_like(q)
        res.copy_(out)
        return res, lse.contiguous()
    return _fwd_triton(_inner_contig(q), _inner_contig(k), _inner_contig(v), key_padding_mask, attn_bias,
                       dropout_p, causal, softmax_scale, seed, offset, out_like=q)


def _attention_fwd_fake(q, k, v, key_padding_mask, attn_bias, dropout_p, causal, softmax_scale, seed, offset):
    b, h, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)


def _attention_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], attn_bias: Optional[Tensor],
    dropout_p: float, causal: bool, softmax_scale: float, seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)`` shaped and strided like ``q``, ``k``, ``v``."""
    if not _use_triton(q):
        if _cpu_flash_ok(q, k, attn_bias, dropout_p):
            g = _cpu_flash_backward(dout, q, k, v, out, lse, key_padding_mask, attn_bias, causal, softmax_scale)
        else:
            g = _attention_backward_ref(dout, q, k, v, out, key_padding_mask, attn_bias, dropout_p, causal,
                                        softmax_scale, seed, offset)
        return tuple(t if t.stride() == x.stride() else torch.empty_like(x).copy_(t) for t, x in zip(g, (q, k, v)))
    return _bwd_triton(dout, _inner_contig(q), _inner_contig(k), _inner_contig(v), _inner_contig(out), lse,
                       key_padding_mask, attn_bias, dropout_p, causal, softmax_scale, seed, offset,
                       grads_like=(q, k, v))


def _attention_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, attn_bias, dropout_p, causal, softmax_scale, seed,
                        offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup(ctx, inputs, output):
    q, k, v, kpm, bias, dropout_p, causal, scale, seed, offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, bias)
    ctx.args = (dropout_p, causal, scale, seed, offset)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, kpm, bias = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None, None, None, None
    dq, dk, dv = _ATTENTION_BWD.from_backward(ctx, dout, q, k, v, out, lse, kpm, bias, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_ATTENTION_BWD = FusedOp("attention_bwd", _attention_bwd_impl, fake=_attention_bwd_fake)
_ATTENTION_FWD = FusedOp("attention_fwd", _attention_fwd_impl, fake=_attention_fwd_fake,
                         setup_context=_fwd_setup, backward=_fwd_backward)


def _attention_varlen_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, causal: bool, softmax_scale: float, seed: int, offset: int,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``: out like ``q`` ``(total_q, H, D)``, lse fp32 ``(H, total_q)``."""
    if not _use_triton(q):
        out, lse = _varlen_forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, causal, softmax_scale,
                                       seed, offset)
        res = torch.empty_like(q)
        res.copy_(out)
        return res, lse
    return _fwd_triton(_inner_contig(q), _inner_contig(k), _inner_contig(v), None, None, dropout_p, causal,
                       softmax_scale, seed, offset, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       out_like=q)


def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                               softmax_scale, seed, offset):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _attention_varlen_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, causal: bool,
    softmax_scale: float, seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``."""
    if not _use_triton(q):
        g = _varlen_backward_ref(dout, q, k, v, out, cu_seqlens_q, cu_seqlens_k, dropout_p, causal,
                                 softmax_scale, seed, offset)
        res = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        for r, t in zip(res, g):
            r.copy_(t)
        return res
    return _bwd_triton(dout, _inner_contig(q), _inner_contig(k), _inner_contig(v), _inner_contig(out), lse,
                       None, None, dropout_p, causal, softmax_scale, seed, offset,
                       cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grads_like=(q, k, v))


def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, causal, softmax_scale, seed, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, dropout_p, causal, scale, seed, offset)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    nones = (None,) * 9
    if dout is None:
        return (None, None, None) + nones
    dq, dk, dv = _ATTENTION_VARLEN_BWD.from_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + nones


_ATTENTION_VARLEN_BWD = FusedOp("attention_varlen_bwd", _attention_varlen_bwd_impl, fake=_attention_varlen_bwd_fake)
_ATTENTION_VARLEN_FWD = FusedOp("attention_varlen_fwd", _attention_varlen_fwd_impl, fake=_attention_varlen_fwd_fake,
                                setup_context=_varlen_setup, backward=_varlen_backward)


# ----------------------------------------------------------------------------- public API


def _draw_seed(dropout_p: float, seed: Optional[int]) -> int:
    if dropout_p == 0.0:
        return 0
    if seed is not None:
        if not isinstance(seed, int) or seed < 0 or seed >= 2**63:
            raise ValueError(f"attention: dropout_seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    # torch's default CPU generator: reproducible under torch.manual_seed, no device sync.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


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


def _check_common(fn: str, dropout_p, softmax_scale):
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"{fn}: softmax_scale must be a finite float or None, got {softmax_scale!r}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    dropout_seed: Optional[int] = None,
    dropout_offset: int = 0,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled dot-product attention with padding mask, bias, causal and dropout.

    Args:
        q: ``(B, H, Lq, D)`` float32 / float16 / bfloat16 (the SDPA layout; any
            strides, e.g. a transposed ``(B, L, H, D)`` projection).
        k, v: ``(B, H, Lk, D)``, same dtype and device as ``q``.
        key_padding_mask: ``(B, Lk)`` bool or 0/1 integers, **True/1 = attend**
            (Hugging Face's ``attention_mask``); None = every key.
        attn_bias: additive float bias broadcastable to ``(B, H, Lq, Lk)``
            (``-inf`` entries mask). No gradient flows to it.
        dropout_p: attention-probability dropout in ``[0, 1)``; apply only in
            training (pass 0.0 in eval).
        causal: mask keys ``j > i + (Lk - Lq)`` (bottom-right aligned).
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, H, Lq)`` fp32 (natural log;
            ``-inf`` for rows with no key).
        dropout_seed, dropout_offset: Philox key and counter offset of the
            dropout mask; default: a seed drawn from torch's CPU generator.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in ``q``'s dtype (laid out like ``q``), or
        ``(out, lse)``. Rows with no key to attend are zeros.

    Gradients flow to ``q``, ``k`` and ``v``. Runs the Triton kernels on a GPU
    (or under ``TRITON_INTERPRET=1`` with ``TURBOTUNE_BACKEND=triton``) and the
    PyTorch reference elsewhere; both use the same dropout mask.
    """
    fn = "attention"
    _check_qkv(fn, q, k, v, 4, "(B, H, L, D)")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        raise ValueError(f"{fn}: k must have shape ({b}, {h}, Lk, {d}) to match q, got {tuple(k.shape)}")
    lk = k.shape[2]
    _check_common(fn, dropout_p, softmax_scale)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.shape != (b, lk):
            got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"{fn}: key_padding_mask must have shape (B, Lk) = ({b}, {lk}), got {got}")
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise TypeError(f"{fn}: key_padding_mask must be bool or integer (True/1 = attend), "
                            f"got dtype {key_padding_mask.dtype}; pass a float mask as attn_bias")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{fn}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor) or not attn_bias.is_floating_point():
            raise TypeError(f"{fn}: attn_bias must be a floating tensor, got "
                            f"{attn_bias.dtype if isinstance(attn_bias, Tensor) else type(attn_bias).__name__}")
        try:
            torch.broadcast_shapes(attn_bias.shape, (b, h, lq, lk))
            ok = attn_bias.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok or torch.broadcast_shapes(attn_bias.shape, (b, h, lq, lk)) != (b, h, lq, lk):
            raise ValueError(f"{fn}: attn_bias must be broadcastable to (B, H, Lq, Lk) = {(b, h, lq, lk)}, "
                             f"got {tuple(attn_bias.shape)}")
        if attn_bias.device != q.device:
            raise ValueError(f"{fn}: attn_bias is on {attn_bias.device} but q is on {q.device}")
        while attn_bias.dim() < 4:
            attn_bias = attn_bias.unsqueeze(0)
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    p = float(dropout_p)
    seed = _draw_seed(p, dropout_seed)
    out, lse = _ATTENTION_FWD(q, k, v, key_padding_mask, attn_bias, p, bool(causal), scale, seed,
                              int(dropout_offset))
    return (out, lse) if return_lse else out


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
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences (no padding anywhere).

    Args:
        q: ``(total_q, H, D)`` float32 / float16 / bfloat16: the sequences'
            tokens concatenated (see :func:`turbotune.padding.unpad_input`).
        k, v: ``(total_k, H, D)``.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 cumulative lengths
            starting at 0; sequence ``b`` is rows ``cu[b]:cu[b+1]``; lengths may be 0.
        max_seqlen_q, max_seqlen_k: the longest sequence (ints, upper bounds).
        dropout_p, causal, softmax_scale, return_lse, dropout_seed,
        dropout_offset: as in :func:`attention` (causal is per sequence).

    Returns:
        ``out`` ``(total_q, H, D)``, or ``(out, lse)`` with lse fp32 ``(H, total_q)``.
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
    _check_common(fn, dropout_p, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    p = float(dropout_p)
    seed = _draw_seed(p, dropout_seed)
    out, lse = _ATTENTION_VARLEN_FWD(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), p, bool(causal), scale, seed,
        int(dropout_offset),
    )
    return (out, lse) if return_lse else out
