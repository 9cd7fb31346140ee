"""Fused multi-tensor gradient clipping by global L2 norm.

Two users share the norm pass here: :func:`clip_grad_norm_` (norm, then one
in-place scaling pass, torch's contract) and ``AdamW(max_grad_norm=...)``
(norm only; the clip coefficient is folded into the update, so the gradients
are read once more by the step and never rewritten). ``turbotune info`` reports
both as op ``clip_grad_norm``.
"""
from __future__ import annotations

import math
import numbers
import struct
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _native, backend
from ._layout import is_dense

OP = "clip_grad_norm"
backend.register_op(
    OP,
    native_cpu_dtypes=backend.FLOATS,
    native_cuda_dtypes=backend.FLOATS,
    summary="multi-tensor global L2 gradient norm: clip_grad_norm_ (norm + in-place scaling) and "
    "AdamW(max_grad_norm=...) (norm only, coefficient folded into the update)",
)

# Storage dtype codes of the native kernels (csrc/cpu/adamw.h, kernels/cuda_api.h); shared by optim.adamw.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

Coef = Union[float, Tensor]


def _f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (inf on overflow, NaN stays NaN)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """``min(1, max_norm / (total_norm + 1e-6))`` evaluated in fp32 exactly as torch does.

    :func:`torch.nn.utils.clip_grad_norm_` computes ``max_norm / (total + 1e-6)``
    on an fp32 tensor, i.e. ``reciprocal(total + 1e-6) * max_norm``, then clamps
    to 1; each operation rounds to fp32. A NaN norm gives a NaN coefficient.
    """
    denom = _f32(_f32(total_norm) + _f32(1e-6))
    coef = _f32(_f32(1.0 / denom) * _f32(max_norm)) if denom != 0 else math.inf
    return 1.0 if coef >= 1.0 else coef


def clip_grad_norm_ref(grads: List[Tensor], max_norm: float) -> Tensor:
    """Plain-PyTorch reference: total L2 norm (fp32, computed in fp64) and in-place scaling."""
    if not grads:
        return torch.tensor(0.0)
    total = torch.sqrt(sum(g.detach().double().square().sum().cpu() for g in grads)).float()
    coef = clip_coefficient(float(total), max_norm)
    if not coef >= 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _native_ok(grads: List[Tensor], device: torch.device) -> bool:
    dtypes = set()
    for g in grads:
        if g.device != device or not is_dense(g):  # the kernels walk each grad's memory as a flat array
            return False
        dtypes.add(g.dtype)
    return all(d in DTYPE_CODE and backend.select(OP, device, d).impl == backend.NATIVE for d in dtypes)


def _by_dtype(grads: List[Tensor]) -> Dict[torch.dtype, List[Tensor]]:
    out: Dict[torch.dtype, List[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel() > 0:  # zero-element tensors add nothing (and may have no data pointer)
            out[g.dtype].append(g)
    return out


def _chunks(gs: List[Tensor], chunk: int) -> int:
    return sum(-(-g.numel() // chunk) for g in gs)


def global_grad_norm(
    grads: List[Tensor], max_norm: float, grad_scale: Optional[Tensor] = None
) -> Tuple[Tensor, Dict[torch.device, Coef]]:
    """Global L2 norm of ``grads`` and the clip coefficient for each of their devices.

    Args:
        grads: gradient tensors (any shapes; zero-element tensors are allowed and
            add nothing), fp32 / fp16 / bf16, on one or more devices.
        max_norm: the largest allowed norm (>= 0, may be inf).
        grad_scale: a GradScaler scale (fp32 scalar tensor) the grads are still
            multiplied by, or None. The norm and coefficient are those of the
            unscaled grads (``grads / grad_scale``).

    Returns:
        ``(total, coefs)``: ``total`` is a 0-dim fp32 tensor on the first grad's
        device (CPU if there are no grads); ``coefs[device]`` is
        ``min(1, max_norm / (total + 1e-6))`` as a Python float for CPU devices
        and as a 1-element fp32 tensor on the device for CUDA devices (computed
        there: no host synchronisation). One pass reads every gradient once.
    """
    devices = list(dict.fromkeys(g.device for g in grads))
    if not devices:
        return torch.zeros((), dtype=torch.float32), {}
    if len(devices) == 1:
        device = devices[0]
        if device.type == "cpu" and _native_ok(grads, device):
            C = _native.require("turbotune.optim gradient norm (CPU kernel)")
            sumsq = 0.0
            for dtype, gs in _by_dtype(grads).items():
                sumsq += C.sum_squares_cpu([g.data_ptr() for g in gs], [g.numel() for g in gs], DTYPE_CODE[dtype])
            total_f = _f32(math.sqrt(sumsq) / (1.0 if grad_scale is None else float(grad_scale)))
            return torch.tensor(total_f, dtype=torch.float32), {device: clip_coefficient(total_f, max_norm)}
        if device.type == "cuda" and _native_ok(grads, device):
            total, coef = _cuda_norm(grads, device, max_norm, grad_scale)
            return total, {device: coef}
    # several devices, or no native kernel: plain PyTorch, the sum of squares in fp64 (as clip_grad_norm_ref)
    first = devices[0]
    total = torch.sqrt(sum(g.detach().double().square().sum().to(first) for g in grads)).float()
    if grad_scale is not None:
        total = total / grad_scale.to(device=first, dtype=torch.float32)
    if first.type == "cpu":
        total_f = float(total)
        coefs: Dict[torch.device, Coef] = {d: clip_coefficient(total_f, max_norm) for d in devices}
        return total.reshape(()), coefs
    coef = torch.clamp((total + 1e-6).reciprocal() * max_norm, max=1.0).reshape(1)
    coefs = {d: (float(coef) if d.type == "cpu" else coef.to(d, non_blocking=True)) for d in devices}
    return total.reshape(()), coefs


def _cuda_norm(grads: List[Tensor], device: torch.device, max_norm: float, grad_scale: Optional[Tensor]):
    C = _native.require_cuda("turbotune.optim gradient norm (CUDA kernel)")
    by_dtype = _by_dtype(grads)
    chunk = int(C.multi_tensor_chunk_size())
    n_chunks = sum(_chunks(gs, chunk) for gs in by_dtype.values())
    work = torch.empty(n_chunks + 2, dtype=torch.float32, device=device)
    scale_ptr = 0
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
        scale_ptr = grad_scale.data_ptr()
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        offset = 0
        for dtype, gs in by_dtype.items():
            C.sum_squares_partials_cuda([g.data_ptr() for g in gs], [g.numel() for g in gs], DTYPE_CODE[dtype],
                                        work.data_ptr() + 4 * offset, stream)
            offset += _chunks(gs, chunk)
        total = work[n_chunks : n_chunks + 1]
        coef = work[n_chunks + 1 : n_chunks + 2]
        C.clip_coefficient_cuda(work.data_ptr(), n_chunks, max_norm, scale_ptr, total.data_ptr(), coef.data_ptr(),
                                stream)
    return total.reshape(()), coef


def clip_grad_norm_(
    parameters: Union[Tensor, Iterable[Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach=None,
) -> Tensor:
    """Clip the gradients of ``parameters`` in place so that their global L2 norm is at most ``max_norm``.

    Same contract as :func:`torch.nn.utils.clip_grad_norm_` for ``norm_type=2``:
    every gradient is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``.
    The norm is computed by one multi-tensor pass per (device, dtype) group
    (fp32 partial sums per chunk, combined in a fixed order, so the result does
    not depend on the thread count); the scaling is a second fused pass. On
    CUDA nothing synchronises the host (unless ``error_if_nonfinite``).
    In a training loop, ``AdamW(max_grad_norm=...)`` does the same clipping
    without the scaling pass (the coefficient is folded into the update).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped
            (params without a gradient are skipped; zero-element ones are
            allowed); grads fp32 / fp16 / bf16.
        max_norm: the largest allowed global norm (>= 0).
        norm_type: only 2 is fused; other norms defer to torch.
        error_if_nonfinite: raise if the total norm is NaN or inf.
        foreach: ignored (accepted for compatibility).

    Returns:
        The total norm of the gradients before clipping: a 0-dim fp32 tensor on
        the gradients' device.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(f"parameters: expected a tensor or an iterable of tensors, got {type(parameters).__name__}") \
            from None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}]: expected a tensor, got {type(p).__name__}")
    if isinstance(max_norm, (bool, str)) or not isinstance(max_norm, (numbers.Real, Tensor)):
        raise TypeError(f"max_norm: expected a number, got {type(max_norm).__name__}")
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ValueError(f"max_norm: expected a non-negative number, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    devices = {g.device for g in grads}
    device = next(iter(devices))
    simple = (
        float(norm_type) == 2.0
        and len(devices) == 1
        and all(g.dtype in DTYPE_CODE and is_dense(g) for g in grads)
    )
    if not simple:  # other norms, several devices, sparse gradients or gradients with gaps in memory
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)
    if not _native_ok(grads, device):
        total = clip_grad_norm_ref(grads, max_norm).to(device)
        _check_finite(total, error_if_nonfinite)
        return total

    total, coefs = global_grad_norm(grads, max_norm)
    _check_finite(total, error_if_nonfinite)
    coef = coefs[device]
    by_dtype = _by_dtype(grads)
    if device.type == "cpu":
        if not coef >= 1.0:  # NaN included, as torch does
            C = _native.require("turbotune.optim.clip_grad_norm_ (CPU kernel)")
            for dtype, gs in by_dtype.items():
                C.scale_cpu([g.data_ptr() for g in gs], [g.numel() for g in gs], DTYPE_CODE[dtype], coef)
        return total
    C = _native.require_cuda("turbotune.optim.clip_grad_norm_ (CUDA kernel)")
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        for dtype, gs in by_dtype.items():
            C.scale_by_cuda([g.data_ptr() for g in gs], [g.numel() for g in gs], DTYPE_CODE[dtype],
                            coef.data_ptr(), stream)
    return total


def _check_finite(total: Tensor, error_if_nonfinite: bool) -> None:
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            "The total norm of the gradients is non-finite, so it cannot be clipped. "
            "Set error_if_nonfinite=False to clip anyway."
        )
