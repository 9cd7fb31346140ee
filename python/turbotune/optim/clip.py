"""Fused multi-tensor gradient clipping by global L2 norm."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Union

import torch
from torch import Tensor

from .. import _native, backend

OP = "clip_grad_norm"
backend.register_op(
    OP,
    native_cpu_dtypes=backend.FLOATS,
    native_cuda_dtypes=backend.FLOATS,
    summary="multi-tensor global L2 gradient norm + in-place scaling",
)

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def clip_grad_norm_ref(grads: List[Tensor], max_norm: float) -> Tensor:
    """Plain-PyTorch reference: total L2 norm (fp32, computed in fp64) and in-place scaling."""
    if not grads:
        return torch.tensor(0.0)
    total = torch.sqrt(sum(g.detach().double().square().sum().cpu() for g in grads)).float()
    coef = max_norm / (float(total) + 1e-6)
    if not coef >= 1.0:
        for g in grads:
            g.mul_(coef)
    return total


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

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped
            (params without a gradient are skipped); grads fp32 / fp16 / bf16.
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
    params = list(parameters)
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
        and all(g.dtype in _DTYPE_CODE and g.layout == torch.strided and g.is_contiguous() for g in grads)
    )
    if not simple:  # other norms, several devices, sparse or strided gradients
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)
    impls = {backend.select(OP, device, g.dtype).impl for g in grads}
    if impls != {backend.NATIVE}:
        total = clip_grad_norm_ref(grads, max_norm).to(device)
        _check_finite(total, error_if_nonfinite)
        return total

    by_dtype: Dict[torch.dtype, List[Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    if device.type == "cpu":
        C = _native.require("turbotune.optim.clip_grad_norm_ (CPU kernel)")
        sumsq = 0.0
        for dtype, gs in by_dtype.items():
            sumsq += C.sum_squares_cpu([g.data_ptr() for g in gs], [g.numel() for g in gs], _DTYPE_CODE[dtype])
        total_f = sumsq**0.5
        total = torch.tensor(total_f, dtype=torch.float32)
        _check_finite(total, error_if_nonfinite)
        coef = max_norm / (total_f + 1e-6)
        if not coef >= 1.0:  # NaN included, as torch does
            for dtype, gs in by_dtype.items():
                C.scale_cpu([g.data_ptr() for g in gs], [g.numel() for g in gs], _DTYPE_CODE[dtype], coef)
        return total

    C = _native.require_cuda("turbotune.optim.clip_grad_norm_ (CUDA kernel)")
    chunk = int(C.multi_tensor_chunk_size())
    n_chunks = sum(-(-g.numel() // chunk) for g in grads)
    work = torch.empty(max(n_chunks, 1) + 2, dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        offset = 0
        for dtype, gs in by_dtype.items():
            C.sum_squares_partials_cuda([g.data_ptr() for g in gs], [g.numel() for g in gs], _DTYPE_CODE[dtype],
                                        work.data_ptr() + 4 * offset, stream)
            offset += sum(-(-g.numel() // chunk) for g in gs)
        total = work[n_chunks + 0 : n_chunks + 1]
        coef = work[n_chunks + 1 : n_chunks + 2]
        C.clip_coefficient_cuda(work.data_ptr(), n_chunks, max_norm, total.data_ptr(), coef.data_ptr(), stream)
        for dtype, gs in by_dtype.items():
            C.scale_by_cuda([g.data_ptr() for g in gs], [g.numel() for g in gs], _DTYPE_CODE[dtype],
                            coef.data_ptr(), stream)
    total = total.reshape(())
    _check_finite(total, error_if_nonfinite)
    return total


def _check_finite(total: Tensor, error_if_nonfinite: bool) -> None:
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            "The total norm of the gradients is non-finite, so it cannot be clipped. "
            "Set error_if_nonfinite=False to clip anyway."
        )
