"""The four ``torch.library`` ops of attention (``turbotune::attention_fwd`` /
``attention_bwd`` / ``attention_varlen_fwd`` / ``attention_varlen_bwd``), their fake
implementations and autograd, registered through :class:`~turbotune.ops._op.FusedOp`.

Each implementation asks :func:`.cpu.choose` which path runs the call and calls it:
the Triton launchers (:mod:`.launch`) or a CPU implementation (:mod:`.cpu`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import backend
from .._op import FusedOp
from . import cpu, launch
from .launch import as_like

MAX_HEAD_DIM = 256  # the Triton kernels handle 1..256 (padded to a power of two >= 16)


def _inner(t: Tensor) -> Tensor:
    """The kernels take any strides, but need a unit-stride head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kv_len(mask: Optional[Tensor], device) -> Tensor:
    """One past the last attended key per batch row (int32 ``(B,)``), empty without a mask."""
    if mask is None:
        return torch.empty(0, dtype=torch.int32, device=device)
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.int32, device=device)
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask != 0, pos, 0).amax(dim=1).to(torch.int32)


def _path(q: Tensor, k: Tensor, **kw) -> str:
    path = cpu.choose(q, k, **kw)
    if path == backend.TRITON and q.shape[-1] > MAX_HEAD_DIM:
        return backend.REFERENCE
    return path


# --------------------------------------------------------------------------- dense


def _attention_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], attn_bias: Optional[Tensor],
    dropout_p: float, causal: bool, softmax_scale: float, seed: int, offset: int, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, lse, kv_len)``: out like ``q``, lse fp32 ``(B, H, Lq)`` (natural log),
    kv_len int32 ``(B,)`` with a mask (saved for the backward), else empty."""
    path = _path(q, k, dropout_p=dropout_p, attn_bias=attn_bias, bias_grad=False, varlen=False)
    if path == backend.TRITON:
        return launch.forward(_inner(q), _inner(k), _inner(v), attention_mask, attn_bias, dropout_p, causal,
                              softmax_scale, seed, offset, out_like=q)
    out, lse = cpu.implementation(path).forward(q, k, v, attention_mask, attn_bias, dropout_p, causal,
                                                softmax_scale, seed, offset)
    return as_like(out, q), lse.contiguous(), _kv_len(attention_mask, q.device)


def _attention_fwd_fake(q, k, v, attention_mask, attn_bias, dropout_p, causal, softmax_scale, seed, offset,
                        deterministic):
    b, h, lq, _ = q.shape
    kv = q.new_empty((b if attention_mask is not None else 0,), dtype=torch.int32)
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32), kv


def _attention_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_len: Tensor,
    attention_mask: Optional[Tensor], attn_bias: Optional[Tensor], dropout_p: float, causal: bool,
    softmax_scale: float, seed: int, offset: int, deterministic: bool, bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv, dbias)`` (like ``q``, ``k``, ``v``; dbias in ``attn_bias``'s
    shape when ``bias_grad``, else an empty tensor)."""
    bias_grad = bias_grad and attn_bias is not None
    path = _path(q, k, dropout_p=dropout_p, attn_bias=attn_bias, bias_grad=bias_grad, varlen=False)
    if path == backend.TRITON:
        dq, dk, dv, dbias = launch.backward(
            dout, _inner(q), _inner(k), _inner(v), _inner(out), lse, kv_len, attention_mask, attn_bias, dropout_p,
            causal, softmax_scale, seed, offset, deterministic=deterministic, bias_grad=bias_grad,
            grads_like=(q, k, v))
    else:
        dq, dk, dv, dbias = cpu.implementation(path).backward(
            dout, q, k, v, out, lse, attention_mask, attn_bias, dropout_p, causal, softmax_scale, seed, offset,
            bias_grad=bias_grad)
        dq, dk, dv = as_like(dq, q), as_like(dk, k), as_like(dv, v)
    if bias_grad:
        if dbias is None:  # a path that cannot compute the bias gradient must not drop it
            raise RuntimeError(f"turbotune attention: the {path} path returned no attn_bias gradient")
        return dq, dk, dv, dbias
    return dq, dk, dv, q.new_empty(0)


def _attention_bwd_fake(dout, q, k, v, out, lse, kv_len, attention_mask, attn_bias, dropout_p, causal,
                        softmax_scale, seed, offset, deterministic, bias_grad):
    dbias = torch.empty_like(attn_bias) if bias_grad and attn_bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _fwd_setup(ctx, inputs, output):
    q, k, v, mask, bias, dropout_p, causal, scale, seed, offset, deterministic = inputs
    out, lse, kv_len = output
    ctx.save_for_backward(q, k, v, out, lse, kv_len, mask, bias)
    ctx.args = (dropout_p, causal, scale, seed, offset, deterministic)
    ctx.mark_non_differentiable(lse, kv_len)


def _fwd_backward(ctx, dout, dlse, dkv):
    q, k, v, out, lse, kv_len, mask, bias = ctx.saved_tensors
    nones = (None,) * 6
    if dout is None:
        return (None,) * 5 + nones
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = _ATTENTION_BWD.from_backward(ctx, dout, q, k, v, out, lse, kv_len, mask, bias, *ctx.args,
                                                     bias_grad)
    return (dq, dk, dv, None, dbias if bias_grad else None) + nones


_ATTENTION_BWD = FusedOp("attention_bwd", _attention_bwd_impl, fake=_attention_bwd_fake)
ATTENTION_FWD = FusedOp("attention_fwd", _attention_fwd_impl, fake=_attention_fwd_fake,
                        setup_context=_fwd_setup, backward=_fwd_backward)


# --------------------------------------------------------------------------- varlen


def _attention_varlen_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, causal: bool, softmax_scale: float, seed: int, offset: int,
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``: out like ``q`` ``(total_q, H, D)``, lse fp32 ``(H, total_q)``."""
    path = _path(q, k, dropout_p=dropout_p, attn_bias=None, bias_grad=False, varlen=True)
    if path == backend.TRITON:
        out, lse, _ = launch.forward(_inner(q), _inner(k), _inner(v), None, None, dropout_p, causal, softmax_scale,
                                     seed, offset, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q,
                                     max_k=max_seqlen_k, out_like=q)
        return out, lse
    out, lse = cpu.implementation(path).varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                       max_seqlen_k, dropout_p, causal, softmax_scale, seed, offset)
    if out.stride() != q.stride():  # the op promises q's layout
        out = torch.empty_like(q).copy_(out)
    return out, lse.contiguous()


def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal,
                               softmax_scale, seed, offset, deterministic):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _attention_varlen_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, causal: bool,
    softmax_scale: float, seed: int, offset: int, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``."""
    path = _path(q, k, dropout_p=dropout_p, attn_bias=None, bias_grad=False, varlen=True)
    if path == backend.TRITON:
        dq, dk, dv, _ = launch.backward(
            dout, _inner(q), _inner(k), _inner(v), _inner(out), lse, None, None, None, dropout_p, causal,
            softmax_scale, seed, offset, deterministic=deterministic, bias_grad=False, cu_q=cu_seqlens_q,
            cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k, grads_like=(q, k, v))
        return dq, dk, dv
    g = cpu.implementation(path).varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, dropout_p, causal, softmax_scale, seed, offset)
    return tuple(t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)
                 for t, like in zip(g, (q, k, v)))


def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, causal, softmax_scale, seed, offset, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, dropout_p, causal, scale, seed, offset, deterministic)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    nones = (None,) * 10
    if dout is None:
        return (None, None, None) + nones
    dq, dk, dv = _ATTENTION_VARLEN_BWD.from_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + nones


_ATTENTION_VARLEN_BWD = FusedOp("attention_varlen_bwd", _attention_varlen_bwd_impl, fake=_attention_varlen_bwd_fake)
ATTENTION_VARLEN_FWD = FusedOp("attention_varlen_fwd", _attention_varlen_fwd_impl, fake=_attention_varlen_fwd_fake,
                               setup_context=_varlen_setup, backward=_varlen_backward)
