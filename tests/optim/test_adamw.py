"""turbotune.optim.AdamW against torch.optim.AdamW and the single-tensor reference."""
import copy

import pytest
import torch

from turbotune import _native, backend
from turbotune.optim import AdamW, adamw_single_tensor, stochastic_round_to_bf16

from adamw_oracle import assert_within_ulps, exact_sr_case, oracle_adamw, sr_bits_expected


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
def test_step_matches_fp64_oracle(impl, dtype, master_weights, state_dtype, amsgrad):
    """Both paths (native kernel, readable reference) against an independent fp64 oracle, odd sizes.

    The oracle (tests/optim/adamw_oracle.py) rounds only where the optimizer stores a value; the
    tolerances are in units of the stored dtype's spacing (ulp): 16 fp32 ulps for fp32 values; two
    ulps of the 16-bit dtype where a value is stored in one (a rounding that lands on the other side of
    a tie flips one ulp), plus a small ``atol`` for values that cancel. With bf16 moments a flipped
    moment changes later updates by up to ~3 x 2^-9 of a step per step, hence 2^-5 lr over 4 steps.
    The native kernel is also compared with the single-tensor reference (same operation order).
    """
    if impl == "native" and not NATIVE_CPU:
        pytest.skip("native extension not built")
    shapes = [(1,), (7, 13), (4099,), (70001,)]  # 70001 spans several parallel chunks
    master = dtype != torch.float32 and master_weights == "auto"
    hyper = dict(lr=3e-3, beta1=0.85, beta2=0.98, eps=1e-7, weight_decay=0.05)
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in range(4)]
    p_k = [p.clone().requires_grad_() for p in params]
    opt = AdamW(p_k, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                weight_decay=hyper["weight_decay"], amsgrad=amsgrad, state_dtype=state_dtype,
                master_weights=master_weights)
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
                                    float(step), amsgrad=amsgrad, maximize=False, **hyper)
    bf16_moments = state_dtype == torch.bfloat16
    for i, p in enumerate(p_k):
        st = opt.state[p]
        assert st["exp_avg"].dtype == state_dtype
        assert ("master_param" in st) == master
        o_param, o_master, o_m, o_v = oracle_adamw(params[i], [gs[i] for gs in grads], amsgrad=amsgrad,
                                                   state_dtype=state_dtype, master=master, **hyper)
        # absolute slack for values that cancel (p - update, beta1 * m + (1 - beta1) * g): relative to the terms
        step_atol = (2.0**-5 if bf16_moments else 2.0**-18) * hyper["lr"]
        g_max = max(float(gs[i].float().abs().max()) for gs in grads)
        moment_atol = (2.0**-7 if bf16_moments else 2.0**-20) * g_max
        if master:
            assert st["master_param"].dtype == torch.float32
            assert_within_ulps(st["master_param"], o_master, torch.float32, 16, f"master[{i}]", atol=step_atol)
            assert torch.equal(p.detach(), st["master_param"].to(dtype)), "param must be the rounded master"
        pn = 16 if dtype == torch.float32 else 2
        assert_within_ulps(p.detach(), o_param, dtype, pn, f"param[{i}]", atol=step_atol)
        sn = 2 if bf16_moments else 16
        assert_within_ulps(st["exp_avg"], o_m, state_dtype, sn, f"exp_avg[{i}]", atol=moment_atol)
        assert_within_ulps(st["exp_avg_sq"], o_v, state_dtype, sn, f"exp_avg_sq[{i}]", atol=moment_atol * g_max)
        if impl == "native":  # same operation order as the single-tensor reference: much closer than the oracle
            if master:
                torch.testing.assert_close(st["master_param"], ref_master[i], rtol=2e-6, atol=1e-6)
            tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(
                rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-5)
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
# the gradient norm pass: the same bits for every SIMD variant (lanes fixed in the source)
g = torch.randn(70001 * 3 + 5, generator=torch.Generator().manual_seed(1))
for code, dt in ((0, torch.float32), (2, torch.bfloat16)):
    x = g.to(dt)
    got = _native.require().sum_squares_cpu([x.data_ptr()], [x.numel()], code)
    assert got.hex() == {"f32": "{sumsq_f32}", "bf16": "{sumsq_bf16}"}[{0: "f32", 2: "bf16"}[code]], got.hex()
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
    g = torch.randn(70001 * 3 + 5, generator=torch.Generator().manual_seed(1))
    C = _native.require()
    sums = {name: C.sum_squares_cpu([x.data_ptr()], [x.numel()], code).hex()
            for name, code, x in (("f32", 0, g), ("bf16", 2, g.to(torch.bfloat16)))}
    script = SIMD_SCRIPT.replace("{isa}", isa).replace("{sumsq_f32}", sums["f32"]).replace("{sumsq_bf16}", sums["bf16"])
    env = dict(os.environ, TURBOTUNE_CPU_SIMD=isa)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------- zero-element params (issue 8, item 1)


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_zero_element_params_step_and_state_dict_like_torch(impl, amsgrad):
    if impl == "native" and not NATIVE_CPU:
        pytest.skip("native extension not built")
    shapes = [(5, 3), (0,), (4, 0), (70001,), (0, 7)]
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    oa = AdamW(ours, lr=1e-2, amsgrad=amsgrad)
    ob = torch.optim.AdamW(ref, lr=1e-2, amsgrad=amsgrad, foreach=False)
    with backend.force(impl):
        for _ in range(3):
            for p, q in zip(ours, ref):
                g = torch.randn(p.shape)
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys() == set(range(len(shapes)))
    for k in sb["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys(), k
        for name, t in sb["state"][k].items():
            assert sa["state"][k][name].shape == t.shape, (k, name)
        assert float(sa["state"][k]["step"]) == float(sb["state"][k]["step"]) == 3
    torch.optim.AdamW(ref, lr=1e-2, amsgrad=amsgrad).load_state_dict(sa)  # loads into torch as is


@needs_native
def test_zero_element_params_with_master_weights_and_bf16_state():
    ps = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(0,), (33,), (2, 0)]]
    opt = AdamW(ps, lr=1e-3, state_dtype=torch.bfloat16)
    for p in ps:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    opt.step()
    for p in ps:
        st = opt.state[p]
        assert st["master_param"].shape == st["exp_avg"].shape == p.shape
        assert float(st["step"]) == 1


# ---------------------------------------------------------------- mismatched state (issue 8, item 2)


def _trained_state(n, **kw):
    p = torch.nn.Parameter(torch.randn(n))
    opt = AdamW([p], lr=1e-3, **kw)
    p.grad = torch.randn(n)
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_of_another_model_raises_value_error_and_changes_nothing(amsgrad):
    sd = _trained_state(1000, amsgrad=amsgrad)
    big = torch.nn.Parameter(torch.randn(100_000))
    opt = AdamW([big], lr=1e-3, amsgrad=amsgrad)
    big.grad = torch.randn(100_000)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 0.*\(1000,\).*\(100000,\)"):
        opt.load_state_dict(sd)
    after = opt.state_dict()  # nothing half-loaded
    for name in before["state"][0]:
        assert torch.equal(torch.as_tensor(after["state"][0][name]), torch.as_tensor(before["state"][0][name]))
    opt.step()  # still usable


def test_torch_state_dict_with_wrong_shapes_names_the_parameter_index():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(7))
    t = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(8))])
    for p in t.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape)
    t.step()
    opt = AdamW([a, b])
    with pytest.raises(ValueError, match=r"parameter 1: 'exp_avg' has shape \(8,\).*shape \(7,\)"):
        opt.load_state_dict(t.state_dict())


def test_non_floating_state_raises_value_error():
    sd = _trained_state(10)
    sd["state"][0]["exp_avg_sq"] = torch.zeros(10, dtype=torch.int64)
    opt = AdamW([torch.nn.Parameter(torch.randn(10))])
    with pytest.raises(ValueError, match=r"parameter 0: 'exp_avg_sq' must be a floating-point tensor"):
        opt.load_state_dict(sd)


BAD_STATE_SCRIPT = r"""
import torch
from turbotune.optim import AdamW
results = []
def probe(label, mutate, **kw):
    p = torch.nn.Parameter(torch.randn(100_000))
    q = torch.nn.Parameter(torch.randn(3))
    opt = AdamW([q, p], lr=1e-3, **kw)
    for t in (p, q):
        t.grad = torch.randn(t.shape)
    opt.step()
    mutate(opt.state[p])
    try:
        opt.step()
        results.append(f"{label}: no error")
    except ValueError as exc:
        results.append(f"{label}: ValueError: {exc}")
probe("exp_avg", lambda st: st.__setitem__("exp_avg", torch.zeros(1000)))
probe("exp_avg_sq", lambda st: st.__setitem__("exp_avg_sq", torch.zeros(10, 10)))
probe("max_exp_avg_sq", lambda st: st.__setitem__("max_exp_avg_sq", torch.zeros(5)), amsgrad=True)
probe("step", lambda st: st.__setitem__("step", torch.zeros(3)))
print("\n".join(results))
"""


@needs_native
def test_state_replaced_after_first_step_is_checked_before_the_kernel_runs():
    """A wrong-sized state tensor put into the state after the first step: ValueError, never a crash.

    Run in a subprocess, so that a regression (the kernel reading out of bounds) fails this test
    instead of killing the test run.
    """
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BAD_STATE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"the process died (rc {out.returncode}): {out.stderr[-2000:]}"
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout
    for line, (name, shape) in zip(lines, [("exp_avg", "(1000,)"), ("exp_avg_sq", "(10, 10)"),
                                          ("max_exp_avg_sq", "(5,)")]):
        assert line.startswith(f"{name}: ValueError: optimizer state of parameter 1: '{name}' has shape {shape}"), line
        assert "(100000,)" in line, line
    assert lines[3].startswith("step: ValueError: optimizer state of parameter 1: 'step' must be"), lines[3]


@needs_native
def test_master_copy_replaced_with_wrong_shape_raises_value_error():
    p = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))
    opt = AdamW([p])
    p.grad = torch.randn(100).to(torch.bfloat16)
    opt.step()
    opt.state[p]["master_param"] = torch.zeros(10)
    with pytest.raises(ValueError, match=r"parameter 0: 'master_param' has shape \(10,\)"):
        opt.step()


@needs_native
def test_master_copy_is_prepared_like_the_moments():
    """state["master_param"] in another dtype or layout (e.g. restored by hand, or on another device after
    model.to(...)) is converted to an fp32 copy in the param's layout on its device before the kernel reads it,
    exactly as the moments are. (The device move itself is tested on a GPU in test_adamw_cuda.py.)"""
    torch.manual_seed(5)
    init = torch.randn(64, 48).to(torch.bfloat16)
    a = torch.nn.Parameter(init.clone())
    b = torch.nn.Parameter(init.clone())
    oa, ob = AdamW([a], lr=1e-2), AdamW([b], lr=1e-2)
    for step in range(4):
        g = torch.randn(64, 48).to(torch.bfloat16)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if step == 1:
            m = oa.state[a]["master_param"]
            oa.state[a]["master_param"] = m.double()  # another dtype
            oa.state[a]["exp_avg"] = oa.state[a]["exp_avg"].t().contiguous().t()  # another layout
        if step == 2:
            m = oa.state[a]["master_param"]
            oa.state[a]["master_param"] = m.t().contiguous().t()  # same values, non-contiguous
    assert torch.equal(oa.state[a]["master_param"], ob.state[b]["master_param"])
    assert oa.state[a]["master_param"].dtype == torch.float32 and oa.state[a]["master_param"].is_contiguous()
    assert torch.equal(a, b)


# ---------------------------------------------------------------- amsgrad NaN (issue 8, CUDA path review)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_amsgrad_keeps_nan_of_either_side_like_torch(impl):
    """torch.maximum propagates a NaN from either operand; so must the kernels (a NaN in max_exp_avg_sq
    from a resumed checkpoint, or a NaN gradient)."""
    if impl == "native" and not NATIVE_CPU:
        pytest.skip("native extension not built")
    n = 70001
    init = torch.randn(n)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = AdamW([a], lr=1e-2, amsgrad=True)
    ob = torch.optim.AdamW([b], lr=1e-2, amsgrad=True, foreach=False)
    g = torch.randn(n)
    a.grad, b.grad = g.clone(), g.clone()
    with backend.force(impl):
        oa.step()
        ob.step()
        bad_max = torch.tensor([3, 4096, 50000])  # NaN already in the running max
        bad_grad = torch.tensor([7, 60000])  # NaN arriving in this step's gradient
        oa.state[a]["max_exp_avg_sq"][bad_max] = float("nan")
        ob.state[b]["max_exp_avg_sq"][bad_max] = float("nan")
        g = torch.randn(n)
        g[bad_grad] = float("nan")
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for name in ("max_exp_avg_sq", "exp_avg_sq"):
        assert torch.equal(oa.state[a][name].isnan(), ob.state[b][name].isnan()), name
    assert int(oa.state[a]["max_exp_avg_sq"].isnan().sum()) == 5
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


# ---------------------------------------------------------------- stochastic rounding bits (issue 8, item 15)


@needs_native
def test_stochastic_rounding_bits_are_the_shared_definition(monkeypatch):
    """One step whose fp32 value is exact on any device (see adamw_oracle.exact_sr_case): the bf16 output bits
    must be those of turbotune::sr (csrc/cpu/adamw.h), recomputed in Python, for every tensor of the list and
    every chunk. The CUDA kernel includes the same header; test_adamw_cuda.py checks it gives the same bits."""
    seed = 0x1234_5678_9ABC_DEF
    monkeypatch.setattr(AdamW, "_seed", staticmethod(lambda group, dtype, master: seed))
    sizes = [5000, 70001, 3]
    params, grads, kwargs, new = exact_sr_case(sizes)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = AdamW(ps, **kwargs)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    for i, (p, v) in enumerate(zip(ps, new)):
        got = p.detach().view(torch.int16).to(torch.int64) & 0xFFFF
        want = sr_bits_expected(v, seed, i)
        assert torch.equal(got, want), (i, int((got != want).sum()))
    up = sum(int((p.float() > v).sum()) for p, v in zip(ps, new))
    down = sum(int((p.float() < v).sum()) for p, v in zip(ps, new))
    assert up > 100 and down > 100  # really stochastic: both directions occur


@needs_native
def test_state_and_storage_changes_between_steps_are_picked_up():
    """The per-param preparation is cached between steps (pointers, checks); replacing the param's storage
    (p.data = ...), a state tensor, or the step count must still be seen by the next step."""
    torch.manual_seed(6)
    init = torch.randn(40, 9)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa = AdamW([a], lr=1e-2, amsgrad=True)
    ob = torch.optim.AdamW([b], lr=1e-2, amsgrad=True, foreach=False)
    for it in range(6):
        g = torch.randn(40, 9)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if it == 1:
            a.data = a.data.clone()  # new storage, same values
        if it == 2:
            oa.state[a]["exp_avg"] = oa.state[a]["exp_avg"].clone()
            oa.state[a]["max_exp_avg_sq"] = oa.state[a]["max_exp_avg_sq"].clone()
        if it == 3:
            oa.state[a]["step"] = 10  # a plain number, as some checkpoints hold
            ob.state[b]["step"] = torch.tensor(10.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(oa.state[a]["step"]) == float(ob.state[b]["step"]) == 12


@needs_native
def test_work_split_does_not_change_a_bit(monkeypatch):
    """The CPU kernel's balanced work split (default) and the equal-chunk-count split
    (TURBOTUNE_CPU_SCHEDULE=chunks) give identical params, state and gradient norm."""
    from turbotune.bench.suites.optim import bert_shapes

    shapes = bert_shapes(1, 64, 256, vocab=3000, positions=128)  # big and tiny tensors, > 64K elements in all
    results = []
    for schedule in ("balanced", "chunks"):
        monkeypatch.setenv("TURBOTUNE_CPU_SCHEDULE", schedule)
        torch.manual_seed(7)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = AdamW(ps, lr=1e-3, max_grad_norm=0.5)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape)
            opt.step()
        results.append(([p.detach().clone() for p in ps], [opt.state[p]["exp_avg_sq"] for p in ps],
                        opt.last_grad_norm))
    (pa, va, na), (pb, vb, nb) = results
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    assert torch.equal(na, nb)
