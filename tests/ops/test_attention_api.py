"""The attention op's contract beyond accuracy: argument validation (varlen boundaries,
the Philox range, the renamed mask), the bias gradient on every path, float64 and
gradcheck, honest dispatch (the declared ATen backend, the native CPU seam), the
launch grid and the interpreter's memory safety with invalid ``cu_seqlens``."""
import os
import subprocess
import sys

import pytest
import torch

from turbotune import backend
from turbotune.ops import attention, attention_dropout_mask, attention_ref, attention_varlen, attention_varlen_ref
from turbotune.ops.attention import cpu as attn_cpu
from turbotune.ops.attention import launch, reference
from turbotune.testing import assert_close



# fp32 tolerance against an fp64 reference: the interpreter's dots are exact; on a GPU the
# kernels use 3xTF32 dots (about 21 mantissa bits per product).
FP32 = dict(atol=1e-4, rtol=5e-4) if torch.cuda.is_available() else dict(atol=2e-5, rtol=1e-4)

@pytest.fixture(autouse=True)
def _fixed_kernel_config(monkeypatch):
    monkeypatch.setenv("TURBOTUNE_AUTOTUNE", "0")


def _qkv(b, h, lq, lk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for n in (lq, lk, lk)]


def _packed(lens, h=2, d=16, dtype=torch.float32, device="cpu"):
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(3))
    return q, k, v, cu


# ----------------------------------------------------------------------------- issue 8, item 4: cu_seqlens


@pytest.mark.parametrize(
    "cu_q,cu_k,max_q,max_k,match",
    [
        ([1, 4, 10], None, 6, 6, "cu_seqlens_q must start at 0, got 1"),
        ([0, 4, 9], None, 6, 6, "cu_seqlens_q must end at the token count 10"),
        ([0, 4, 11], None, 7, 7, "cu_seqlens_q must end at the token count 10"),
        ([0, 7, 4, 10], [0, 3, 6, 10], 7, 7, "cu_seqlens_q must be non-decreasing, but cu_seqlens_q\\[2\\] = 4"),
        (None, [0, 6, 5, 10], 6, 6, "cu_seqlens_k must be non-decreasing"),
        ([0, 4, 10], None, 5, 6, "max_seqlen_q = 5 is smaller than the longest sequence in cu_seqlens_q \\(6"),
        ([0, 4, 10], None, 6, 3, "max_seqlen_k = 3 is smaller than the longest sequence in cu_seqlens_k \\(6"),
    ],
)
def test_varlen_rejects_invalid_cu_seqlens_on_cpu(cu_q, cu_k, max_q, max_k, match):
    q = torch.randn(10, 2, 16)
    n = len(cu_q if cu_q is not None else cu_k)
    good = [0, 4, 10] if n == 3 else [0, 3, 6, 10]
    cq = torch.tensor(cu_q if cu_q is not None else good, dtype=torch.int32)
    ck = torch.tensor(cu_k if cu_k is not None else good, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        attention_varlen(q, q, q, cq, ck, max_q, max_k)


def test_varlen_accepts_upper_bounds_and_empty_sequences():
    q, k, v, cu = _packed([3, 0, 5])
    out = attention_varlen(q, k, v, cu, cu, 100, 100)  # max_seqlen is an upper bound
    assert_close(out, attention_varlen_ref(q, k, v, cu, cu), atol=1e-5, rtol=1e-5)


OOB_PROBE = r"""
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
from turbotune.ops.attention import launch
torch.manual_seed(0)
h, d, total, guard = 2, 16, 20, 6
def guarded():  # rows [guard, guard + total) are the tensor; NaN rows around it catch stray reads
    buf = torch.full((total + 2 * guard, h, d), float("nan"))
    buf[guard:guard + total] = torch.randn(total, h, d)
    return buf[guard:guard + total]
q, k, v = guarded(), guarded(), guarded()
bad = [[0, 30, 10, 20], [-5, 8, 20, 20], [0, 8, 100, 20], [3, 3, 3, 3], [25, 40, 0, 20]]
for cu in bad:
    cu = torch.tensor(cu, dtype=torch.int32)
    for causal in (False, True):
        out, lse, _ = launch.forward(q, k, v, None, None, 0.2, causal, 0.25, 7, 0, cu_q=cu, cu_k=cu, max_q=40, max_k=40)
        dout = torch.randn_like(out)
        dq, dk, dv, _ = launch.backward(dout, q, k, v, out, lse, None, None, None, 0.2, causal, 0.25, 7, 0,
                                        deterministic=causal, bias_grad=False, cu_q=cu, cu_k=cu, max_q=40, max_k=40)
        assert not torch.isnan(v).any() and not torch.isnan(q).any()
        # every row any clamped sequence touched is finite: no NaN guard row was read
        c = cu.clamp(0, total).tolist()
        rows = torch.zeros(total, dtype=torch.bool)
        for i in range(len(c) - 1):
            lo, hi = c[i], max(c[i], min(c[i + 1], total))
            rows[lo:hi] = True
        for name, t in (("out", out), ("dq", dq)):
            assert torch.isfinite(t[rows]).all(), (cu.tolist(), causal, name)
print("ok")
"""


def test_kernels_never_touch_memory_outside_the_tensors_with_invalid_cu_seqlens():
    """Invalid boundaries reach the kernels unchecked on CUDA without TURBOTUNE_CHECK: the
    kernels clamp them. The launchers are called directly (no validation) under the
    interpreter on tensors framed by NaN rows; a stray read would put NaN into the
    results. Run in a subprocess so a stray write cannot take the test run down."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", OOB_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-side validation")
def test_varlen_cuda_validation_behind_turbotune_check(monkeypatch):
    q, k, v, cu = _packed([4, 6], device="cuda")
    bad = torch.tensor([0, 6, 4], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("TURBOTUNE_CHECK", "1")
    with pytest.raises(ValueError, match="non-decreasing"):
        attention_varlen(q, k, v, bad, cu, 6, 6)
    monkeypatch.setenv("TURBOTUNE_CHECK", "0")
    attention_varlen(q, k, v, bad, cu, 6, 6)  # unchecked: meaningless but memory-safe
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- item 5: Philox range


def test_dropout_position_limit_is_enforced():
    n = 1 << 17  # n * n = 2**34 positions per head: one past the last valid counter
    q = torch.randn(1, 1, n, 1)
    with pytest.raises(ValueError, match="at most 2\\*\\*34"):
        attention(q, q, q, dropout_p=0.1)
    qv = torch.randn(4, 1, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q \\* max_seqlen_k = 17179869184"):
        attention_varlen(qv, qv, qv, cu, cu, n, n, dropout_p=0.1)
    with pytest.raises(ValueError, match="at most 2\\*\\*34"):
        attention_dropout_mask(1, 1, n, n, 0.1, seed=1)


# ----------------------------------------------------------------------------- item 6: bias gradient

BIAS_SHAPES = [(2, 3, 19, 23), (1, 3, 19, 23), (3, 19, 23), (2, 1, 1, 23), (23,), (1, 1, 19, 1)]


def _bias_case(shape, dtype=torch.float32, device="cpu"):
    q, k, v = _qkv(2, 3, 19, 23, 16, dtype, device, seed=1)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    mask = torch.ones(2, 23, dtype=torch.int64, device=device)
    mask[1, 17:] = 0
    return q, k, v, bias, mask


def _check_bias_grad(q, k, v, bias, mask, atol=FP32["atol"], rtol=FP32["rtol"], **kw):
    out = attention(q, k, v, attn_bias=bias, attention_mask=mask, causal=True, **kw)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v, bias), dout)
    assert g[3] is not None and g[3].shape == bias.shape and g[3].dtype == bias.dtype
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    seed = kw.get("dropout_seed", 0)
    ref = attention_ref(*x64[:3], attn_bias=x64[3], attention_mask=mask, causal=True,
                        dropout_p=kw.get("dropout_p", 0.0), dropout_seed=seed)
    gref = torch.autograd.grad(ref, x64, dout.double())
    for a, r, name in zip(g, gref, ("dq", "dk", "dv", "dbias")):
        assert_close(a, r, atol=atol, rtol=rtol, name=name)


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=[str(s) for s in BIAS_SHAPES])
@pytest.mark.parametrize("impl", [None, backend.REFERENCE, backend.ATEN])
def test_bias_gradient_cpu_paths(shape, impl):
    q, k, v, bias, mask = _bias_case(shape)
    with backend.force(impl):
        _check_bias_grad(q, k, v, bias, mask)
        _check_bias_grad(q, k, v, bias, mask, dropout_p=0.3, dropout_seed=5)


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=[str(s) for s in BIAS_SHAPES])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bias_gradient_triton(shape, deterministic, device, triton_backend):
    """The Triton backward writes dS into a bias-shaped buffer (atomics over broadcast
    dimensions) or a full buffer reduced afterwards (deterministic); with dropout too."""
    q, k, v, bias, mask = _bias_case(shape, device=device)
    _check_bias_grad(q, k, v, bias, mask, deterministic=deterministic, dropout_p=0.25, dropout_seed=9)


def test_bias_gradient_half_precision(device, triton_backend):
    q, k, v, bias, mask = _bias_case((1, 3, 19, 23), torch.bfloat16, device)
    _check_bias_grad(q, k, v, bias, mask, atol=3e-2, rtol=3e-2)


def test_a_path_that_drops_the_bias_gradient_raises(monkeypatch):
    class NoBiasGrad:
        @staticmethod
        def forward(*args):
            return reference.forward(*args)

        @staticmethod
        def backward(*args, bias_grad=False):
            dq, dk, dv, _ = reference.backward(*args, bias_grad=bias_grad)
            return dq, dk, dv, None

    monkeypatch.setattr(attn_cpu, "implementation", lambda name: NoBiasGrad)
    q, k, v, bias, mask = _bias_case((3, 19, 23))
    out = attention(q, k, v, attn_bias=bias)
    with pytest.raises(RuntimeError, match="returned no attn_bias gradient"):
        out.sum().backward()


# ----------------------------------------------------------------------------- item 7: the mask's name


def test_key_padding_mask_raises_a_type_error_explaining_the_rename():
    q, k, v = _qkv(1, 1, 4, 5, 8)
    m = torch.ones(1, 5, dtype=torch.bool)
    for fn in (attention, attention_ref):
        with pytest.raises(TypeError, match="renamed to attention_mask.*True/1 = a real token.*MultiheadAttention"):
            fn(q, k, v, key_padding_mask=m)


def test_attention_mask_has_the_hugging_face_meaning():
    """(B, Lk) int64 0/1 exactly as a tokenizer returns it: 1 = real token, 0 = padding."""
    q, k, v = _qkv(2, 2, 6, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = attention(q, k, v, attention_mask=mask)
    alone = attention(q[1:, :, :3], k[1:, :, :3], v[1:, :, :3])  # the real tokens of row 1, unpadded
    assert_close(out[1, :, :3], alone[0], atol=1e-5, rtol=1e-5, name="padded row == its real tokens alone")


# ----------------------------------------------------------------------------- item 8: float64


@pytest.mark.parametrize("impl", [None, backend.TRITON])
def test_float64_runs_the_reference_and_passes_gradcheck(impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(1, 2, 5, 6, 4, seed=3))
    bias = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1]])
    with backend.force(impl):
        out = attention(q, k, v, attention_mask=mask, attn_bias=bias, causal=True)
        assert out.dtype == torch.float64
        assert torch.autograd.gradcheck(
            lambda q, k, v, b: attention(q, k, v, attention_mask=mask, attn_bias=b, causal=True),
            (q, k, v, bias), eps=1e-6, atol=1e-5)
        # the fp64 result is fp64 math: it matches the fp64 reference to rounding
        ref = attention_ref(q, k, v, attention_mask=mask, attn_bias=bias, causal=True)
        assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_float64_varlen_gradcheck():
    q, k, v, cu = _packed([3, 1, 4], h=1, d=4, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_varlen(q, k, v, cu, cu, 4, 4, causal=True),
                                    (q, k, v), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- item 9: honest dispatch


def test_aten_is_a_declared_backend_chosen_and_reported():
    from turbotune.cli import info_text

    # the default CPU path: the native kernels when the extension has them, else ATen's
    default = backend.NATIVE if attn_cpu.native() is not None else backend.ATEN
    with backend.force(None):
        for dtype in backend.FLOATS:
            assert backend.select("attention", torch.device("cpu"), dtype).impl == default
        text = info_text()
    lines = text[text.index("  attention:"):].splitlines()
    assert f"-> {default}" in lines[1], lines[:4]
    with backend.force(backend.ATEN):
        assert backend.select("attention", torch.device("cpu"), torch.float32).impl == backend.ATEN
        text = info_text()
        line = text[text.index("  attention:"):].splitlines()[1]
        assert "-> aten" in line and "flash-attention" in line, line
    with backend.force(backend.REFERENCE):
        assert backend.select("attention", torch.device("cpu"), torch.float32).impl == backend.REFERENCE
        text = info_text()
        assert "-> reference" in text[text.index("  attention:"):].splitlines()[1]


def test_forced_reference_really_runs_the_reference(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = attn_cpu._CPU_FLASH
    monkeypatch.setattr(attn_cpu, "_CPU_FLASH", spy)
    q, k, v = _qkv(1, 2, 7, 7, 8)
    with backend.force(backend.ATEN):
        attention(q, k, v)
    assert len(calls) == 1, "TURBOTUNE_BACKEND=aten runs ATen's kernel"
    with backend.force(backend.REFERENCE):
        out = attention(q, k, v)
    assert len(calls) == 1, "TURBOTUNE_BACKEND=reference must not call ATen's kernel"
    assert_close(out, attention_ref(q, k, v), atol=1e-6, rtol=1e-6)
    with backend.force(backend.ATEN):
        attention(q, k, v)
        attention(q, k, v, dropout_p=0.2)  # no dropout in ATen's kernel: this call runs the reference
    assert len(calls) == 2
    assert "TURBOTUNE_ATTENTION_CPU_FLASH" not in open(attn_cpu.__file__).read()


def test_forced_aten_on_float64_keeps_the_reference():
    with backend.force(backend.ATEN):
        with pytest.raises(backend.BackendUnavailable, match="no ATen cpu kernel for torch.float64"):
            backend.select("attention", torch.device("cpu"), torch.float64)
        q, k, v = (t.detach().double() for t in _qkv(1, 1, 3, 3, 4))
        assert attention(q, k, v).dtype == torch.float64  # the op itself always runs fp64 on the reference


# ----------------------------------------------------------------------------- the native CPU seam


class _FakeNative:
    """A stand-in for the C++ implementation: the reference's functions, counted."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name in ("forward", "backward", "varlen_forward", "varlen_backward"):
            def f(*args, **kwargs):
                self.calls.append(name)
                return getattr(reference, name)(*args, **kwargs)
            return f
        raise AttributeError(name)


def test_native_cpu_seam_is_one_registration_away():
    from turbotune.cli import info_text

    fake = _FakeNative()
    attn_cpu.register_native(fake)
    try:
        with backend.force(None):
            assert backend.select("attention", torch.device("cpu"), torch.float32).impl == backend.NATIVE
            assert backend.select("attention", torch.device("cpu"), torch.float16).impl == backend.ATEN
            assert "float32   -> native" in info_text()
            q, k, v = _qkv(2, 2, 9, 11, 8)
            mask = torch.ones(2, 11, dtype=torch.bool)
            mask[1, 7:] = False
            for p in (0.0, 0.2):
                out = attention(q, k, v, attention_mask=mask, dropout_p=p, dropout_seed=4)
                out.sum().backward()
            assert fake.calls == ["forward", "backward"] * 2
            fake.calls.clear()
            attention(q, k, v, attn_bias=torch.randn(11)).sum().backward()  # a bias: native is skipped (ATen)
            attention(q, k, v, attn_bias=torch.randn(11), dropout_p=0.1).sum()  # bias + dropout: the reference
            assert fake.calls == []
            qv, kv, vv, cu = _packed([3, 5])
            qv.requires_grad_()
            attention_varlen(qv, kv, vv, cu, cu, 5, 5, dropout_p=0.1).sum().backward()
            assert fake.calls == ["varlen_forward", "varlen_backward"]
        with backend.force(backend.REFERENCE):
            fake.calls.clear()
            attention(q, k, v, attention_mask=mask)
            assert fake.calls == []
        with backend.force(backend.NATIVE):
            assert backend.select("attention", torch.device("cpu"), torch.bfloat16).impl == backend.NATIVE
            with pytest.raises(backend.BackendUnavailable, match="no native cpu kernel for torch.float16"):
                backend.select("attention", torch.device("cpu"), torch.float16)
    finally:
        attn_cpu.register_native(None)
    with backend.force(None):
        assert backend.select("attention", torch.device("cpu"), torch.float32).impl == backend.ATEN
    with pytest.raises(TypeError, match="has no 'varlen_backward'"):
        attn_cpu.register_native(type("Half", (), {"DTYPES": (), "forward": 0, "backward": 0,
                                                   "varlen_forward": 0})())


# ----------------------------------------------------------------------------- launch details (issue 9)


def test_batch_times_heads_is_grid_axis_0(device, triton_backend, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535: batch * heads must be axis 0 of every kernel."""
    grids = []
    real = launch._launch

    def record(kernel, grid, *args, **kwargs):
        grids.append((getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)), grid))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", record)
    b, h = 3, 2
    q, k, v = _qkv(b, h, 70, 40, 16, device=device)
    for det in (False, True):
        attention(q, k, v, dropout_p=0.1, dropout_seed=1, deterministic=det).sum().backward()
    attention_dropout_mask(b, h, 70, 40, 0.1, seed=1, use_kernel=True, device=device)
    names = {n for n, _ in grids}
    assert {"_attn_fwd_kernel", "_attn_bwd_preprocess", "_attn_bwd_kernel", "_attn_bwd_dq_kernel",
            "_dropout_mask_kernel"} <= names, names
    assert all(g[0] == b * h for _, g in grids), grids
    grids.clear()
    qv, kv, vv, cu = _packed([5, 9, 1, 30], h=h, device=device)
    qv.requires_grad_()
    attention_varlen(qv, kv, vv, cu, cu, 30, 30).sum().backward()
    for name, g in grids:  # sequences * heads; the row-wise preprocess sees (1, H, total) views
        assert g[0] == (h if name == "_attn_bwd_preprocess" else 4 * h), (name, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_more_than_65535_heads_launch_on_gpu():
    """6,000 packed sequences x 12 heads = 72,000 (sequence, head) programs on grid axis 0."""
    lens = (torch.arange(6000) % 7 + 1).tolist()
    q, k, v, cu = _packed(lens, h=12, d=64, dtype=torch.bfloat16, device="cuda")
    q.requires_grad_()
    out = attention_varlen(q, k, v, cu, cu, 7, 7)
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all()
    sel = slice(int(cu[5990]), int(cu[6000]))
    tail = (cu[5990:] - cu[5990]).contiguous()
    ref = attention_varlen_ref(q[sel].detach().float(), k[sel].float(), v[sel].float(), tail, tail)
    assert_close(out[sel], ref, atol=2e-2, rtol=2e-2, name="last sequences")
    out = attention_varlen(q, k, v, cu, cu, 7, 7, dropout_p=0.1, dropout_seed=3)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device_not_the_current_one():
    q, k, v = _qkv(2, 2, 33, 33, 64, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        out = attention(q, k, v)
        out.float().sum().backward()
    ref = attention_ref(q.float(), k.float(), v.float())
    assert_close(out, ref, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- item 15: housekeeping


def test_kernel_constants_are_defined_once_and_hf_module_has_no_dead_flag():
    import turbotune.models.hf_attention as hf
    from turbotune.ops.attention import kernels

    src = "".join(open(os.path.join(os.path.dirname(kernels.__file__), f)).read()
                  for f in os.listdir(os.path.dirname(kernels.__file__)) if f.endswith(".py"))
    assert src.count("1.4426950408889634") == 1 and src.count("0.6931471805599453") == 1
    assert not hasattr(hf, "_registered")
