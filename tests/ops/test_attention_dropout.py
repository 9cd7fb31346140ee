"""Attention dropout: counter-based Philox mask regenerated in the backward.

Statistical checks use fixed seeds (deterministic), with bounds of 5 standard
deviations so a correct kernel essentially never fails them while a wrong
keep-probability or scaling (off by a few percent) does.
"""
import math

import pytest
import torch

from turbotune import backend
from turbotune.ops import attention, attention_dropout_mask, attention_ref, attention_varlen, attention_varlen_ref
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


def _inputs(b, h, lq, lk, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device).requires_grad_() for n in (lq, lk, lk)]


def _run(q, k, v, dout, **kw):
    out = attention(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def test_same_seed_same_result_different_seed_differs(device, triton_backend):
    q, k, v = _inputs(2, 2, 33, 40, 32, device)
    dout = torch.randn(2, 2, 33, 32, device=device)
    mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    a = _run(q, k, v, dout, dropout_p=0.3, dropout_seed=1234, attention_mask=mask)
    b = _run(q, k, v, dout, dropout_p=0.3, dropout_seed=1234, attention_mask=mask)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = _run(q, k, v, dout, dropout_p=0.3, dropout_seed=1235, attention_mask=mask)
    d = _run(q, k, v, dout, dropout_p=0.3, dropout_seed=1234, dropout_offset=1, attention_mask=mask)
    for x, y, z in zip(a, c, d):
        assert (x - y).abs().max() > 1e-2 and (x - z).abs().max() > 1e-2
    # without an explicit seed, torch.manual_seed makes runs reproducible
    torch.manual_seed(7)
    e = _run(q, k, v, dout, dropout_p=0.3)
    torch.manual_seed(7)
    f = _run(q, k, v, dout, dropout_p=0.3)
    for x, y in zip(e, f):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_consistent_with_kernel_mask(dtype, device, triton_backend):
    """The kernel's own keep-mask (debug path) fed to an fp64 reference reproduces
    the forward and all gradients: the backward regenerated the same mask."""
    b, h, lq, lk, d, p, seed, offset = 2, 3, 45, 70, 64, 0.2, 987654321987, 5
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _inputs(b, h, lq, lk, d, device, seed=1))
    bias = torch.randn(h, lq, lk, device=device)
    dout = torch.randn(b, h, lq, d, device=device, dtype=dtype)
    out, *g = _run(q, k, v, dout, dropout_p=p, dropout_seed=seed, dropout_offset=offset, attn_bias=bias, causal=True)

    mask = attention_dropout_mask(b, h, lq, lk, p, seed, offset, device=device, use_kernel=True)
    assert torch.equal(mask, attention_dropout_mask(b, h, lq, lk, p, seed, offset, device=device, use_kernel=False))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*x64, attn_bias=bias.double(), causal=True, dropout_p=p, dropout_mask=mask)
    gref = torch.autograd.grad(ref, x64, dout.double())
    atol, rtol = (FP32["atol"], FP32["rtol"]) if dtype == torch.float32 else (3e-2, 3e-2)
    assert_close(out, ref, atol=atol, rtol=rtol, name="out")
    for a, r, name in zip(g, gref, ("dq", "dk", "dv")):
        assert_close(a, r, atol=atol * 2, rtol=rtol, name=name)
    # and a different mask would not match: the check can fail
    other = attention_dropout_mask(b, h, lq, lk, p, seed + 1, offset, device=device)
    wrong = attention_ref(*x64, attn_bias=bias.double(), causal=True, dropout_p=p, dropout_mask=other)
    assert (wrong - ref).abs().max() > 0.1


def test_varlen_dropout_uses_per_sequence_mask(device, triton_backend):
    lens = [20, 1, 37]
    cu = torch.tensor([0, 20, 21, 58], dtype=torch.int32, device=device)
    h, d, p, seed = 2, 32, 0.25, 42
    q, k, v = (torch.randn(58, h, d, device=device, requires_grad=True) for _ in range(3))
    out = attention_varlen(q, k, v, cu, cu, 37, 37, dropout_p=p, dropout_seed=seed)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_varlen_ref(*x64, cu, cu, dropout_p=p, dropout_seed=seed)
    assert_close(out, ref, **FP32, name="out")
    for a, r, name in zip(g, torch.autograd.grad(ref, x64, dout.double()), ("dq", "dk", "dv")):
        assert_close(a, r, **FP32, name=name)
    # sequence 2 uses heads b*H+h = 4, 5 with counter i * len_k + j
    m = attention_dropout_mask(3, h, 37, 37, p, seed, device=device)[2]
    seq = attention_ref(*(t[21:].transpose(0, 1).unsqueeze(0).detach().double() for t in (q, k, v)),
                        dropout_p=p, dropout_mask=m.unsqueeze(0))
    assert_close(out[21:], seq[0].transpose(0, 1), **FP32, name="sequence 2")


def test_keep_probability_within_statistical_bounds(device, triton_backend):
    for p in (0.1, 0.5):
        mask = attention_dropout_mask(4, 3, 130, 100, p, seed=2024, device=device, use_kernel=True)
        n = mask.numel()
        kept = mask.sum().item()
        sd = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sd, f"p={p}: kept {kept} of {n}"
        # no visible structure: rows, columns and heads all keep ~(1 - p)
        for dim in (2, 3):
            frac = mask.float().mean(dim=dim)
            per = mask.shape[dim]
            assert (frac - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / per) + 1e-6
        # consecutive positions are not correlated
        a, b = mask[..., :-1].float().flatten(), mask[..., 1:].float().flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel())
    # p = 0 keeps everything; different offsets give different masks
    assert attention_dropout_mask(1, 1, 20, 20, 0.0, seed=1, device=device).all()
    m1 = attention_dropout_mask(1, 2, 64, 64, 0.5, seed=1, offset=0, device=device)
    m2 = attention_dropout_mask(1, 2, 64, 64, 0.5, seed=1, offset=1, device=device)
    assert 0.4 < (m1 != m2).float().mean().item() < 0.6
    # seed = offset = 1 (Triton would specialize a 1 into a constant) still matches the reference
    assert torch.equal(m2, attention_dropout_mask(1, 2, 64, 64, 0.5, seed=1, offset=1, device=device, use_kernel=False))


def test_mean_over_seeds_approaches_no_dropout(device, triton_backend):
    """E[dropout(P) / (1 - p)] = P: averaging outputs over many masks converges to the
    no-dropout output. Masks differ per (batch, head), so one launch on a batch of
    identical copies averages over 48 masks; 4 seeds make 192."""
    p, copies, seeds = 0.3, 48, 4
    q0, k0, v0 = (t.detach() for t in _inputs(1, 1, 20, 28, 16, device, seed=3))
    q, k, v = (t.expand(copies, 1, -1, -1).contiguous() for t in (q0, k0, v0))
    exact = attention(q0, k0, v0)[0, 0]
    outs = torch.cat([attention(q, k, v, dropout_p=p, dropout_seed=s)[:, 0] for s in range(seeds)])
    mean = outs.mean(0)
    # standard error of the mean, estimated per element from the samples
    se = outs.std(0) / math.sqrt(outs.shape[0])
    z = ((mean - exact).abs() / se.clamp_min(1e-6))
    assert z.max() < 5.0, f"max z-score {z.max():.2f}"
    assert (mean - exact).abs().mean() < (outs[0] - exact).abs().mean() / 5


def test_kernel_mask_is_bit_identical_to_the_reference_for_every_alignment(device, triton_backend):
    """The kernels draw four keep bits per Philox call (two calls per 4 keys when a row
    starts mid-block, i.e. Lk % 4 != 0). The mask must stay exactly the reference's
    (position n = i * Lk + j is word n % 4 of block n // 4) for every Lk mod 4, row
    start, large seeds (both key words) and offsets (the whole 32-bit word)."""
    cases = [(lq, lk, s) for lq, lk in ((1, 5), (3, 1), (5, 2), (70, 3), (70, 4), (9, 6), (33, 7), (70, 65), (2, 130))
             for s in ((12345, 0), (2**62 + 2**40 + 7, 2**32 - 1))]
    for lq, lk, (seed, offset) in cases:
        a = attention_dropout_mask(1, 2, lq, lk, 0.37, seed, offset, device=device, use_kernel=True)
        b = attention_dropout_mask(1, 2, lq, lk, 0.37, seed, offset, device=device, use_kernel=False)
        assert torch.equal(a, b), (lq, lk, seed, offset)


def test_kernels_use_all_four_philox_words(device, triton_backend, monkeypatch):
    """Count the counters the kernels hand to tl.philox (under the interpreter): one per 4
    keys when rows start on a Philox block (Lk % 4 == 0), two per 4 keys otherwise; never
    one per key (the 4x redundant scheme)."""
    if device.type != "cpu":
        pytest.skip("counts tl.philox calls under the Triton interpreter")
    import triton.language as tl

    real = tl.philox
    counters = []

    def counting(seed, c0, *rest, **kwargs):
        counters.append(math.prod(c0.shape))
        return real(seed, c0, *rest, **kwargs)

    monkeypatch.setattr(tl, "philox", counting)
    for lk, per_key in ((64, 0.25), (66, 0.5)):
        counters.clear()
        mask = attention_dropout_mask(1, 2, 64, lk, 0.3, seed=5, use_kernel=True)
        tiles = 2 * 64 * 64 * -(-lk // 64)  # (heads, query block, key blocks) x 64 x 64 positions
        assert sum(counters) == tiles * per_key, (lk, sum(counters), tiles)
        assert torch.equal(mask, attention_dropout_mask(1, 2, 64, lk, 0.3, seed=5, use_kernel=False))
    # the attention kernels call the same helper: a forward with dropout draws <= 1/4 counter per score
    counters.clear()
    q, k, v = _inputs(1, 2, 64, 64, 16, device)
    attention(q, k, v, dropout_p=0.3, dropout_seed=5)
    assert counters and sum(counters) <= 2 * 64 * 64 / 4
