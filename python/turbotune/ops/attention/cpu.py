"""The implementations of the attention op that are not Triton kernels, and the one
function, :func:`choose`, that decides which implementation runs a call.

Implementations (each exposes ``forward``, ``backward`` and, except ATen,
``varlen_forward`` / ``varlen_backward`` with :mod:`.reference`'s signatures):

- ``reference`` (:mod:`.reference`): plain PyTorch, every feature, fp32/fp64 math.
- ``aten``: ATen's fused CPU flash-attention kernel (what SDPA runs on CPU), with the
  padding mask, bias and causal mask folded into one additive mask. It has no
  dropout (it cannot reproduce turbotune's Philox mask), no varlen and no bias
  gradient.
- ``native``: the C++/OpenMP CPU kernels of :mod:`.native_cpu` (``csrc/cpu/attention.cpp``),
  plugged in with :func:`register_native` when the extension has them (dense with a
  padding mask, and varlen; dropout with the same Philox mask; no bias).

:func:`choose` applies ``backend.select("attention", device, dtype)`` (which honours
``TURBOTUNE_BACKEND`` and is what ``turbotune info`` reports) and then the per-call
limits: native > aten > reference, and with dropout native > reference. float64
always runs the reference (fp64 math).
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor

from ... import backend
from . import reference

OP = "attention"

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
ATEN_AVAILABLE = _CPU_FLASH is not None and _CPU_FLASH_BWD is not None
ATEN_DESCRIPTION = ("ATen's CPU flash-attention kernel (SDPA's); calls with dropout, varlen or a bias that needs a "
                    "gradient run the reference")


# --------------------------------------------------------------------------- ATen


def _additive_mask(q: Tensor, k: Tensor, mask: Optional[Tensor], bias: Optional[Tensor], causal: bool):
    """mask, bias and causal folded into one additive mask broadcastable to (B, H, Lq, Lk), q's dtype."""
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    m = bias
    if mask is not None:
        pad = torch.zeros(b, 1, 1, lk, dtype=q.dtype, device=q.device).masked_fill(
            ~(mask != 0).view(b, 1, 1, lk), float("-inf"))
        m = pad if m is None else m + pad
    if causal:
        i = torch.arange(lq, device=q.device).view(-1, 1)
        j = torch.arange(lk, device=q.device).view(1, -1)
        c = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(j > i + (lk - lq), float("-inf"))
        m = c if m is None else m + c
    if m is not None:
        while m.dim() < 4:
            m = m.unsqueeze(0)
    return m


def _unit_d(*ts: Tensor):
    """The tensors with a unit-stride head dim: ATen's CPU flash kernel reads rows of D as if
    contiguous (SDPA copies such inputs before calling it; a direct call must too)."""
    return [t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in ts]


class _Aten:
    """ATen's CPU flash kernel behind :mod:`.reference`'s dense signatures."""

    @staticmethod
    def forward(q, k, v, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset):
        assert dropout_p == 0.0, "the ATen path has no dropout"
        q, k, v = _unit_d(q, k, v)
        mask = _additive_mask(q, k, attention_mask, attn_bias, causal)
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        lse = lse.to(torch.float32)
        if mask is not None:  # the ATen kernel reports 0 for rows with no key; we promise -inf
            empty = torch.isneginf(mask).all(dim=-1).expand(lse.shape)
            lse = lse.masked_fill(empty, float("-inf"))
        return out, lse.contiguous()

    @staticmethod
    def backward(dout, q, k, v, out, lse, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset,
                 bias_grad=False):
        assert dropout_p == 0.0 and not bias_grad, "the ATen path has no dropout and no bias gradient"
        dout, q, k, v, out = _unit_d(dout, q, k, v, out)
        mask = _additive_mask(q, k, attention_mask, attn_bias, causal)
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # exp(-inf - 0) = 0 for rows with no key
        dq, dk, dv = _CPU_FLASH_BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
        return dq, dk, dv, None


# --------------------------------------------------------------------------- native (the seam)


class NativeAttention(Protocol):
    """What a native CPU attention module provides (the reference's signatures):

    - ``DTYPES``: the dtypes it handles, e.g. ``(torch.float32, torch.bfloat16, torch.float16)``;
    - ``forward(q, k, v, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset) -> (out, lse)``
      (dense ``(B, H, L, D)``; ``attn_bias`` is always None: calls with a bias go elsewhere);
    - ``backward(dout, q, k, v, out, lse, attention_mask, attn_bias, dropout_p, causal, scale, seed, offset,
      bias_grad=False) -> (dq, dk, dv, None)``;
    - ``varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset) -> (out, lse)``;
    - ``varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, seed, offset)
      -> (dq, dk, dv)``.

    Dropout must apply :func:`.philox.keep_mask_ref`'s mask bit for bit; ``lse`` is fp32 natural-log
    with ``-inf`` for rows without keys; outputs have the inputs' dtype (any strides).
    """

    DTYPES: Tuple[torch.dtype, ...]

    def forward(self, *args): ...

    def backward(self, *args, bias_grad: bool = False): ...

    def varlen_forward(self, *args): ...

    def varlen_backward(self, *args): ...


_native: Optional[NativeAttention] = None


def register_native(impl: Optional[NativeAttention]) -> None:
    """Plug in (or, with None, remove) the native CPU implementation: declares its dtypes
    to :mod:`turbotune.backend`, so it is chosen by default on CPU, forced by
    ``TURBOTUNE_BACKEND=native`` and reported by ``turbotune info``."""
    global _native
    for name in ("DTYPES", "forward", "backward", "varlen_forward", "varlen_backward"):
        if impl is not None and not hasattr(impl, name):
            raise TypeError(f"register_native: the implementation has no {name!r}")
    _native = impl
    backend.update_op(OP, native_cpu_dtypes=tuple(impl.DTYPES) if impl is not None else ())


def native() -> Optional[NativeAttention]:
    return _native


# --------------------------------------------------------------------------- the choice


def choose(q: Tensor, k: Tensor, *, dropout_p: float, attn_bias: Optional[Tensor], bias_grad: bool,
           varlen: bool) -> str:
    """The implementation that runs one call: ``backend.TRITON``, ``NATIVE``, ``ATEN`` or ``REFERENCE``.

    ``backend.select`` gives the op's choice for (device, dtype); a call the chosen
    implementation cannot do falls down the chain native > aten > reference (with
    dropout: native > reference; a bias, or its gradient, rules native out; ATen also
    needs a bias of q's dtype and non-empty sequences). float64 always runs the reference.
    """
    if q.dtype == torch.float64:
        return backend.REFERENCE
    impl = backend.select(OP, q.device, q.dtype).impl
    if impl == backend.TRITON:
        return backend.TRITON
    if impl == backend.NATIVE and _native is not None and attn_bias is None:
        return backend.NATIVE
    if (impl in (backend.NATIVE, backend.ATEN) and ATEN_AVAILABLE and q.device.type == "cpu" and not varlen
            and dropout_p == 0.0 and not bias_grad and (attn_bias is None or attn_bias.dtype == q.dtype)
            and q.shape[0] * q.shape[1] > 0 and q.shape[2] > 0 and k.shape[2] > 0):
        return backend.ATEN
    return backend.REFERENCE


def implementation(name: str):
    """The module/object implementing ``name`` (one of the non-Triton choices)."""
    if name == backend.NATIVE:
        return _native
    if name == backend.ATEN:
        return _Aten
    return reference
