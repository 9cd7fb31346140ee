"""Fused bias + GELU: the Triton kernels (interpreted on CPU, compiled on GPU)
against an fp64 PyTorch reference, forward and every gradient; the CPU default
path against stock ``F.gelu``."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from turbotune import backend
from turbotune.ops import _rows, bias_gelu, bias_gelu_ref
from turbotune.testing import DTYPE_PARAMS, assert_close

gelu_mod = importlib.import_module("turbotune.ops.gelu")
APPROX = ["none", "tanh"]


def _inputs(shape, dtype, device, with_bias=True, bias_dtype=None):
    n = shape[-1]
    x = (torch.randn(shape, device=device) * 2).to(dtype).requires_grad_()
    b = torch.randn(n, device=device).to(bias_dtype or dtype).requires_grad_() if with_bias else None
    return x, b


def _check_case(shape, dtype, atol, rtol, device, approximate, with_bias=True, bias_dtype=None):
    x, b = _inputs(shape, dtype, device, with_bias, bias_dtype)
    y = bias_gelu(x, b, approximate)
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if with_bias else None
    y64 = F.gelu(x64 + b64 if with_bias else x64, approximate=approximate)
    assert_close(y, y64, atol=atol, rtol=rtol, name="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close(x.grad, x64.grad, atol=atol * 2, rtol=rtol * 2, name="dx")
    if with_bias:
        rows = x.numel() // shape[-1]
        assert b.grad.dtype == b.dtype
        assert_close(b.grad, b64.grad, atol=atol * 2 * max(1.0, rows ** 0.5), rtol=rtol * 2, name="dbias")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("shape", [(5, 1), (3, 7), (2, 3, 383), (17, 1000), (4, 3072)])
@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu(triton_backend, device, dtype, atol, rtol, shape, approximate):
    _check_case(shape, dtype, atol, rtol, device, approximate)


@pytest.mark.parametrize("approximate", APPROX)
def test_no_bias(triton_backend, device, approximate):
    _check_case((6, 130), torch.float32, 1e-5, 1e-5, device, approximate, with_bias=False)


def test_mixed_dtypes(triton_backend, device):
    """bf16 activations with an fp32 bias (the autocast layout): dbias stays fp32."""
    _check_case((9, 200), torch.bfloat16, 2e-2, 2e-2, device, "none", bias_dtype=torch.float32)


@pytest.mark.parametrize("rows, n, several_splits", [(301, 96, True), (70, 700, False)])
def test_many_rows(triton_backend, device, rows, n, several_splits):
    """More row tiles than programs: each backward program loops over several
    tiles (the last one partial); the partial bias sums of several row splits
    are reduced after (or, with one split, stored as dbias directly)."""
    bm, bn = gelu_mod._bwd_blocks(rows, n)
    splits, per = _rows.row_splits(rows, bm, -(-n // bn), device)
    if device.type == "cpu":
        assert per > 1 and rows % bm != 0 and (splits > 1) == several_splits
    _check_case((rows, n), torch.float32, 1e-5, 1e-5, device, "none")


def test_strided_rows_and_expanded_grad(triton_backend, device):
    """A row-strided view (a slice of a wider matrix) runs without a copy; the
    stride-0 gradient of ``y.sum()`` is handled."""
    big = torch.randn(11, 80, device=device)
    x = big[:, 5:69].detach().requires_grad_()
    assert not x.is_contiguous()
    b = torch.randn(64, device=device, requires_grad=True)
    y = bias_gelu(x, b)
    y.sum().backward()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    F.gelu(x64 + b64).sum().backward()
    assert_close(y, F.gelu(x64 + b64), name="y")
    assert_close(x.grad, x64.grad, name="dx")
    assert_close(b.grad, b64.grad, atol=1e-4, name="dbias")


def test_only_bias_requires_grad(triton_backend, device):
    x = torch.randn(4, 33, device=device)
    b = torch.randn(33, device=device, requires_grad=True)
    bias_gelu(x, b).sum().backward()
    b64 = b.detach().double().requires_grad_()
    F.gelu(x.double() + b64).sum().backward()
    assert_close(b.grad, b64.grad, atol=1e-5, name="dbias")


def _assert_every_element_written(device):
    x, b = _inputs((45, 300), torch.float32, device)
    with _rows.poisoned_outputs() as buffers:
        y = bias_gelu(x, b)
        y.backward(torch.randn_like(y))
    assert len(buffers) >= 3, f"only {len(buffers)} buffers came from the poisoned allocator"
    for name, t in dict(y=y, dx=x.grad, dbias=b.grad).items():
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_every_output_element_written(triton_backend, device):
    _assert_every_element_written(device)


@pytest.mark.parametrize("kernel", ["_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"])
def test_poisoned_output_check_catches_a_skipped_row(triton_backend, device, monkeypatch, kernel):
    """The check above can fail: with a kernel told there is one row fewer, it does."""
    real = getattr(gelu_mod, kernel)
    m_arg = 3 if kernel == "_bias_gelu_fwd_kernel" else 5

    class SkipLastRow:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                args = list(args)
                args[m_arg] -= 1  # M
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(gelu_mod, kernel, SkipLastRow())
    with pytest.raises(AssertionError, match="unwritten"):
        _assert_every_element_written(device)


def test_empty_batch(triton_backend, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = bias_gelu(x, b)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(b.grad, torch.zeros(16, device=device))


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(triton_backend, device, approximate, with_bias):
    x = torch.randn(3, 5, 40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.turbotune.bias_gelu, (x, b, approximate))
    torch.library.opcheck(
        torch.ops.turbotune.bias_gelu_backward,
        (torch.randn_like(x), x.detach(), b.detach() if with_bias else None, approximate, with_bias),
    )


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
def test_dispatcher_path_matches_eager_path(triton_backend, device, dtype, atol, rtol):
    """torch.ops.turbotune.bias_gelu (what torch.compile sees) and the eager
    autograd.Function give the same outputs and gradients, bit for bit."""
    x, b = _inputs((4, 3, 200), dtype, device)
    y1 = bias_gelu(x, b, "tanh")
    y1.float().square().sum().backward()
    g1 = [x.grad.clone(), b.grad.clone()]
    x.grad = b.grad = None
    y2 = torch.ops.turbotune.bias_gelu(x, b, "tanh")
    y2.float().square().sum().backward()
    assert torch.equal(y1, y2)
    assert torch.equal(x.grad, g1[0]) and torch.equal(b.grad, g1[1])


def test_inference_path_without_autograd(triton_backend, device):
    x, b = _inputs((3, 77), torch.float16, device)
    with torch.no_grad():
        y = bias_gelu(x, b)
    assert y.grad_fn is None
    assert_close(y, F.gelu(x.double() + b.double()), name="y (no_grad)")


# ----------------------------------------------------------------------------- the CPU default path


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("regime", ["small", "large"])
def test_cpu_default_is_stock_gelu(monkeypatch, approximate, with_bias, regime):
    """On CPU (no backend forced) fp32 computes what ``F.gelu(x + b)`` computes:
    the same values and dx bit for bit, dbias up to summation order, in both
    regimes (the large one forced by a zero threshold)."""
    if regime == "large":
        monkeypatch.setattr(gelu_mod, "CPU_INPLACE_MIN_BYTES", 0)
    x = torch.randn(7, 3, 50, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if with_bias else None
    y = bias_gelu(x, b, approximate)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if with_bias else None
    y2 = F.gelu(x2 + b2 if with_bias else x2, approximate=approximate)
    y2.backward(dy)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    if with_bias:
        assert_close(b.grad, b2.grad, atol=1e-5, rtol=1e-6, name="dbias")
    with torch.no_grad():
        assert torch.equal(bias_gelu(x, b, approximate), y2)


def _big_allocations(fn, nbytes):
    """How many buffers of at least ``nbytes`` ``fn`` allocates (torch profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= nbytes)


def test_cpu_training_allocates_no_more_than_stock(monkeypatch):
    """BERT's intermediate block on CPU, for tensors in the large regime:
    ``bias_gelu(F.linear(h, W), b)`` forward + backward allocates no more
    full-size buffers than stock ``F.gelu(F.linear(h, W, b))`` (a fresh
    buffer of that size costs page faults); the count does catch the plain
    ``F.gelu(x + b)`` composition (which the small regime uses)."""
    monkeypatch.setattr(gelu_mod, "CPU_INPLACE_MIN_BYTES", 0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(96, 32, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    dy = torch.randn(64, 96)
    size = 64 * 96 * 4

    def run(f):
        return _big_allocations(lambda: torch.autograd.grad(f(), (h, w, b), dy), size)

    stock = run(lambda: F.gelu(F.linear(h, w, b)))
    assert run(lambda: bias_gelu(F.linear(h, w), b)) <= stock
    assert run(lambda: F.gelu(F.linear(h, w) + b)) > stock


@pytest.mark.parametrize("forced", [None, backend.TRITON])
def test_linear_gelu(device, forced):
    h = torch.randn(2, 5, 24, device=device, requires_grad=True)
    w = torch.randn(40, 24, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    with backend.force(forced):
        y = gelu_mod.linear_gelu(h, w, b)
        y.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    y64 = F.gelu(F.linear(*leaves))
    y64.square().sum().backward()
    assert_close(y, y64, atol=1e-5, name="y")
    for name, t, t64 in zip(("dh", "dW", "db"), (h, w, b), leaves):
        assert_close(t.grad, t64.grad, atol=1e-4, rtol=1e-5, name=name)
    with pytest.raises(ValueError, match="does not match weight"):
        gelu_mod.linear_gelu(h, w.t(), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_default_half_computes_in_fp32(dtype):
    x = torch.randn(5, 64).to(dtype).requires_grad_()
    b = torch.randn(64).to(dtype).requires_grad_()
    y = bias_gelu(x, b)
    assert y.dtype == dtype
    assert_close(y, F.gelu(x.double() + b.double()), name="y")


@pytest.mark.parametrize("forced", [None, backend.TRITON])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("threshold", [None, 0])
def test_fp64_gradcheck(device, monkeypatch, forced, approximate, threshold):
    """fp64 runs in fp64 math whatever is forced (and through the op's own
    backward when the large-tensor path is forced): gradcheck passes for x and bias."""
    if threshold is not None:
        monkeypatch.setattr(gelu_mod, "CPU_INPLACE_MIN_BYTES", threshold)
    x = torch.randn(3, 2, 9, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, device=device, dtype=torch.float64, requires_grad=True)
    with backend.force(forced):
        assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate), (x, b))


def test_torch_compile_reference_path():
    torch._dynamo.reset()
    x, b = torch.randn(4, 33), torch.randn(33)
    with backend.force(backend.REFERENCE):
        fn = torch.compile(lambda x: bias_gelu(x, b), fullgraph=True, backend="aot_eager")
        assert_close(fn(x), F.gelu(x + b), name="compiled y")


def test_reference_contract():
    x, b = torch.randn(3, 10, dtype=torch.bfloat16), torch.randn(10)
    y = bias_gelu_ref(x, b, "tanh")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.gelu(x.float() + b, approximate="tanh").to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=[1.0], bias=None), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.ones(2, 3, dtype=torch.long), bias=None), TypeError, "x must be a floating"),
        (dict(x=torch.tensor(1.0), bias=None), ValueError, "shape \\(\\.\\.\\., N\\)"),
        (dict(x=torch.randn(2, 8), bias=torch.randn(7)), ValueError, "bias must have shape \\(8,\\)"),
        (dict(x=torch.randn(2, 8), bias=torch.ones(8, dtype=torch.long)), TypeError, "bias must be a floating"),
        (dict(x=torch.randn(2, 8), bias=[0.0] * 8), TypeError, "bias must be a torch.Tensor"),
        (dict(x=torch.randn(2, 8), bias=None, approximate="erf"), ValueError, "approximate must be"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        bias_gelu(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton path with inductor on a GPU")
def test_torch_compile_triton_gpu(triton_backend):
    torch._dynamo.reset()
    x = torch.randn(64, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3072, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda x: bias_gelu(x, b).float().square().sum(), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    assert_close(loss, F.gelu(x.float() + b).square().sum(), atol=1.0, rtol=1e-2, name="compiled loss")
