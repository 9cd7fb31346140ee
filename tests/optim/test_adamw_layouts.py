"""AdamW and gradient clipping on params whose memory is dense but not contiguous.

``turbotune.optimize(cnn)`` gives conv weights the channels_last layout; a transposed 2-D weight or a
channels_last_3d conv weight is dense too. An elementwise update (and a sum of squares) does not care in which
order it walks the elements as long as the param, its grad, moments and master copy share the layout, so these
params take the native kernels. A gradient in another layout is copied into the param's layout first (torch's
own fused CPU AdamW reads it in the wrong order: see test_torch_fused_reads_a_grad_of_another_layout_wrongly).
"""
import copy
import math

import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, clip_grad_norm_
from turbotune.optim import adamw as adamw_module
from turbotune.optim import clip as clip_module
from turbotune.optim._layout import is_dense, same_layout

from adamw_oracle import exact_sr_case, sr_bits_expected

needs_native = pytest.mark.skipif(not _native.status().loaded, reason="native extension not built")

CL = torch.channels_last
CL3 = torch.channels_last_3d


def _cnn_mix(dtype=torch.float32, seed=0):
    """(tensor, description) pairs of a CNN-like param mix in several dense layouts, odd sizes; the big
    channels_last weight alone is above the kernel's one-thread threshold (several parallel chunks)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        (r(16, 8, 3, 3).contiguous(memory_format=CL), "conv 3x3 channels_last"),
        (r(128, 67, 3, 3).contiguous(memory_format=CL), "big conv channels_last (77184 elements)"),
        (r(5, 7, 3, 3).contiguous(memory_format=CL), "odd conv channels_last"),
        (r(32, 16, 1, 1).contiguous(memory_format=CL), "1x1 conv (contiguous and channels_last at once)"),
        (r(4, 3, 3, 5, 2).contiguous(memory_format=CL3), "conv3d channels_last_3d"),
        (r(13, 7).t(), "transposed linear weight"),
        (r(8, 3, 5, 5), "contiguous conv"),
        (r(16), "BatchNorm weight"),
        (r(11), "bias"),
    ]


def _params(mix):
    return [torch.nn.Parameter(t.clone()) for t, _ in mix]  # clone keeps a dense layout


def _grad_like(p, g):
    """``g``'s values in ``p``'s layout."""
    return torch.empty_like(p, dtype=g.dtype).copy_(g)


def _no_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference path ran for a param the native kernel can take")

    monkeypatch.setattr(AdamW, "_step_reference", fail)


def _assert_torch_fused_bits(ours, theirs, what):
    """Bit for bit, except in the scalar tail of torch's fused CPU kernel: it rounds the last
    ``numel % vector width`` (8 or 16) elements differently from its vector body (turbotune's kernel rounds
    every element as torch's vector body does), hence within an ulp when numel is not a multiple of 16."""
    if ours.numel() % 16 == 0:
        assert torch.equal(ours, theirs), what
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=what)


def _strides(t):
    return tuple(s for n, s in zip(t.shape, t.stride()) if n > 1)


# ----------------------------------------------------------------------------- layout helpers


def test_is_dense_and_same_layout():
    x = torch.randn(6, 5, 4, 3)
    assert is_dense(x) and is_dense(x.contiguous(memory_format=CL)) and is_dense(x.permute(2, 0, 3, 1))
    assert is_dense(torch.randn(4, 3, 3, 5, 2).contiguous(memory_format=CL3))
    assert is_dense(torch.randn(0, 3)) and is_dense(torch.randn(7, 1).t()) and is_dense(torch.randn(()))
    assert not is_dense(x[:, ::2]) and not is_dense(x[..., :2]) and not is_dense(torch.randn(3).expand(4, 3))
    assert not is_dense(torch.randn(10).as_strided((3, 3), (2, 1)))  # overlapping rows
    assert same_layout(x, x.clone()) and not same_layout(x, x.contiguous(memory_format=CL))
    w = torch.randn(32, 16, 1, 1)
    assert same_layout(w, w.contiguous(memory_format=CL))  # size-1 dims: the strides differ, the memory not


# ----------------------------------------------------------------------------- AdamW, fp32


@needs_native
@pytest.mark.parametrize("amsgrad", [False, True])
def test_dense_layouts_take_the_native_path_and_match_torch_fused_bit_for_bit(monkeypatch, amsgrad):
    """channels_last / channels_last_3d / transposed params: native kernel, bit-identical to
    torch.optim.AdamW(fused=True) on contiguous copies wherever the contiguous path is (see
    _assert_torch_fused_bits), and on the same layouts; the state is created in the param's layout.
    (Which elements fall in torch's scalar tail depends on the layout; turbotune rounds every element the same
    way, so its result does not depend on the layout at all: see the 16-bit test below.)"""
    _no_reference(monkeypatch)
    mix = _cnn_mix()
    a, b, c = _params(mix), [torch.nn.Parameter(t.contiguous().clone()) for t, _ in mix], _params(mix)
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    oa, ob = AdamW(a, **kw), torch.optim.AdamW(b, fused=True, **kw)
    oc = torch.optim.AdamW(c, fused=True, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q, r in zip(a, b, c):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad, r.grad = _grad_like(p, g), g.clone(), _grad_like(r, g)
        oa.step()
        ob.step()
        oc.step()
    for (p, q, r), (_, what) in zip(zip(a, b, c), mix):
        _assert_torch_fused_bits(p, q, what)
        _assert_torch_fused_bits(p, r, what)
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert _strides(oa.state[p][name]) == _strides(p), (what, name)
            _assert_torch_fused_bits(oa.state[p][name], ob.state[q][name], (what, name))


@needs_native
def test_torch_fused_reads_a_grad_of_another_layout_wrongly():
    """Why the layouts must agree: torch 2.13's fused CPU AdamW walks a contiguous grad in the memory order of
    a channels_last param (wrong elements); turbotune copies such a grad into the param's layout."""
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=CL)
    g = torch.randn(16, 8, 3, 3)  # contiguous
    fused, single, ours = (torch.nn.Parameter(w.clone()) for _ in range(3))
    for p in (fused, single, ours):
        p.grad = g.clone()
    torch.optim.AdamW([fused], lr=1e-2, fused=True).step()
    torch.optim.AdamW([single], lr=1e-2, foreach=False).step()
    AdamW([ours], lr=1e-2).step()
    torch.testing.assert_close(ours, single, rtol=1e-6, atol=1e-7)
    if torch.equal(fused, single):  # fixed in a later torch: nothing to document any more
        pytest.skip("this torch's fused AdamW handles a grad of another layout")
    assert (fused - single).abs().max() > 1e-3


@needs_native
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "strided slice", "float64"])
def test_grad_of_another_layout_or_dtype_reads_the_right_elements(monkeypatch, grad_layout):
    """A grad whose strides (or dtype) differ from its param's is copied into the param's layout for the
    kernel: the result is bit-identical to giving the grad in the param's layout, and p.grad is untouched."""
    _no_reference(monkeypatch)
    mix = _cnn_mix()
    a, b = _params(mix), _params(mix)
    oa, ob = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            if grad_layout == "contiguous":
                ga = g.clone()
            elif grad_layout == "channels_last":
                ga = g.contiguous(memory_format=CL) if g.dim() == 4 else g.t().contiguous().t() if g.dim() == 2 else g
            elif grad_layout == "strided slice":
                ga = torch.zeros(*g.shape[:-1], 2 * g.shape[-1])[..., ::2].copy_(g) if g.dim() else g
            else:
                ga = g.double()
            if ga.dtype != p.dtype:
                p.grad_dtype = None  # allow a grad of another dtype
            p.grad, q.grad = ga, _grad_like(q, g)  # ga as built: a clone would make the slice dense
        assert grad_layout in ("contiguous", "float64") or not all(same_layout(p.grad, p) for p in a)
        before = [p.grad.clone() for p in a]
        oa.step()
        ob.step()
        assert all(torch.equal(p.grad, g0) for p, g0 in zip(a, before))
    for (p, q), (_, what) in zip(zip(a, b), mix):
        assert torch.equal(p, q), what


@needs_native
def test_grad_scaler_writes_the_unscaled_grad_back_in_its_own_layout():
    """Under a GradScaler the step leaves grad / scale in p.grad, also when p.grad had another layout
    (then the kernel read a copy and p.grad is unscaled in place)."""
    mix = _cnn_mix()
    a, b = _params(mix), _params(mix)
    oa, ob = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen) * 1024 for p in a]
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), _grad_like(q, g)  # a: contiguous grads, b: the params' layouts
    for o in (oa, ob):
        o.grad_scale, o.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        o.step()
    for p, q, g in zip(a, b, grads):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad) and torch.equal(p.grad, g / 1024)


# ----------------------------------------------------------------------------- 16-bit params, bf16 state


@needs_native
@pytest.mark.parametrize(
    "dtype,master_weights,state_dtype",
    [(torch.float32, "auto", torch.float32), (torch.bfloat16, "auto", torch.float32),
     (torch.bfloat16, "auto", torch.bfloat16),
     (torch.float16, "auto", torch.float32), (torch.bfloat16, False, torch.bfloat16),
     (torch.float32, "auto", torch.bfloat16)],
)
def test_16bit_master_and_bf16_state_same_bits_as_contiguous_and_close_to_reference(
        monkeypatch, dtype, master_weights, state_dtype):
    """Native on the dense layouts == native on contiguous copies, bit for bit (an elementwise update does not
    depend on the order), master copy and moments in the param's layout; and within the native-vs-reference
    tolerances of test_step_matches_fp64_oracle of the reference path on the same layouts."""
    mix = _cnn_mix(dtype, seed=4)
    a = _params(mix)
    c = [torch.nn.Parameter(t.contiguous().clone()) for t, _ in mix]
    r = _params(mix)
    kw = dict(lr=3e-3, weight_decay=0.05, master_weights=master_weights, state_dtype=state_dtype)
    oa, oc, orf = AdamW(a, **kw), AdamW(c, **kw), AdamW(r, **kw)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q, s in zip(a, c, r):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad, s.grad = _grad_like(p, g), g.clone(), _grad_like(s, g)
        with monkeypatch.context() as m:
            _no_reference(m)
            oa.step()
            oc.step()
        with backend.force("reference"):
            orf.step()
    master = dtype != torch.float32 and master_weights == "auto"
    for (p, q, s), (_, what) in zip(zip(a, c, r), mix):
        st = oa.state[p]
        assert torch.equal(p, q), what
        names = ["exp_avg", "exp_avg_sq"] + (["master_param"] if master else [])
        assert ("master_param" in st) == master
        for name in names:
            assert torch.equal(st[name], oc.state[q][name]), (what, name)
            assert _strides(st[name]) == _strides(p), (what, name)
        if master:
            torch.testing.assert_close(st["master_param"], orf.state[s]["master_param"], rtol=2e-6, atol=1e-6)
        tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(
            rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-5)
        torch.testing.assert_close(p, s, **tol)


@needs_native
def test_stochastic_rounding_bits_follow_memory_order():
    """The random bits of element i are those of its position in memory (CPU and CUDA walk the memory), so a
    channels_last bf16 param gets sr::element_bits of its storage offsets."""
    seed = 0x0BAD_5EED_1234
    shapes = [(20, 9, 3, 3), (70, 33, 3, 3)]
    params, grads, kwargs, new = exact_sr_case([math.prod(s) for s in shapes], generator_seed=3)
    ps = [torch.nn.Parameter(p.reshape(s).contiguous(memory_format=CL)) for p, s in zip(params, shapes)]
    opt = AdamW(ps, **kwargs)
    opt._seed = lambda group, dtype, master: seed
    for p, g, s in zip(ps, grads, shapes):
        p.grad = _grad_like(p, g.reshape(s))
    opt.step()
    for i, (p, v, s) in enumerate(zip(ps, new, shapes)):
        memory_order = lambda t: t.permute(0, 2, 3, 1).reshape(-1)  # noqa: E731  (channels_last storage)
        got = memory_order(p.detach()).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
        want = sr_bits_expected(memory_order(v.reshape(s).contiguous(memory_format=CL)), seed, i)
        assert torch.equal(got, want), (i, int((got != want).sum()))


# ----------------------------------------------------------------------------- state: loading, relayout


@needs_native
def test_state_of_another_layout_is_converted_once(monkeypatch):
    """A state dict saved with contiguous params loads into channels_last params: each state tensor is stored
    in its param's layout, and training continues exactly as torch's fused AdamW does on the contiguous
    params (see the first test for why not on the same layouts)."""
    _no_reference(monkeypatch)
    mix = _cnn_mix(seed=6)
    src = [torch.nn.Parameter(t.contiguous().clone()) for t, _ in mix]
    osrc = torch.optim.AdamW(src, lr=1e-2, amsgrad=True, fused=True)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        for p in src:
            p.grad = torch.randn(p.shape, generator=gen)
        osrc.step()
    saved = osrc.state_dict()
    a = [torch.nn.Parameter(torch.empty_like(t).copy_(p.detach())) for (t, _), p in zip(mix, src)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in src]
    oa, ob = AdamW(a, lr=1e-2, amsgrad=True), torch.optim.AdamW(b, lr=1e-2, amsgrad=True, fused=True)
    oa.load_state_dict(copy.deepcopy(saved))  # torch's loader keeps the "step" tensors: do not share them
    ob.load_state_dict(copy.deepcopy(saved))
    for p, (_, what) in zip(a, mix):
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert _strides(oa.state[p][name]) == _strides(p), (what, name)
    for _ in range(3):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = _grad_like(p, g), g.clone()
        oa.step()
        ob.step()
    for (p, q), (_, what) in zip(zip(a, b), mix):
        _assert_torch_fused_bits(p, q, what)
    # a state tensor replaced by hand with another layout is converted before the kernel reads it
    p = a[0]
    oa.state[p]["exp_avg"] = oa.state[p]["exp_avg"].contiguous()
    p.grad = torch.zeros_like(p)
    oa.step()
    assert _strides(oa.state[p]["exp_avg"]) == _strides(p)


@needs_native
def test_state_dict_round_trip_keeps_values_and_layouts(monkeypatch, tmp_path):
    """state_dict of channels_last params -> torch.save / torch.load -> a new AdamW on the same layouts and one
    on contiguous params: every state value kept, each state tensor in its own param's layout, and the next
    steps bit-identical to the optimizer that was never saved (the kernel does not depend on the layout)."""
    _no_reference(monkeypatch)
    mix = _cnn_mix(torch.bfloat16, seed=13)
    kw = dict(lr=1e-2, amsgrad=True)
    a = _params(mix)
    oa = AdamW(a, **kw)
    gen = torch.Generator().manual_seed(14)
    for _ in range(2):
        for p in a:
            p.grad = _grad_like(p, torch.randn(p.shape, generator=gen).to(p.dtype))
        oa.step()
    torch.save(oa.state_dict(), tmp_path / "opt.pt")
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    c = [torch.nn.Parameter(p.detach().contiguous().clone()) for p in a]
    ob, oc = AdamW(b, **kw), AdamW(c, **kw)
    ob.load_state_dict(torch.load(tmp_path / "opt.pt"))
    oc.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for p, q, r in zip(a, b, c):
        assert set(ob.state[q]) == set(oa.state[p]) == set(oc.state[r]) and "master_param" in oa.state[p]
        for name, t in oa.state[p].items():
            assert torch.equal(ob.state[q][name], t) and torch.equal(oc.state[r][name], t), name
            if name != "step":
                assert _strides(ob.state[q][name]) == _strides(p) and oc.state[r][name].is_contiguous(), name
    for _ in range(2):
        for p, q, r in zip(a, b, c):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, q.grad, r.grad = _grad_like(p, g), _grad_like(q, g), g.clone()
        for o in (oa, ob, oc):
            o.step()
    for (p, q, r), (_, what) in zip(zip(a, b, c), mix):
        assert torch.equal(p, q) and torch.equal(p, r), what


@needs_native
def test_param_relaid_between_steps_keeps_its_state_right(monkeypatch):
    """optimize(cnn).revert() re-lays conv weights (w.data = w.data.contiguous()) between steps; the state is
    re-laid with them and the values are those of a run that never changed layout."""
    _no_reference(monkeypatch)
    init = torch.randn(24, 10, 3, 3)
    a = torch.nn.Parameter(init.contiguous(memory_format=CL))
    b = torch.nn.Parameter(init.clone())
    oa = AdamW([a], lr=1e-2, amsgrad=True)
    ob = torch.optim.AdamW([b], lr=1e-2, amsgrad=True, fused=True)
    gen = torch.Generator().manual_seed(8)
    for it in range(6):
        g = torch.randn(init.shape, generator=gen)
        a.grad, b.grad = _grad_like(a, g), g.clone()
        oa.step()
        ob.step()
        if it == 1:
            a.data = a.data.contiguous()
            a.grad = None
        if it == 3:
            a.data = a.data.contiguous(memory_format=CL)
    assert torch.equal(a, b)
    assert all(_strides(t) == _strides(a) for k, t in oa.state[a].items() if k != "step")


def test_non_dense_param_uses_the_reference_path_correctly():
    """A param whose memory has holes (a strided slice) cannot be walked as a flat array: reference path."""
    base = torch.randn(13, 14)
    a = base.clone()[:, ::2].requires_grad_()
    b = base.clone()[:, ::2].contiguous().requires_grad_()
    assert not is_dense(a)
    oa, ob = AdamW([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2, foreach=False)
    for _ in range(3):
        g = torch.randn(13, 7)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- clipping


class _CountingNative:
    """Stands in for turbotune._C: counts the calls of the native norm / scaling kernels."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name in ("sum_squares_cpu", "scale_cpu"):
            def counted(*args):
                self.calls.append(name)
                return fn(*args)
            return counted
        return fn


@pytest.fixture
def counting_native(monkeypatch):
    if not _native.status().loaded:
        pytest.skip("native extension not built")
    counter = _CountingNative(_native.require())
    monkeypatch.setattr(clip_module._native, "require", lambda *args, **kwargs: counter)
    return counter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_on_dense_layouts_is_native_and_matches_torch(counting_native, dtype):
    mix = _cnn_mix(dtype, seed=9)
    a, b = _params(mix), _params(mix)
    gen = torch.Generator().manual_seed(10)
    for p, q in zip(a, b):
        g = _grad_like(p, torch.randn(p.shape, generator=gen).to(dtype))
        p.grad, q.grad = g.clone(), g.clone()
    exact = torch.sqrt(sum(q.grad.double().square().sum() for q in b))
    total = clip_grad_norm_(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert counting_native.calls.count("sum_squares_cpu") >= 1 and "scale_cpu" in counting_native.calls
    torch.testing.assert_close(total.double(), exact, rtol=1e-5, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for (p, q), (_, what) in zip(zip(a, b), mix):
        assert p.grad.stride() == q.grad.stride(), what  # scaled in place
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_grad_norm_on_dense_layouts_is_native_and_equals_clip_then_step(counting_native, monkeypatch, dtype):
    """AdamW(max_grad_norm) on channels_last params: the native norm and the native step; the same result as
    torch's clip_grad_norm_ followed by the step (fp32: torch's fused AdamW)."""
    _no_reference(monkeypatch)
    mix = _cnn_mix(dtype, seed=11)
    a, b = _params(mix), _params(mix)
    oa = AdamW(a, lr=1e-2, max_grad_norm=1.0)
    ob = torch.optim.AdamW(b, lr=1e-2, fused=True) if dtype == torch.float32 else None
    om = AdamW(b, lr=1e-2) if ob is None else None
    gen = torch.Generator().manual_seed(12)
    for _ in range(4):
        for p, q in zip(a, b):
            g = _grad_like(p, torch.randn(p.shape, generator=gen).to(dtype))
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
        (ob or om).step()
        torch.testing.assert_close(oa.last_grad_norm, norm.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=0)
    assert counting_native.calls.count("sum_squares_cpu") >= 4
    for (p, q), (_, what) in zip(zip(a, b), mix):
        if dtype == torch.float32:
            err = ((p - q).abs().max() / q.abs().max()).item()
            assert err <= 1e-5, (what, err)
        else:  # torch's clip rounds the clipped grads to bf16 first; the fused step uses them unrounded
            torch.testing.assert_close(oa.state[p]["master_param"], om.state[q]["master_param"], rtol=1e-3, atol=1e-4)


def test_kernel_pointer_lists_keep_every_grad_alive():
    """_kernel_pointers hands out the addresses of the (possibly copied) grads and returns them to keep alive."""
    p = torch.nn.Parameter(torch.randn(6, 4, 3, 3).contiguous(memory_format=CL))
    p.grad = torch.randn(6, 4, 3, 3)
    grads, lists = adamw_module._kernel_pointers([p], [(p.data_ptr(), 0, 0, 0, 0, 0, p.numel())], False, False)
    assert grads[0] is not p.grad and same_layout(grads[0], p) and torch.equal(grads[0], p.grad)
    assert lists[1] == [grads[0].data_ptr()]
