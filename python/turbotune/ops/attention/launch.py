"""Host side of the Triton kernels: block-config choice (autotuned once per key, then
cached and launched directly), argument packing for the dense and varlen layouts,
and the forward / backward / dropout-mask launchers.

Autotuning: the first call for a key (kernel, dtype, head dim, mask/bias/causal/dropout
flags, power-of-two buckets of the lengths, device) times every candidate config that
fits the estimates in :mod:`.kernels` and keeps the fastest; later calls look the
config up in a dict and launch the ``@triton.jit`` kernel directly (no autotuner
bookkeeping per call). ``TURBOTUNE_AUTOTUNE=0`` uses :func:`.kernels.fixed_config`.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ... import backend
from .._triton import next_power_of_2, triton
from . import kernels as K
from .philox import dropout_threshold, offset_word, seed_words

_INTERPRET = backend.interpreter_enabled()  # fixed when the kernels were jitted
_CHOSEN: Dict[tuple, K.Config] = {}


def autotune_enabled() -> bool:
    return os.environ.get("TURBOTUNE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def chosen_configs() -> Dict[tuple, K.Config]:
    """The configs autotuning picked so far, by key (for tests and bug reports)."""
    return dict(_CHOSEN)


def clear_config_cache() -> None:
    _CHOSEN.clear()


def _launch(kernel, grid, *args, **kwargs):
    """Every kernel launch goes through here (tests record the grids)."""
    kernel[grid](*args, **kwargs)


def _smem_limit(device: torch.device) -> int:
    if device.type != "cuda":
        return K.SM90_SMEM
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", K.SM90_SMEM) or K.SM90_SMEM)


def _benchmark(configs, run: Callable[[K.Config], None]) -> K.Config:
    best, best_ms = None, math.inf
    for cfg in configs:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception:  # e.g. OutOfResources: this config cannot run here
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("turbotune attention: no kernel configuration could run on this device")
    return best


def _pick(kind: str, key: tuple, block_d: int, elt: int, feats: K.Features, device: torch.device,
          run: Callable[[K.Config], None]) -> K.Config:
    if not autotune_enabled():
        return K.fixed_config(kind, block_d, elt, _INTERPRET, feats)
    full = (kind,) + key
    cfg = _CHOSEN.get(full)
    if cfg is None:
        cands = K.candidates(kind, block_d, elt, _INTERPRET, feats, _smem_limit(device))
        cfg = cands[0] if len(cands) == 1 or device.type != "cuda" else _benchmark(cands, run)
        _CHOSEN[full] = cfg
    return cfg


def _device(t: Tensor):
    """Launch on the tensors' GPU even when another one is current."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _bucket(n: int) -> int:
    return next_power_of_2(max(int(n), 16))


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter computes bf16/fp16 wrongly (raw 16-bit values): upcast right after loading.
    return dtype == torch.float32 or _INTERPRET


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 on a GPU: 3xTF32 (near-fp32 accuracy on tensor cores; "ieee" compiles to FMA loops
    # that spill). The interpreter's dots are exact whatever the setting: keep "ieee" there.
    # fp16/bf16: tensor-core MMA with fp32 accumulation (the precision flag does not apply).
    if _INTERPRET:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _elt(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def _rng_args(dropout_p: float, seed: int, offset: int):
    lo, hi = seed_words(seed)
    if dropout_p > 0.0:
        return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), lo, hi, offset_word(offset)
    return 0, 1.0, lo, hi, offset_word(offset)


def _like_inner(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty tensor laid out like ``t`` with a unit-stride last dim (the kernels' contract)."""
    out = torch.empty_like(t, dtype=dtype)
    return out if out.stride(-1) == 1 or out.numel() == 0 else torch.empty(t.shape, dtype=out.dtype, device=t.device)


def _mask_args(mask: Optional[Tensor], dummy: Tensor):
    if mask is None:
        return dummy, (0, 0)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, (m.stride(0), m.stride(1))


def _bias_args(bias: Optional[Tensor], shape4, dummy: Tensor):
    if bias is None:
        return dummy, (0, 0, 0, 0)
    t = bias.expand(shape4)
    return t, tuple(t.stride())


class _Layout:
    """Sizes and the (batch, head, row) strides of one call, dense or varlen."""

    def __init__(self, q: Tensor, k: Tensor, cu_q: Optional[Tensor], max_q: int, max_k: int):
        self.varlen = cu_q is not None
        if self.varlen:
            self.total_q, self.heads, self.d = q.shape
            self.total_k = k.shape[0]
            self.batch = cu_q.numel() - 1
            self.lq, self.lk = max_q, max_k
        else:
            self.batch, self.heads, self.lq, self.d = q.shape
            self.lk = k.shape[2]
            self.total_q, self.total_k = self.lq, self.lk

    def st(self, t: Tensor) -> Tuple[int, int, int]:
        """(batch, head, row) strides of a (B, H, L, D) or (total, H, D) tensor."""
        return (0, t.stride(1), t.stride(0)) if self.varlen else (t.stride(0), t.stride(1), t.stride(2))

    def st_lse(self, t: Tensor) -> Tuple[int, int, int]:
        return (0, t.stride(0), t.stride(1)) if self.varlen else tuple(t.stride())

    def sizes(self):
        return self.heads, self.lq, self.lk, self.total_q, self.total_k

    def empty(self) -> bool:
        return self.batch * self.heads == 0 or self.lq == 0 or self.total_q == 0


def forward(q, k, v, mask, bias, dropout_p, causal, scale, seed, offset, *, cu_q=None, cu_k=None, max_q=0,
            max_k=0, out_like=None):
    """Dense: q ``(B, H, Lq, D)``; varlen: q ``(total_q, H, D)`` with ``cu_q``/``cu_k``.
    Returns ``(out, lse, kv_len)``: out laid out like ``out_like`` (default ``q``), lse fp32
    ``(B, H, Lq)`` / ``(H, total_q)``, kv_len int32 ``(B,)`` (one past each row's last
    attended key) when ``mask`` is given, else an empty int32 tensor."""
    lay = _Layout(q, k, cu_q, max_q, max_k)
    like = q if out_like is None else out_like
    out = _like_inner(like)
    if lay.varlen:
        lse = torch.empty(lay.heads, lay.total_q, dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty(lay.batch, lay.heads, lay.lq, dtype=torch.float32, device=q.device)
    kv_len = torch.empty(lay.batch if mask is not None else 0, dtype=torch.int32, device=q.device)
    if lay.empty() or lay.lk == 0 or lay.total_k == 0:
        out.zero_()
        return as_like(out, like), lse.fill_(float("-inf")), kv_len.zero_()
    mask_t, mask_s = _mask_args(mask, lse)  # unused pointer arguments get a live tensor
    bias_t, bias_s = _bias_args(bias, (lay.batch, lay.heads, lay.lq, lay.lk), lse)
    threshold, dscale, seed_lo, seed_hi, off = _rng_args(dropout_p, seed, offset)
    kv_t = kv_len if mask is not None else lse
    cu_q_t = cu_q if lay.varlen else lse
    cu_k_t = cu_k if lay.varlen else lse
    bd = block_d(lay.d)
    flags = dict(IS_VARLEN=lay.varlen, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
                 HAS_DROPOUT=dropout_p > 0.0, DOT_F32=_dot_f32(q.dtype), DOT_PREC=_dot_prec(q.dtype),
                 HEAD_DIM=lay.d, BLOCK_D=bd)
    args = (q, k, v, out, lse, mask_t, kv_t, bias_t, cu_q_t, cu_k_t,
            *lay.st(q), *lay.st(k), *lay.st(v), *lay.st(out), *lay.st_lse(lse), *mask_s, *bias_s,
            *lay.sizes(), scale * K.LOG2E, threshold, dscale, seed_lo, seed_hi, off)

    def run(cfg: K.Config):
        _launch(K._attn_fwd_kernel, (lay.batch * lay.heads, triton.cdiv(lay.lq, cfg.block_m)), *args, **flags,
                **cfg.launch_kwargs())

    feats = K.Features(mask is not None, bias is not None, bool(causal), dropout_p > 0.0)
    key = (q.dtype, lay.d, lay.varlen, feats, _bucket(lay.lq), _bucket(lay.lk), q.device)
    with _device(q):
        run(_pick("fwd", key, bd, _elt(q.dtype), feats, q.device, run))
    return as_like(out, like), lse, kv_len


def as_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the layout the fake implementations promise (``torch.empty_like(like)``):
    ``t`` itself when it has it, else a copy."""
    if t.stride() == like.stride() or t.numel() == 0:
        return t
    res = torch.empty_like(like)
    return t if res.stride() == t.stride() else res.copy_(t)


def _delta_views(lay: _Layout, t: Tensor) -> Tensor:
    """(B, H, L, D) view of a dense or varlen (total, H, D) tensor (varlen: B = 1)."""
    return t.permute(1, 0, 2).unsqueeze(0) if lay.varlen else t


def backward(dout, q, k, v, out, lse, kv_len, mask, bias, dropout_p, causal, scale, seed, offset, *,
             deterministic: bool, bias_grad: bool, cu_q=None, cu_k=None, max_q=0, max_k=0, grads_like=None):
    """Returns ``(dq, dk, dv, dbias)``: gradients laid out like ``grads_like`` (default
    ``(q, k, v)``); dbias fp32-accumulated, in ``bias``'s shape and dtype (summed over its
    broadcast dimensions) when ``bias_grad``, else None.

    Default (``deterministic=False``): one kernel computes dK, dV and accumulates dQ in
    fp32 with atomics (FlashAttention-2's layout, five matmuls per tile). With
    ``deterministic=True`` a second kernel computes dQ per query block instead
    (bit-reproducible, two more matmuls per tile)."""
    lay = _Layout(q, k, cu_q, max_q, max_k)
    like = grads_like if grads_like is not None else (q, k, v)
    dk, dv = _like_inner(like[1]), _like_inner(like[2])
    full = (lay.batch, lay.heads, lay.lq, lay.lk)
    want_dbias = bias_grad and bias is not None
    if deterministic or q.dtype == torch.float32:
        dq = dq_acc = _like_inner(like[0], torch.float32 if not deterministic else None)
    else:
        dq, dq_acc = None, torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if lay.empty() or lay.lk == 0 or lay.total_k == 0:
        dq = _like_inner(like[0]).zero_()
        dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=q.device) if want_dbias else None
        return (as_like(dq, like[0]), as_like(dk.zero_(), like[1]), as_like(dv.zero_(), like[2]), dbias)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = torch.empty_like(lse)
    mask_t, mask_s = _mask_args(mask, lse)
    bias_t, bias_s = _bias_args(bias, full, lse)
    threshold, dscale, seed_lo, seed_hi, off = _rng_args(dropout_p, seed, offset)
    kv_t = kv_len if mask is not None else lse
    cu_q_t = cu_q if lay.varlen else lse
    cu_k_t = cu_k if lay.varlen else lse
    bd = block_d(lay.d)
    elt = _elt(q.dtype)

    # bias gradient: atomics straight into a bias-shaped buffer when the bias broadcasts (and
    # atomics are allowed), else a full (B, H, Lq, Lk) buffer reduced afterwards
    g = gs = None
    dbias_atomic = False
    if want_dbias:
        broadcast = any(s == 1 and f != 1 for s, f in zip(bias.shape, full))
        dbias_atomic = broadcast and not deterministic
        g = torch.zeros(bias.shape if dbias_atomic or not broadcast else full, dtype=torch.float32,
                        device=q.device)
        gs = tuple(g.expand(full).stride())
    g_t, g_s = (g, gs) if g is not None else (lse, (0, 0, 0, 0))

    o4, do4, dq4 = _delta_views(lay, out), _delta_views(lay, dout), _delta_views(lay, dq_acc)
    d4 = delta.unsqueeze(0) if lay.varlen else delta
    m_rows = o4.shape[2]

    def preprocess():
        bm = 64
        _launch(K._attn_bwd_preprocess, (o4.shape[0] * lay.heads, triton.cdiv(m_rows, bm)),
                o4, do4, d4, dq4, *o4.stride()[:3], *do4.stride()[:3], *d4.stride(), *dq4.stride()[:3],
                lay.heads, m_rows, HEAD_DIM=lay.d, ZERO_DQ=not deterministic, BLOCK_M=bm, BLOCK_D=bd)

    common = dict(IS_VARLEN=lay.varlen, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
                  HAS_DROPOUT=dropout_p > 0.0, DOT_F32=_dot_f32(q.dtype), DOT_PREC=_dot_prec(q.dtype),
                  HEAD_DIM=lay.d, BLOCK_D=bd)
    tail = (*lay.sizes(), scale * K.LOG2E, scale, threshold, dscale, seed_lo, seed_hi, off)
    bwd_args = (q, k, v, dout, lse, delta, dq_acc, dk, dv, g_t, mask_t, kv_t, bias_t, cu_q_t, cu_k_t,
                *lay.st(q), *lay.st(k), *lay.st(v), *lay.st(dout), *lay.st_lse(lse),
                *lay.st(dq_acc), *lay.st(dk), *lay.st(dv), *g_s, *mask_s, *bias_s, *tail)

    def run_bwd(cfg: K.Config):
        _launch(K._attn_bwd_kernel, (lay.batch * lay.heads, triton.cdiv(lay.lk, cfg.block_n)), *bwd_args,
                ATOMIC_DQ=not deterministic, BIAS_GRAD=want_dbias, DBIAS_ATOMIC=dbias_atomic, **common,
                **cfg.launch_kwargs())

    def bench_bwd(cfg: K.Config):  # atomics accumulate: re-zero what they add into
        if not deterministic:
            preprocess()
        if dbias_atomic:
            g.zero_()
        run_bwd(cfg)

    feats = K.Features(mask is not None, bias is not None, bool(causal), dropout_p > 0.0, want_dbias)
    key = (q.dtype, lay.d, lay.varlen, feats, deterministic, _bucket(lay.lq), _bucket(lay.lk), q.device)
    with _device(q):
        cfg = _pick("bwd", key, bd, elt, feats, q.device, bench_bwd)
        if dbias_atomic:
            g.zero_()
        preprocess()
        run_bwd(cfg)
        if deterministic:
            dq_args = (q, k, v, dout, lse, delta, dq, mask_t, kv_t, bias_t, cu_q_t, cu_k_t,
                       *lay.st(q), *lay.st(k), *lay.st(v), *lay.st(dout), *lay.st_lse(lse), *lay.st(dq),
                       *mask_s, *bias_s, *tail)

            def run_dq(cfg: K.Config):
                _launch(K._attn_bwd_dq_kernel, (lay.batch * lay.heads, triton.cdiv(lay.lq, cfg.block_m)), *dq_args,
                        **common, **cfg.launch_kwargs())

            run_dq(_pick("dq", key, bd, elt, feats, q.device, run_dq))
    if dq is None:
        dq = _like_inner(like[0]).copy_(dq_acc)
    dbias = None
    if want_dbias:
        dbias = (g if g.shape == bias.shape else g.sum_to_size(bias.shape)).to(bias.dtype)
    return as_like(dq, like[0]), as_like(dk, like[1]), as_like(dv, like[2]), dbias


def dropout_mask(batch: int, heads: int, lq: int, lk: int, p: float, seed: int, offset: int,
                 device: torch.device) -> Tensor:
    """The keep mask ``(batch, heads, lq, lk)`` bool from the kernels' ``_keep_tile``."""
    out = torch.empty(batch * heads, lq, lk, dtype=torch.uint8, device=device)
    if out.numel():
        bm, bn = (64, 64) if _INTERPRET else (32, 64)
        _, _, seed_lo, seed_hi, off = _rng_args(p, seed, offset)
        with _device(out):
            _launch(K._dropout_mask_kernel, (batch * heads, triton.cdiv(lq, bm), triton.cdiv(lk, bn)),
                    out, lq, lk, dropout_threshold(p), seed_lo, seed_hi, off, BLOCK_M=bm, BLOCK_N=bn)
    return out.view(batch, heads, lq, lk).bool()
