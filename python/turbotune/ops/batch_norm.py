"""Fused BatchNorm + activation (+ residual add): the training-time building
block of conv nets (``act(BN(conv(x)) + identity)`` in a ResNet block).

``batch_norm_act(x, weight, bias, running_mean, running_var, training=...,
momentum=..., eps=..., activation="relu", residual=None)`` computes

    z = (x - mean) / sqrt(var + eps) * weight + bias  (+ residual)
    y = activation(z)

over the channel dimension 1 of an ``(N, C, *spatial)`` tensor, in NCHW or
channels_last layout. In training mode the batch statistics are computed in
fp32 and ``running_mean`` / ``running_var`` are updated exactly as
``torch.nn.functional.batch_norm`` does (``momentum`` weighting, unbiased
variance); in eval mode the running statistics normalize.

This module holds everything about the op:

- :func:`batch_norm_act_ref`: the spec in plain PyTorch (``F.batch_norm``,
  ``+``, the activation); the CPU implementation runs ATen's own batch-norm
  kernels, so its outputs and running statistics equal stock PyTorch's;
- the Triton kernels: a two-stage statistics reduction (per-chunk mean and
  centred sum of squares, merged with Chan's formula, so no catastrophic
  cancellation), a normalize + residual + activation pass, and a backward made
  of a two-stage reduction of ``sum(dz)`` and ``sum(dz * (x - mean))`` plus an
  elementwise pass that writes ``dx`` (and ``dresidual``). ReLU's backward
  reads the saved output; SiLU / GELU recompute the pre-activation from ``x``
  (nothing extra is stored);
- the ``torch.library`` ops ``turbotune::batch_norm_act`` and
  ``turbotune::batch_norm_act_backward`` (fake implementations and autograd
  through :class:`~turbotune.ops._op.FusedOp`);
- :func:`batch_norm_act`, the public function.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from ._op import FusedOp
from ._triton import HAS_TRITON, next_power_of_2, num_programs_hint, tl, triton

OP = "batch_norm_act"

#: activation name -> the integer code the op and the kernels take
ACTIVATIONS = {"none": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}
_NONE, _RELU, _SILU, _GELU, _GELU_TANH = range(5)

backend.register_op(
    OP,
    triton_dtypes=backend.FLOATS,
    summary="fused BatchNorm + activation (+ residual add), forward and backward, NCHW and channels_last",
)


# ----------------------------------------------------------------------------- reference


def _activation_ref(z: Tensor, act: int) -> Tensor:
    if act == _RELU:
        return torch.relu(z)
    if act == _SILU:
        return F.silu(z)
    if act == _GELU:
        return F.gelu(z)
    if act == _GELU_TANH:
        return F.gelu(z, approximate="tanh")
    return z


def batch_norm_act_ref(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """The spec in stock PyTorch: ``act(F.batch_norm(x, ...) + residual)``
    (same contract as :func:`batch_norm_act`; updates the running statistics in place)."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return _activation_ref(z, _act_code(activation))


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics are fp32 (fp64 for fp64 inputs, which only the reference handles)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _forward_ref(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act):
    """``(y, mean, invstd, new_running_mean, new_running_var)`` through ATen's batch norm
    (bit-identical to ``F.batch_norm``); the running statistics are not mutated."""
    sd = _stat_dtype(x)
    new_rm, new_rv = x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd)
    if training:
        if running_mean is not None:
            z, mean, invstd, new_rm, new_rv = torch.ops.aten._native_batch_norm_legit_functional(
                x, weight, bias, running_mean, running_var, True, momentum, eps)
        else:
            z, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(x, weight, bias, True, momentum, eps)
    else:
        z = torch.native_batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps)[0]
        mean = running_mean.to(sd, copy=True)
        invstd = torch.rsqrt(running_var.to(sd) + eps)
    if residual is not None:
        z = z.add_(residual) if _out_dtype(x, residual) == z.dtype else z + residual
    if act == _RELU:
        z = z.relu_()
    elif act != _NONE:
        z = _activation_ref(z, act)
    return z, mean.to(sd), invstd.to(sd), new_rm, new_rv


def _preactivation_ref(x, weight, bias, mean, invstd, residual):
    """``z`` recomputed in fp32 from the saved statistics (for SiLU / GELU backward)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sd = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(sd)
    shift = -mean * scale if bias is None else bias.to(sd) - mean * scale
    z = x.to(sd) * scale.view(shape) + shift.view(shape)
    return z + residual.to(sd) if residual is not None else z


def _activation_grad_ref(dy, act, y, z):
    if act == _RELU:
        return torch.ops.aten.threshold_backward(dy, y, 0)
    if act == _SILU:
        return torch.ops.aten.silu_backward(dy.to(z.dtype), z)
    if act == _GELU:
        return torch.ops.aten.gelu_backward(dy.to(z.dtype), z)
    if act == _GELU_TANH:
        return torch.ops.aten.gelu_backward(dy.to(z.dtype), z, approximate="tanh")
    return dy


def _backward_ref(dy, x, weight, bias, mean, invstd, y, residual, has_residual, training, act, eps, need_w, need_b):
    z = _preactivation_ref(x, weight, bias, mean, invstd, residual) if act in (_SILU, _GELU, _GELU_TANH) else None
    dz = _activation_grad_ref(dy, act, y, z)
    if training:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dz.to(x.dtype), x, weight, None, None, mean, invstd, True, eps, [True, need_w, need_b])
    else:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        sd = mean.dtype
        scale = invstd if weight is None else invstd * weight.to(sd)
        dzf = dz.to(sd)
        dx = (dzf * scale.view(shape)).to(x.dtype)
        dw = (dzf * (x.to(sd) - mean.view(shape)) * invstd.view(shape)).sum(dims) if need_w else None
        db = dzf.sum(dims) if need_b else None
    w_dtype = weight.dtype if weight is not None else x.dtype
    dw = dw.to(w_dtype) if need_w else None
    db = db.to(bias.dtype if bias is not None else w_dtype) if need_b else None
    dr = dz.to(dy.dtype) if has_residual else None
    return dx, dw, db, dr


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _tile(t, tiles_s, c, S, sN, sC, sS, C, BLOCK_S: tl.constexpr):
        """Offsets and mask of tile ``t``: channels ``c`` x ``BLOCK_S`` positions of one image."""
        n = t // tiles_s
        s = (t % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = (tl.cast(n, tl.int64) * sN + c[:, None].to(tl.int64) * sC + s[None, :].to(tl.int64) * sS)
        mask = (c[:, None] < C) & (s[None, :] < S)
        return offs, mask, tl.sum((s < S).to(tl.float32), axis=0)

    @triton.jit
    def _act_fwd(z, ACT: tl.constexpr):
        if ACT == 1:
            z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu (tl.maximum would drop it)
        elif ACT == 2:
            z = z * tl.sigmoid(z)
        elif ACT == 3:
            z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        elif ACT == 4:
            u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
            z = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
        return z

    @triton.jit
    def _act_grad(dy, y, z, ACT: tl.constexpr):
        """d act(z) / dz * dy; ReLU reads the output ``y``, the others the pre-activation ``z``."""
        if ACT == 1:
            dy = tl.where(y > 0.0, dy, 0.0)
        elif ACT == 2:
            sg = tl.sigmoid(z)
            dy = dy * sg * (1.0 + z * (1.0 - sg))
        elif ACT == 3:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            dy = dy * (cdf + z * pdf)
        elif ACT == 4:
            k = 0.7978845608028654
            u = k * (z + 0.044715 * z * z * z)
            th = 2.0 * tl.sigmoid(2.0 * u) - 1.0
            dy = dy * (0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * z * z))
        return dy

    @triton.jit
    def _scale_shift(W, B, Mean, Invstd, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        mean = tl.load(Mean + c, mask=cmask, other=0.0)
        invstd = tl.load(Invstd + c, mask=cmask, other=0.0)
        scale = invstd
        if HAS_W:
            scale = scale * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift += tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        return mean, invstd, scale, shift

    @triton.jit
    def _bn_stats_partial_kernel(
        X, PMean, PM2, PCount,
        C, S, sN, sC, sS, tiles_s, total_tiles, tiles_per_prog,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Per (chunk of tiles, channel block): count, mean and centred sum of squares."""
        part = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        t0 = part * tiles_per_prog
        t1 = tl.minimum(t0 + tiles_per_prog, total_tiles)
        acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        count = 0.0
        for t in range(t0, t1):
            offs, mask, valid = _tile(t, tiles_s, c, S, sN, sC, sS, C, BLOCK_S)
            acc += tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            count += valid
        mean = tl.sum(acc, axis=1) / tl.maximum(count, 1.0)
        acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        for t in range(t0, t1):
            offs, mask, valid = _tile(t, tiles_s, c, S, sN, sC, sS, C, BLOCK_S)
            d = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None], 0.0)
            acc += d * d
        cmask = c < C
        tl.store(PMean + part * C + c, mean, mask=cmask)
        tl.store(PM2 + part * C + c, tl.sum(acc, axis=1), mask=cmask)
        if tl.program_id(1) == 0:
            tl.store(PCount + part, count)

    @triton.jit
    def _bn_stats_finalize_kernel(
        PMean, PM2, PCount, RM, RV, Mean, Invstd, NewRM, NewRV,
        num_parts, C, momentum, eps,
        UPDATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Merge the chunks (Chan et al.), write mean / invstd and the new running statistics."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        wsum = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        csum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < num_parts
            cnt = tl.load(PCount + p, mask=pm, other=0.0)
            mu = tl.load(PMean + p[:, None] * C + c[None, :], mask=pm[:, None] & cmask[None, :], other=0.0)
            wsum += cnt[:, None] * mu
            csum += cnt
        total = tl.sum(csum, axis=0)
        mean = tl.sum(wsum, axis=0) / total
        m2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < num_parts
            m = pm[:, None] & cmask[None, :]
            cnt = tl.load(PCount + p, mask=pm, other=0.0)
            mu = tl.load(PMean + p[:, None] * C + c[None, :], mask=m, other=0.0)
            d = tl.where(m, mu - mean[None, :], 0.0)
            m2 += tl.load(PM2 + p[:, None] * C + c[None, :], mask=m, other=0.0) + cnt[:, None] * d * d
        m2s = tl.sum(m2, axis=0)
        var = m2s / total
        tl.store(Mean + c, mean, mask=cmask)
        tl.store(Invstd + c, 1.0 / tl.sqrt(var + eps), mask=cmask)
        if UPDATE:
            unbiased = m2s / tl.maximum(total - 1.0, 1.0)
            rm = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
            rv = tl.load(RV + c, mask=cmask, other=0.0).to(tl.float32)
            tl.store(NewRM + c, (momentum * mean + (1.0 - momentum) * rm).to(NewRM.dtype.element_ty), mask=cmask)
            tl.store(NewRV + c, (momentum * unbiased + (1.0 - momentum) * rv).to(NewRV.dtype.element_ty), mask=cmask)

    @triton.jit
    def _bn_act_fwd_kernel(
        X, R, Y, W, B, Mean, Invstd,
        C, S, sN, sC, sS, tiles_s,
        HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs, mask, _ = _tile(tl.program_id(0), tiles_s, c, S, sN, sC, sS, C, BLOCK_S)
        _, _, scale, shift = _scale_shift(W, B, Mean, Invstd, c, c < C, HAS_W, HAS_B)
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * scale[:, None] + shift[:, None]
        if HAS_R:
            z += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, _act_fwd(z, ACT).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_dz(DY, Y, X, R, offs, mask, scale, shift, HAS_R: tl.constexpr, ACT: tl.constexpr):
        """``(dz, x)`` for one tile: the upstream gradient through the activation, and x in fp32."""
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        y = dy
        z = dy
        if ACT == 1:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT >= 2:
            z = x * scale[:, None] + shift[:, None]
            if HAS_R:
                z += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, _act_grad(dy, y, z, ACT), 0.0), x

    @triton.jit
    def _bn_act_bwd_partial_kernel(
        DY, Y, X, R, W, B, Mean, Invstd, PSum, PDot,
        C, S, sN, sC, sS, tiles_s, total_tiles, tiles_per_prog,
        HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Per chunk: sum(dz) and sum(dz * (x - mean)) for a block of channels."""
        part = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        mean, _, scale, shift = _scale_shift(W, B, Mean, Invstd, c, cmask, HAS_W, HAS_B)
        acc_sum = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        acc_dot = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
        t0 = part * tiles_per_prog
        t1 = tl.minimum(t0 + tiles_per_prog, total_tiles)
        for t in range(t0, t1):
            offs, mask, _ = _tile(t, tiles_s, c, S, sN, sC, sS, C, BLOCK_S)
            dz, x = _load_dz(DY, Y, X, R, offs, mask, scale, shift, HAS_R, ACT)
            acc_sum += dz
            acc_dot += dz * (x - mean[:, None])
        tl.store(PSum + part * C + c, tl.sum(acc_sum, axis=1), mask=cmask)
        tl.store(PDot + part * C + c, tl.sum(acc_dot, axis=1), mask=cmask)

    @triton.jit
    def _bn_act_bwd_finalize_kernel(
        PSum, PDot, Invstd, SumDz, SumDot, DW, DB, num_parts, C,
        NEED_W: tl.constexpr, NEED_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        a = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        b = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p[:, None] < num_parts) & cmask[None, :]
            a += tl.load(PSum + p[:, None] * C + c[None, :], mask=m, other=0.0)
            b += tl.load(PDot + p[:, None] * C + c[None, :], mask=m, other=0.0)
        sum_dz = tl.sum(a, axis=0)
        sum_dot = tl.sum(b, axis=0)
        tl.store(SumDz + c, sum_dz, mask=cmask)
        tl.store(SumDot + c, sum_dot, mask=cmask)
        if NEED_W:
            invstd = tl.load(Invstd + c, mask=cmask, other=0.0)
            tl.store(DW + c, (sum_dot * invstd).to(DW.dtype.element_ty), mask=cmask)
        if NEED_B:
            tl.store(DB + c, sum_dz.to(DB.dtype.element_ty), mask=cmask)

    @triton.jit
    def _bn_act_bwd_dx_kernel(
        DY, Y, X, R, W, B, Mean, Invstd, SumDz, SumDot, DX, DR,
        C, S, sN, sC, sS, tiles_s, inv_count,
        TRAINING: tl.constexpr, WRITE_DR: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        offs, mask, _ = _tile(tl.program_id(0), tiles_s, c, S, sN, sC, sS, C, BLOCK_S)
        mean, invstd, scale, shift = _scale_shift(W, B, Mean, Invstd, c, cmask, HAS_W, HAS_B)
        dz, x = _load_dz(DY, Y, X, R, offs, mask, scale, shift, HAS_R, ACT)
        if TRAINING:
            # dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat))
            mdz = tl.load(SumDz + c, mask=cmask, other=0.0) * inv_count
            k = tl.load(SumDot + c, mask=cmask, other=0.0) * inv_count * invstd * invstd
            dx = (dz - mdz[:, None] - (x - mean[:, None]) * k[:, None]) * scale[:, None]
        else:
            dx = dz * scale[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DR:
            tl.store(DR + offs, dz.to(DR.dtype.element_ty), mask=mask)


def _geometry(x: Tensor):
    """``(N', C, S', sN, sC, sS)``: ``x`` as an (image, channel, position) grid.

    Channels_last (and 2-D) tensors become one image of ``N * S`` positions with
    stride ``C``; NCHW stays ``N`` images of ``S`` contiguous positions. The
    caller makes ``x`` one of these two dense layouts first (:func:`_dense`)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    if x.dim() == 2 or (c > 1 and x.stride(1) == 1):
        return 1, c, n * s, 0, 1, c
    return n, c, s, c * s, s, 1


def _channels_last_dense(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _dense(x: Tensor) -> Tensor:
    """``x`` in NCHW-contiguous or channels_last layout (a copy only when it is neither)."""
    if x.is_contiguous() or _channels_last_dense(x):
        return x
    return x.contiguous()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with ``x``'s (dense) strides."""
    if t.stride() == x.stride():
        return t
    return t.contiguous(memory_format=torch.channels_last if _channels_last_dense(x) else torch.contiguous_format)


def _blocks(geom, device):
    n, c, s, _, sc, _ = geom
    if sc == 1:  # channels contiguous: wide channel blocks
        block_c = min(next_power_of_2(c), 64)
        block_s = min(next_power_of_2(s), max(1, 4096 // block_c))
    else:  # positions contiguous
        block_s = min(next_power_of_2(s), 1024)
        block_c = min(next_power_of_2(c), max(1, 4096 // block_s))
    if device.type != "cuda":  # the interpreter: fewer, bigger programs
        block_s = min(next_power_of_2(s), max(block_s, 8192 // block_c))
    return block_c, block_s


def _launch_plan(geom, device):
    n, c, s = geom[:3]
    block_c, block_s = _blocks(geom, device)
    tiles_s = triton.cdiv(s, block_s)
    total = n * tiles_s
    c_blocks = triton.cdiv(c, block_c)
    parts = max(1, min(total, triton.cdiv(num_programs_hint(device, per_sm=4, cpu=3), c_blocks)))
    per_prog = triton.cdiv(total, parts)
    parts = triton.cdiv(total, per_prog)
    return dict(block_c=block_c, block_s=block_s, tiles_s=tiles_s, total=total, c_blocks=c_blocks, parts=parts,
                per_prog=per_prog, warps=4 if device.type == "cuda" else 1)


def _stats_triton(x, running_mean, running_var, momentum, eps, geom, plan):
    n, c, s, sn, sc, ss = geom
    dev = x.device
    pmean = torch.empty(plan["parts"], c, dtype=torch.float32, device=dev)
    pm2 = torch.empty_like(pmean)
    pcount = torch.empty(plan["parts"], dtype=torch.float32, device=dev)
    _bn_stats_partial_kernel[(plan["parts"], plan["c_blocks"])](
        x, pmean, pm2, pcount, c, s, sn, sc, ss, plan["tiles_s"], plan["total"], plan["per_prog"],
        BLOCK_C=plan["block_c"], BLOCK_S=plan["block_s"], num_warps=plan["warps"],
    )
    mean = torch.empty(c, dtype=torch.float32, device=dev)
    invstd = torch.empty_like(mean)
    update = running_mean is not None
    new_rm = torch.empty_like(running_mean) if update else mean.new_empty(0)
    new_rv = torch.empty_like(running_var) if update else mean.new_empty(0)
    block_c = min(next_power_of_2(c), 128)
    _bn_stats_finalize_kernel[(triton.cdiv(c, block_c),)](
        pmean, pm2, pcount, running_mean if update else mean, running_var if update else mean, mean, invstd,
        new_rm if update else mean, new_rv if update else mean, plan["parts"], c, float(momentum), float(eps),
        UPDATE=update, BLOCK_P=min(32, next_power_of_2(plan["parts"])), BLOCK_C=block_c,
        num_warps=plan["warps"],
    )
    return mean, invstd, new_rm, new_rv


def _forward_triton(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act):
    geom = _geometry(x)
    plan = _launch_plan(geom, x.device)
    n, c, s, sn, sc, ss = geom
    if training:
        mean, invstd, new_rm, new_rv = _stats_triton(x, running_mean, running_var, momentum, eps, geom, plan)
    else:
        mean = running_mean.to(torch.float32, copy=True)
        invstd = torch.rsqrt(running_var.float() + eps)
        new_rm, new_rv = mean.new_empty(0), mean.new_empty(0)
    y = torch.empty_like(x, dtype=_out_dtype(x, residual))
    _bn_act_fwd_kernel[(plan["total"], plan["c_blocks"])](
        x, residual if residual is not None else x, y, weight if weight is not None else mean,
        bias if bias is not None else mean, mean, invstd, c, s, sn, sc, ss, plan["tiles_s"],
        HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
        BLOCK_C=plan["block_c"], BLOCK_S=plan["block_s"], num_warps=plan["warps"],
    )
    return y, mean, invstd, new_rm, new_rv


def _backward_triton(dy, x, weight, bias, mean, invstd, y, residual, has_residual, training, act, need_w, need_b):
    geom = _geometry(x)
    plan = _launch_plan(geom, x.device)
    n, c, s, sn, sc, ss = geom
    dev = x.device
    common = dict(HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, ACT=act,
                  BLOCK_C=plan["block_c"], BLOCK_S=plan["block_s"], num_warps=plan["warps"])
    y_arg = y if y is not None else x
    r_arg = residual if residual is not None else x
    w_arg = weight if weight is not None else mean
    b_arg = bias if bias is not None else mean
    w_dtype = weight.dtype if weight is not None else x.dtype
    dw = torch.empty(c, dtype=w_dtype, device=dev) if need_w else None
    db = torch.empty(c, dtype=bias.dtype if bias is not None else w_dtype, device=dev) if need_b else None
    sum_dz = torch.empty(c, dtype=torch.float32, device=dev)
    sum_dot = torch.empty_like(sum_dz)
    if training or need_w or need_b:
        psum = torch.empty(plan["parts"], c, dtype=torch.float32, device=dev)
        pdot = torch.empty_like(psum)
        _bn_act_bwd_partial_kernel[(plan["parts"], plan["c_blocks"])](
            dy, y_arg, x, r_arg, w_arg, b_arg, mean, invstd, psum, pdot,
            c, s, sn, sc, ss, plan["tiles_s"], plan["total"], plan["per_prog"], **common,
        )
        block_c = min(next_power_of_2(c), 128)
        _bn_act_bwd_finalize_kernel[(triton.cdiv(c, block_c),)](
            psum, pdot, invstd, sum_dz, sum_dot, dw if need_w else sum_dz, db if need_b else sum_dz,
            plan["parts"], c, NEED_W=need_w, NEED_B=need_b, BLOCK_P=min(32, next_power_of_2(plan["parts"])),
            BLOCK_C=block_c, num_warps=plan["warps"],
        )
    dx = torch.empty_like(x)
    dr = torch.empty_like(x, dtype=dy.dtype) if has_residual else None
    _bn_act_bwd_dx_kernel[(plan["total"], plan["c_blocks"])](
        dy, y_arg, x, r_arg, w_arg, b_arg, mean, invstd, sum_dz, sum_dot, dx, dr if has_residual else dx,
        c, s, sn, sc, ss, plan["tiles_s"], 1.0 / float(n * s), TRAINING=training, WRITE_DR=has_residual, **common,
    )
    return dx, dw, db, dr


# ----------------------------------------------------------------------------- ops


def _use_triton(x: Tensor) -> bool:
    if x.numel() == 0 or x.dtype == torch.float64:  # fp64: the reference (tests, debugging)
        return False
    return backend.select(OP, x.device, x.dtype).impl == backend.TRITON


def _batch_norm_act_impl(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], residual: Optional[Tensor], training: bool, momentum: float, eps: float, act: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``.

    ``mean`` / ``invstd`` (fp32, ``(C,)``) are the batch statistics in training
    mode and the running ones in eval mode; the new running statistics are
    empty unless ``training`` with running statistics."""
    if not _use_triton(x):
        return _forward_ref(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act)
    x = _dense(x)
    residual = _like(residual, x) if residual is not None else None
    return _forward_triton(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act)


def _batch_norm_act_fake(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act):
    c = x.shape[1]
    sd = _stat_dtype(x)
    stat = x.new_empty((c,), dtype=sd)
    update = training and running_mean is not None
    return (
        torch.empty_like(x, dtype=_out_dtype(x, residual)),
        stat,
        torch.empty_like(stat),
        torch.empty_like(running_mean) if update else x.new_empty(0, dtype=sd),
        torch.empty_like(running_var) if update else x.new_empty(0, dtype=sd),
    )


def _batch_norm_act_backward_impl(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
    y: Optional[Tensor], residual: Optional[Tensor], has_residual: bool, training: bool, act: int, eps: float,
    need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dresidual)``; a gradient that is not needed is an empty tensor.

    ``y`` (the forward output) is needed for ReLU, ``residual`` only for SiLU /
    GELU (the pre-activation is recomputed from ``x`` and it). ``dresidual``
    (the gradient of the pre-activation) has ``dy``'s dtype."""
    if not _use_triton(x):
        out = _backward_ref(dy, x, weight, bias, mean, invstd, y, residual, has_residual, training, act, eps,
                            need_weight, need_bias)
    else:
        x = _dense(x)
        dy = _like(dy, x)
        y = _like(y, x) if y is not None else None
        residual = _like(residual, x) if residual is not None else None
        out = _backward_triton(dy, x, weight, bias, mean, invstd, y, residual, has_residual, training, act,
                               need_weight, need_bias)
    return tuple(t if t is not None else x.new_empty(0) for t in out)


def _batch_norm_act_backward_fake(dy, x, weight, bias, mean, invstd, y, residual, has_residual, training, act, eps,
                                  need_weight, need_bias):
    c = x.shape[1]
    w_dtype = weight.dtype if weight is not None else x.dtype
    return (
        torch.empty_like(x),
        x.new_empty((c,), dtype=w_dtype) if need_weight else x.new_empty(0),
        x.new_empty((c,), dtype=bias.dtype if bias is not None else w_dtype) if need_bias else x.new_empty(0),
        torch.empty_like(x, dtype=dy.dtype) if has_residual else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act = inputs
    y, mean, invstd, _, _ = output
    ctx.meta = (training, act, eps, weight is not None and weight.requires_grad,
                bias is not None and bias.requires_grad, residual is not None)
    ctx.save_for_backward(
        x, weight, bias, mean, invstd,
        y if act == _RELU else None,
        residual if (residual is not None and act not in (_NONE, _RELU)) else None,
    )
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dy, dmean, dinvstd, drm, drv):
    if dy is None:
        return (None,) * 10
    x, weight, bias, mean, invstd, y, residual = ctx.saved_tensors
    training, act, eps, need_w, need_b, has_r = ctx.meta
    dx, dw, db, dr = _BACKWARD.from_backward(ctx, dy, x, weight, bias, mean, invstd, y, residual, has_r, training,
                                             act, eps, need_w, need_b)
    if has_r and dr.dtype != ctx.residual_dtype:
        dr = dr.to(ctx.residual_dtype)
    return (dx, dw if need_w else None, db if need_b else None, None, None, dr if has_r else None,
            None, None, None, None)


_BACKWARD = FusedOp("batch_norm_act_backward", _batch_norm_act_backward_impl, fake=_batch_norm_act_backward_fake)
_BATCH_NORM_ACT = FusedOp(
    "batch_norm_act", _batch_norm_act_impl, fake=_batch_norm_act_fake,
    setup_context=_setup_context, backward=_backward, materialize_grads=False,
)


# ----------------------------------------------------------------------------- public API


def _act_code(activation) -> int:
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"batch_norm_act: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") \
            from None


def _check_tensor(name, t, shape, what, x):
    if t is None:
        return
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"batch_norm_act: {name} must have shape {shape} {what}, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"batch_norm_act: {name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"batch_norm_act: {name} is on {t.device} but x is on {x.device}")


def _check(x, weight, bias, running_mean, running_var, training, momentum, eps, residual):
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm_act: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"batch_norm_act: x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[1] == 0:
        raise ValueError(f"batch_norm_act: x must have shape (N, C, *spatial) with C >= 1, got {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_tensor(name, t, (c,), "(x's channels)", x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_act: pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("batch_norm_act: eval mode (training=False) needs running_mean and running_var")
    _check_tensor("residual", residual, tuple(x.shape), "(x's shape)", x)
    for name, value in (("eps", eps), ("momentum", momentum)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
            raise TypeError(f"batch_norm_act: {name} must be a float, got {type(value).__name__}")
    if not (eps > 0.0) or math.isinf(eps):
        raise ValueError(f"batch_norm_act: eps must be a finite number > 0, got {eps}")
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"batch_norm_act: momentum must be in [0, 1], got {momentum}")
    if training and x.numel() // c == 1:
        raise ValueError(f"batch_norm_act: expected more than 1 value per channel when training, got input of "
                         f"shape {tuple(x.shape)}")


def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    residual: Optional[Tensor] = None,
) -> Tensor:
    """``activation(batch_norm(x) + residual)`` in one fused op.

    Args:
        x: ``(N, C, *spatial)`` float32 / float16 / bfloat16, NCHW or
            channels_last (other layouts are made contiguous first).
        weight, bias: ``(C,)`` affine parameters (any float dtype) or None.
        running_mean, running_var: ``(C,)`` running statistics or None (then
            training mode always uses batch statistics). Updated in place in
            training mode, exactly as ``F.batch_norm``:
            ``running = (1 - momentum) * running + momentum * batch_stat`` with
            the unbiased batch variance.
        training: normalize with the batch statistics (True) or the running ones.
        momentum: the running-average factor in ``[0, 1]`` (pass
            ``1 / num_batches_tracked`` for a cumulative average).
        eps: added to the variance, ``> 0``.
        activation: ``"relu"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"none"``.
        residual: optional tensor of ``x``'s shape added before the activation.

    Returns:
        ``y`` of ``x``'s shape and memory format; dtype ``x.dtype`` (promoted
        with ``residual.dtype`` when given). Statistics are fp32.

    Gradients flow to ``x``, ``weight``, ``bias`` and ``residual``. Runs the
    Triton kernels on a GPU (or under ``TRITON_INTERPRET=1`` with
    ``TURBOTUNE_BACKEND=triton``) and ATen's batch norm elsewhere.
    """
    _check(x, weight, bias, running_mean, running_var, training, momentum, eps, residual)
    act = _act_code(activation)
    y, _, _, new_rm, new_rv = _BATCH_NORM_ACT(x, weight, bias, running_mean, running_var, residual, bool(training),
                                              float(momentum), float(eps), act)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return y
