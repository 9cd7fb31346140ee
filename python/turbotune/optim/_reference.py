"""Readable single-tensor AdamW: the reference the fused kernels are tested against.

One function, one tensor at a time, plain PyTorch, fp32 math. It follows
``torch.optim.AdamW``'s single-tensor path operation by operation, and adds
what turbotune's AdamW offers on top of it:

- fp32 master weights for 16-bit params (the master copy is updated, the param
  receives its rounded value);
- moments stored in bf16 (``state_dtype=torch.bfloat16``): they are rounded to
  nearest after each update, and the rounded values are used for the step;
- stochastic rounding of bf16 params (no master copy);
- a gradient multiplier (``1 / GradScaler scale``).

It is also the fallback the optimizer uses where no native kernel can run
(``TURBOTUNE_BACKEND=reference``, a build without the extension, or
params whose memory has gaps, e.g. a strided slice).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def stochastic_round_to_bf16(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically: up with probability equal to the discarded fraction.

    Adds 16 uniform random bits below bf16's mantissa and truncates, so the
    expected value of the result equals ``x``. Returns a bf16 tensor of ``x``'s shape.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected a float32 tensor, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the 16 low bits (two's complement mask 0xFFFF0000)
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero
    # inf / NaN must survive the integer trick unchanged
    special = ~torch.isfinite(x)
    if bool(special.any()):
        out = torch.where(special, x.to(torch.bfloat16), out)
    return out


@torch.no_grad()
def adamw_single_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    master: Optional[Tensor],
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_multiplier: float = 1.0,
    stochastic_rounding: bool = False,
    generator: Optional[torch.Generator] = None,
) -> None:
    """One AdamW update of one tensor, in place.

    Args:
        param: the parameter, any shape, fp32 / fp16 / bf16.
        grad: its gradient, same shape (any floating dtype).
        exp_avg, exp_avg_sq: first and second moments, same shape, fp32 or bf16.
        max_exp_avg_sq: running max of ``exp_avg_sq`` (amsgrad) or None.
        master: fp32 master copy of a 16-bit ``param`` or None.
        step: the step count *after* this update (1 for the first update).
        grad_multiplier: the gradient is multiplied by it first (``1/scale``
            for a GradScaler that did not unscale).
        stochastic_rounding: write a bf16 ``param`` (no master) with
            :func:`stochastic_round_to_bf16` instead of round-to-nearest.
    """
    g = grad.float()
    if grad_multiplier != 1.0:
        g = g * grad_multiplier
    if maximize:
        g = -g
    if master is not None:
        p = master
    elif param.dtype == torch.float32:
        p = param
    else:
        p = param.float()

    # decoupled weight decay
    p.mul_(1 - lr * weight_decay)

    # moments, kept in their storage dtype; the stored (rounded) values are used
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    m = exp_avg.float()
    v = exp_avg_sq.float()

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    if amsgrad:
        assert max_exp_avg_sq is not None
        v_max = torch.maximum(max_exp_avg_sq.float(), v)
        max_exp_avg_sq.copy_(v_max)
        denom = (max_exp_avg_sq.float().sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)

    if master is not None:
        param.copy_(p)
    elif stochastic_rounding and param.dtype == torch.bfloat16:
        param.copy_(stochastic_round_to_bf16(p, generator))
    elif p is not param:
        param.copy_(p)
