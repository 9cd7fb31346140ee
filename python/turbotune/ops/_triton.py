"""Shared plumbing for the Triton kernels: a guarded import and launch helpers.

Kernel modules do ``from ._triton import triton, tl, HAS_TRITON`` and define
their ``@triton.jit`` functions only when ``HAS_TRITON`` is true, so
``import turbotune`` works on machines without Triton (the reference paths
then run, and :mod:`turbotune.backend` says why).
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # not installed, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_hint(device: torch.device, per_sm: int = 4, cpu: int = 4) -> int:
    """How many persistent programs to launch: a few per SM on a GPU, a handful
    under the interpreter (its cost grows with programs x loop steps)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    return cpu
