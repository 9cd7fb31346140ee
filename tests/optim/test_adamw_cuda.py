"""CUDA kernels against the CPU kernel, torch and the reference (run by scripts/gpu_check.sh; skipped elsewhere)."""
import copy

import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, adamw_single_tensor, clip_grad_norm_

from adamw_oracle import assert_within_ulps, exact_sr_case, sr_bits_expected

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _native.status().cuda_usable, reason="turbotune built without usable CUDA kernels"),
]

SHAPES = [(1,), (7, 13), (4099,), (65536 * 2 + 17,), (384, 1536)] + [(31 + i,) for i in range(40)]  # > 1 launch
HYPER = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cuda_kernel_matches_cpu_kernel(dtype, state_dtype, amsgrad):
    """The CUDA and CPU kernels follow the same operation order in fp32: on the same inputs they agree to the
    bit, except that an fp32 result one ulp apart may round to the neighbouring 16-bit value. The tolerance is
    therefore one step of the stored dtype (plus, with bf16 moments, the 2^-9-of-a-step change such a flip
    makes in later updates)."""
    dev = torch.device("cuda")
    assert backend.select("adamw", dev, dtype).impl == backend.NATIVE
    master = dtype != torch.float32
    params = [torch.randn(s).to(dtype) for s in SHAPES]
    p_gpu = [p.to(dev).requires_grad_() for p in params]
    p_cpu = [p.clone().requires_grad_() for p in params]
    og = AdamW(p_gpu, amsgrad=amsgrad, state_dtype=state_dtype, **HYPER)
    oc = AdamW(p_cpu, amsgrad=amsgrad, state_dtype=state_dtype, **HYPER)
    for _ in range(4):
        gs = [torch.randn(s).to(dtype) for s in SHAPES]
        for pg, pc, g in zip(p_gpu, p_cpu, gs):
            pg.grad, pc.grad = g.to(dev), g.clone()
        og.step()
        oc.step()
    bf16_moments = state_dtype == torch.bfloat16
    step_atol = 2.0**-5 * HYPER["lr"] if bf16_moments else 0.0
    g_max = 6.0  # |randn| bound for these sizes, with margin
    moment_atol = {"exp_avg": 2.0**-7 * g_max, "exp_avg_sq": 2.0**-7 * g_max**2, "max_exp_avg_sq": 2.0**-7 * g_max**2}
    for i, (pg, pc) in enumerate(zip(p_gpu, p_cpu)):
        sg, sc = og.state[pg], oc.state[pc]
        assert sg["step"].device.type == "cuda" and float(sg["step"]) == 4
        if master:
            assert_within_ulps(sg["master_param"], sc["master_param"], torch.float32, 4, f"master[{i}]",
                               atol=step_atol)
            assert torch.equal(pg.detach(), sg["master_param"].to(dtype))
        assert_within_ulps(pg, pc, dtype, 1 if dtype != torch.float32 else 4, f"param[{i}]", atol=step_atol)
        for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            # fp32 moments depend on the grads only: identical; a flipped bf16 moment carries into later ones
            assert_within_ulps(sg[name], sc[name], state_dtype, 1 if bf16_moments else 2, f"{name}[{i}]",
                               atol=moment_atol[name] if bf16_moments else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference_with_fp32_state(dtype):
    dev = torch.device("cuda")
    master = dtype != torch.float32
    params = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
    p_k = [p.clone().requires_grad_() for p in params]
    opt = AdamW(p_k, **HYPER)
    ref_p = [p.clone() for p in params]
    ref_master = [p.float().clone() if master else None for p in params]
    ref_m = [torch.zeros(s, device=dev) for s in SHAPES]
    ref_v = [torch.zeros(s, device=dev) for s in SHAPES]
    for step in range(1, 5):
        gs = [torch.randn(s, device=dev).to(dtype) for s in SHAPES]
        for p, g in zip(p_k, gs):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            adamw_single_tensor(ref_p[i], g, ref_m[i], ref_v[i], None, ref_master[i], float(step), lr=3e-3,
                                beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.05, amsgrad=False, maximize=False)
    for i, p in enumerate(p_k):
        st = opt.state[p]
        if master:
            torch.testing.assert_close(st["master_param"], ref_master[i], rtol=1e-5, atol=1e-6)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(p.detach(), ref_p[i], **tol)
        torch.testing.assert_close(st["exp_avg"], ref_m[i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], ref_v[i], rtol=1e-5, atol=1e-7)


def test_cuda_stochastic_rounding_gives_the_cpu_bits(monkeypatch):
    """Same seed, same exact fp32 values: the CUDA kernel rounds to the same bf16 bits as the CPU kernel
    (one definition, turbotune::sr in csrc/cpu/adamw.h)."""
    seed = 0x0FED_CBA9_8765_4321
    monkeypatch.setattr(AdamW, "_seed", staticmethod(lambda group, dtype, master: seed))
    sizes = [5000, 65536 * 2 + 17, 3] + [31 + i for i in range(30)]  # several chunks and launches
    params, grads, kwargs, new = exact_sr_case(sizes, generator_seed=1)
    outs = []
    for dev in ("cpu", "cuda"):
        ps = [torch.nn.Parameter(p.clone().to(dev)) for p in params]
        opt = AdamW(ps, **kwargs)
        for p, g in zip(ps, grads):
            p.grad = g.clone().to(dev)
        opt.step()
        outs.append([p.detach().cpu() for p in ps])
    for i, (c, g, v) in enumerate(zip(outs[0], outs[1], new)):
        assert torch.equal(c.view(torch.int16), g.view(torch.int16)), i
        assert torch.equal(g.view(torch.int16).to(torch.int64) & 0xFFFF, sr_bits_expected(v, seed, i)), i


def test_master_copy_follows_the_model_to_the_gpu():
    """State created on the CPU, then model.cuda(): the master copy moves with the moments (it used to stay
    on the host and the kernel got a host pointer). The same gradients drive a CPU twin, so the two runs
    differ only by the kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    x = torch.randn(32, 64).to(torch.bfloat16)
    oa, ob = AdamW(model.parameters(), lr=1e-3), AdamW(ref.parameters(), lr=1e-3)

    def step():
        ob.zero_grad()
        ref(x).float().pow(2).mean().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = q.grad.to(p.device)
        oa.step()
        ob.step()

    step()
    assert oa.state[next(model.parameters())]["master_param"].device.type == "cpu"
    model.cuda()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), ref.parameters()):
        st = oa.state[p]
        assert st["master_param"].device == p.device and st["exp_avg"].device == p.device
        assert float(st["step"]) == 4
        assert_within_ulps(st["master_param"], ob.state[q]["master_param"], torch.float32, 4, "master")
        assert_within_ulps(p, q, torch.bfloat16, 1, "param")


def test_cuda_grad_scaler_matches_torch_fused_writes_unscaled_grads_and_skips_inf():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(dev)
    ref = copy.deepcopy(model)
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
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)  # unscaled (scaled on the inf step)
    assert sa.get_scale() == sb.get_scale()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert float(oa.state[p]["step"]) == 5


def test_cuda_found_inf_summed_over_devices_does_not_count_the_step():
    """GradScaler hands the optimizer the sum of its per-device flags: 2.0 with infs on two GPUs."""
    dev = torch.device("cuda")
    p = torch.nn.Parameter(torch.randn(1000, device=dev))
    opt = AdamW([p], lr=1e-2)
    p.grad = torch.randn(1000, device=dev)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.randn(1000, device=dev)
    opt.grad_scale = torch.tensor(1.0, device=dev)
    opt.found_inf = torch.tensor(2.0, device=dev)
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert float(opt.state[p]["step"]) == 1
    assert torch.equal(p, before)
    p.grad = torch.randn(1000, device=dev)
    opt.step()  # the next bias correction uses step 2 (it used to divide by 1 - beta^0 = 0)
    assert float(opt.state[p]["step"]) == 2 and bool(torch.isfinite(p).all())


def test_cuda_amsgrad_keeps_nan_like_torch():
    dev = torch.device("cuda")
    init = torch.randn(70001, device=dev)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = AdamW([a], lr=1e-2, amsgrad=True)
    ob = torch.optim.AdamW([b], lr=1e-2, amsgrad=True, foreach=False)
    g = torch.randn(70001, device=dev)
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    bad = torch.tensor([3, 4096, 50000], device=dev)
    oa.state[a]["max_exp_avg_sq"][bad] = float("nan")
    ob.state[b]["max_exp_avg_sq"][bad] = float("nan")
    g = torch.randn(70001, device=dev)
    g[7] = float("nan")
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    assert torch.equal(oa.state[a]["max_exp_avg_sq"].isnan(), ob.state[b]["max_exp_avg_sq"].isnan())
    assert int(oa.state[a]["max_exp_avg_sq"].isnan().sum()) == 4
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_cuda_zero_element_params_and_clipping():
    dev = torch.device("cuda")
    shapes = [(0,), (33, 7), (2, 0), (70001,)]
    ps = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    oa, ob = AdamW(ps, lr=1e-2), torch.optim.AdamW(qs, lr=1e-2, fused=True)
    for _ in range(2):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, device=dev)
            p.grad, q.grad = g.clone(), g.clone()
        torch.testing.assert_close(clip_grad_norm_(ps, 0.5), torch.nn.utils.clip_grad_norm_(qs, 0.5), rtol=1e-5,
                                   atol=0)
        oa.step()
        ob.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert oa.state[p]["exp_avg"].shape == p.shape and float(oa.state[p]["step"]) == 2


def test_cuda_mismatched_state_raises_value_error():
    dev = torch.device("cuda")
    small = torch.nn.Parameter(torch.randn(1000, device=dev))
    o1 = AdamW([small])
    small.grad = torch.randn(1000, device=dev)
    o1.step()
    big = torch.nn.Parameter(torch.randn(100_000, device=dev))
    o2 = AdamW([big])
    with pytest.raises(ValueError, match=r"parameter 0.*\(1000,\).*\(100000,\)"):
        o2.load_state_dict(o1.state_dict())


@pytest.mark.parametrize("scaler", [None, "step", "unscale_first"])
def test_cuda_max_grad_norm_matches_torch_clip_and_fused_step_without_host_sync(scaler):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.Linear(300, 8)).to(dev)
    ref = copy.deepcopy(model)
    oa = AdamW(model.parameters(), lr=1e-3, max_grad_norm=0.05)
    ob = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    sa = torch.amp.GradScaler("cuda", init_scale=2.0**10) if scaler else None
    sb = torch.amp.GradScaler("cuda", init_scale=2.0**10) if scaler else None
    x = torch.randn(32, 64, device=dev)
    clipped = 0
    for it in range(8):
        oa.zero_grad()
        ob.zero_grad()
        la, lb = model(x).pow(2).mean(), ref(x).pow(2).mean()
        if scaler:
            sa.scale(la).backward()
            sb.scale(lb).backward()
            if scaler == "unscale_first":
                sa.unscale_(oa)
            if it >= 2:
                torch.cuda.set_sync_debug_mode("error")  # step() must not wait for the GPU
            try:
                sa.step(oa)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            sa.update()
            sb.unscale_(ob)
            nb = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            sb.step(ob)
            sb.update()
        else:
            la.backward()
            lb.backward()
            if it >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                oa.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            nb = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            ob.step()
        assert oa.last_grad_norm.device.type == "cuda" and oa.last_grad_norm.dim() == 0
        torch.testing.assert_close(oa.last_grad_norm, nb, rtol=1e-4, atol=0)
        clipped += float(nb) > 0.05
    assert clipped >= 4, clipped
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dense_layouts_are_native_and_layout_independent(monkeypatch, dtype):
    """channels_last / channels_last_3d / transposed params on the GPU: the CUDA kernel walks their memory
    (state in the param's layout, a grad of another layout copied into it), with the same bits as on
    contiguous copies; AdamW(max_grad_norm) and clip_grad_norm_ take the CUDA norm on them."""
    dev = torch.device("cuda")

    def fail(*args, **kwargs):
        raise AssertionError("the reference path ran for a dense param")

    monkeypatch.setattr(AdamW, "_step_reference", fail)
    cl, cl3 = torch.channels_last, torch.channels_last_3d
    init = [torch.randn(16, 8, 3, 3).contiguous(memory_format=cl),
            torch.randn(128, 67, 3, 3).contiguous(memory_format=cl),
            torch.randn(5, 7, 3, 3).contiguous(memory_format=cl),
            torch.randn(4, 3, 3, 5, 2).contiguous(memory_format=cl3),
            torch.randn(13, 7).t(), torch.randn(16)]
    a = [torch.nn.Parameter(t.to(device=dev, dtype=dtype)) for t in init]  # .to keeps the layout
    c = [torch.nn.Parameter(t.contiguous().to(device=dev, dtype=dtype)) for t in init]
    oa, oc = AdamW(a, **HYPER), AdamW(c, **HYPER)
    for it in range(4):
        for p, q in zip(a, c):
            g = torch.randn(p.shape, device=dev).to(dtype)
            p.grad = g.clone() if it == 2 else torch.empty_like(p).copy_(g)  # step 2: contiguous grads
            q.grad = g.clone()
        oa.step()
        oc.step()
    for p, q in zip(a, c):
        assert torch.equal(p, q)
        for name, t in oa.state[p].items():
            if name != "step":
                assert torch.equal(t, oc.state[q][name]), name
                assert all(x == y for n, x, y in zip(p.shape, t.stride(), p.stride()) if n > 1), name
    # the norm sums in memory order: equal to the contiguous one up to fp32 rounding
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    clipping = AdamW(a, max_grad_norm=1.0, **HYPER)
    clipping.step()
    torch.testing.assert_close(clipping.last_grad_norm, torch.nn.utils.clip_grad_norm_(c, 1e9).float(), rtol=rtol,
                               atol=0)
    total = clip_grad_norm_(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(c, 0.5)
    torch.testing.assert_close(total, ref.float(), rtol=rtol, atol=0)
