"""CUDA kernels against the reference (run where a GPU and the CUDA build exist; skipped elsewhere)."""
import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, adamw_single_tensor, clip_grad_norm_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _native.status().cuda_usable, reason="turbotune built without usable CUDA kernels"),
]

SHAPES = [(1,), (7, 13), (4099,), (65536 * 2 + 17,), (384, 1536)] + [(31 + i,) for i in range(40)]  # > 1 launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_kernel_matches_reference(dtype, state_dtype, amsgrad):
    dev = torch.device("cuda")
    assert backend.select("adamw", dev, dtype).impl == backend.NATIVE
    master = dtype != torch.float32
    params = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
    p_k = [p.clone().requires_grad_() for p in params]
    opt = AdamW(p_k, lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05, amsgrad=amsgrad,
                state_dtype=state_dtype)
    ref_p = [p.clone() for p in params]
    ref_master = [p.float().clone() if master else None for p in params]
    ref_m = [torch.zeros(s, device=dev, dtype=state_dtype) for s in SHAPES]
    ref_v = [torch.zeros(s, device=dev, dtype=state_dtype) for s in SHAPES]
    ref_vm = [torch.zeros(s, device=dev, dtype=state_dtype) for s in SHAPES]
    for step in range(1, 5):
        gs = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
        for p, g in zip(p_k, gs):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            adamw_single_tensor(ref_p[i], g, ref_m[i], ref_v[i], ref_vm[i] if amsgrad else None, ref_master[i],
                                float(step), lr=3e-3, beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.05,
                                amsgrad=amsgrad, maximize=False)
    for i, p in enumerate(p_k):
        st = opt.state[p]
        assert st["step"].device.type == "cuda"
        if master:
            torch.testing.assert_close(st["master_param"], ref_master[i], rtol=1e-5, atol=1e-6)
            assert torch.equal(p.detach(), st["master_param"].to(dtype))
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(p.detach(), ref_p[i], **tol)
        stol = dict(rtol=1e-5, atol=1e-7) if state_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(st["exp_avg"].float(), ref_m[i].float(), **stol)
        torch.testing.assert_close(st["exp_avg_sq"].float(), ref_v[i].float(), **stol)


def test_cuda_matches_torch_fused_and_grad_scaler_skips_inf():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(dev)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(dev)
    ref.load_state_dict(model.state_dict())
    oa = AdamW(model.parameters(), lr=1e-3)
    ob = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    sa = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    sb = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    x = torch.randn(32, 64, device=dev)
    for it in range(6):
        for m, o, s in ((model, oa, sa), (ref, ob, sb)):
            o.zero_grad()
            s.scale(m(x).pow(2).mean()).backward()
            if it == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert sa.get_scale() == sb.get_scale()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(oa.state[p]["step"]) == 5


def test_cuda_clip_grad_norm():
    dev = torch.device("cuda")
    ps = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in SHAPES]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        g = torch.randn(p.shape, device=dev)
        p.grad, q.grad = g.clone(), g.clone()
    total = clip_grad_norm_(ps, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
