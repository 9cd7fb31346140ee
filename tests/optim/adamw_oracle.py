"""Independent checks for the AdamW tests (imported by test_adamw.py and test_adamw_cuda.py).

- :func:`oracle_adamw`: AdamW written from the paper's formulas in float64, rounding
  only where the optimizer stores a value (moments in the state dtype, the param in
  its dtype or the fp32 master copy). It shares no code with
  ``turbotune.optim.adamw_single_tensor``, so the reference path can be tested.
- :func:`assert_within_ulps`: a tolerance in units of the stored dtype's spacing.
- :func:`sr_bits_expected`: the stochastic-rounding bits of ``csrc/cpu/adamw.h``
  (``turbotune::sr``) recomputed in Python, for bit-exact tests of both kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_MIN_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at ``|x|`` (fp64 tensor)."""
    a = x.detach().double().abs()
    e = torch.floor(torch.log2(a.clamp_min(2.0 ** _MIN_EXP[dtype])))
    return torch.pow(2.0, e - _MANTISSA[dtype])


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, n: float, name: str,
                       atol: float = 0.0) -> None:
    """``|got - want| <= n * ulp_dtype(want) + atol`` elementwise, with a readable failure."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, (name, g.shape, w.shape)
    bound = n * ulp(w, dtype) + atol
    err = (g - w).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = int(torch.argmax(torch.where(bad, err - bound, torch.full_like(err, -1.0)).flatten().nan_to_num(math.inf)))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.numel()} elements beyond {n} ulp({dtype}) + {atol:g}; worst at flat "
            f"index {i}: got {g.flatten()[i].item():.9g}, want {w.flatten()[i].item():.9g} "
            f"(bound {bound.flatten()[i].item():.3g})"
        )


def oracle_adamw(param: torch.Tensor, grads: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, amsgrad: bool, state_dtype: torch.dtype, master: bool,
                 grad_multipliers: Optional[List[float]] = None):
    """Run ``len(grads)`` AdamW steps on one tensor in float64.

    Returns ``(param, master_or_None, exp_avg, exp_avg_sq)`` as float64 tensors holding
    exactly representable values of their storage dtypes.
    """
    def stored(x, dtype):
        return x.to(dtype).double()

    pdt = param.dtype
    w = param.double().clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    vmax = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double() * (1.0 if grad_multipliers is None else grad_multipliers[t - 1])
        w = w * (1.0 - lr * weight_decay)
        m = stored(beta1 * m + (1.0 - beta1) * g, state_dtype)
        v = stored(beta2 * v + (1.0 - beta2) * g * g, state_dtype)
        vhat = v
        if amsgrad:
            vmax = stored(torch.maximum(vmax, v), state_dtype)
            vhat = vmax
        denom = vhat.sqrt() / math.sqrt(1.0 - beta2**t) + eps
        w = w - (lr / (1.0 - beta1**t)) * m / denom
        w = stored(w, torch.float32 if master else pdt)
    out_param = stored(w, pdt) if master else w
    return out_param, (w if master else None), m, v


# ---------------------------------------------------------------- stochastic rounding bits

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def tensor_seed(seed: int, tensor_index: int) -> int:
    s = (seed * 0x9E3779B97F4A7C15 + tensor_index * 0xBF58476D1CE4E5B9) & _M64
    return int(_hash32(torch.tensor([(s ^ (s >> 32)) & _M32], dtype=torch.int64)))


def sr_bits_expected(values: torch.Tensor, seed: int, tensor_index: int) -> torch.Tensor:
    """bf16 bits (int64 tensor) of stochastically rounded fp32 ``values`` (finite), element i of tensor
    ``tensor_index`` of the launch list, as ``sr::round_bf16_stochastic(bits, sr::element_bits(...))``."""
    bits = values.contiguous().view(torch.int32).to(torch.int64) & _M32
    index = torch.arange(values.numel(), dtype=torch.int64) & _M32
    rnd = _hash32(index ^ tensor_seed(seed, tensor_index))
    return ((bits + (rnd & 0xFFFF)) >> 16) & 0xFFFF


def exact_sr_case(sizes: Sequence[int], generator_seed: int = 0):
    """Inputs for which one AdamW step is exact in fp32 on every device, so stochastic rounding alone decides
    the output: bf16 params in [1, 2), grads +-1, betas 0, eps 0, no weight decay, lr = 2^-12 (1/32 of a bf16
    ulp there). The new fp32 value is exactly p -+ 2^-12. Returns (params, grads, kwargs, fp32 new values)."""
    g = torch.Generator().manual_seed(generator_seed)
    params = [(torch.rand(n, generator=g) + 1.0).to(torch.bfloat16) for n in sizes]
    grads = [torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.bfloat16) for n in sizes]
    lr = 2.0**-12
    kwargs = dict(lr=lr, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, master_weights=False, stochastic_rounding=True)
    new = [p.float() - lr * gr.float() for p, gr in zip(params, grads)]
    return params, grads, kwargs, new
