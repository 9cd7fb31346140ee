"""Fused attention for BERT-style training: padding mask, additive bias (with its
gradient), causal, packed variable lengths, dropout, forward and backward.

``attention(q, k, v, ...)`` computes ``softmax(q k^T * scale + bias + mask) v`` on
the SDPA layout ``(B, H, L, D)``; ``attention_varlen(...)`` does the same on packed
``(total, H, D)`` tensors whose sequences are delimited by ``cu_seqlens`` (see
:mod:`turbotune.padding`).

One module per concern:

- :mod:`.philox`: the dropout RNG (Philox-4x32-10 in PyTorch), the mask's definition,
  its limits and the debug helper :func:`attention_dropout_mask`;
- :mod:`.reference`: plain PyTorch (the semantics, the CPU fallback, the tests'
  reference): :func:`attention_ref`, :func:`attention_varlen_ref`;
- :mod:`.kernels`: the Triton kernels (dense and varlen share them) and their block
  configurations; :mod:`.launch`: config choice and launchers;
- :mod:`.native_cpu`: the C++/OpenMP CPU kernels (``csrc/cpu/attention.cpp``);
- :mod:`.cpu`: the CPU implementations (ATen's flash kernel, the native seam) and
  :func:`.cpu.choose`, the one function that picks the path of a call;
- :mod:`.ops`: the four ``torch.library`` ops with fake implementations and autograd;
- :mod:`.api`: the public :func:`attention` and :func:`attention_varlen`.

Semantics shared by every path
------------------------------
- ``attention_mask`` (``(B, Lk)``, bool or 0/1 ints): True/1 = a real token to attend
  (Hugging Face's convention).
- ``causal``: query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned, as
  FlashAttention; identical to SDPA's ``is_causal`` when ``Lq == Lk``).
- A query row with no key to attend (all masked) produces zeros, never NaN; its
  log-sum-exp is ``-inf`` and its gradients are zero.
- Dropout: counter-based Philox keyed by ``(seed, offset)`` and the position of each
  probability (see :mod:`.philox`); the backward regenerates the mask instead of
  storing it, and every path applies the same mask bit for bit.
"""
from ... import backend
from . import cpu as _cpu

OP = "attention"

backend.register_op(
    OP,
    triton_dtypes=backend.FLOATS,
    aten_cpu_dtypes=backend.FLOATS if _cpu.ATEN_AVAILABLE else (),
    aten_description=_cpu.ATEN_DESCRIPTION,
    summary="fused attention: padding mask, bias (+grad), causal, varlen, dropout (forward and backward)",
)

from . import native_cpu as _native_cpu  # noqa: E402

if _native_cpu.available()[0]:  # the C++ kernels: the default CPU path (see cpu.choose)
    _cpu.register_native(_native_cpu.OpImplementation)

from .api import attention, attention_varlen  # noqa: E402
from .philox import attention_dropout_mask  # noqa: E402
from .reference import attention_ref, attention_varlen_ref  # noqa: E402

__all__ = ["attention", "attention_varlen", "attention_ref", "attention_varlen_ref", "attention_dropout_mask"]
