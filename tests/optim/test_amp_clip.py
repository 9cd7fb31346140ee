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
