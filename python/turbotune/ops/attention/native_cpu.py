"""Native CPU attention: launcher of the C++ kernels in ``csrc/cpu/attention.cpp``.

Forward and backward of ``softmax(q k^T * scale + masks) v`` on CPU tensors,
for packed variable-length batches (``cu_seqlens``) and dense ``(B, H, L, D)``
batches with an optional key padding mask, causal masking and dropout.
:class:`OpImplementation` adapts them to the reference's signatures
(:class:`.cpu.NativeAttention`); :mod:`turbotune.ops.attention` registers it
with :func:`.cpu.register_native` as the default CPU path. The functions:

- :func:`varlen_forward` / :func:`varlen_backward`
- :func:`dense_forward` / :func:`dense_backward`
- :func:`available`, :data:`SUPPORTED_DTYPES`, :func:`simd_variant`,
  :func:`dropout_mask` (debug: the keep mask the kernels apply)

Semantics (the same as every other attention path of turbotune):

- math in fp32 for fp32 / fp16 / bf16 storage; outputs in the inputs' dtype,
  the log-sum-exp in fp32 (natural log, ``-inf`` for a row with no visible
  key, whose output and gradients are zeros);
- ``key_mask`` ``(B, Lk)``: True / nonzero = attend; masked keys may be
  anywhere (not only at the end); masked keys get zero ``dk`` / ``dv``;
- causal is bottom-right aligned: key ``j`` is visible to query ``i`` when
  ``j <= i + (Lk - Lq)`` (per sequence for varlen);
- dropout: the Philox-4x32-10 keep mask of the Triton kernels and of
  ``attention_dropout_mask`` bit for bit (position ``n = i * Lk + j`` of head
  ``bh = b * H + h``, word ``n % 4`` of the block with counter ``(n // 4, bh,
  offset, 0)``, key ``(seed & 0xffffffff, seed >> 32)``, kept when ``word >> 8
  >= round(p * 2**24)``, kept probabilities scaled by ``1 / (1 - p)``); the
  backward regenerates it. ``seed`` in ``[0, 2**63)``, ``offset`` in ``[0, 2**32)`` (:mod:`.philox`'s limits).

Inputs may have any strides (e.g. ``(B, L, H, D)`` projections viewed as
``(B, H, L, D)``); outputs are allocated with ``torch.empty_like`` (so they
follow the inputs' layout when it is dense). The kernels use
``torch.get_num_threads()`` threads and release the GIL. There is no limit on
the head dim or the sequence lengths beyond memory: the backward keeps about
``5 * Lk * D + 3 * BM * (D + Lk)`` floats of scratch per thread and head of a work item (BM <= 64
query rows). Per head, ``Lq * Lk`` must stay below ``2**34`` (32-bit Philox counter, as the Triton
kernels).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _native
from .philox import MAX_SEED, check_offset

__all__ = [
    "SUPPORTED_DTYPES",
    "available",
    "simd_variant",
    "varlen_forward",
    "varlen_backward",
    "dense_forward",
    "dense_backward",
    "dropout_mask",
]

#: Storage dtypes the kernels take (math is always fp32; fp64 runs the PyTorch reference).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_RNG_BITS = 24
_SIMD_CHOICES = ("auto", "generic", "avx2", "avx512")


def available() -> Tuple[bool, str]:
    """``(True, description)`` when the compiled kernels can run here, else ``(False, reason)``."""
    st = _native.status()
    if not st.loaded:
        return False, f"the native extension turbotune._C is not loaded ({st.error})"
    if not hasattr(_native._C, "attention_forward_cpu"):
        return False, "turbotune._C was built without the CPU attention kernels; rebuild turbotune (pip install .)"
    return True, f"native CPU attention ({_native._C.attention_cpu_simd('auto')}, OpenMP={st.openmp})"


def _lib():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"turbotune native CPU attention: {why}")
    return _native._C


def simd_variant(simd: str = "auto") -> str:
    """The SIMD variant (``"avx512"``, ``"avx2"`` or ``"generic"``) the kernels run for ``simd``.

    ``"auto"`` is the best this CPU has (capped by ``TURBOTUNE_CPU_SIMD``); an
    explicit request is capped to what the CPU has.
    """
    _check_simd(simd)
    return _lib().attention_cpu_simd(simd)


def _check_simd(simd: str) -> None:
    if simd not in _SIMD_CHOICES:
        raise ValueError(f"simd must be one of {_SIMD_CHOICES}, got {simd!r}")


# ----------------------------------------------------------------------------- argument checks


def _check_float(fn: str, name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be a CPU tensor, got device {t.device}")


def _check_same(fn: str, name: str, t: Tensor, ref: Tensor, shape) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but q has {ref.dtype}; they must match")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_qkv(fn: str, q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(fn, name, t, ndim, layout)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share a dtype")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{fn}: q and k must share the head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError(f"{fn}: head dim D must be >= 1")


def _check_scalars(fn: str, dropout_p, causal, scale, seed, offset) -> Tuple[float, int, int]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{fn}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be a finite float, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63), got {seed!r}")
    check_offset(fn, offset)
    p = float(dropout_p)
    return p, int(round(p * (1 << _RNG_BITS))), offset


def _check_key_mask(fn: str, key_mask, b: int, lk: int) -> Optional[Tensor]:
    if key_mask is None:
        return None
    if not isinstance(key_mask, Tensor):
        raise TypeError(f"{fn}: key_mask must be a torch.Tensor or None, got {type(key_mask).__name__}")
    if tuple(key_mask.shape) != (b, lk):
        raise ValueError(f"{fn}: key_mask must have shape (B, Lk) = ({b}, {lk}), got {tuple(key_mask.shape)}")
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise TypeError(f"{fn}: key_mask must be bool or integer (True/nonzero = attend), got {key_mask.dtype}")
    if key_mask.device.type != "cpu":
        raise ValueError(f"{fn}: key_mask must be a CPU tensor, got device {key_mask.device}")
    if key_mask.dtype == torch.bool:
        return key_mask.view(torch.uint8)
    if key_mask.dtype == torch.uint8:
        return key_mask
    return (key_mask != 0).view(torch.uint8)


def _check_cu(fn: str, name: str, cu, total: int, max_name: str, max_seqlen, values: bool = True) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype != torch.int32:
        got = f"shape {tuple(cu.shape)} dtype {cu.dtype}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"{fn}: {name} must be a (B + 1,) int32 tensor, got {got}")
    if cu.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be a CPU tensor, got device {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{fn}: {max_name} must be a non-negative int, got {max_seqlen!r}")
    if not values:  # the caller validated the boundaries already (the attention op does, once per call)
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{fn}: {name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{fn}: {name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{fn}: {name} must end at the number of rows {total}, got {vals[-1]}")
    longest = max(lens, default=0)
    if max_seqlen < longest:
        raise ValueError(f"{fn}: {max_name} = {max_seqlen} is smaller than the longest sequence ({longest})")


def _check_lse(fn: str, lse, shape) -> None:
    if not isinstance(lse, Tensor):
        raise TypeError(f"{fn}: lse must be a torch.Tensor, got {type(lse).__name__}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(shape) or lse.device.type != "cpu":
        raise ValueError(f"{fn}: lse must be a float32 CPU tensor of shape {tuple(shape)}, got "
                         f"{tuple(lse.shape)} {lse.dtype} on {lse.device}")


# ----------------------------------------------------------------------------- views


def _dense_view(t: Tensor):
    s = t.stride()
    return (t.data_ptr(), s[0], s[1], s[2], s[3])


def _varlen_view(t: Tensor):  # (total, H, D): row = the packed token
    s = t.stride()
    return (t.data_ptr(), 0, s[1], s[0], s[2])


def _dense_lse_view(lse: Tensor):  # (B, H, Lq)
    s = lse.stride()
    return (lse.data_ptr(), s[0], s[1], s[2], 0)


def _varlen_lse_view(lse: Tensor):  # (H, total_q)
    s = lse.stride()
    return (lse.data_ptr(), 0, s[0], s[1], 0)


def _problem(q: Tensor, heads: int, seqlen_q: int, seqlen_k: int, cu_q, cu_k, total_q: int, total_k: int, key_mask,
             causal: bool, scale: float, p: float, threshold: int, seed: int, offset: int, simd: str) -> dict:
    batch = cu_q.numel() - 1 if cu_q is not None else q.shape[0]
    return dict(
        dtype=_DTYPE_CODE[q.dtype], batch=batch, heads=heads, head_dim=q.shape[-1], seqlen_q=seqlen_q,
        seqlen_k=seqlen_k, cu_seqlens_q=cu_q.data_ptr() if cu_q is not None else 0,
        cu_seqlens_k=cu_k.data_ptr() if cu_k is not None else 0, total_q=total_q, total_k=total_k,
        key_mask=key_mask.data_ptr() if key_mask is not None else 0,
        mask_stride_b=key_mask.stride(0) if key_mask is not None else 0,
        mask_stride_k=key_mask.stride(1) if key_mask is not None else 0,
        causal=causal, scale=float(scale), dropout_p=p if p > 0 else 0.0, dropout_threshold=threshold if p > 0 else 0,
        seed=seed, offset=offset, num_threads=torch.get_num_threads(), simd=simd,
    )


def _check_grad_inputs(fn: str, q: Tensor, grad, layout: str, lse_shape) -> None:
    """Backward extras: dout and the forward's out shaped like q, lse fp32 ``lse_shape``."""
    dout, out, lse = grad
    for name, t in (("dout", dout), ("out", out)):
        _check_float(fn, name, t, q.dim(), layout)
        _check_same(fn, name, t, q, q.shape)
    _check_lse(fn, lse, lse_shape)


def _varlen_problem(fn: str, q, k, v, grad, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset,
                    simd, check_cu_values: bool = True) -> dict:
    """Checks every argument of a varlen call (``grad`` = (dout, out, lse) for the backward)."""
    _check_qkv(fn, q, k, v, 3, "(total, H, D)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{fn}: k must have q's head count {q.shape[1]}, got shape {tuple(k.shape)}")
    if grad is not None:
        _check_grad_inputs(fn, q, grad, "(total_q, H, D)", (q.shape[1], q.shape[0]))
    _check_cu(fn, "cu_q", cu_q, q.shape[0], "max_q", max_q, check_cu_values)
    _check_cu(fn, "cu_k", cu_k, k.shape[0], "max_k", max_k, check_cu_values)
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{fn}: cu_q and cu_k must have the same length (B + 1), got {cu_q.numel()} and {cu_k.numel()}")
    p, thr, off = _check_scalars(fn, dropout_p, causal, scale, seed, offset)
    _check_simd(simd)
    return _problem(q, q.shape[1], 0, 0, cu_q, cu_k, q.shape[0], k.shape[0], None, causal, scale, p, thr, seed, off,
                    simd)


def _dense_problem(fn: str, q, k, v, grad, key_mask, causal, scale, dropout_p, seed, offset, simd):
    """Checks every argument of a dense call (``grad`` = (dout, out, lse) for the backward).
    Returns ``(args, mask)``: the caller must hold ``mask`` (the uint8 key mask, possibly a new
    tensor) until the kernel has run, ``args`` only holds its address."""
    _check_qkv(fn, q, k, v, 4, "(B, H, L, D)")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        raise ValueError(f"{fn}: k must have shape ({b}, {h}, Lk, {d}) to match q, got {tuple(k.shape)}")
    mask = _check_key_mask(fn, key_mask, b, k.shape[2])
    if grad is not None:
        _check_grad_inputs(fn, q, grad, "(B, H, Lq, D)", (b, h, lq))
    p, thr, off = _check_scalars(fn, dropout_p, causal, scale, seed, offset)
    _check_simd(simd)
    return _problem(q, h, lq, k.shape[2], None, None, 0, 0, mask, causal, scale, p, thr, seed, off, simd), mask


# ----------------------------------------------------------------------------- varlen


def varlen_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, dropout_p: float,
    causal: bool, scale: float, seed: int, offset: int, *, simd: str = "auto", check_cu_values: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Forward over packed sequences.

    Args:
        q: ``(total_q, H, D)`` float32 / float16 / bfloat16, any strides.
        k, v: ``(total_k, H, D)``, q's dtype.
        cu_q, cu_k: ``(B + 1,)`` int32 cumulative lengths: start at 0, non-decreasing, end at
            total_q / total_k; sequence ``b`` is rows ``cu[b]:cu[b + 1]`` (lengths may be 0).
        max_q, max_k: ints >= the longest query / key sequence.
        dropout_p: in ``[0, 1)``. causal: bool (per sequence, bottom-right aligned).
        scale: softmax scale (finite float). seed: int in ``[0, 2**63)``. offset: int in ``[0, 2**32)``.
        simd: ``"auto"`` or a variant to force (tests).
        check_cu_values: False when the caller has already checked the ``cu`` / ``max`` values (the
            attention op does, once per call); their dtype, shape and device are always checked.

    Returns:
        ``(out, lse)``: out ``(total_q, H, D)`` in q's dtype (``empty_like(q)``), lse fp32
        ``(H, total_q)`` (natural log; ``-inf`` for rows with no key).
    """
    args = _varlen_problem("varlen_forward", q, k, v, None, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale,
                           seed, offset, simd, check_cu_values)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32)
    _lib().attention_forward_cpu(**args, q=_varlen_view(q), k=_varlen_view(k), v=_varlen_view(v),
                                 out=_varlen_view(out), lse=_varlen_lse_view(lse))
    return out, lse


def varlen_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
    max_k: int, dropout_p: float, causal: bool, scale: float, seed: int, offset: int, *, simd: str = "auto",
    check_cu_values: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`varlen_forward` (same arguments, plus ``dout`` and the forward's ``out``
    ``(total_q, H, D)`` and ``lse`` ``(H, total_q)`` fp32). The dropout mask is regenerated.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (``empty_like``), in their dtype.
    """
    args = _varlen_problem("varlen_backward", q, k, v, (dout, out, lse), cu_q, cu_k, max_q, max_k, dropout_p, causal,
                           scale, seed, offset, simd, check_cu_values)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _lib().attention_backward_cpu(
        **args, dout=_varlen_view(dout), q=_varlen_view(q), k=_varlen_view(k), v=_varlen_view(v),
        out=_varlen_view(out), lse=_varlen_lse_view(lse), dq=_varlen_view(dq), dk=_varlen_view(dk),
        dv=_varlen_view(dv),
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- dense


def dense_forward(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], causal: bool, scale: float, dropout_p: float,
    seed: int, offset: int, *, simd: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Forward over a dense batch.

    Args:
        q: ``(B, H, Lq, D)`` float32 / float16 / bfloat16, any strides.
        k, v: ``(B, H, Lk, D)``, q's dtype.
        key_mask: ``(B, Lk)`` bool / integer (True / nonzero = attend; anywhere, not only a
            suffix), or None (every key).
        causal, scale, dropout_p, seed, offset, simd: as in :func:`varlen_forward`.

    Returns:
        ``(out, lse)``: out ``(B, H, Lq, D)`` in q's dtype (``empty_like(q)``), lse fp32
        ``(B, H, Lq)``.
    """
    args, _mask = _dense_problem("dense_forward", q, k, v, None, key_mask, causal, scale, dropout_p, seed, offset,
                                 simd)
    b, h, lq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, lq, dtype=torch.float32)
    _lib().attention_forward_cpu(**args, q=_dense_view(q), k=_dense_view(k), v=_dense_view(v), out=_dense_view(out),
                                 lse=_dense_lse_view(lse))
    return out, lse


def dense_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_mask: Optional[Tensor],
    causal: bool, scale: float, dropout_p: float, seed: int, offset: int, *, simd: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`dense_forward` (same arguments, plus ``dout`` and the forward's ``out``
    ``(B, H, Lq, D)`` and ``lse`` ``(B, H, Lq)`` fp32). The dropout mask is regenerated.

    Returns:
        ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (``empty_like``); masked keys get zeros.
    """
    args, _mask = _dense_problem("dense_backward", q, k, v, (dout, out, lse), key_mask, causal, scale, dropout_p,
                                 seed, offset, simd)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _lib().attention_backward_cpu(
        **args, dout=_dense_view(dout), q=_dense_view(q), k=_dense_view(k), v=_dense_view(v), out=_dense_view(out),
        lse=_dense_lse_view(lse), dq=_dense_view(dq), dk=_dense_view(dk), dv=_dense_view(dv),
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- debug


def dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float, seed: int, offset: int = 0,
                 *, simd: str = "auto") -> Tensor:
    """The keep mask ``(batch, heads, seqlen_q, seqlen_k)`` bool the kernels apply for
    ``(dropout_p, seed, offset)`` (same contract as ``attention_dropout_mask``)."""
    fn = "dropout_mask"
    for name, n in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {n!r}")
    p, thr, off = _check_scalars(fn, dropout_p, False, 1.0, seed, offset)
    _check_simd(simd)
    out = torch.empty(batch, heads, seqlen_q, seqlen_k, dtype=torch.uint8)
    if out.numel():
        _lib().attention_dropout_mask_cpu(out.data_ptr(), 0, batch * heads, seqlen_q, seqlen_k, thr, seed, off, simd)
    return out.view(torch.bool)


# ----------------------------------------------------------------------------- the op's seam


class OpImplementation:
    """These kernels behind :class:`.cpu.NativeAttention` (the reference's signatures), as
    :func:`.cpu.register_native` takes them. ``attn_bias`` is never given (calls with a bias
    take another path); ``cu_seqlens`` arrive int32 with their values checked by the op."""

    DTYPES = SUPPORTED_DTYPES

    @staticmethod
    def forward(q, k, v, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset):
        return dense_forward(q, k, v, attention_mask, causal, scale, dropout_p, seed, offset)

    @staticmethod
    def backward(dout, q, k, v, out, lse, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset,
                 bias_grad=False):
        dq, dk, dv = dense_backward(dout, q, k, v, out, lse, attention_mask, causal, scale, dropout_p, seed, offset)
        return dq, dk, dv, None

    @staticmethod
    def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset):
        return varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset,
                              check_cu_values=False)

    @staticmethod
    def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset):
        return varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed,
                               offset, check_cu_values=False)
