"""Triton kernels of the attention op (FlashAttention-2 style), shared by the dense
``(B, H, L, D)`` and the packed varlen ``(total, H, D)`` layouts, and the block
configurations they may run with.

- ``_attn_fwd_kernel``: online softmax in fp32, saves the log-sum-exp; one program
  per (batch * head, query block).
- ``_attn_bwd_preprocess``: ``delta = rowsum(dO * O)`` (and zeroes the fp32 dQ
  accumulator of the default backward).
- ``_attn_bwd_kernel``: one program per (batch * head, key block) looping over the
  query blocks: dK and dV, and (default, ``ATOMIC_DQ``) dQ accumulated in fp32 with
  atomics: five matmuls per tile, FlashAttention-2's layout. It also writes the
  bias gradient when asked.
- ``_attn_bwd_dq_kernel``: the deterministic path's separate dQ pass (one program per
  query block, no atomics; it recomputes two matmuls).

Every kernel calls the same two helpers for the logic they share: ``_scores`` (scale,
bias, padding/causal/bounds masks, in either tile orientation) and ``_keep_tile``
(the dropout mask, four Philox words per call). Rows of varlen sequences come from
``_seq_bounds``, which clamps ``cu_seqlens`` into the tensors so that no value makes a
kernel read or write out of bounds.

Grid axis 0 is ``batch * heads`` (CUDA allows 2**31 - 1 there, 65535 on axis 1).
"""
from __future__ import annotations

from typing import List, NamedTuple

from .._triton import HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634  # scores run in base 2 inside the kernels
LN2 = 0.6931471805599453


class Config(NamedTuple):
    """One block configuration of a kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


class Features(NamedTuple):
    """The compile-time features of one launch: they decide how many registers a tile needs."""

    mask: bool = False
    bias: bool = False
    causal: bool = False
    dropout: bool = False
    bias_grad: bool = False


HEAVIEST = Features(True, True, True, True, True)

# --------------------------------------------------------------------------- configurations

# Candidates per kernel kind, before pruning (GPU). "fwd": forward; "bwd": dK/dV (+ atomic dQ)
# kernel; "dq": the deterministic dQ kernel. Small tiles close each list so that the heaviest
# feature sets always keep a config that fits. fp16/bf16 up to head dim 128:
GPU_CONFIGS = {
    "fwd": [Config(*c) for c in [
        (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3),
        (64, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2),
    ]],
    "bwd": [Config(*c) for c in [
        (64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2),
        (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2),
    ]],
    "dq": [Config(*c) for c in [
        (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2),
        (16, 32, 4, 2), (16, 16, 4, 2),
    ]],
}
# fp16/bf16 at head dim 256: eight warps spread the (rows x 256) operands and accumulators.
LARGE_D_CONFIGS = {
    "fwd": [Config(*c) for c in [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)]],
    "bwd": [Config(*c) for c in [(32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2)]],
    "dq": [Config(*c) for c in [(16, 32, 8, 2), (16, 16, 8, 2)]],
}
# fp32 (3xTF32 dots: each register operand is split in two, each product takes three MMAs).
FP32_CONFIGS = {
    "fwd": [Config(*c) for c in [(32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2)]],
    "bwd": [Config(*c) for c in [(16, 32, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2)]],
    "dq": [Config(*c) for c in [(16, 32, 4, 2), (16, 16, 4, 2)]],
}


def config_list(kind: str, block_d: int, elt: int) -> List[Config]:
    """The candidates before pruning for a kernel, dtype size and (padded) head dim."""
    if elt == 4:
        return FP32_CONFIGS[kind]
    return LARGE_D_CONFIGS[kind] if block_d > 128 else GPU_CONFIGS[kind]


# The Triton interpreter: one candidate per kind, deliberately NOT the fixed config below
# (non-square, BLOCK_M != BLOCK_N), so that the test of autotuned vs fixed configs compares
# two different block shapes.
INTERPRETER_CONFIGS = {
    "fwd": [Config(128, 32, 4, 1)],
    "bwd": [Config(32, 128, 4, 1)],
    "dq": [Config(128, 32, 4, 1)],
}
INTERPRETER_FIXED = Config(64, 64, 4, 1)

SM90_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
REGS_BUDGET = 140  # register estimate (below) a config may reach; calibrated so that none spills


def smem_estimate(kind: str, cfg: Config, block_d: int, elt: int) -> int:
    """Shared memory (bytes) a config needs: the tiles Triton stages for the dots (pipelined
    operands count ``num_stages`` times), in the operands' element size ``elt``."""
    bm, bn, st = cfg.block_m, cfg.block_n, max(cfg.num_stages, 1)
    if kind == "fwd":  # Q once; K and V pipelined; P staged for the second dot
        return elt * (bm * block_d + st * 2 * bn * block_d + bm * bn)
    if kind == "bwd":  # K and V once; Q and dO pipelined; P^T and dS^T staged (dS again for dQ)
        return elt * (2 * bn * block_d + st * 2 * bm * block_d + 3 * bm * bn)
    if kind == "dq":  # Q and dO once; K and V pipelined; dS staged
        return elt * (2 * bm * block_d + st * 2 * bn * block_d + bm * bn)
    raise ValueError(f"unknown kernel kind {kind!r}")


def acc_regs_estimate(kind: str, cfg: Config, block_d: int, elt: int, feats: Features = HEAVIEST) -> float:
    """A register-pressure estimate per thread: the score tiles (scores, probabilities, masks,
    bias, dropout bits: a weight per element that grows with the features; fp32's 3xTF32 dots
    triple it), the fp32 accumulators, fp32's split register operands, and deeper pipelines.
    Fitted to sm_90 compiles (``tests/ops/attention_sm90.py``) so that every config it admits
    under :data:`REGS_BUDGET` compiled without spilling."""
    bm, bn, threads = cfg.block_m, cfg.block_n, 32 * cfg.num_warps
    per_score = 2.0 + 2.0 * feats.bias + 1.0 * feats.dropout + 2.0 * (feats.bias_grad and kind == "bwd")
    if elt == 4:
        per_score *= 3.0
    if kind == "fwd":  # acc (M x D); K/V tiles stream through registers for fp32's split
        acc, ops = bm * block_d, bn * block_d
    elif kind == "bwd":  # dK, dV (N x D) and the atomic dQ partial (M x D); Q/dO tiles stream
        acc, ops = 2 * bn * block_d + bm * block_d, bm * block_d
    elif kind == "dq":
        acc, ops = bm * block_d, bn * block_d
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    ops = 4 * ops if elt == 4 else ops  # operand tiles held in registers (fp32: split hi/lo parts)
    return per_score * bm * bn / threads + (acc + ops) / threads + 20 * max(0, cfg.num_stages - 2)


def fits(kind: str, cfg: Config, block_d: int, elt: int, feats: Features = HEAVIEST,
         smem_limit: int = SM90_SMEM) -> bool:
    return (smem_estimate(kind, cfg, block_d, elt) <= smem_limit
            and acc_regs_estimate(kind, cfg, block_d, elt, feats) <= REGS_BUDGET)


def candidates(kind: str, block_d: int, elt: int, interpreter: bool, feats: Features = HEAVIEST,
               smem_limit: int = SM90_SMEM) -> List[Config]:
    """The configs autotuning tries for one kernel: the GPU list pruned by the estimates above."""
    if interpreter:
        return list(INTERPRETER_CONFIGS[kind])
    configs = config_list(kind, block_d, elt)
    keep = [c for c in configs if fits(kind, c, block_d, elt, feats, smem_limit)]
    return keep or [min(configs, key=lambda c: acc_regs_estimate(kind, c, block_d, elt, feats))]


def fixed_config(kind: str, block_d: int, elt: int, interpreter: bool, feats: Features = HEAVIEST) -> Config:
    """The one config used when autotuning is off (``TURBOTUNE_AUTOTUNE=0``): the first
    candidate of a moderate size (at most 64 x 64) that fits, so it suits every head dim,
    dtype and feature set and compiles quickly."""
    if interpreter:
        return INTERPRETER_FIXED
    cands = candidates(kind, block_d, elt, False, feats)
    return next((c for c in cands if c.block_m * c.block_n <= 64 * 64), cands[-1])


# --------------------------------------------------------------------------- kernels

# Integer arguments Triton must not specialise (value 1 / divisible by 16 would compile new
# variants for every sequence length; the RNG words must stay runtime values).
NO_SPECIALIZE = ["H", "seqlen_q", "seqlen_k", "total_q", "total_k", "threshold", "seed_lo", "seed_hi", "rng_offset"]

if HAS_TRITON:
    _LOG2E = tl.constexpr(LOG2E)
    _LN2 = tl.constexpr(LN2)

    @triton.jit
    def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN: tl.constexpr):
        """``(q_start, q_len, k_start, k_len)`` of sequence ``b``. Varlen bounds are clamped to
        ``[0, total)`` and to non-negative lengths, so invalid ``cu_seqlens`` never make a
        kernel touch memory outside the tensors (the results are then meaningless)."""
        if IS_VARLEN:
            q0 = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)
            q1 = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), q0), total_q)
            k0 = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), total_k)
            k1 = tl.minimum(tl.maximum(tl.load(CU_K + b + 1), k0), total_k)
            return q0.to(tl.int64), q1 - q0, k0.to(tl.int64), k1 - k0
        else:
            zero = (b * 0).to(tl.int64)
            return zero, seqlen_q, zero, seqlen_k

    @triton.jit
    def _kv_end(MASK_ROW, smn, seqlen_k, BLOCK_N: tl.constexpr):
        """One past the last attended key of a padding-mask row (0 when none)."""
        offs = tl.arange(0, BLOCK_N)
        last = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for start in range(0, seqlen_k, BLOCK_N):
            n = start + offs
            m = tl.load(MASK_ROW + n * smn, mask=n < seqlen_k, other=0)
            last = tl.maximum(last, tl.where(m != 0, n + 1, 0))
        return tl.max(last, 0)

    @triton.jit
    def _load_rows(BASE, rows, stride, row_ok, offs_d, d_ok, DOT_F32: tl.constexpr):
        """A ``(rows, BLOCK_D)`` tile of a row-major operand (unit-stride head dim), zero
        outside; fp32 when the dots run in fp32."""
        t = tl.load(BASE + rows[:, None] * stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _load_cols(BASE, cols, stride, col_ok, offs_d, d_ok, DOT_F32: tl.constexpr):
        """The transposed ``(BLOCK_D, cols)`` tile of a row-major operand (K^T, V^T)."""
        t = tl.load(BASE + cols[None, :] * stride + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _row_stats(LSE_ROW, DELTA_ROW, rows, stride, row_ok):
        """Log-sum-exp in base 2 (``+inf`` for rows without keys, so their probabilities are 0)
        and ``delta = rowsum(dO * O)`` of the query rows ``rows``."""
        lse = tl.load(LSE_ROW + rows * stride, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        return lse, tl.load(DELTA_ROW + rows * stride, mask=row_ok, other=0.0)

    @triton.jit
    def _scores(qk, rows, cols, row_ok, col_ok, qk_scale, BIAS_BH, sbm, sbn, diag,
                HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
        """Scores in base 2 with every mask applied (-inf where masked), for a raw ``q k^T``
        tile in either orientation: ``rows``/``cols`` are the query/key indices and
        ``row_ok``/``col_ok`` their validity (key padding included), each shaped to broadcast
        along the tile's query/key axis."""
        s = qk * qk_scale
        valid = row_ok & col_ok
        if HAS_BIAS:
            bias = tl.load(BIAS_BH + rows.to(tl.int64) * sbm + cols.to(tl.int64) * sbn, mask=valid, other=0.0)
            s += bias.to(tl.float32) * _LOG2E
        if CAUSAL:
            valid = valid & (cols <= rows + diag)
        return tl.where(valid, s, float("-inf"))

    @triton.jit
    def _philox_bits(seed_lo, seed_hi, rng_offset, bh, blk, threshold):
        """The keep bits of the four positions of Philox blocks ``blk`` (uint32 tile), packed
        as bits 0..3 of an int32 (bit w = position 4 * blk + w)."""
        z = blk * 0
        seed = (seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | \
            seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
        r0, r1, r2, r3 = tl.philox(seed, blk, z + bh.to(tl.uint32), z + rng_offset.to(tl.uint32, bitcast=True), z)
        k0 = ((r0 >> 8).to(tl.int32) >= threshold).to(tl.int32)
        k1 = ((r1 >> 8).to(tl.int32) >= threshold).to(tl.int32)
        k2 = ((r2 >> 8).to(tl.int32) >= threshold).to(tl.int32)
        k3 = ((r3 >> 8).to(tl.int32) >= threshold).to(tl.int32)
        return k0 | (k1 << 1) | (k2 << 2) | (k3 << 3)

    @triton.jit
    def _keep_tile(seed_lo, seed_hi, rng_offset, bh, offs_m, start_n, k_len, threshold,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Dropout keep mask ``(BLOCK_M, BLOCK_N)`` for query rows ``offs_m`` and keys
        ``start_n + arange(BLOCK_N)`` (``start_n`` a multiple of 4).

        Position ``n = i * k_len + j`` is word ``n % 4`` of Philox block ``n // 4``. A row's
        tile starts at position ``base = i * k_len + start_n``; one Philox call per 4 keys
        gives the blocks ``base // 4 + a``. When ``k_len % 4 != 0`` rows start mid-block
        (``rot = base % 4``): the next block's bits are appended and the row shifted by
        ``rot``, so every key still gets exactly its word (two calls per 4 keys). Block
        indices are < 2**32 (the callers check ``Lq * Lk < 2**34``): uint32 arithmetic."""
        QN: tl.constexpr = BLOCK_N // 4
        base = offs_m.to(tl.int64) * k_len + start_n
        blk = (base >> 2).to(tl.uint32)[:, None] + tl.arange(0, QN).to(tl.uint32)[None, :]
        bits = _philox_bits(seed_lo, seed_hi, rng_offset, bh, blk, threshold)
        if k_len % 4 != 0:
            nxt = _philox_bits(seed_lo, seed_hi, rng_offset, bh, blk + 1, threshold)
            bits = (bits | (nxt << 4)) >> (base & 3).to(tl.int32)[:, None]
        keep = (bits[:, :, None] >> tl.arange(0, 4)[None, None, :]) & 1
        return tl.reshape(keep, (BLOCK_M, BLOCK_N)) != 0

    @triton.jit(do_not_specialize=NO_SPECIALIZE)
    def _dropout_mask_kernel(OUT, seqlen_q, seqlen_k, threshold, seed_lo, seed_hi, rng_offset,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The keep mask of head ``program_id(0)`` as uint8 ``(seqlen_q, seqlen_k)`` tiles."""
        bh = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        start_n = tl.program_id(2) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _keep_tile(seed_lo, seed_hi, rng_offset, bh, offs_m, start_n, seqlen_k, threshold, BLOCK_M, BLOCK_N)
        ptr = OUT + bh.to(tl.int64) * seqlen_q * seqlen_k + offs_m[:, None].to(tl.int64) * seqlen_k + offs_n[None, :]
        tl.store(ptr, keep.to(tl.uint8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))

    @triton.jit(do_not_specialize=NO_SPECIALIZE)
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, MASK, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, slb, slh, slm, smb, smn, sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, total_q, total_k,
        qk_scale, threshold, dropout_scale, seed_lo, seed_hi, rng_offset,
        IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        start_m = pid_m * BLOCK_M
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN)
        end_n = k_len
        if HAS_MASK:  # keys after the last attended one are skipped (padding costs nothing)
            kv_end = _kv_end(MASK + b64 * smb, smn, seqlen_k, BLOCK_N)
            if (pid_m == 0) & (h == 0):
                tl.store(KVLEN + b, kv_end)  # saved for the backward
            end_n = tl.minimum(end_n, kv_end)
        if start_m < q_len:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_nb = tl.arange(0, BLOCK_N)
            m_ok = offs_m < q_len
            d_ok = offs_d < HEAD_DIM
            q = _load_rows(Q + b64 * sqb + h64 * sqh + q_start * sqm, offs_m, sqm, m_ok, offs_d, d_ok, DOT_F32)
            k_base = K + b64 * skb + h64 * skh + k_start * skn
            v_base = V + b64 * svb + h64 * svh + k_start * svn
            bias_bh = BIAS + b64 * sbb + h64 * sbh
            mask_row = MASK + b64 * smb

            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            if CAUSAL:
                end_n = tl.minimum(end_n, start_m + BLOCK_M + diag)
            for start_n in range(0, end_n, BLOCK_N):
                offs_n = start_n + offs_nb
                n_ok = offs_n < k_len
                col_ok = n_ok
                if HAS_MASK:
                    col_ok = col_ok & (tl.load(mask_row + offs_n * smn, mask=n_ok, other=0) != 0)
                kt = _load_cols(k_base, offs_n, skn, n_ok, offs_d, d_ok, DOT_F32)
                s = _scores(tl.dot(q, kt, input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :],
                            m_ok[:, None], col_ok[None, :], qk_scale, bias_bh, sbm, sbn, diag, HAS_BIAS, CAUSAL)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if HAS_DROPOUT:
                    keep = _keep_tile(seed_lo, seed_hi, rng_offset, bh, offs_m, start_n, k_len, threshold,
                                      BLOCK_M, BLOCK_N)
                    p = tl.where(keep, p, 0.0)
                v = _load_rows(v_base, offs_n, svn, n_ok, offs_d, d_ok, DOT_F32)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            out = acc * (dropout_scale / l_safe)[:, None]
            tl.store(O + b64 * sob + h64 * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
            lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
            tl.store(LSE + b64 * slb + h64 * slh + (q_start + offs_m) * slm, lse, mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess(O, DO, DELTA, DQ, sob, soh, som, sdob, sdoh, sdom, sdb, sdh, sdm, sqb, sqh, sqm,
                             H, M, HEAD_DIM: tl.constexpr, ZERO_DQ: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """DELTA[b, h, m] = sum_d O * dO over strided 4-D views; zeroes DQ (fp32) when asked."""
        bh = tl.program_id(0)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m[:, None] < M) & (offs_d[None, :] < HEAD_DIM)
        rows = offs_m[:, None].to(tl.int64)
        o = tl.load(O + b * sob + h * soh + rows * som + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdob + h * sdoh + rows * sdom + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
        tl.store(DELTA + b * sdb + h * sdh + offs_m * sdm, tl.sum(o * do, 1), mask=offs_m < M)
        if ZERO_DQ:
            tl.store(DQ + b * sqb + h * sqh + rows * sqm + offs_d[None, :],
                     tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), mask=msk)

    @triton.jit(do_not_specialize=NO_SPECIALIZE)
    def _attn_bwd_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DBIAS, MASK, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm,
        sdqb, sdqh, sdqm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sgb, sgh, sgm, sgn,
        smb, smn, sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, total_q, total_k,
        qk_scale, sm_scale, threshold, dropout_scale, seed_lo, seed_hi, rng_offset,
        IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, BIAS_GRAD: tl.constexpr, DBIAS_ATOMIC: tl.constexpr,
        DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
        b = bh // H
        h = bh % H
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN)
        if start_n < k_len:
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            offs_mb = tl.arange(0, BLOCK_M)
            n_ok = offs_n < k_len
            d_ok = offs_d < HEAD_DIM
            nd_ok = n_ok[:, None] & d_ok[None, :]
            k = _load_rows(K + b64 * skb + h64 * skh + k_start * skn, offs_n, skn, n_ok, offs_d, d_ok, DOT_F32)
            v = _load_rows(V + b64 * svb + h64 * svh + k_start * svn, offs_n, svn, n_ok, offs_d, d_ok, DOT_F32)
            col_ok = n_ok
            hi = q_len
            if HAS_MASK:
                col_ok = col_ok & (tl.load(MASK + b64 * smb + offs_n * smn, mask=n_ok, other=0) != 0)
                # a block of padding keys only needs its zero gradients written
                hi = tl.where(start_n < tl.load(KVLEN + b), q_len, 0)
            dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            lo = 0
            if CAUSAL:
                lo = tl.maximum(start_n - diag, 0)
                lo = (lo // BLOCK_M) * BLOCK_M
            q_base = Q + b64 * sqb + h64 * sqh + q_start * sqm
            do_base = DO + b64 * sdob + h64 * sdoh + q_start * sdom
            dq_base = DQ + b64 * sdqb + h64 * sdqh + q_start * sdqm
            l_base = LSE + b64 * slb + h64 * slh + q_start * slm
            d_base = DELTA + b64 * slb + h64 * slh + q_start * slm
            bias_bh = BIAS + b64 * sbb + h64 * sbh
            g_base = DBIAS + b64 * sgb + h64 * sgh
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_mb
                m_ok = offs_m < q_len
                md_ok = m_ok[:, None] & d_ok[None, :]
                q = _load_rows(q_base, offs_m, sqm, m_ok, offs_d, d_ok, DOT_F32)
                do = _load_rows(do_base, offs_m, sdom, m_ok, offs_d, d_ok, DOT_F32)
                lse, delta = _row_stats(l_base, d_base, offs_m, slm, m_ok)
                st = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), offs_m[None, :], offs_n[:, None],
                             m_ok[None, :], col_ok[:, None], qk_scale, bias_bh, sbm, sbn, diag, HAS_BIAS, CAUSAL)
                pt = tl.exp2(st - lse[None, :])  # (N, M); 0 where masked
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    keep = tl.trans(_keep_tile(seed_lo, seed_hi, rng_offset, bh, offs_m, start_n, k_len, threshold,
                                               BLOCK_M, BLOCK_N))
                    zt = tl.where(keep, pt * dropout_scale, 0.0)
                    dpt = tl.where(keep, dpt * dropout_scale, 0.0)
                else:
                    zt = pt
                dv += tl.dot(zt.to(do.dtype), do, input_precision=DOT_PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=DOT_PREC) * sm_scale
                    tl.atomic_add(dq_base + offs_m[:, None] * sdqm + offs_d[None, :], dq, mask=md_ok)
                if BIAS_GRAD:
                    g_ptr = g_base + offs_m[None, :].to(tl.int64) * sgm + offs_n[:, None].to(tl.int64) * sgn
                    g_ok = m_ok[None, :] & n_ok[:, None]
                    if DBIAS_ATOMIC:
                        tl.atomic_add(g_ptr, dst, mask=g_ok)
                    else:
                        tl.store(g_ptr, dst, mask=g_ok)
            dk = dk * sm_scale
            tl.store(DK + b64 * sdkb + h64 * sdkh + (k_start + offs_n[:, None]) * sdkn + offs_d[None, :],
                     dk.to(DK.dtype.element_ty), mask=nd_ok)
            tl.store(DV + b64 * sdvb + h64 * sdvh + (k_start + offs_n[:, None]) * sdvn + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=nd_ok)

    @triton.jit(do_not_specialize=NO_SPECIALIZE)
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, MASK, KVLEN, BIAS, CU_Q, CU_K,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, slb, slh, slm, sdqb, sdqh, sdqm,
        smb, smn, sbb, sbh, sbm, sbn,
        H, seqlen_q, seqlen_k, total_q, total_k,
        qk_scale, sm_scale, threshold, dropout_scale, seed_lo, seed_hi, rng_offset,
        IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        start_m = tl.program_id(1) * BLOCK_M
        b = bh // H
        h = bh % H
        q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, total_q, total_k, IS_VARLEN)
        if start_m < q_len:
            b64 = b.to(tl.int64)
            h64 = h.to(tl.int64)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            offs_nb = tl.arange(0, BLOCK_N)
            m_ok = offs_m < q_len
            d_ok = offs_d < HEAD_DIM
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = _load_rows(Q + b64 * sqb + h64 * sqh + q_start * sqm, offs_m, sqm, m_ok, offs_d, d_ok, DOT_F32)
            do = _load_rows(DO + b64 * sdob + h64 * sdoh + q_start * sdom, offs_m, sdom, m_ok, offs_d, d_ok, DOT_F32)
            lse, delta = _row_stats(LSE + b64 * slb + h64 * slh + q_start * slm,
                                    DELTA + b64 * slb + h64 * slh + q_start * slm, offs_m, slm, m_ok)
            k_base = K + b64 * skb + h64 * skh + k_start * skn
            v_base = V + b64 * svb + h64 * svh + k_start * svn
            bias_bh = BIAS + b64 * sbb + h64 * sbh
            mask_row = MASK + b64 * smb
            dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            diag = k_len - q_len
            end_n = k_len
            if CAUSAL:
                end_n = tl.minimum(k_len, start_m + BLOCK_M + diag)
            if HAS_MASK:
                end_n = tl.minimum(end_n, tl.load(KVLEN + b))
            for start_n in range(0, end_n, BLOCK_N):
                offs_n = start_n + offs_nb
                n_ok = offs_n < k_len
                col_ok = n_ok
                if HAS_MASK:
                    col_ok = col_ok & (tl.load(mask_row + offs_n * smn, mask=n_ok, other=0) != 0)
                kt = _load_cols(k_base, offs_n, skn, n_ok, offs_d, d_ok, DOT_F32)
                vt = _load_cols(v_base, offs_n, svn, n_ok, offs_d, d_ok, DOT_F32)
                s = _scores(tl.dot(q, kt, input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :],
                            m_ok[:, None], col_ok[None, :], qk_scale, bias_bh, sbm, sbn, diag, HAS_BIAS, CAUSAL)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, vt, input_precision=DOT_PREC)
                if HAS_DROPOUT:
                    keep = _keep_tile(seed_lo, seed_hi, rng_offset, bh, offs_m, start_n, k_len, threshold,
                                      BLOCK_M, BLOCK_N)
                    dp = tl.where(keep, dp * dropout_scale, 0.0)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
            dq = dq * sm_scale
            tl.store(DQ + b64 * sdqb + h64 * sdqh + (q_start + offs_m[:, None]) * sdqm + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=md_ok)

    KERNELS = {"fwd": _attn_fwd_kernel, "bwd": _attn_bwd_kernel, "dq": _attn_bwd_dq_kernel}
