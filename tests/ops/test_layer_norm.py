"""Fused residual-add + LayerNorm: Triton kernels (interpreted on CPU, compiled on
GPU) against an fp64 PyTorch reference, forward and every gradient."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import turbotune
from turbotune import backend
from turbotune.ops import _rows
from turbotune.ops.layer_norm import layer_norm, layer_norm_ref
from turbotune.testing import DTYPE_PARAMS, assert_close

ln_mod = importlib.import_module("turbotune.ops.layer_norm")  # the module (turbotune.ops.layer_norm is the function)

HIDDEN = [1, 7, 383, 768, 1000, 1024, 4096]


def _reference(x, w, b, eps, r):
    """fp64 autograd through torch's own LayerNorm."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    b64 = b.detach().double().requires_grad_() if b is not None else None
    r64 = r.detach().double().requires_grad_() if r is not None else None
    s = x64 + r64 if r is not None else x64
    y = F.layer_norm(s, (x.shape[-1],), w64, b64, eps)
    return y, s, (x64, w64, b64, r64)


def _inputs(shape, dtype, device, residual, affine=True, wdtype=None):
    n = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    wdtype = wdtype or dtype
    w = (torch.rand(n, device=device) + 0.5).to(wdtype).requires_grad_() if affine else None
    b = torch.randn(n, device=device).to(wdtype).requires_grad_() if affine else None
    r = torch.randn(shape, device=device).to(dtype).requires_grad_() if residual else None
    return x, w, b, r


def _check_case(shape, dtype, atol, rtol, device, residual, affine=True, wdtype=None):
    x, w, b, r = _inputs(shape, dtype, device, residual, affine, wdtype)
    eps = 1e-5
    out = layer_norm(x, w, b, eps, residual=r)
    y, s = out if residual else (out, None)
    y_ref, s_ref, leaves = _reference(x, w, b, eps, r)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, atol=atol, rtol=rtol, name="y")
    if residual:
        assert_close(s, s_ref, atol=atol, rtol=rtol, name="x + residual")
    dy = torch.randn_like(y)
    ds = torch.randn_like(s) if residual else None
    loss = (y.float() * dy.float()).sum() + ((s.float() * ds.float()).sum() if residual else 0)
    loss.backward()
    loss_ref = (y_ref * dy.double()).sum() + ((s_ref * ds.double()).sum() if residual else 0)
    loss_ref.backward()
    x64, w64, b64, r64 = leaves
    # gradients of weight/bias sum over every row: scale the tolerance with sqrt(rows).
    rows = x.numel() // x.shape[-1]
    g_atol = atol * 4
    assert_close(x.grad, x64.grad, atol=g_atol, rtol=rtol * 2, name="dx")
    if residual:
        assert_close(r.grad, r64.grad, atol=g_atol, rtol=rtol * 2, name="dresidual")
    if affine:
        red_atol = g_atol * max(1.0, rows ** 0.5)
        assert_close(w.grad, w64.grad, atol=red_atol, rtol=rtol * 2, name="dweight")
        assert_close(b.grad, b64.grad, atol=red_atol, rtol=rtol * 2, name="dbias")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_2d(triton_backend, device, dtype, atol, rtol, n, residual):
    _check_case((5, n), dtype, atol, rtol, device, residual)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("n", [7, 768, 1000])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_3d(triton_backend, device, dtype, atol, rtol, n, residual):
    _check_case((2, 3, n), dtype, atol, rtol, device, residual)


@pytest.mark.parametrize("rows, n", [(150, 129), (37, 1000), (301, 48)])
def test_layer_norm_many_rows(triton_backend, device, rows, n):
    """More row tiles than persistent backward programs (each program loops over
    several 2-D tiles, the last one partial), then one launch reduces dw and db."""
    block_m, _, programs, per = ln_mod._bwd_plan(rows, n, device)
    if device.type == "cpu":
        assert per > 1 and rows % block_m != 0, "the shape must make programs loop over a partial last tile"
    _check_case((rows, n), torch.float32, 1e-5, 1e-5, device, residual=True)


@pytest.mark.parametrize("block_m, per_sm", [(1, 1), (2, 3), (8, 2)])
def test_backward_launch_plans(triton_backend, device, block_m, per_sm):
    """Every backward tiling the GPU sweep may pick gives the reference gradients."""
    x, w, b, r = _inputs((13, 200), torch.float32, device, residual=True)
    y, s, mean, rstd = torch.ops.turbotune.layer_norm(x, w, b, r, 1e-5)
    dy, dres = torch.randn_like(y), torch.randn_like(y)
    want = ln_mod.layer_norm_backward_ref(dy, dres, s, w, mean, rstd, True)
    got = ln_mod._backward_triton(dy, dres, s, w.detach(), mean, rstd, True, block_m=block_m, per_sm=per_sm)
    for name, g, e in zip(("dx", "dw", "db"), got, want):
        assert_close(g, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("forced", [None, backend.TRITON])
def test_fp64_gradcheck(device, forced, residual):
    """fp64 runs the reference in fp64 math (never the fp32 kernels), so
    gradcheck passes for x, weight, bias and residual, whichever backend is forced."""
    torch.manual_seed(3)
    shape = (2, 3, 9)
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, device=device, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(9, device=device, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True) if residual else None
    with backend.force(forced):
        y = layer_norm(x, w, b, 1e-5, residual=r)
        y = y[0] if residual else y
        assert y.dtype == torch.float64
        assert_close(y, F.layer_norm(x + r if residual else x, (9,), w, b, 1e-5), atol=1e-12, rtol=1e-12, name="y")
        inputs = (x, w, b, r) if residual else (x, w, b)
        assert torch.autograd.gradcheck(lambda *t: layer_norm(t[0], t[1], t[2], 1e-5, *t[3:]), inputs)


def test_layer_norm_no_affine(triton_backend, device):
    _check_case((3, 5, 65), torch.float32, 1e-5, 1e-5, device, residual=True, affine=False)


def test_layer_norm_mixed_dtypes(triton_backend, device):
    """bf16 activations with fp32 parameters (the autocast layout)."""
    _check_case((4, 300), torch.bfloat16, 2e-2, 2e-2, device, residual=True, wdtype=torch.float32)


def test_layer_norm_fp32_residual_stream(triton_backend, device):
    x = torch.randn(3, 96, device=device, dtype=torch.bfloat16)
    r = torch.randn(3, 96, device=device, dtype=torch.float32)
    w, b = torch.ones(96, device=device), torch.zeros(96, device=device)
    y, s = layer_norm(x, w, b, residual=r)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(s, x.float() + r, atol=0, rtol=0, name="s")


def test_reference_matches_torch(device):
    """The reference itself (used on CPU by default) agrees with torch in fp64."""
    with backend.force(backend.REFERENCE):
        _check_case((6, 300), torch.float32, 1e-5, 1e-5, device, residual=True)


def _assert_every_element_written(device, shape=(21, 383)):
    """Forward + backward through the public function with every kernel output
    buffer (y, s, mean, rstd, dx, the partial sums, dw, db) handed out NaN-filled."""
    x, w, b, r = _inputs(shape, torch.float32, device, residual=True)
    with _rows.poisoned_outputs() as buffers:
        y, s = layer_norm(x, w, b, residual=r)
        (y * torch.randn_like(y) + s).sum().backward()
    assert len(buffers) >= 8, f"only {len(buffers)} buffers came from the poisoned allocator"
    for name, t in dict(y=y, s=s, dx=x.grad, dres=r.grad, dw=w.grad, db=b.grad).items():
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_every_output_element_written(triton_backend, device):
    _assert_every_element_written(device)


class _SkipLastRow:
    """A deliberately broken launch: the forward grid misses the last row, or the
    backward is told there is one row fewer."""

    def __init__(self, kernel, backward):
        self.kernel, self.backward = kernel, backward

    def __getitem__(self, grid):
        launch = self.kernel[grid if self.backward else (grid[0] - 1,)]
        if not self.backward:
            return launch

        def launch_short(*args, **kw):
            args = list(args)
            args[12] -= 1  # M
            return launch(*args, **kw)

        return launch_short


@pytest.mark.parametrize("kernel", ["_ln_fwd_kernel", "_ln_bwd_kernel"])
def test_poisoned_output_check_catches_a_skipped_row(triton_backend, device, monkeypatch, kernel):
    """The check above can fail: with a kernel that skips the last row it does."""
    monkeypatch.setattr(ln_mod, kernel, _SkipLastRow(getattr(ln_mod, kernel), backward=kernel == "_ln_bwd_kernel"))
    with pytest.raises(AssertionError, match="unwritten"):
        _assert_every_element_written(device)


def test_empty_batch(triton_backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y = layer_norm(x, w, None)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64, device=device))


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(triton_backend, device, residual):
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    r = torch.randn(3, 5, 40, device=device, requires_grad=True) if residual else None
    torch.library.opcheck(torch.ops.turbotune.layer_norm, (x, w, b, r, 1e-5))
    y, s, mean, rstd = torch.ops.turbotune.layer_norm(x, w, b, r, 1e-5)
    dres = torch.randn_like(x) if residual else None
    torch.library.opcheck(
        torch.ops.turbotune.layer_norm_backward,
        (torch.randn_like(x), dres, (s if residual else x).detach(), w.detach(), mean, rstd, True),
    )


def test_torch_compile_reference_path():
    """The op is visible to torch.compile (no graph break) through the reference path."""
    torch._dynamo.reset()
    x = torch.randn(4, 33)
    w, b = torch.rand(33) + 0.5, torch.randn(33)
    with backend.force(backend.REFERENCE):
        fn = torch.compile(lambda x: layer_norm(x, w, b), fullgraph=True, backend="aot_eager")
        assert_close(fn(x), F.layer_norm(x, (33,), w, b), name="compiled y")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=torch.randn(2, 8), weight=torch.ones(7), bias=None), ValueError, "weight must have shape \\(8,\\)"),
        (dict(x=torch.randn(2, 8), weight=None, bias=torch.ones(2, 8)), ValueError, "bias must have shape"),
        (dict(x=torch.randn(2, 8), weight=None, bias=None, residual=torch.randn(2, 7)), ValueError, "residual must have"),
        (dict(x=torch.ones(2, 8, dtype=torch.long), weight=None, bias=None), TypeError, "floating"),
        (dict(x=torch.randn(2, 0), weight=None, bias=None), ValueError, "N >= 1"),
        (dict(x=torch.randn(2, 8), weight=None, bias=None, eps=-1.0), ValueError, "eps"),
        (dict(x=[1.0, 2.0], weight=None, bias=None), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        layer_norm(**kwargs)


def test_reference_contract():
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    w, b = torch.rand(16), torch.randn(16)
    y, s = layer_norm_ref(x, w, b, 1e-5, residual=r)
    assert_close(y, F.layer_norm(x + r, (16,), w, b), name="y")
    assert_close(s, x + r, name="s")


# ----------------------------------------------------------------------------- nn.LayerNorm


def test_nn_layer_norm_drop_in(triton_backend, device):
    ref = torch.nn.LayerNorm(100, eps=1e-6).to(device)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    mod = turbotune.nn.LayerNorm(100, eps=1e-6).to(device)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 4, 100, device=device)
    assert_close(mod(x), ref(x), name="LayerNorm(x)")
    r = torch.randn_like(x)
    y, s = mod(x, r)
    assert_close(y, ref(x + r), name="LayerNorm(x, residual)")


def test_nn_from_torch_shares_parameters(triton_backend, device):
    ref = torch.nn.LayerNorm(48).to(device)
    mod = turbotune.nn.LayerNorm.from_torch(ref)
    assert isinstance(mod, torch.nn.LayerNorm)
    assert mod.weight is ref.weight and mod.bias is ref.bias
    x = torch.randn(5, 48, device=device, requires_grad=True)
    mod(x).square().sum().backward()
    assert ref.weight.grad is not None
    with pytest.raises(TypeError, match="torch.nn.LayerNorm"):
        turbotune.nn.LayerNorm.from_torch(torch.nn.Linear(2, 2))


def test_nn_multi_dim_normalized_shape_falls_back(device):
    ref = torch.nn.LayerNorm((4, 6)).to(device)
    mod = turbotune.nn.LayerNorm((4, 6)).to(device)
    x = torch.randn(2, 4, 6, device=device)
    assert_close(mod(x), ref(x), name="2-D normalized_shape")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton path with inductor on a GPU")
def test_torch_compile_triton_gpu(triton_backend):
    torch._dynamo.reset()
    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.rand(768, device="cuda", requires_grad=True)
    b = torch.randn(768, device="cuda", requires_grad=True)

    def block(x, r):
        y, s = layer_norm(x, w, b, residual=r)
        return (y.float() * 2).sum() + s.float().sum()

    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(x, r)
    loss.backward()
    ref = block(x.detach().requires_grad_(), r.detach().requires_grad_())
    assert_close(loss, ref, atol=1e-1, rtol=1e-2, name="compiled loss")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
def test_dispatcher_path_matches_eager_path(triton_backend, device, dtype, atol, rtol):
    """torch.ops.turbotune.layer_norm (what torch.compile sees) and the eager
    autograd.Function give the same outputs and gradients."""
    x, w, b, r = _inputs((4, 3, 200), dtype, device, residual=True)
    y1, s1 = layer_norm(x, w, b, 1e-5, residual=r)
    (y1.float().square().sum() + s1.float().sum()).backward()
    g1 = [t.grad.clone() for t in (x, w, b, r)]
    for t in (x, w, b, r):
        t.grad = None
    y2, s2, mean, rstd = torch.ops.turbotune.layer_norm(x, w, b, r, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (4, 3)
    (y2.float().square().sum() + s2.float().sum()).backward()
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    for name, a, t in zip("xwbr", g1, (x, w, b, r)):
        assert_close(t.grad, a, atol=0, rtol=0, name=f"d{name}")


def test_inference_path_without_autograd(triton_backend, device):
    x, w, b, r = _inputs((3, 77), torch.float16, device, residual=True)
    with torch.no_grad():
        y, s = layer_norm(x, w, b, residual=r)
    assert y.grad_fn is None
    y_ref, s_ref, _ = _reference(x, w, b, 1e-5, r)
    assert_close(y, y_ref, name="y (no_grad)")
