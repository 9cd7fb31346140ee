"""Fused cross-entropy over class logits: ``torch.nn.functional.cross_entropy``
for ``(N, C)`` logits and ``(N,)`` class targets, with ``ignore_index``,
``label_smoothing`` and every reduction, without ever holding an fp32 copy of
the logits (masked-language-model heads have C = 30,522).

This module holds everything about the op:

- :func:`cross_entropy_ref`: plain PyTorch (ATen's ``F.cross_entropy``)
  computing in fp32 (fp64 for fp64 logits); the CPU default, where ATen's
  vectorized kernel is the fastest path;
- the Triton kernels: the forward reads each row once in chunks of the
  vocabulary, keeping an online log-sum-exp (running max and rescaled sum), the
  sum of the logits (for label smoothing) and the target logit in fp32
  registers, and stores the per-row loss and log-sum-exp; rows whose target is
  ``ignore_index`` are skipped. The backward reads each row once more and
  writes ``softmax - (1 - eps) * onehot - eps / C``, times the upstream
  gradient, straight in the logits' dtype;
- the ``torch.library`` ops ``turbotune::cross_entropy`` and
  ``turbotune::cross_entropy_backward`` with fake implementations and autograd
  (through :class:`~turbotune.ops._op.FusedOp`);
- :func:`cross_entropy`, the public function.
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

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
# Vocabulary chunk one program holds in registers at a time.
MAX_BLOCK_V = 4096

backend.register_op(
    OP,
    triton_dtypes=backend.FLOATS,
    summary="fused cross-entropy: chunked online log-sum-exp, ignore_index, label smoothing (forward and backward)",
)


# ----------------------------------------------------------------------------- reference


def _math_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy`` computed in fp32 (fp64 for fp64 logits), returned in
    ``logits``' dtype; differentiable through ATen's own autograd. For fp32
    logits this is exactly ``F.cross_entropy``."""
    loss = F.cross_entropy(
        logits.to(_math_dtype(logits)), target,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    return loss.to(logits.dtype)


def _row_losses_ref(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float):
    """Per-row ``(loss, lse)`` in fp32 math (what the Triton forward stores)."""
    z = logits.to(_math_dtype(logits))
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    loss = lse - z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(-1))
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def _reduce(row_loss: Tensor, target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return row_loss.to(dtype)
    total = row_loss.sum()
    if reduction == "mean":
        # torch divides by the number of non-ignored targets (0/0 = nan when all are ignored)
        total = total / (target != ignore_index).sum()
    return total.to(dtype)


def _row_scale(dloss: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The upstream gradient of each row's loss as an fp32 vector (length N, or 1 to broadcast)."""
    g = dloss.float()
    if reduction == "mean":
        g = g / (target != ignore_index).sum()
    return g.reshape(-1)


def _backward_ref(dloss, logits, target, lse, ignore_index, label_smoothing, reduction):
    z = logits.to(_math_dtype(logits))
    n, c = z.shape
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target))
    grad = torch.exp(z - lse.to(z.dtype).unsqueeze(-1))
    if label_smoothing:
        grad = grad - label_smoothing / c
    grad = grad.scatter_add(-1, t.unsqueeze(-1), torch.full((n, 1), label_smoothing - 1.0, dtype=z.dtype, device=z.device))
    scale = _row_scale(dloss, target, ignore_index, reduction).to(z.dtype)
    grad = grad * scale.unsqueeze(-1)
    return torch.where(valid.unsqueeze(-1), grad, torch.zeros((), dtype=z.dtype, device=z.device)).to(logits.dtype)


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _ce_fwd_kernel(
        Logits, Target, Loss, Lse, stride_l, V, ignore_index, smoothing,
        HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(Target + row)
        if t == ignore_index:
            tl.store(Loss + row, 0.0)
            tl.store(Lse + row, 0.0)
        else:
            base = Logits + row * stride_l
            m = float("-inf")
            s = 0.0
            zsum = 0.0
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
                if HAS_SMOOTHING:
                    zsum += tl.sum(tl.where(cols < V, z, 0.0), axis=0)
            lse = m + tl.log(s)
            ok = (t >= 0) & (t < V)
            # An out-of-range target is never read out of bounds: its loss is NaN.
            zt = tl.load(base + tl.where(ok, t, 0)).to(tl.float32)
            loss = tl.where(ok, lse - zt, float("nan"))
            if HAS_SMOOTHING:
                loss = (1.0 - smoothing) * loss + smoothing * (lse - zsum / V)
            tl.store(Loss + row, loss)
            tl.store(Lse + row, lse)

    @triton.jit
    def _ce_bwd_kernel(
        Logits, Target, Lse, Scale, DLogits, stride_l, stride_d, stride_scale, V, ignore_index, smoothing,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(Target + row)
        dbase = DLogits + row * stride_d
        if t == ignore_index:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                tl.store(dbase + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(DLogits.dtype.element_ty),
                         mask=cols < V)
        else:
            base = Logits + row * stride_l
            lse = tl.load(Lse + row)
            g = tl.load(Scale + row * stride_scale)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cmask = cols < V
                z = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
                p = tl.exp(z - lse) - smoothing / V
                p = tl.where(cols == t, p - (1.0 - smoothing), p)
                # Each element is read before it is written by this same program, so
                # DLogits may alias Logits.
                tl.store(dbase + cols, (p * g).to(DLogits.dtype.element_ty), mask=cmask)


def _block_v(v: int) -> int:
    return min(MAX_BLOCK_V, max(16, next_power_of_2(v)))  # >= 16: no 1-wide blocks on the GPU


def _warps(block_v: int) -> int:
    return int(min(16, max(4, block_v // 256)))


def _forward_triton(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float):
    n, v = logits.shape
    loss = _rows.alloc((n,), torch.float32, logits.device)
    lse = _rows.alloc((n,), torch.float32, logits.device)
    if n == 0:
        return loss, lse
    bv = _block_v(v)
    with _rows.device_guard(logits):
        _ce_fwd_kernel[(n,)](
            logits, target, loss, lse, logits.stride(0), v, ignore_index, float(label_smoothing),
            HAS_SMOOTHING=label_smoothing != 0.0, BLOCK_V=bv, num_warps=_warps(bv),
        )
    return loss, lse


def _backward_triton(scale: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                     label_smoothing: float, out: Optional[Tensor] = None) -> Tensor:
    n, v = logits.shape
    dlogits = _rows.alloc((n, v), logits.dtype, logits.device) if out is None else out
    if n == 0:
        return dlogits
    bv = _block_v(v)
    with _rows.device_guard(logits):
        _ce_bwd_kernel[(n,)](
            logits, target, lse, scale, dlogits, logits.stride(0), dlogits.stride(0),
            1 if scale.numel() > 1 else 0, v, ignore_index, float(label_smoothing),
            BLOCK_V=bv, num_warps=_warps(bv),
        )
    return dlogits


# ----------------------------------------------------------------------------- ops


def _use_triton(logits: Tensor) -> bool:
    return logits.dtype in backend.FLOATS and backend.select(OP, logits.device, logits.dtype).impl == backend.TRITON


def _cross_entropy_impl(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, reduction: str
) -> Tuple[Tensor, Tensor]:
    """``(loss, lse)``: the reduced loss in ``logits``' dtype and the per-row
    fp32 log-sum-exp (0 for ignored rows) that the backward needs."""
    if _use_triton(logits):
        row_loss, lse = _forward_triton(_rows.as_rows(logits, logits.shape[-1]), target.contiguous(),
                                        ignore_index, label_smoothing)
    else:
        row_loss, lse = _row_losses_ref(logits, target, ignore_index, label_smoothing)
        lse = lse.float() if logits.dtype != torch.float64 else lse
    return _reduce(row_loss, target, ignore_index, reduction, logits.dtype), lse


def _cross_entropy_fake(logits, target, ignore_index, label_smoothing, reduction):
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else ())
    lse = logits.new_empty((n,), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return loss, lse


def _cross_entropy_backward_impl(
    dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
    reduction: str,
) -> Tensor:
    """``dlogits`` of ``logits``' shape and dtype."""
    if _use_triton(logits):
        scale = _row_scale(dloss, target, ignore_index, reduction).contiguous()
        return _backward_triton(scale, _rows.as_rows(logits, logits.shape[-1]), target.contiguous(), lse,
                                ignore_index, label_smoothing)
    return _backward_ref(dloss, logits, target, lse, ignore_index, label_smoothing, reduction).contiguous()


def _cross_entropy_backward_fake(dloss, logits, target, lse, ignore_index, label_smoothing, reduction):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, reduction = inputs
    _, lse = output
    ctx.args = (ignore_index, label_smoothing, reduction)
    ctx.save_for_backward(logits, target, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dloss, dlse):
    logits, target, lse = ctx.saved_tensors
    dlogits = _CROSS_ENTROPY_BACKWARD.from_backward(ctx, dloss, logits, target, lse, *ctx.args)
    return dlogits, None, None, None, None


_CROSS_ENTROPY_BACKWARD = FusedOp(
    "cross_entropy_backward", _cross_entropy_backward_impl, fake=_cross_entropy_backward_fake
)
_CROSS_ENTROPY = FusedOp(
    "cross_entropy", _cross_entropy_impl, fake=_cross_entropy_fake, setup_context=_setup_context, backward=_backward
)


# ----------------------------------------------------------------------------- public API


def _check(logits, target, ignore_index, label_smoothing, reduction):
    if not isinstance(logits, Tensor):
        raise TypeError(f"cross_entropy: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"cross_entropy: target must be a torch.Tensor, got {type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be a floating tensor, got dtype {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(
            f"cross_entropy: target must hold int64 class indices, got dtype {target.dtype} "
            "(class-probability targets are not supported: use torch.nn.functional.cross_entropy)"
        )
    if logits.dim() not in (1, 2):
        raise ValueError(
            f"cross_entropy: logits must have shape (N, C) or (C,), got {tuple(logits.shape)} "
            "(flatten the leading dimensions: logits.reshape(-1, C), target.reshape(-1))"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits must have C >= 1 classes, got shape {tuple(logits.shape)}")
    want = logits.shape[:-1]
    if target.shape != want:
        raise ValueError(
            f"cross_entropy: target must have shape {tuple(want)} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"cross_entropy: target is on {target.device} but logits is on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"cross_entropy: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_targets(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    """Out-of-range class indices raise ``IndexError`` for CPU tensors, as
    torch does; on a GPU no host synchronisation is spent: the kernel gives
    NaN for those rows and never reads outside the row."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    c = logits.shape[-1]
    bad = (target != ignore_index) & ((target < 0) | (target >= c))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: target[{i}] = {int(target.reshape(-1)[i])} is out of bounds for "
                         f"{c} classes (and is not ignore_index={ignore_index})")


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy between class logits and class indices, as
    ``torch.nn.functional.cross_entropy(logits, target, ignore_index=...,
    label_smoothing=..., reduction=...)``.

    Args:
        logits: ``(N, C)`` (or ``(C,)``) float32 / float16 / bfloat16 (float64
            runs the reference in fp64); rows may be strided, classes contiguous.
        target: ``(N,)`` (or ``()``) int64 class indices in ``[0, C)``, or
            ``ignore_index``.
        ignore_index: targets equal to it contribute no loss and no gradient.
        label_smoothing: ``eps`` in ``[0, 1]``: the target distribution is
            ``(1 - eps) * onehot + eps / C``, exactly as torch defines it.
        reduction: ``"mean"`` (sum over non-ignored rows divided by their count;
            NaN when every row is ignored, as in torch), ``"sum"`` or ``"none"``.

    Returns:
        The loss in ``logits``' dtype: a 0-d tensor, or ``(N,)`` for
        ``reduction="none"`` (0 at ignored rows).

    On a GPU the Triton kernels compute in fp32 chunk by chunk over the classes
    (no fp32 copy of the logits is made), and the backward writes
    ``dlogits`` directly in ``logits``' dtype. Elsewhere ATen's
    ``F.cross_entropy`` runs (computing in fp32 for half-precision logits).
    An out-of-range target raises ``IndexError`` on CPU tensors; on a GPU it
    makes that row's loss NaN (no host synchronisation is spent checking).
    """
    _check(logits, target, ignore_index, label_smoothing, reduction)
    if not _use_triton(logits):  # ATen (which raises its own IndexError for a bad target)
        return cross_entropy_ref(logits, target, ignore_index, float(label_smoothing), reduction)
    _check_targets(logits, target, ignore_index)
    squeeze = logits.dim() == 1
    if squeeze:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    loss, _ = _CROSS_ENTROPY(logits, target, int(ignore_index), float(label_smoothing), reduction)
    return loss.squeeze(0) if squeeze and reduction == "none" else loss
