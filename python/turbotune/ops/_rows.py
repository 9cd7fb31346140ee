"""Plumbing shared by the row-wise kernels (``layer_norm``, ``bias_gelu``,
``cross_entropy``): the output allocator, the launch plan for kernels that
reduce over rows, and one Triton kernel that finishes such reductions.

Kernels that reduce over rows (LayerNorm's ``dweight``/``dbias``, the bias
gradient of ``bias_gelu``) let each program sum a slice of the rows in fp32
registers and store one partial row; :func:`column_sums` then adds the partial
rows of up to two outputs in a single launch.

Every output buffer of these kernels comes from :func:`alloc`, so a test can
hand the kernels NaN-poisoned memory and prove that each element is written.
"""
from __future__ import annotations

import contextlib

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._triton import HAS_TRITON, next_power_of_2, num_programs_hint, tl, triton


def alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised output buffer (tests replace this to poison it)."""
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def as_rows(t: Tensor, n: int) -> Tensor:
    """``t`` as a ``(rows, n)`` matrix whose columns are contiguous (rows may be
    strided, e.g. an expanded gradient); copies only when it must."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def device_guard(t: Tensor):
    """Launch on ``t``'s GPU even when another one is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_splits(rows: int, block_m: int, col_blocks: int, device: torch.device, per_sm: int = 8) -> Tuple[int, int]:
    """``(splits, tiles_per_split)``: cut ``rows`` (in tiles of ``block_m``) into
    ``splits`` contiguous slices so that ``splits * col_blocks`` programs keep
    every SM busy (``per_sm`` programs each) without tiny slices."""
    tiles = max(1, triton.cdiv(rows, block_m))
    target = max(1, num_programs_hint(device, per_sm=per_sm) // max(1, col_blocks))
    splits = max(1, min(tiles, target))
    per = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per), per


if HAS_TRITON:

    @triton.jit
    def _column_sums_kernel(P, O0, O1, rows, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """``O_k[c] = sum_r P[k, r, c]`` for a ``(K, rows, N)`` fp32 tensor, K <= 2;
        grid ``(cdiv(N, BLOCK_C), K)``."""
        k = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < N
        base = P + k.to(tl.int64) * rows * N
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r[:, None] < rows) & cmask[None, :]
            acc += tl.load(base + r[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
        total = tl.sum(acc, axis=0)
        if k == 0:
            tl.store(O0 + cols, total.to(O0.dtype.element_ty), mask=cmask)
        else:
            tl.store(O1 + cols, total.to(O1.dtype.element_ty), mask=cmask)


def column_sums(part: Tensor, out0: Tensor, out1: Optional[Tensor] = None) -> None:
    """Reduce ``part`` (``(K, rows, N)`` fp32, K = 1 or 2) over its rows into
    ``out0`` (and ``out1``), each ``(N,)``, in one launch."""
    k, rows, n = part.shape
    if k != (1 if out1 is None else 2):
        raise ValueError(f"column_sums: part has {k} slices but {1 if out1 is None else 2} outputs were given")
    block_c = min(128, max(16, next_power_of_2(n)))
    _column_sums_kernel[(triton.cdiv(n, block_c), k)](
        part, out0, out0 if out1 is None else out1, rows, n, BLOCK_R=32, BLOCK_C=block_c, num_warps=4
    )


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[List[Tensor]]:
    """For tests: inside the block every buffer from :func:`alloc` starts filled
    with NaN (floating) or -1 (integer), so an element a kernel forgets to
    write shows up. Yields the list of buffers handed out."""
    global alloc
    made: List[Tensor] = []
    real = alloc

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        t.fill_(float("nan") if t.is_floating_point() else -1)
        made.append(t)
        return t

    alloc = poisoned
    try:
        yield made
    finally:
        alloc = real
