"""Fused bias + GELU: ``y = gelu(x + bias)``, the activation of every BERT
feed-forward block (``gelu(x @ W1.T + b1)`` with the matmul run without its
bias).

``approximate="none"`` is the exact erf GELU that BERT uses;
``approximate="tanh"`` is the tanh approximation (GPT-2's ``gelu_new``), with
the same meaning as in :func:`torch.nn.functional.gelu`.

This module holds everything about the op:

- :func:`bias_gelu_ref`: plain PyTorch in fp32 (fp64 for fp64 inputs), the
  tests' reference; the CPU default runs the same math with ATen ops arranged
  to allocate no more than stock (see ``_forward_aten``);
- the Triton kernels: a 2-D tiled forward, and a backward that writes ``dx``
  while each program sums its rows of ``dx`` for ``dbias`` in fp32 registers
  (finished by one small reduction launch); the pre-activation ``x + bias`` is
  recomputed in the backward, never stored;
- the ``torch.library`` ops ``turbotune::bias_gelu`` and
  ``turbotune::bias_gelu_backward`` with fake implementations and autograd
  (through :class:`~turbotune.ops._op.FusedOp`);
- :func:`bias_gelu`, the public function, and :func:`linear_gelu`
  (``gelu(x @ W.T + b)``: the bias inside the matmul on CPU, inside the fused
  kernel on GPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from . import _rows
from ._op import FusedOp
from ._triton import HAS_TRITON, next_power_of_2, tl, triton

OP = "bias_gelu"
APPROXIMATIONS = ("none", "tanh")

backend.register_op(
    OP,
    triton_dtypes=backend.FLOATS,
    summary="fused bias + GELU, exact erf or tanh (forward and backward)",
)


# ----------------------------------------------------------------------------- reference


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bias_gelu_ref(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` in plain PyTorch, computed in fp32 (fp64 for fp64 ``x``),
    returned in ``x``'s dtype; differentiable through ATen's own autograd."""
    ct = _math_dtype(x)
    h = x.to(ct)
    if bias is not None:
        h = h + bias.to(ct)
    return F.gelu(h, approximate=approximate).to(x.dtype)


# The CPU path, two regimes (measured in benchmarks/RESULTS.md):
# - below CPU_INPLACE_MIN_BYTES, plain ``F.gelu(x + bias)`` with ATen's autograd:
#   the allocator recycles buffers that size, and saving the sum beats
#   recomputing it;
# - from there up (where glibc hands out fresh mmap pages and every new buffer
#   page-faults), ATen ops arranged to allocate only what stock
#   ``F.gelu(F.linear(h, W, b))`` allocates (one buffer forward, one backward):
#   the GELU runs in place on the fresh sum ``x + bias``, and the backward
#   recomputes that sum and writes the gradient over it.
CPU_INPLACE_MIN_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold


def _pre_activation(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A fresh ``x + bias`` in the math dtype (fp32, fp64 for fp64 ``x``)."""
    ct = _math_dtype(x)
    if bias is None:
        return x.to(ct, copy=True)
    return torch.add(x.to(ct), bias.to(ct))


def _forward_aten(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    s = _pre_activation(x, bias)
    torch.ops.aten.gelu_(s, approximate=approximate)
    return s.to(x.dtype)


def _backward_aten(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str, need_dbias: bool):
    s = _pre_activation(x, bias)
    torch.ops.aten.gelu_backward.grad_input(dy.to(s.dtype), s, approximate=approximate, grad_input=s)
    db = s.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype) if (bias is not None and need_dbias) else None
    return s.to(x.dtype), db


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _tanh(u):
        # 1 - 2 / (1 + e^{2u}): saturates to +-1 without inf/inf (tl has no tanh in every version).
        return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * u))

    @triton.jit
    def _gelu(h, APPROX_TANH: tl.constexpr):
        if APPROX_TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) (h + 0.044715 h^3)
            y = 0.5 * h * (1.0 + _tanh(u))
        else:
            y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # h * Phi(h)
        return y

    @triton.jit
    def _gelu_grad(h, APPROX_TANH: tl.constexpr):
        if APPROX_TANH:
            u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            t = _tanh(u)
            g = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        else:
            cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
            g = cdf + h * pdf
        return g

    @triton.jit
    def _bias_gelu_fwd_kernel(
        X, B, Y, M, N, stride_x, stride_y,
        HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows[:, None] < M) & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        h = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = _gelu(h, APPROX_TANH)
        tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_kernel(
        DY, X, B, DX, DB_part, M, N, stride_dy, stride_x, stride_dx, tiles_per_split,
        HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, APPROX_TANH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (j, p): columns block j, row tiles [p * tiles_per_split, ...)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        cmask = cols < N
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t_start = split * tiles_per_split
        t_end = tl.minimum(t_start + tiles_per_split, tl.cdiv(M, BLOCK_M))
        for t in range(t_start, t_end):
            rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
            mask = (rows[:, None] < M) & cmask[None, :]
            r64 = rows.to(tl.int64)[:, None]
            h = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                h += b[None, :]
            dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dh = dy * _gelu_grad(h, APPROX_TANH)
            tl.store(DX + r64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
            if NEED_DB:
                acc += dh  # masked elements have dy = 0, so dh = 0
        if NEED_DB:
            tl.store(DB_part + split.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=cmask)


def _fwd_blocks(m: int, n: int) -> Tuple[int, int]:
    block_n = min(max(16, next_power_of_2(n)), 512)  # >= 16: no 1-wide blocks on the GPU
    return max(1, min(next_power_of_2(m), 4096 // block_n)), block_n


def _bwd_blocks(m: int, n: int) -> Tuple[int, int]:
    block_n = min(max(16, next_power_of_2(n)), 256)
    return max(1, min(next_power_of_2(m), 4096 // block_n)), block_n


def _forward_triton(x2: Tensor, b: Optional[Tensor], approximate: str) -> Tensor:
    m, n = x2.shape
    y = _rows.alloc((m, n), x2.dtype, x2.device)
    if m == 0:
        return y
    bm, bn = _fwd_blocks(m, n)
    with _rows.device_guard(x2):
        _bias_gelu_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, b if b is not None else x2, y, m, n, x2.stride(0), y.stride(0),
            HAS_BIAS=b is not None, APPROX_TANH=approximate == "tanh", BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    return y


def _backward_triton(dy2: Tensor, x2: Tensor, b: Optional[Tensor], approximate: str, need_db: bool):
    m, n = x2.shape
    dx = _rows.alloc((m, n), x2.dtype, x2.device)
    need_db = need_db and b is not None
    if m == 0:
        return dx, (torch.zeros(n, dtype=b.dtype, device=b.device) if need_db else None)
    bm, bn = _bwd_blocks(m, n)
    col_blocks = triton.cdiv(n, bn)
    splits, per = _rows.row_splits(m, bm, col_blocks, x2.device)
    part = _rows.alloc((1, splits, n), torch.float32, x2.device) if need_db else dx
    with _rows.device_guard(x2):
        _bias_gelu_bwd_kernel[(col_blocks, splits)](
            dy2, x2, b if b is not None else x2, dx, part, m, n, dy2.stride(0), x2.stride(0), dx.stride(0), per,
            HAS_BIAS=b is not None, NEED_DB=need_db, APPROX_TANH=approximate == "tanh",
            BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
        db = None
        if need_db:
            if splits == 1 and b.dtype == torch.float32:
                db = part.view(n)
            else:
                db = _rows.alloc((n,), b.dtype, b.device)
                _rows.column_sums(part, db)
    return dx, db


# ----------------------------------------------------------------------------- ops


def _use_triton(x: Tensor) -> bool:
    # zero-element tensors (e.g. N = 0 columns, which cannot be viewed as rows) take the ATen path
    return x.numel() > 0 and x.dtype in backend.FLOATS and backend.select(OP, x.device, x.dtype).impl == backend.TRITON


def _bias_gelu_impl(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    if not _use_triton(x):
        return _forward_aten(x, bias, approximate).contiguous()
    n = x.shape[-1]
    y = _forward_triton(_rows.as_rows(x, n), bias.contiguous() if bias is not None else None, approximate)
    return y.view(x.shape)


def _bias_gelu_fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_backward_impl(
    dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str, need_dbias: bool
) -> Tuple[Tensor, Tensor]:
    """``(dx, dbias)``; ``dbias`` is empty when there is no bias or it is not needed."""
    if not _use_triton(x):
        dx, db = _backward_aten(dy, x, bias, approximate, need_dbias)
        dx = dx.contiguous()
    else:
        n = x.shape[-1]
        dx, db = _backward_triton(
            _rows.as_rows(dy, n), _rows.as_rows(x, n), bias.contiguous() if bias is not None else None,
            approximate, need_dbias,
        )
        dx = dx.view(x.shape)
    return dx, (x.new_empty(0) if db is None else db)


def _bias_gelu_backward_fake(dy, x, bias, approximate, need_dbias):
    db = bias.new_empty(bias.shape) if (bias is not None and need_dbias) else x.new_empty(0)
    return x.new_empty(x.shape), db


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_db = ctx.has_bias and ctx.needs_input_grad[1]
    dx, db = _BIAS_GELU_BACKWARD.from_backward(ctx, dy, x, bias, ctx.approximate, need_db)
    return dx, (db if need_db else None), None


_BIAS_GELU_BACKWARD = FusedOp("bias_gelu_backward", _bias_gelu_backward_impl, fake=_bias_gelu_backward_fake)
_BIAS_GELU = FusedOp("bias_gelu", _bias_gelu_impl, fake=_bias_gelu_fake, setup_context=_setup_context, backward=_backward)


# ----------------------------------------------------------------------------- public API


def _check(x, bias, approximate):
    if not isinstance(x, Tensor):
        raise TypeError(f"bias_gelu: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"bias_gelu: x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have shape (..., N), got a 0-d tensor")
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is None:
        return
    n = x.shape[-1]
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias_gelu: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.shape != (n,):
        raise ValueError(f"bias_gelu: bias must have shape ({n},) to match x's last dim, got {tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise TypeError(f"bias_gelu: bias must be a floating tensor, got dtype {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` in one pass.

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 (float64 runs the reference
            in fp64), e.g. the output of ``F.linear(h, W)`` without its bias.
        bias: ``(N,)`` any float dtype (e.g. fp32 parameters under autocast), or None.
        approximate: ``"none"`` (exact erf GELU, BERT's) or ``"tanh"``, as in
            :func:`torch.nn.functional.gelu`.

    Returns:
        ``(..., N)`` tensor of ``x``'s dtype and shape.

    The math is fp32 whatever the storage dtype. Gradients flow to ``x`` and
    ``bias`` (``dbias`` is ``dx`` summed over every row, accumulated in fp32);
    the fused paths recompute ``x + bias`` in the backward instead of storing
    it (only ``x`` and ``bias`` are saved). On a GPU the Triton kernels run; elsewhere ATen
    ops: ``F.gelu(x + bias)`` for tensors under 32 MiB, and above that an
    in-place GELU on the fresh sum (as few buffers as stock
    ``F.gelu(F.linear(h, W, b))`` allocates). The fused paths are not twice
    differentiable.
    When the bias comes from a linear layer on CPU, :func:`linear_gelu` is
    cheaper still (ATen folds the bias into the matmul there).
    """
    _check(x, bias, approximate)
    if not torch.compiler.is_compiling() and not _use_triton(x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if not needs_grad:
            return _forward_aten(x, bias, approximate)  # inference: one buffer, GELU in place
        if x.numel() * 4 < CPU_INPLACE_MIN_BYTES:
            return bias_gelu_ref(x, bias, approximate)
    return _BIAS_GELU(x, bias, approximate)


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x @ weight.T + bias)``: BERT's intermediate block, each part where it is cheapest.

    Args:
        x: ``(..., K)`` float tensor.
        weight: ``(N, K)``, ``x``'s dtype (or autocast's).
        bias: ``(N,)`` or None.
        approximate: ``"none"`` (exact erf GELU) or ``"tanh"``.

    Returns:
        ``(..., N)`` in the matmul's output dtype.

    With Triton (GPU) the matmul runs without its bias and :func:`bias_gelu`
    adds it in its fused kernel, whose backward also produces ``dbias``
    without another pass. Elsewhere this is exactly stock
    ``F.gelu(F.linear(x, weight, bias))``: ATen's CPU ``addmm`` folds the bias
    into the matmul, which no separate elementwise op can beat.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"linear_gelu: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"linear_gelu: x must be a floating tensor of shape (..., K), got dtype {x.dtype}, "
                        f"shape {tuple(x.shape)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"linear_gelu: weight must be a (N, K) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: x's last dim {x.shape[-1]} does not match weight's K = {weight.shape[1]}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"linear_gelu: bias must have shape ({weight.shape[0]},) to match weight, got {got}")
    if bias is not None and _use_triton(x):
        return bias_gelu(F.linear(x, weight), bias, approximate)
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)
