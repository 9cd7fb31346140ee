"""Helpers shared by turbotune's tests (and handy for users' own checks).

``TOLERANCES`` maps a dtype to the default ``(atol, rtol)`` for comparing a
kernel against an fp32/fp64 reference; :func:`assert_close` reports the worst
elements instead of only the first mismatch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

# (atol, rtol) against an fp32/fp64 reference, after the kernel's output is cast
# to fp32. bf16 keeps 8 mantissa bits, and the Triton interpreter truncates on
# fp32 -> bf16 stores instead of rounding, so it needs >= 1e-2 relative.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DTYPE_PARAMS = [
    (torch.float32, *TOLERANCES[torch.float32]),
    (torch.float16, *TOLERANCES[torch.float16]),
    (torch.bfloat16, *TOLERANCES[torch.bfloat16]),
]


def tolerances(dtype: torch.dtype) -> Tuple[float, float]:
    """Default ``(atol, rtol)`` for ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no default tolerance for dtype {dtype}; pass atol/rtol explicitly") from None


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    name: str = "tensor",
    worst: int = 5,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Both tensors are compared in fp64 on the CPU. On failure the message gives
    the number of mismatches, the largest absolute and relative errors and the
    ``worst`` offending indices with their values. ``atol``/``rtol`` default to
    :data:`TOLERANCES` for ``actual.dtype``.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if atol is None or rtol is None:
        d_atol, d_rtol = tolerances(actual.dtype)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    err = (a - e).abs()
    err = torch.where(torch.isnan(a) & torch.isnan(e), torch.zeros_like(err), err)
    bound = atol + rtol * e.abs()
    bad = (err > bound) | nan_mismatch | (torch.isinf(a) & (a != e))
    if not bool(bad.any()):
        return
    excess = torch.where(bad, (err - bound).nan_to_num(float("inf")), torch.full_like(err, -1.0))
    flat = excess.flatten()
    k = min(worst, int(bad.sum()))
    idx = torch.topk(flat, k).indices
    lines = []
    for i in idx.tolist():
        pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        lines.append(f"  at {pos}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g}")
    rel = (err / e.abs().clamp_min(1e-30)).nan_to_num(float("inf"))
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
        f"max abs err {err.nan_to_num(float('inf')).max().item():.3g}, max rel err {rel.max().item():.3g}; worst:\n"
        + "\n".join(lines)
    )
