"""turbotune.optim.AdamW against torch.optim.AdamW and the single-tensor reference."""
import copy
import math

import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, adamw_single_tensor, stochastic_round_to_bf16



NATIVE_CPU = _native.status().loaded
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="native extension not built")


def clone_model(model):
    return copy.deepcopy(model)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative difference of a tensor: max |a - b| / max |b|.

    (Elementwise ratios are meaningless for parameters that pass near zero: a
    1-ulp difference of one intermediate there is a large ratio. torch's own
    fused and single-tensor AdamW differ by up to 7e-3 elementwise on the
    MiniLM test below, and by 1.1e-7 with this measure.)
    """
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def loss_fn(model, batch):
    out = model(**batch).last_hidden_state
    return out.float().pow(2).mean() + out.float().mean()


def run_pair(model, batch, make_ours, make_torch, steps, scheduler=None, make_third=None):
    """Train a copy with turbotune; feed the same gradients to a copy stepped by torch (and a third)."""
    a = clone_model(model)
    b = clone_model(model)
    oa, ob = make_ours(a), make_torch(b)
    if make_third is not None:
        c = clone_model(model)
        oc = make_third(c)
    sa = scheduler(oa) if scheduler else None
    sb = scheduler(ob) if scheduler else None
    pa, pb = list(a.parameters()), list(b.parameters())
    for _ in range(steps):
        oa.zero_grad()
        ob.zero_grad()
        loss_fn(a, batch).backward()
        for x, y in zip(pa, pb):
            y.grad = None if x.grad is None else x.grad.clone()
        oa.step()
        ob.step()
        if make_third is not None:
            for x, y in zip(pa, c.parameters()):
                y.grad = None if x.grad is None else x.grad.clone()
            oc.step()
        if sa:
            sa.step()
            sb.step()
    if make_third is not None:
        return a, b, oa, ob, c
    return a, b, oa, ob


@needs_native
def test_fp32_matches_torch_50_steps_real_model(minilm):
    model, batch = minilm
    a, b, oa, ob, c = run_pair(
        model, batch,
        lambda m: AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01),
        lambda m: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01, foreach=False),
        steps=50,
        make_third=lambda m: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3,
                                               weight_decay=0.01, fused=True),
    )
    assert backend.select("adamw", torch.device("cpu"), torch.float32).impl == backend.NATIVE
    worst = max(max_rel(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert worst <= 1e-6, worst
    # the kernel rounds like torch's own fused CPU AdamW: identical bits after 50 steps
    for (name, x), y in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(x, y), (name, (x - y).abs().max().item())
    # the parameters really moved
    moved = max((x - y).abs().max().item() for x, y in zip(a.parameters(), model.parameters()))
    assert moved > 1e-3
    for x, y in zip(a.parameters(), b.parameters()):
        if x not in oa.state:  # frozen, or no gradient (the unused pooler)
            assert y not in ob.state
            continue
        sa, sb = oa.state[x], ob.state[y]
        assert float(sa["step"]) == float(sb["step"]) == 50
        assert max_rel(sa["exp_avg_sq"], sb["exp_avg_sq"]) <= 1e-5


def _small_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


@needs_native
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_flags_and_groups_match_torch(amsgrad, maximize, weight_decay):
    model = _small_model()
    x = torch.randn(64, 17)

    def groups(m):
        return [
            {"params": m[0].parameters(), "lr": 3e-3, "betas": (0.8, 0.99)},
            {"params": m[2].parameters(), "weight_decay": 0.0, "eps": 1e-6},
        ]

    kw = dict(lr=1e-3, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[3e-3, 1e-3], total_steps=30)  # noqa: E731
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    oa, ob = AdamW(groups(a), **kw), torch.optim.AdamW(groups(b), foreach=False, **kw)
    sa, sb = sched(oa), sched(ob)
    for _ in range(25):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert max_rel(p, q) <= 1e-5
        if amsgrad:
            assert max_rel(oa.state[p]["max_exp_avg_sq"], ob.state[q]["max_exp_avg_sq"]) <= 1e-4


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize(
    "dtype,master_weights",
    [(torch.float32, "auto"), (torch.float16, "auto"), (torch.bfloat16, "auto"), (torch.float16, False),
     (torch.bfloat16, False)],
)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_kernel_matches_single_tensor_reference(impl, dtype, master_weights, state_dtype, amsgrad):
    """Native CPU kernel vs the readable reference, odd sizes, with and without master weights."""
    if impl == "native" and not NATIVE_CPU:
        pytest.skip("native extension not built")
    shapes = [(1,), (7, 13), (4099,), (70001,)]  # 70001 spans several parallel chunks
    master = dtype != torch.float32 and master_weights == "auto"
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(4)]
    p_k = [p.clone().requires_grad_() for p in params]
    opt = AdamW(p_k, lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05, amsgrad=amsgrad,
                state_dtype=state_dtype, master_weights=master_weights)
    ref_p = [p.clone() for p in params]
    ref_master = [p.float().clone() if master else None for p in params]
    ref_m = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    ref_v = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    ref_vm = [torch.zeros(s, dtype=state_dtype) for s in shapes]
    with backend.force(impl):
        for step, gs in enumerate(grads, start=1):
            for p, g in zip(p_k, gs):
                p.grad = g.clone()
            opt.step()
            for i, g in enumerate(gs):
                adamw_single_tensor(ref_p[i], g, ref_m[i], ref_v[i], ref_vm[i] if amsgrad else None, ref_master[i],
                                    float(step), lr=3e-3, beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.05,
                                    amsgrad=amsgrad, maximize=False)
    for i, p in enumerate(p_k):
        st = opt.state[p]
        assert st["exp_avg"].dtype == state_dtype
        assert ("master_param" in st) == master
        if master:
            assert st["master_param"].dtype == torch.float32
            torch.testing.assert_close(st["master_param"], ref_master[i], rtol=2e-6, atol=1e-6)
            assert torch.equal(p.detach(), st["master_param"].to(dtype)), "param must be the rounded master"
        tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
        if dtype != torch.float32:
            # rounding of an almost identical fp32 value may still flip one ulp
            tol = dict(rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-5)
        torch.testing.assert_close(p.detach(), ref_p[i], **tol)
        stol = dict(rtol=1e-5, atol=1e-7) if state_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(st["exp_avg"].float(), ref_m[i].float(), **stol)
        torch.testing.assert_close(st["exp_avg_sq"].float(), ref_v[i].float(), **stol)


@needs_native
def test_bf16_master_weights_track_fp32_far_better_than_plain_bf16():
    """Same gradient stream; updates under half a bf16 ulp: plain bf16 loses them, master weights keep them."""
    torch.manual_seed(3)
    shapes = [(256, 384), (384,), (1000,)]
    # values in [1, 2): bf16 ulp 2^-7, Adam updates ~lr = 1e-3 < half an ulp. Exactly representable in
    # bf16 so that all three runs start from the same values.
    init = [(torch.rand(s) + 1.0).to(torch.bfloat16).float() for s in shapes]
    fp32 = [p.clone().requires_grad_() for p in init]
    master = [p.to(torch.bfloat16).requires_grad_() for p in init]
    plain = [p.to(torch.bfloat16).requires_grad_() for p in init]
    o32 = torch.optim.AdamW(fp32, lr=1e-3, foreach=False)
    om = AdamW(master, lr=1e-3)
    op = torch.optim.AdamW(plain, lr=1e-3, foreach=False)
    for _ in range(40):
        gs = [torch.randn(s) + 1.0 for s in shapes]
        for ps, o, dt in ((fp32, o32, torch.float32), (master, om, torch.bfloat16), (plain, op, torch.bfloat16)):
            for p, g in zip(ps, gs):
                p.grad = g.to(dt)
            o.step()
    drift = min((q - p0).abs().mean().item() for q, p0 in zip(fp32, init))
    assert drift > 0.02  # the fp32 run moved by several bf16 ulps
    for p, q, r in zip(master, fp32, plain):
        # the fp32 master follows the fp32 run (only the gradients were rounded to bf16)
        assert (om.state[p]["master_param"] - q).abs().max().item() < 1e-3
        err_master = (p.float() - q).abs().mean().item()  # ~ rounding of the fp32 run to bf16
        err_plain = (r.float() - q).abs().mean().item()
        assert err_master < 2**-8, err_master
        assert err_master < err_plain / 5, (err_master, err_plain)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_stochastic_rounding_unbiased_and_keeps_small_updates(impl):
    if impl == "native" and not NATIVE_CPU:
        pytest.skip("native extension not built")
    torch.manual_seed(4)
    n = 200_000
    x = torch.full((n,), 1.0 + 2**-10)  # a quarter of a bf16 ulp above 1.0 (ulp = 2^-7)
    r = stochastic_round_to_bf16(x).float()
    assert set(r.unique().tolist()) <= {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 2e-4

    init = torch.ones(50_000)
    sr = init.to(torch.bfloat16).requires_grad_()
    rn = init.to(torch.bfloat16).requires_grad_()
    ref = init.clone().requires_grad_()
    osr = AdamW([sr], lr=2e-4, weight_decay=0.0, stochastic_rounding=True)
    orn = AdamW([rn], lr=2e-4, weight_decay=0.0, master_weights=False)
    oref = torch.optim.AdamW([ref], lr=2e-4, weight_decay=0.0, foreach=False)
    with backend.force(impl):
        for _ in range(20):
            g = torch.full((50_000,), 1.0)
            for p, o in ((sr, osr), (rn, orn), (ref, oref)):
                p.grad = g.to(p.dtype)
                o.step()
    assert "master_param" not in osr.state[sr]
    target = ref.mean().item()  # 1 - 20 * 2e-4
    assert abs(sr.float().mean().item() - target) < 2e-4  # unbiased on average
    assert abs(rn.float().mean().item() - target) > 2e-3  # round-to-nearest lost every update


def test_bad_input_errors_name_the_argument():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        AdamW([p], eps=-1e-8)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        AdamW([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        AdamW([p], betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW([p], weight_decay=-0.1)
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="master_weights"):
        AdamW([p], master_weights="yes")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        AdamW([p], master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="params: complex"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="params: sparse"):
        AdamW([torch.randn(4, 4).to_sparse().requires_grad_()])
    with pytest.raises(ValueError, match=r"betas\[0\]"):  # per-group hyper-parameters are checked too
        AdamW([{"params": [p], "betas": (1.5, 0.9)}])
    q = torch.nn.Parameter(torch.randn(4, 4))
    opt = AdamW([q])
    q.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@needs_native
def test_state_dict_round_trip_with_torch():
    model = _small_model()
    x = torch.randn(32, 17)

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()

    # torch -> turbotune -> torch, compared with an uninterrupted torch run
    ref_m = copy.deepcopy(model)
    ref_o = torch.optim.AdamW(ref_m.parameters(), lr=1e-2, foreach=False, amsgrad=True)
    train(ref_m, ref_o, 9)

    m = copy.deepcopy(model)
    t1 = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False, amsgrad=True)
    train(m, t1, 3)
    ours = AdamW(m.parameters(), lr=1e-2, amsgrad=True, master_weights=False)
    ours.load_state_dict(t1.state_dict())
    train(m, ours, 3)
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    t2 = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False, amsgrad=True)
    t2.load_state_dict(sd)
    train(m, t2, 3)
    for p, q in zip(m.parameters(), ref_m.parameters()):
        assert max_rel(p, q) <= 1e-5
    assert float(t2.state[next(m.parameters())]["step"]) == 9


@needs_native
def test_state_dict_keeps_fp32_master_and_state_dtype():
    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    opt = AdamW([p], lr=1e-3, state_dtype=torch.bfloat16)
    for _ in range(3):
        p.grad = torch.randn(1000).to(torch.bfloat16)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW([q], lr=1e-3, state_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    st = opt2.state[q]
    assert st["master_param"].dtype == torch.float32
    assert torch.equal(st["master_param"], opt.state[p]["master_param"])
    assert st["exp_avg"].dtype == torch.bfloat16
    g = torch.randn(1000).to(torch.bfloat16)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@needs_native
def test_zero_grad_and_params_without_grad():
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(torch.randn(10))
    opt = AdamW([a, b], lr=0.1)
    a.grad = torch.randn(10)
    b0 = b.detach().clone()
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    opt.zero_grad()
    assert a.grad is None


def test_non_contiguous_param_uses_reference_path_correctly():
    base = torch.randn(13, 7)
    a = base.clone().t().requires_grad_()  # non-contiguous leaf
    b = base.clone().t().contiguous().requires_grad_()
    oa, ob = AdamW([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2, foreach=False)
    for _ in range(3):
        g = torch.randn(7, 13)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


SIMD_SCRIPT = r"""
import torch
from turbotune import _native
from turbotune.optim import AdamW, adamw_single_tensor
assert _native.require().adamw_cpu_simd() == "{isa}", _native.require().adamw_cpu_simd()
torch.manual_seed(0)
for dtype, sdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]:
    p = torch.randn(70001).to(dtype)
    g = torch.randn(70001).to(dtype)
    a = p.clone().requires_grad_()
    opt = AdamW([a], lr=1e-3, amsgrad=True, state_dtype=sdt)
    a.grad = g
    opt.step()
    rp, rm, rv, rvm = p.clone(), torch.zeros(70001, dtype=sdt), torch.zeros(70001, dtype=sdt), torch.zeros(70001, dtype=sdt)
    master = p.float().clone() if dtype != torch.float32 else None
    adamw_single_tensor(rp, g, rm, rv, rvm, master, 1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=1e-2, amsgrad=True, maximize=False)
    if master is not None:
        torch.testing.assert_close(opt.state[a]["master_param"], master, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.detach().float(), rp.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[a]["exp_avg_sq"].float(), rv.float(), rtol=1e-2, atol=1e-9)
print("ok")
"""


@needs_native
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_lower_simd_variants_match_reference(isa):
    """The AVX2 and generic builds of the loop (picked at run time) compute the same update."""
    import os
    import subprocess
    import sys

    feats = _native.status().cpu_features
    if isa == "avx2" and not (feats.get("avx2") and feats.get("fma")):
        pytest.skip("CPU has no AVX2/FMA")
    env = dict(os.environ, TURBOTUNE_CPU_SIMD=isa)
    out = subprocess.run([sys.executable, "-c", SIMD_SCRIPT.replace("{isa}", isa)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
