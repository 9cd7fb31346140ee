"""Fused attention: Triton kernels (interpreted on CPU) vs an fp64 reference.

The issue's full grid (B 1..3 x H 1..4 x L {1,17,64,100,130} x D {16,32,64,80,128}
x 4 mask kinds x 3 dtypes, Lq != Lk) has thousands of points and the interpreter
costs ~0.1-2 s per forward+backward, so the dense test uses a covering design
(``GRID`` below): every (mask kind, dtype) pair appears, every value of B, H,
L and D appears with every dtype, Lq != Lk in most cases, and the expensive
corners (L=130 with D=128, B=3 with H=4) are each hit at least once.

Accuracy rule (DESIGN.md): the kernel's error against an fp64 reference must
be at most 2x stock PyTorch's own error in the same dtype (eager
softmax(QK^T)V computed in that dtype), plus a small absolute slack: the
Triton interpreter truncates fp32 -> bf16/fp16 stores instead of rounding
(up to one extra ulp of the output), so the slack is one ulp of the largest
reference value (2**-7 relative for bf16, 2**-10 for fp16) plus 1e-5 (fp32
rounding of gradients that are exactly zero, e.g. dq when Lk = 1). fp32 is checked
tightly (atol 2e-5, rtol 1e-4) since the interpreter's fp32 dot is exact.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from turbotune import backend
from turbotune.ops.attention import launch
from turbotune.ops.attention.reference import probs as _probs_ref
from turbotune.ops import attention, attention_ref, attention_varlen, attention_varlen_ref
from turbotune.padding import pad_input, unpad_input
from turbotune.testing import assert_close



# fp32 tolerance against an fp64 reference: the interpreter's dots are exact; on a GPU the
# kernels use 3xTF32 dots (about 21 mantissa bits per product).
FP32 = dict(atol=1e-4, rtol=5e-4) if torch.cuda.is_available() else dict(atol=2e-5, rtol=1e-4)

@pytest.fixture(autouse=True)
def _fixed_kernel_config(monkeypatch):
    """One fixed block config per kernel variant instead of autotuning each one: on a GPU this
    keeps compilation time of the many variants tested here small (on the interpreter both are
    one config). test_autotuned_launchers covers the autotuned path."""
    monkeypatch.setenv("TURBOTUNE_AUTOTUNE", "0")

MASKS = ("none", "padding", "bias", "causal", "all")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (B, H, Lq, Lk, D, mask, dtype): 15 cases = every (mask, dtype) pair once.
GRID = [
    (1, 1, 17, 17, 16, "none", torch.float32),
    (2, 3, 64, 100, 80, "padding", torch.float32),
    (3, 2, 100, 64, 32, "bias", torch.float32),
    (2, 4, 130, 130, 128, "causal", torch.float32),
    (1, 2, 1, 17, 64, "all", torch.float32),
    (2, 2, 100, 130, 64, "none", torch.float16),
    (1, 4, 17, 64, 128, "padding", torch.float16),
    (2, 1, 130, 1, 16, "bias", torch.float16),
    (3, 3, 64, 17, 80, "causal", torch.float16),
    (2, 2, 17, 100, 32, "all", torch.float16),
    (3, 4, 64, 64, 32, "none", torch.bfloat16),
    (2, 1, 130, 100, 64, "padding", torch.bfloat16),
    (1, 3, 17, 130, 128, "bias", torch.bfloat16),
    (1, 2, 100, 17, 16, "causal", torch.bfloat16),
    (3, 1, 1, 64, 80, "all", torch.bfloat16),
]

# Extra points beyond the covering design: a non-power-of-two head dim the issue names (96),
# single-token queries and keys, and the largest corner in half precision with every mask.
EXTRA = [
    (2, 2, 45, 77, 96, "all", torch.bfloat16),
    (3, 1, 1, 1, 32, "padding", torch.float32),
    (3, 4, 130, 100, 128, "all", torch.float16),
    (1, 2, 64, 64, 96, "causal", torch.float32),
    (2, 2, 33, 70, 40, "all", torch.float16),
]

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _check_grid():
    assert {(m, d) for *_, m, d in GRID} == set(itertools.product(MASKS, DTYPES))
    for dt in DTYPES:
        rows = [g for g in GRID if g[-1] == dt]
        assert {r[4] for r in rows} == {16, 32, 64, 80, 128}
        assert {r[2] for r in rows} | {r[3] for r in rows} == {1, 17, 64, 100, 130}
    assert {g[0] for g in GRID} == {1, 2, 3} and {g[1] for g in GRID} == {1, 2, 3, 4}


_check_grid()


def make_inputs(b, h, lq, lk, d, mask, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(b, h, lq, d), rnd(b, h, lk, d), rnd(b, h, lk, d)
    kw = {}
    if mask in ("padding", "all"):
        lens = torch.randint(1, lk + 1, (b,), generator=g)
        lens[0] = lk  # one unpadded row
        am = torch.arange(lk).view(1, -1) < lens.view(-1, 1)
        if b > 1 and mask == "padding":  # one row with padding in the middle, as an int mask
            am[-1] = torch.rand(lk, generator=g) > 0.3
            am[-1, 0] = True
            am = am.to(torch.int64)
        kw["attention_mask"] = am.to(device)
    if mask in ("bias", "all"):
        kw["attn_bias"] = torch.randn(1 if mask == "bias" else b, h, lq, lk, generator=g).to(device=device, dtype=dtype)
    if mask in ("causal", "all"):
        kw["causal"] = True
    return q, k, v, kw


def stock_lowp(q, k, v, attention_mask=None, attn_bias=None, causal=False):
    """Stock PyTorch eager attention computed in the inputs' dtype (masked rows -> 0)."""
    scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias
    lq, lk = q.shape[-2], k.shape[-2]
    valid = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        valid = torch.arange(lk, device=q.device).view(1, -1) <= torch.arange(lq, device=q.device).view(-1, 1) + lk - lq
    valid = valid.expand(s.shape)
    if attention_mask is not None:
        valid = valid & attention_mask.bool().view(q.shape[0], 1, 1, lk)
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v)


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_against_reference(dtype, got, stock, ref, name):
    """``got``/``stock`` in dtype, ``ref`` fp64: fp32 tight; low precision within 2x stock's error."""
    if dtype == torch.float32:
        assert_close(got, ref, **FP32, name=name)
        return
    err = (got.double() - ref).abs().max().item()
    err_stock = (stock.double() - ref).abs().max().item()
    slack = ULP[dtype] * ref.abs().max().item() + 1e-5  # + fp32 accumulation floor (gradients that are exactly zero)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= 2 * err_stock + slack, (
        f"{name}: max error {err:.3g} > 2 x stock PyTorch {dtype} error {err_stock:.3g} + slack {slack:.3g}"
    )


@pytest.mark.parametrize(
    "b,h,lq,lk,d,mask,dtype", GRID + EXTRA,
    ids=[f"{g[5]}-{str(g[6])[6:]}-B{g[0]}H{g[1]}q{g[2]}k{g[3]}d{g[4]}" for g in GRID + EXTRA],
)
def test_attention_matches_fp64_reference(b, h, lq, lk, d, mask, dtype, device, triton_backend):
    q, k, v, kw = make_inputs(b, h, lq, lk, d, mask, dtype, device)
    out = attention(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    dout = torch.randn_like(out)
    g = grads(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw)
    if "attn_bias" in kw64:
        kw64["attn_bias"] = kw64["attn_bias"].double()
    ref = attention_ref(q64, k64, v64, **kw64)
    gref = grads(ref, (q64, k64, v64), dout.double())

    stock = stock_lowp(q, k, v, **kw)
    gstock = grads(stock, (q, k, v), dout)

    check_against_reference(dtype, out, stock, ref, "out")
    for name, a, s, r in zip(("dq", "dk", "dv"), g, gstock, gref):
        check_against_reference(dtype, a, s, r, name)


@pytest.mark.parametrize("deterministic", [False, True])
def test_autotuned_launchers(deterministic, device, triton_backend, monkeypatch):
    """The autotuned launch (config chosen once per key, cached, then launched directly)
    against a deliberately different block config, on the same inputs (mask, bias and its
    gradient, causal, dropout). Under the interpreter the tuned candidates are non-square
    and differ from the fixed 64x64; on a GPU the runner-up is used. A kernel whose result
    depends on the block shape (beyond fp32 summation order) fails here."""
    from turbotune.ops.attention import kernels as K

    launch.clear_config_cache()
    monkeypatch.setenv("TURBOTUNE_AUTOTUNE", "1")
    q, k, v, kw = make_inputs(2, 3, 150, 130, 64, "all", torch.bfloat16, device, seed=8)
    kw["attn_bias"].requires_grad_()
    leaves = (q, k, v, kw["attn_bias"])

    def run():
        out = attention(q, k, v, dropout_p=0.1, dropout_seed=3, deterministic=deterministic, **kw)
        return (out, *grads(out, leaves, dout))

    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    tuned = run()
    chosen = launch.chosen_configs()
    assert {key[0] for key in chosen} == ({"fwd", "bwd", "dq"} if deterministic else {"fwd", "bwd"})

    def other(kind, key, bd, elt, feats, dev, bench):
        cfg = chosen[(kind,) + key]
        alts = (K.candidates(kind, bd, elt, launch._INTERPRET, feats)
                + [K.fixed_config(kind, bd, elt, launch._INTERPRET, feats)])
        alt = next(c for c in alts if c != cfg)
        assert (alt.block_m, alt.block_n) != (cfg.block_m, cfg.block_n)
        return alt

    monkeypatch.setattr(launch, "_pick", other)
    different = run()
    # block shapes change only the fp32 summation order: same result up to bf16 rounding
    for a, b_, name in zip(tuned, different, ("out", "dq", "dk", "dv", "dbias")):
        assert_close(a, b_, atol=2e-2, rtol=2e-2, name=name)


def test_deterministic_and_default_backwards_agree(device, triton_backend):
    """deterministic=True (separate dQ kernel) is bit-reproducible and matches the default
    (dQ accumulated with fp32 atomics) up to summation order, dropout and bias included."""
    q, k, v, kw = make_inputs(2, 2, 70, 90, 32, "all", torch.float16, device, seed=12)
    kw["attn_bias"].requires_grad_()
    leaves = (q, k, v, kw["attn_bias"])
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)

    def run(det):
        out = attention(q, k, v, dropout_p=0.2, dropout_seed=8, deterministic=det, **kw)
        return (out, *grads(out, leaves, dout))

    a, b, c = run(True), run(True), run(False)
    for x, y, z, name in zip(a, b, c, ("out", "dq", "dk", "dv", "dbias")):
        assert torch.equal(x, y), f"{name}: deterministic=True differs between runs"
        assert_close(z, x, atol=5e-3, rtol=5e-3, name=name)


def test_reference_backend_matches_kernel(device):
    """The default CPU path (reference) and the kernel compute the same thing, grads included."""
    q, k, v, kw = make_inputs(2, 2, 33, 47, 24, "all", torch.float32, device, seed=3)
    outs = {}
    for impl in (backend.REFERENCE, backend.TRITON):
        with backend.force(impl):
            o = attention(q, k, v, dropout_p=0.25, dropout_seed=11, **kw)
            outs[impl] = (o, *grads(o, (q, k, v), torch.ones_like(o)))
    for a, b_, name in zip(outs[backend.REFERENCE], outs[backend.TRITON], ("out", "dq", "dk", "dv")):
        assert_close(b_, a, **FP32, name=name)


def test_hf_layout_strides_and_int_mask(device, triton_backend):
    """q/k/v as transposed (B, L, H, D) projections (what HF passes), int 0/1 mask, 1-D bias."""
    b, l, h, d = 2, 37, 3, 32
    x = [torch.randn(b, l, h, d, device=device, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    mask = torch.ones(b, l, dtype=torch.int64, device=device)
    mask[1, 20:] = 0
    bias = torch.randn(l, device=device)  # broadcast over (B, H, Lq)
    out = attention(q, k, v, attention_mask=mask, attn_bias=bias)
    assert out.transpose(1, 2).is_contiguous(), "output should follow q's (B, L, H, D) layout"
    ref = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(),
                        attention_mask=mask, attn_bias=bias.double())
    assert_close(out, ref, **FP32, name="out")
    g = grads(out, x, torch.ones_like(out))
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = attention_ref(*(t.transpose(1, 2) for t in x64), attention_mask=mask, attn_bias=bias.double())
    for a, r, name in zip(g, grads(ref, x64, torch.ones_like(ref)), ("dq", "dk", "dv")):
        assert_close(a, r, **FP32, name=name)


def test_rows_without_keys_are_zero_not_nan(device, triton_backend):
    b, h, lq, lk, d = 2, 2, 40, 24, 16
    q, k, v, _ = make_inputs(b, h, lq, lk, d, "none", torch.float32, device, seed=5)
    mask = torch.ones(b, lk, dtype=torch.bool, device=device)
    mask[1] = False  # batch row 1 attends to nothing
    # causal with Lq > Lk (bottom-right aligned): the first Lq - Lk query rows see no key
    out, lse = attention(q, k, v, attention_mask=mask, causal=True, return_lse=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, : lq - lk], torch.zeros_like(out[0, :, : lq - lk]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, : lq - lk]).all()
    assert torch.isfinite(lse[0, :, lq - lk:]).all()
    g = grads(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in g)
    assert torch.equal(g[0][1], torch.zeros_like(g[0][1])) and torch.equal(g[1][1], torch.zeros_like(g[1][1]))
    ref = attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), attention_mask=mask, causal=True)
    assert_close(out, ref, **FP32, name="out")
    # a bias of -inf everywhere also means "no key"
    out2 = attention(q, k, v, attn_bias=torch.full((lq, lk), float("-inf"), device=device))
    assert torch.equal(out2, torch.zeros_like(out2))


def test_return_lse_matches_logsumexp(device, triton_backend):
    q, k, v, kw = make_inputs(1, 2, 50, 70, 32, "padding", torch.float32, device, seed=2)
    _, lse = attention(q, k, v, return_lse=True, **kw)
    s = (q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5
    s = s.masked_fill(~kw["attention_mask"].view(1, 1, 1, -1), float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5, name="lse")


# ----------------------------------------------------------------------------- varlen

VARLEN = [
    # (lengths_q, lengths_k, H, D, causal, dtype)
    ([5, 1, 70, 0, 33], None, 3, 80, False, torch.float32),
    ([1, 17, 130], [64, 1, 100], 2, 64, True, torch.float32),
    ([100, 1, 17], None, 4, 128, False, torch.float16),
    ([64, 1, 9, 130], None, 1, 16, True, torch.bfloat16),
    ([3, 31], [40, 2], 2, 32, False, torch.bfloat16),
]


@pytest.mark.parametrize("lens_q,lens_k,h,d,causal,dtype", VARLEN)
def test_attention_varlen_matches_reference(lens_q, lens_k, h, d, causal, dtype, device, triton_backend):
    lens_k = lens_k or lens_q
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), h, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), h, d, device=device, dtype=dtype, requires_grad=True)
    out = attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    g = grads(out, (q, k, v), dout)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_varlen_ref(*x64, cu_q, cu_k, causal=causal)
    gref = grads(ref, x64, dout.double())
    # stock PyTorch in dtype, per sequence
    stock = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal) if dtype == torch.float32 else None
    if dtype != torch.float32:
        pieces = []
        for i in range(len(lens_q)):
            sl_q = slice(int(cu_q[i]), int(cu_q[i + 1]))
            sl_k = slice(int(cu_k[i]), int(cu_k[i + 1]))
            qb, kb, vb = (t[s].transpose(0, 1).unsqueeze(0) for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
            if kb.shape[2] == 0:
                pieces.append(torch.zeros_like(q[sl_q]))
                continue
            pieces.append(stock_lowp(qb, kb, vb, causal=causal)[0].transpose(0, 1))
        stock = torch.cat(pieces)
    gstock = grads(stock, (q, k, v), dout)
    check_against_reference(dtype, out, stock, ref, "out")
    for name, a, s, r in zip(("dq", "dk", "dv"), g, gstock, gref):
        check_against_reference(dtype, a, s, r, name)


def test_varlen_equals_padded_with_mask(device, triton_backend):
    """unpad -> attention_varlen -> pad gives the padded-with-mask result on the real tokens."""
    b, l, h, d = 3, 45, 2, 32
    lens = torch.tensor([45, 12, 1])
    mask = torch.arange(l).view(1, -1) < lens.view(-1, 1)
    x = torch.randn(b, l, 3, h, d, device=device)
    packed, idx, cu, mx = unpad_input(x, mask.to(device))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 45, 57, 58] and mx == 45
    qp, kp, vp = packed.unbind(1)
    out_v = pad_input(attention_varlen(qp, kp, vp, cu, cu, mx, mx), idx, b, l)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    out_p = attention(q, k, v, attention_mask=mask.to(device)).transpose(1, 2)
    m = mask.to(device)
    assert_close(out_v[m], out_p[m], **FP32, name="real tokens")
    assert torch.equal(out_v[~m], torch.zeros_like(out_v[~m]))


# ----------------------------------------------------------------------------- registration, errors


def test_opcheck_all_ops(device, triton_backend):
    q, k, v, kw = make_inputs(2, 2, 19, 23, 16, "all", torch.float32, device, seed=1)
    kw["attn_bias"].requires_grad_()
    for det in (False, True):
        args = (q, k, v, kw["attention_mask"], kw["attn_bias"], 0.2, True, 0.25, 7, 3, det)
        torch.library.opcheck(torch.ops.turbotune.attention_fwd.default, args)
        out, lse, kv_len = torch.ops.turbotune.attention_fwd(*args)
        for bias_grad in (False, True):
            bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, kv_len,
                     kw["attention_mask"], kw["attn_bias"].detach(), 0.2, True, 0.25, 7, 3, det, bias_grad)
            torch.library.opcheck(torch.ops.turbotune.attention_bwd.default, bargs)

    cu = torch.tensor([0, 5, 6, 20], dtype=torch.int32, device=device)
    qv, kv, vv = (torch.randn(20, 2, 16, device=device, requires_grad=True) for _ in range(3))
    for det in (False, True):
        vargs = (qv, kv, vv, cu, cu, 14, 14, 0.1, False, 0.25, 9, 0, det)
        torch.library.opcheck(torch.ops.turbotune.attention_varlen_fwd.default, vargs)
        out, lse = torch.ops.turbotune.attention_varlen_fwd(*vargs)
        torch.library.opcheck(torch.ops.turbotune.attention_varlen_bwd.default,
                              (torch.randn_like(out), qv.detach(), kv.detach(), vv.detach(), out.detach(), lse,
                               cu, cu, 14, 14, 0.1, False, 0.25, 9, 0, det))


def test_opcheck_cpu_default_path():
    q, k, v, kw = make_inputs(2, 2, 19, 23, 16, "all", torch.float32, "cpu", seed=1)
    args = (q, k, v, kw["attention_mask"], kw["attn_bias"], 0.0, True, 0.25, 0, 0, False)
    for impl in (backend.REFERENCE, backend.ATEN):
        with backend.force(impl):
            torch.library.opcheck(torch.ops.turbotune.attention_fwd.default, args)
            out, lse, kv_len = torch.ops.turbotune.attention_fwd(*args)
            for bias_grad in (False, True):
                torch.library.opcheck(torch.ops.turbotune.attention_bwd.default,
                                      (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                       kv_len, kw["attention_mask"], kw["attn_bias"], 0.0, True, 0.25, 0, 0, False,
                                       bias_grad))


def test_torch_compile_reference_path():
    """torch.compile sees the custom op without graph breaks (CPU: reference path, see DESIGN.md)."""
    q, k, v, kw = make_inputs(1, 2, 8, 8, 16, "padding", torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v, m):
        return attention(q, k, v, attention_mask=m).sum()

    with backend.force(backend.REFERENCE):
        loss = f(q, k, v, kw["attention_mask"])
        loss.backward()
        expected = attention_ref(q.detach(), k.detach(), v.detach(), attention_mask=kw["attention_mask"]).sum()
    assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton path with inductor on a GPU")
def test_torch_compile_triton_gpu(triton_backend):
    torch._dynamo.reset()
    q, k, v, kw = make_inputs(2, 4, 77, 77, 64, "padding", torch.bfloat16, "cuda", seed=6)

    def f(q, k, v, m):
        return attention(q, k, v, attention_mask=m, dropout_p=0.1, dropout_seed=5).float().square().sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v, kw["attention_mask"])
    g = torch.autograd.grad(loss, (q, k, v))
    x2 = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = f(*x2, kw["attention_mask"])
    gref = torch.autograd.grad(ref, x2)
    assert_close(loss, ref, atol=1e-1, rtol=1e-2, name="compiled loss")
    for a, r, name in zip(g, gref, ("dq", "dk", "dv")):
        assert_close(a, r, atol=1e-2, rtol=1e-2, name=name)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][0]), "q must have shape"),
        (lambda a: a.update(k=a["k"].half()), "k has dtype"),
        (lambda a: a.update(v=a["v"][:, :, :3]), "k and v must have the same shape"),
        (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), "head dim"),
        (lambda a: a.update(attention_mask=torch.ones(2, 5, dtype=torch.bool)), "attention_mask must have shape"),
        (lambda a: a.update(attention_mask=torch.ones(2, 9)), "attention_mask must be bool or 0/1 integers"),
        (lambda a: a.update(attn_bias=torch.ones(3, 1, 1, 1)), "attn_bias must be broadcastable"),
        (lambda a: a.update(attn_bias=torch.ones(9, dtype=torch.bool)), "attn_bias must be a floating"),
        (lambda a: a.update(dropout_p=1.0), "dropout_p must be"),
        (lambda a: a.update(softmax_scale=float("nan")), "softmax_scale"),
        (lambda a: a.update(dropout_p=0.1, dropout_seed=-1), "dropout_seed"),
        (lambda a: a.update(dropout_p=0.1, dropout_offset=2**32), "dropout_offset"),
        (lambda a: a.update(deterministic=1), "deterministic must be a bool"),
    ],
)
def test_attention_argument_errors(mutate, match):
    a = dict(q=torch.randn(2, 2, 7, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16))
    mutate(a)
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        attention(q, k, v, **a)


def test_attention_varlen_argument_errors():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a \\(B \\+ 1,\\) int32"):
        attention_varlen(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="same length"):
        attention_varlen(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_k must be a non-negative int"):
        attention_varlen(q, q, q, cu, cu, 6, -1)
    with pytest.raises(ValueError, match="q must have shape"):
        attention_varlen(q[0], q, q, cu, cu, 6, 6)


def test_padding_key_blocks_are_skipped_but_gradients_written(device, triton_backend):
    """Key blocks after the last attended key are skipped by the kernels; their dk/dv
    must still come back as zeros (the buffers are uninitialized)."""
    b, h, lq, lk, d = 3, 2, 70, 150, 32
    q, k, v, _ = make_inputs(b, h, lq, lk, d, "none", torch.float32, device, seed=9)
    mask = torch.zeros(b, lk, dtype=torch.bool, device=device)
    mask[0] = True
    mask[1, :30] = True
    mask[2, 5:20] = True
    mask[2, 140] = True  # one attended key far out: nothing before it may be skipped wrongly
    out = attention(q, k, v, attention_mask=mask)
    dout = torch.randn_like(out)
    g = grads(out, (q, k, v), dout)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*x64, attention_mask=mask)
    assert_close(out, ref, **FP32, name="out")
    for a, r, name in zip(g, grads(ref, x64, dout.double()), ("dq", "dk", "dv")):
        assert_close(a, r, **FP32, name=name)
    assert torch.equal(g[1][1, :, 30:], torch.zeros_like(g[1][1, :, 30:]))
    assert torch.equal(g[2][1, :, 30:], torch.zeros_like(g[2][1, :, 30:]))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_default_path(mask, dtype):
    """Without dropout, the CPU default (ATen's fused CPU kernel with our masks folded in)
    meets the same accuracy rule, keeps lse = -inf and zeros for rows with no key."""
    q, k, v, kw = make_inputs(2, 3, 37, 29, 40, mask, dtype, "cpu", seed=4)
    if "attention_mask" in kw:
        kw["attention_mask"][1] = False  # a batch row with no key at all
    with backend.force(backend.REFERENCE):
        out, lse = attention(q, k, v, return_lse=True, **kw)
        dout = torch.randn_like(out)
        g = grads(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw)
    if "attn_bias" in kw64:
        kw64["attn_bias"] = kw64["attn_bias"].double()
    ref = attention_ref(q64, k64, v64, **kw64)
    gref = grads(ref, (q64, k64, v64), dout.double())
    stock = stock_lowp(q, k, v, **kw)
    gstock = grads(stock, (q, k, v), dout)
    check_against_reference(dtype, out, stock, ref, "out")
    for name, a, s, r in zip(("dq", "dk", "dv"), g, gstock, gref):
        check_against_reference(dtype, a, s, r, name)
    _, lse_ref = _probs_ref(q64, k64, kw.get("attention_mask"), kw64.get("attn_bias"),
                            kw.get("causal", False), 40 ** -0.5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert_close(lse[fin], lse_ref[fin], atol=2e-5 if dtype == torch.float32 else 5e-2, rtol=1e-3, name="lse")
    if "attention_mask" in kw:
        assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(g[0][1], torch.zeros_like(g[0][1]))


def test_bench_suite_has_a_torch_baseline_per_configuration():
    from turbotune.bench import all_suites

    cases = list(all_suites()["attention"](True, torch.device("cpu")))
    groups = {}
    for c in cases:
        groups.setdefault(c.key(), []).append(c)
    assert len(groups) == 6  # (nomask, pad50) x (fwd, bwd, fwd+bwd)
    for key, cs in groups.items():
        assert sum(c.baseline for c in cs) == 1 and any(c.provider == "turbotune" for c in cs), key
        assert all(c.work.get("flop", 0) > 0 for c in cs)
    assert any(c.provider == "turbotune-varlen" for c in cases)


# ----------------------------------------------------------------------------- padding helpers


def test_unpad_pad_roundtrip_any_mask_and_gradients():
    b, l = 3, 11
    mask = torch.tensor([[1] * 11, [0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1], [0] * 11], dtype=torch.int32)
    x = torch.randn(b, l, 2, 5, requires_grad=True)
    packed, idx, cu, mx = unpad_input(x, mask)
    assert packed.shape == (15, 2, 5) and idx.dtype == torch.int64
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 11, 15, 15] and mx == 11
    assert torch.equal(packed[11:15], x[1, [1, 2, 4, 10]].detach())  # order kept, holes skipped
    back = pad_input(packed, idx, b, l)
    m = mask.bool()
    assert torch.equal(back[m], x[m].detach()) and torch.equal(back[~m], torch.zeros_like(back[~m]))
    back.sum().backward()
    assert torch.equal(x.grad, m.view(b, l, 1, 1).float().expand_as(x))


def test_padding_argument_errors():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="attention_mask must have shape \\(B, L\\) = \\(2, 4\\)"):
        unpad_input(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be bool or 0/1 integers"):
        unpad_input(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden must be a tensor of shape \\(B, L, ...\\)"):
        unpad_input(torch.randn(4), torch.ones(2, 4, dtype=torch.bool))
    packed, idx, _, _ = unpad_input(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices must be a 1-D tensor with nnz = 8"):
        pad_input(packed, idx[:3], 2, 4)


SM90_SCRIPT = os.path.join(os.path.dirname(__file__), "attention_sm90.py")


@pytest.mark.slow
def test_kernel_configs_fit_sm90_without_spills(tmp_path):
    """The interpreter accepts code the GPU compiler rejects, and says nothing about registers:
    compile the attention kernels for sm_90 through the real launchers (no GPU needed) and check
    every autotuning candidate the pruning keeps: shared memory within sm_90's 227 KiB (compile
    metadata) and no register spills (``cuobjdump -res-usage``; ``ptxas -v`` spill stores when the
    stack frame is not empty, ptxas' occasional single-register spills of <= 8 bytes tolerated). By default the
    heaviest variant (mask, bias + gradient, causal, dropout) in bf16 at head dims 64 and 256,
    the two candidates with the largest estimates per kernel; ``TURBOTUNE_SM90_FULL=1`` (set by
    scripts/gpu_check.sh) checks every candidate of every variant, dtype and head dim 64/128/256.
    fp32 (3xTF32 dots) above head dim 64 spills in every config tried: reported, not failed."""
    pytest.importorskip("triton.backends.nvidia")
    full = os.environ.get("TURBOTUNE_SM90_FULL", "0") == "1"
    out = tmp_path / "rows.jsonl"
    args = ["--out", str(out), "--jobs", "2"]
    args += (["--configs", "all"] if full else
             ["--configs", "worst", "--variants", "heavy", "--dtypes", "bf16", "--dims", "64,256"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, SM90_SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=3000 if full else 900)
    assert out.exists(), res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert rows and len(rows) >= (6 if not full else 100), res.stdout + res.stderr[-2000:]
    assert all("stack" in r for r in rows), "cuobjdump -res-usage gave no resource line"
    over_smem = [r for r in rows if r["shared"] > r["limit"]]
    spills = [r for r in rows if (r["spill_bytes"] > 8 or r["local"]) and not (r["dtype"] == "fp32" and r["d"] > 64)]
    assert not over_smem and not spills, res.stdout
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
