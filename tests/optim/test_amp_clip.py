"""GradScaler integration and fused gradient clipping."""
import copy

import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, clip_grad_norm_, clip_grad_norm_ref

needs_native = pytest.mark.skipif(not _native.status().loaded, reason="native extension not built")


def _model():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(9, 31), torch.nn.GELU(), torch.nn.Linear(31, 3))


@needs_native
def test_grad_scaler_matches_unscaled_training_and_skips_inf_step():
    x = torch.randn(16, 9)
    a, b = _model(), _model()
    oa = AdamW(a.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    assert AdamW._step_supports_amp_scaling
    for _ in range(5):
        oa.zero_grad()
        ob.zero_grad()
        scaler.scale(a(x).pow(2).mean()).backward()
        scaler.step(oa)
        scaler.update()
        b(x).pow(2).mean().backward()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not hasattr(oa, "grad_scale")  # GradScaler removes the attributes after step

    # an inf gradient: the step is skipped (params, moments and step count unchanged), the scale backs off
    before = [p.detach().clone() for p in a.parameters()]
    state_before = copy.deepcopy(oa.state_dict())
    scale_before = scaler.get_scale()
    oa.zero_grad()
    scaler.scale(a(x).pow(2).mean()).backward()
    next(a.parameters()).grad[0, 0] = float("inf")
    scaler.step(oa)
    scaler.update()
    for p, q in zip(a.parameters(), before):
        assert torch.equal(p, q)
    for k, st in oa.state_dict()["state"].items():
        assert float(st["step"]) == float(state_before["state"][k]["step"]) == 5
        assert torch.equal(st["exp_avg"], state_before["state"][k]["exp_avg"])
    assert scaler.get_scale() == scale_before * 0.5


@needs_native
def test_grad_scaler_after_unscale_for_clipping():
    """scaler.unscale_ + clip_grad_norm_ + scaler.step: grads are not divided twice."""
    x = torch.randn(16, 9)
    a, b = _model(), _model()
    oa = AdamW(a.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(3):
        oa.zero_grad()
        ob.zero_grad()
        scaler.scale(a(x).pow(2).mean()).backward()
        scaler.unscale_(oa)
        na = clip_grad_norm_(a.parameters(), 0.05)
        scaler.step(oa)
        scaler.update()
        b(x).pow(2).mean().backward()
        nb = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        ob.step()
        torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(impl, dtype, max_norm):
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    shapes = [(1,), (33, 7), (70001,), (5, 5, 5)]
    params_a = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    params_a.append(torch.nn.Parameter(torch.randn(3)))  # no grad: skipped
    for p, q in zip(params_a, params_b):
        g = (torch.randn(p.shape) * 0.1).to(dtype)
        p.grad, q.grad = g.clone(), g.clone()
    exact = torch.sqrt(sum(q.grad.double().square().sum() for q in params_b))
    originals = [q.grad.clone() for q in params_b]
    with backend.force(impl):
        total = clip_grad_norm_(params_a, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(params_b, max_norm)
    assert total.dtype == torch.float32 and total.dim() == 0
    # the norm is accumulated in fp32/fp64 whatever the grad dtype (torch's is computed in the grad dtype)
    torch.testing.assert_close(total.double(), exact, rtol=1e-5, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)
    coef = min(1.0, max_norm / (float(exact) + 1e-6))
    for p, g0 in zip(params_a, originals):
        expected = (g0.float() * coef).to(dtype)
        tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(p.grad, expected, **tol)
    if dtype == torch.float32:
        for p, q in zip(params_a, params_b):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_clip_grad_norm_bad_input_and_nonfinite():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], -1.0)
    p.grad[0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert float(clip_grad_norm_([torch.nn.Parameter(torch.randn(2))], 1.0)) == 0.0  # no grads at all


def test_clip_grad_norm_ref_is_exact_in_fp64():
    g = [torch.randn(100), torch.randn(7, 3)]
    expected = torch.sqrt(sum(t.double().square().sum() for t in g))
    got = clip_grad_norm_ref([t.clone() for t in g], 1e9)
    assert abs(float(got) - float(expected)) <= 1e-6 * float(expected)


# ---------------------------------------------------------------- GradScaler: grads written back, step count (issue 8)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_grad_scaler_leaves_unscaled_grads_like_torch_fused(impl):
    """torch's fused AdamW writes grad / scale back into p.grad (and leaves it alone on a skipped step)."""
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    x = torch.randn(16, 9)
    a, b = _model(), _model()
    oa = AdamW(a.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with backend.force(impl):
        for it in range(4):
            for m, o, s in ((a, oa, sa), (b, ob, sb)):
                o.zero_grad()
                s.scale(m(x).pow(2).mean()).backward()
                if it == 2:
                    next(m.parameters()).grad[0, 0] = float("inf")
                scaled = [p.grad.clone() for p in m.parameters()]
                s.step(o)
                s.update()
                if it == 2:  # skipped: the grads stay as they were
                    for p, g in zip(m.parameters(), scaled):
                        assert torch.equal(p.grad, g)
            for p, q in zip(a.parameters(), b.parameters()):
                if impl == "native":  # bit-identical to torch's fused CPU kernel
                    assert torch.equal(p.grad, q.grad), it
                else:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)  # params differ by ulps
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(oa.state[next(a.parameters())]["step"]) == 3


@needs_native
def test_grad_scaler_unscales_grads_of_another_dtype_in_place():
    """A grad whose dtype differs from its param's goes through a temporary; p.grad is still unscaled."""
    p = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
    p.grad_dtype = None  # allow a grad of another dtype
    g = torch.randn(300) * 1024
    p.grad = g.clone()  # fp32 grad on a bf16 param
    opt = AdamW([p], lr=1e-3)
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()
    assert p.grad.dtype == torch.float32
    torch.testing.assert_close(p.grad, g / 1024, rtol=0, atol=0)


def test_skipped_step_count_uses_found_inf_not_equal_zero():
    """GradScaler hands the optimizer the SUM of its per-device found_inf flags (2.0 with infs on two GPUs).
    The device-side step counting (CUDA path, no host sync) must decrement by found_inf != 0, never by the sum."""
    from turbotune.optim.adamw import _count_steps

    steps = [torch.tensor(3.0), torch.tensor(5.0)]
    _count_steps(steps, torch.tensor(2.0))
    assert [float(s) for s in steps] == [3.0, 5.0]
    _count_steps(steps, torch.tensor(1.0))
    assert [float(s) for s in steps] == [3.0, 5.0]
    _count_steps(steps, torch.tensor(0.0))
    assert [float(s) for s in steps] == [4.0, 6.0]
    _count_steps(steps, None)
    assert [float(s) for s in steps] == [5.0, 7.0]


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_found_inf_summed_over_two_devices_skips_the_step_on_cpu(impl):
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    p = torch.nn.Parameter(torch.randn(50))
    opt = AdamW([p], lr=1e-2)
    p.grad = torch.randn(50)
    with backend.force(impl):
        opt.step()
        before = p.detach().clone()
        p.grad = torch.randn(50)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(2.0)
        opt.step()
    assert float(opt.state[p]["step"]) == 1
    assert torch.equal(p, before)


# ---------------------------------------------------------------- zero-element grads in clipping (issue 8, item 1)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_clip_grad_norm_accepts_zero_element_params(impl):
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    shapes = [(0,), (40, 3), (2, 0), (70001,)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        g = torch.randn(p.shape)
        p.grad, q.grad = g.clone(), g.clone()
    with backend.force(impl):
        total = clip_grad_norm_(ps, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(qs, 0.5)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- clipping fused into the step (issue 8, item 12)


def _loss(model, batch):
    out = model(**batch).last_hidden_state
    return out.float().pow(2).mean() + out.float().mean()


@needs_native
def test_max_grad_norm_matches_torch_clip_then_fused_step_on_minilm(minilm):
    """20 steps on a real model: AdamW(max_grad_norm=c) vs torch's clip_grad_norm_(c) + AdamW(fused=True).

    Same weights (fp32, 1e-5 relative), last_grad_norm equal to torch's returned norm (1e-4 relative) at every
    step, and p.grad left unclipped (the coefficient is folded into the update, no scaling pass)."""
    model, batch = minilm
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    oa = AdamW(pa, lr=1e-3, weight_decay=0.01, max_grad_norm=0.05)
    ob = torch.optim.AdamW(pb, lr=1e-3, weight_decay=0.01, fused=True)
    assert oa.last_grad_norm is None
    clipped = 0
    for _ in range(20):
        oa.zero_grad()
        ob.zero_grad()
        _loss(a, batch).backward()
        for x, y in zip(pa, pb):
            y.grad = None if x.grad is None else x.grad.clone()
        raw = [None if x.grad is None else x.grad.clone() for x in pa]
        oa.step()
        nb = torch.nn.utils.clip_grad_norm_(pb, 0.05)
        ob.step()
        assert oa.last_grad_norm.dtype == torch.float32 and oa.last_grad_norm.dim() == 0
        torch.testing.assert_close(oa.last_grad_norm, nb, rtol=1e-4, atol=0)
        clipped += float(nb) > 0.05
        for x, g in zip(pa, raw):
            assert (x.grad is None and g is None) or torch.equal(x.grad, g)
    assert clipped >= 10, clipped  # the clip really acted
    for (name, x), y in zip([(n, p) for n, p in a.named_parameters() if p.requires_grad], pb):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, (name, err)
    moved = max((x - y).abs().max().item() for x, y in zip(a.parameters(), model.parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_grad_norm_equals_clip_then_step(impl, dtype):
    """Fused clip + step vs clip_grad_norm_ then step, both turbotune, groups and zero-element params included."""
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    shapes = [(33, 7), (0,), (70001,), (5,), (4, 0)]
    init = [torch.randn(s).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]  # noqa: E731
    oa = AdamW(groups(a), lr=1e-2, max_grad_norm=1.5)
    ob = AdamW(groups(b), lr=1e-2)
    with backend.force(impl):
        for it in range(5):
            for p, q in zip(a, b):
                g = (torch.randn(p.shape) * (0.01 if it == 3 else 1.0)).to(dtype)  # step 3: below the threshold
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            nb = clip_grad_norm_(b, 1.5)
            ob.step()
            torch.testing.assert_close(oa.last_grad_norm, nb, rtol=1e-6, atol=0)
    for p, q in zip(a, b):
        if dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:  # clip_grad_norm_ rounds the clipped grads to bf16 first; the fused step uses them unrounded
            torch.testing.assert_close(oa.state[p]["master_param"], ob.state[q]["master_param"], rtol=1e-3,
                                       atol=1e-4)
    assert float(oa.state[a[1]]["step"]) == 5 and oa.state[a[1]]["exp_avg"].shape == (0,)


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_max_grad_norm_with_grad_scaler(unscale_first, impl):
    """Under a GradScaler the norm is that of the unscaled grads, whether the user calls scaler.unscale_ first
    or leaves the unscaling to the step; an inf step is skipped and reports a non-finite norm."""
    if impl == "native" and not _native.status().loaded:
        pytest.skip("native extension not built")
    x = torch.randn(16, 9)
    a, b = _model(), _model()
    oa = AdamW(a.parameters(), lr=1e-2, max_grad_norm=0.05)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with backend.force(impl):
        for it in range(5):
            oa.zero_grad()
            ob.zero_grad()
            sa.scale(a(x).pow(2).mean()).backward()
            sb.scale(b(x).pow(2).mean()).backward()
            if it == 3:
                next(a.parameters()).grad[0, 0] = float("inf")
                next(b.parameters()).grad[0, 0] = float("inf")
            if unscale_first:
                sa.unscale_(oa)
            sa.step(oa)
            sa.update()
            sb.unscale_(ob)
            nb = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
            sb.step(ob)
            sb.update()
            if it == 3:
                assert not torch.isfinite(oa.last_grad_norm)
            else:
                torch.testing.assert_close(oa.last_grad_norm, nb, rtol=1e-5, atol=0)
                assert float(nb) > 0.05  # clipped
    assert sa.get_scale() == sb.get_scale()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(oa.state[next(a.parameters())]["step"]) == 4


def test_max_grad_norm_argument_and_attribute():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW([p], max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        AdamW([p], max_grad_norm=float("nan"))
    with pytest.raises(TypeError, match="max_grad_norm"):
        AdamW([p], max_grad_norm="1.0")
    opt = AdamW([p], lr=0.1)
    assert opt.max_grad_norm is None and opt.last_grad_norm is None
    p.grad = torch.full((3,), 4.0)
    opt.step()
    assert opt.last_grad_norm is None  # no clipping, no norm pass
    opt.max_grad_norm = float("inf")  # measure only
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(float(torch.linalg.vector_norm(p.grad)), rel=1e-6)
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.max_grad_norm = -2
    opt.max_grad_norm = 1.0
    clone = copy.deepcopy(opt)  # pickling keeps the setting (torch's __getstate__ would drop it)
    assert clone.max_grad_norm == 1.0
    fresh = AdamW([torch.nn.Parameter(torch.randn(3))], max_grad_norm=2.0)
    fresh.load_state_dict(opt.state_dict())  # a state dict carries no max_grad_norm: keep the constructor's
    assert fresh.max_grad_norm == 2.0


def test_info_reports_the_optimizer_ops():
    import turbotune.optim  # noqa: F401  (registers the ops)

    ops = backend.registered_ops()
    assert "max_grad_norm" in ops["adamw"].summary
    assert "AdamW(max_grad_norm" in ops["clip_grad_norm"].summary
    for op in ("adamw", "clip_grad_norm"):
        expected = backend.NATIVE if _native.status().loaded else backend.REFERENCE
        assert backend.select(op, torch.device("cpu"), torch.float32).impl == expected
