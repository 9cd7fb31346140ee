"""Attention dropout's random numbers, torch side: Philox-4x32-10 in int64
arithmetic, the keep mask the reference applies, the public debug helper
:func:`attention_dropout_mask`, seeds and the limits of the counter space.

The mask (the same on every path, bit for bit)
----------------------------------------------
Position ``n = i * Lk + j`` (query ``i``, key ``j``) of head ``bh = b * H + h``
uses word ``n % 4`` of the Philox block with counter ``(n // 4, bh, offset, 0)``
keyed by ``seed`` (low, high 32 bits). The element is kept when the top 24 bits
of that word are ``>= round(p * 2**24)``; kept probabilities are scaled by
``1 / (1 - p)``. Counters are 32-bit words, hence the limits below.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

RNG_BITS = 24
MAX_POSITIONS = 1 << 34  # n // 4 must fit the 32-bit counter word c0
MAX_HEADS = 1 << 32  # b * H + h is the 32-bit counter word c1
MAX_OFFSET = 1 << 32  # the offset is the 32-bit counter word c2
MAX_SEED = 1 << 63

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mul32(a: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * b`` for uint32 values held in int64 (no overflow)."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00 = a0 * b0
    mid = a1 * b0 + a0 * b1 + (p00 >> 16)
    hi = (a1 * b1 + (mid >> 16)) & _M32
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    return hi, lo


def philox4(seed: int, c0: Tensor, c1: Tensor, c2: int, c3: int = 0, rounds: int = 10):
    """The four output words of Philox-4x32 (Triton's ``tl.philox``), uint32 values held in int64."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = c0.to(torch.int64) & _M32
    c1 = torch.broadcast_to(c1.to(torch.int64) & _M32, c0.shape)
    c2 = torch.full_like(c0, c2 & _M32)
    c3 = torch.full_like(c0, c3 & _M32)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Keep an element when the top 24 bits of its Philox word are ``>=`` this."""
    return int(round(p * (1 << RNG_BITS)))


def seed_words(seed: int) -> Tuple[int, int]:
    """``seed`` (``[0, 2**63)``) as two signed int32 words (low, high): kernel arguments of one type."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


def offset_word(offset: int) -> int:
    """``offset`` (``[0, 2**32)``) as a signed int32 kernel argument."""
    return offset - (1 << 32) if offset >= 1 << 31 else offset


def check_dropout_range(fn: str, heads: int, positions: int, what: str) -> None:
    """Raise ``ValueError`` when a dropout call would run past the 32-bit Philox counters.

    ``heads``: the number of (sequence, head) pairs (``B * H``); ``positions``: the
    largest ``Lq * Lk`` of one head; ``what`` says how ``positions`` was computed.
    """
    if positions >= MAX_POSITIONS:
        raise ValueError(
            f"{fn}: attention dropout supports at most 2**34 = {MAX_POSITIONS} (query, key) positions per head "
            f"(its Philox counter is a 32-bit word of 4 positions), got {what} = {positions}; "
            f"use shorter sequences or dropout_p=0"
        )
    if heads >= MAX_HEADS:
        raise ValueError(f"{fn}: attention dropout supports fewer than 2**32 (batch * heads) pairs, got {heads}")


_CHUNK = 1 << 16  # Philox counters per step: keeps the ~250 elementwise passes in cache


def keep_mask_ref(seed: int, offset: int, bh: Tensor, lq: int, lk: int, p: float, device) -> Tensor:
    """Keep mask ``(len(bh), lq, lk)`` bool for the (flattened) heads ``bh``, in PyTorch."""
    n = lq * lk
    blocks = (n + 3) // 4
    threshold = dropout_threshold(p)
    bh = bh.to(device=device, dtype=torch.int64).reshape(-1)
    out = torch.empty(bh.numel(), blocks * 4, dtype=torch.bool, device=device)
    if out.numel() == 0:
        return out[:, :n].reshape(bh.numel(), lq, lk)
    per_step = max(1, _CHUNK // blocks)
    for s0 in range(0, bh.numel(), per_step):
        heads = bh[s0:s0 + per_step].view(-1, 1)
        for b0 in range(0, blocks, _CHUNK):
            ctr = torch.arange(b0, min(blocks, b0 + _CHUNK), device=device, dtype=torch.int64).view(1, -1)
            words = torch.stack(philox4(seed, ctr.expand(heads.shape[0], -1), heads, offset), dim=-1)
            keep = (words >> (32 - RNG_BITS)) >= threshold  # (heads, ctr, 4) -> positions 4*ctr + w
            out[s0:s0 + heads.shape[0], 4 * b0:4 * b0 + keep.shape[1] * 4] = keep.reshape(heads.shape[0], -1)
    return out[:, :n].reshape(bh.numel(), lq, lk)


def draw_seed(fn: str, dropout_p: float, seed: Optional[int]) -> int:
    """The dropout seed of one call: ``seed`` checked, or one drawn from torch's default CPU
    generator (reproducible under ``torch.manual_seed``, no device synchronisation)."""
    if dropout_p == 0.0:
        return 0
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"{fn}: dropout_seed must be an int in [0, 2**63), got {seed!r}")
        return seed
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def check_offset(fn: str, offset) -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"{fn}: dropout_offset must be an int in [0, 2**32), got {offset!r}")
    return offset


def attention_dropout_mask(
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int = 0,
    *,
    device: Union[str, torch.device] = "cpu",
    use_kernel: Optional[bool] = None,
) -> Tensor:
    """Debug path: the keep-mask ``(batch, heads, seqlen_q, seqlen_k)`` bool (True = keep)
    that :func:`~turbotune.ops.attention` applies for ``(dropout_p, seed, offset)``.

    With ``use_kernel=True`` (default: when the Triton backend is selected for
    ``device``) the mask comes from a Triton kernel that calls the attention
    kernels' own ``_keep_tile``; otherwise from the PyTorch Philox the
    reference uses. Both are bit-identical. For a varlen batch, sequence ``b``
    uses ``mask[b, :, :len_q[b], :len_k[b]]`` of a call with ``seqlen_q =
    len_q[b]`` and ``seqlen_k = len_k[b]`` (the position counter is ``i * len_k + j``).
    """
    from ... import backend

    fn = "attention_dropout_mask"
    device = torch.device(device)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    for name, val in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {val!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"{fn}: seed must be an int in [0, 2**63), got {seed!r}")
    check_offset(fn, offset)
    check_dropout_range(fn, batch * heads, seqlen_q * seqlen_k, "seqlen_q * seqlen_k")
    if use_kernel is None:
        use_kernel = backend.select("attention", device, torch.float32).impl == backend.TRITON
    if use_kernel:
        from . import launch

        return launch.dropout_mask(batch, heads, seqlen_q, seqlen_k, float(dropout_p), seed, offset, device)
    bh = torch.arange(batch * heads, device=device)
    return keep_mask_ref(seed, offset, bh, seqlen_q, seqlen_k, float(dropout_p), device).view(
        batch, heads, seqlen_q, seqlen_k
    )
