"""Fused BatchNorm + activation (+ residual): the Triton kernels (interpreted on CPU,
compiled on GPU) and the ATen reference against an fp64 PyTorch reference, forward,
every gradient and the running statistics, NCHW and channels_last."""
import pytest
import torch
import torch.nn.functional as F

from turbotune import backend
from turbotune.ops.batch_norm import ACTIVATIONS, batch_norm_act, batch_norm_act_ref
from turbotune.testing import DTYPE_PARAMS, assert_close

ACTS = ["relu", "silu", "gelu", "gelu_tanh", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: see tests/conftest.py


def _act64(z, act):
    return {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "none": lambda t: t}[act](z)


def _inputs(shape, dtype, device, channels_last, residual, wdtype=None, rdtype=None):
    x = (torch.randn(shape, device=device) * 2 + 0.7).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    wdtype = wdtype or dtype
    w = (torch.rand(c, device=device) + 0.5).to(wdtype)
    b = torch.randn(c, device=device).to(wdtype)
    r = None
    if residual:
        r = torch.randn(shape, device=device).to(rdtype or dtype)
        if channels_last:
            r = r.contiguous(memory_format=torch.channels_last)
    rm = torch.randn(c, device=device) * 0.1
    rv = torch.rand(c, device=device) + 0.5
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, r)] + [rm, rv]


def _check(shape, dtype, atol, rtol, device, channels_last, act, residual, training=True, wdtype=None, rdtype=None):
    x, w, b, r, rm, rv = _inputs(shape, dtype, device, channels_last, residual, wdtype, rdtype)
    rm64, rv64 = rm.double(), rv.double()
    rm_k, rv_k = rm.clone(), rv.clone()
    y = batch_norm_act(x, w, b, rm_k, rv_k, training=training, momentum=0.1, eps=1e-5, activation=act, residual=r)
    assert y.shape == x.shape
    assert y.dtype == (torch.promote_types(dtype, r.dtype) if residual else dtype)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    z = F.batch_norm(leaves[0], rm64, rv64, leaves[1], leaves[2], training, 0.1, 1e-5)
    if residual:
        z = z + leaves[3]
    y64 = _act64(z, act)
    assert_close(y, y64, atol=atol, rtol=rtol, name="y")
    if training:  # running statistics, updated in place like F.batch_norm
        assert_close(rm_k, rm64, atol=1e-5, rtol=1e-5, name="running_mean")
        assert_close(rv_k, rv64, atol=1e-5, rtol=1e-5, name="running_var")
    else:
        assert torch.equal(rm_k, rm) and torch.equal(rv_k, rv)
    dy = torch.randn_like(y)
    (y.float() * dy.float()).sum().backward()
    (y64 * dy.double()).sum().backward()
    count = x.numel() // x.shape[1]
    g_atol, g_rtol = atol * 4, rtol * 4
    names = ["dx", "dweight", "dbias", "dresidual"]
    for name, t, ref in zip(names, (x, w, b, r), leaves):
        if t is None:
            continue
        red = name in ("dweight", "dbias")  # sums over N*H*W elements
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert_close(t.grad, ref.grad, atol=g_atol * (count ** 0.5 if red else 1), rtol=g_rtol, name=name)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_triton_parity(triton_backend, device, dtype, atol, rtol, channels_last, act, residual):
    """Odd channel count and spatial size: 5 channels, 7x9 positions, batch 3."""
    _check((3, 5, 7, 9), dtype, atol, rtol, device, channels_last, act, residual)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_triton_eval_mode(triton_backend, device, channels_last, act):
    """Running statistics normalize; gradients still flow (frozen-BN fine-tuning)."""
    _check((2, 6, 5, 3), torch.float32, 1e-5, 1e-5, device, channels_last, act, residual=True, training=False)


@pytest.mark.parametrize("shape", [(37, 129, 1, 1), (2, 70, 9, 17), (4, 3, 1, 300)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_multi_block_shapes(triton_backend, device, shape, channels_last):
    """More channels than one channel block, more tiles than programs, 1x1 spatial."""
    _check(shape, torch.float32, 1e-5, 1e-5, device, channels_last, "relu", residual=True)


@pytest.mark.parametrize("shape", [(9, 13), (4, 6, 11)])
def test_triton_1d_inputs(triton_backend, device, shape):
    """(N, C) and (N, C, L) inputs (BatchNorm1d layouts)."""
    _check(shape, torch.float32, 1e-5, 1e-5, device, False, "gelu", residual=True)


def test_triton_mixed_dtypes(triton_backend, device):
    """bf16 activations, fp32 parameters and an fp32 residual stream (autocast layouts)."""
    _check((2, 7, 5, 5), torch.bfloat16, 2e-2, 2e-2, device, True, "relu", residual=True,
           wdtype=torch.float32, rdtype=torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "silu", "none"])
def test_reference_is_bit_identical_to_torch(device, channels_last, act):
    """The CPU default (ATen's batch norm) equals the unfused spec bit for bit:
    outputs, every gradient and the running statistics."""
    if device.type != "cpu":
        pytest.skip("the reference path runs on the CPU")
    x, w, b, r, rm, rv = _inputs((4, 5, 6, 7), torch.float32, device, channels_last, True)
    rm2, rv2 = rm.clone(), rv.clone()
    with backend.force(backend.REFERENCE):
        y = batch_norm_act(x, w, b, rm, rv, training=True, activation=act, residual=r)
        y.backward(torch.ones_like(y) * 0.5)
    grads = [t.grad.clone() for t in (x, w, b, r)]
    for t in (x, w, b, r):
        t.grad = None
    y_ref = batch_norm_act_ref(x, w, b, rm2, rv2, training=True, activation=act, residual=r)
    y_ref.backward(torch.ones_like(y_ref) * 0.5)
    assert torch.equal(y, y_ref) and torch.equal(rm, rm2) and torch.equal(rv, rv2)
    for g, t in zip(grads, (x, w, b, r)):
        if act in ("relu", "none"):
            assert torch.equal(g, t.grad)
        else:  # the SiLU backward recomputes the pre-activation in fp32
            assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", [backend.REFERENCE, backend.TRITON])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_torch_over_steps(device, impl, momentum):
    """Five training steps through nn.BatchNorm2d's bookkeeping (momentum, unbiased
    variance, num_batches_tracked, cumulative average for momentum=None)."""
    from turbotune.models.cnn import _bn_act

    if impl == backend.TRITON and device.type == "cpu" and not backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    ref = torch.nn.BatchNorm2d(6, momentum=momentum).to(device)
    mine = torch.nn.BatchNorm2d(6, momentum=momentum).to(device)
    mine.load_state_dict(ref.state_dict())
    with backend.force(impl):
        for step in range(5):
            x = torch.randn(3, 6, 5, 4, device=device) * (step + 1) + step
            y_ref = torch.relu(ref(x))
            y = _bn_act(mine, x, "relu", None)
            assert_close(y, y_ref, atol=1e-5, rtol=1e-5, name=f"y step {step}")
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 5
    if impl == backend.REFERENCE:
        assert torch.equal(mine.running_mean, ref.running_mean) and torch.equal(mine.running_var, ref.running_var)
    else:
        assert_close(mine.running_mean, ref.running_mean, atol=1e-6, rtol=1e-6, name="running_mean")
        assert_close(mine.running_var, ref.running_var, atol=1e-6, rtol=1e-6, name="running_var")


def test_no_running_stats(triton_backend, device):
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    y = batch_norm_act(x, None, None, training=True, activation="none")
    assert_close(y, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5, name="y")


def test_triton_writes_every_element(triton_backend, device):
    """Outputs come from torch.empty: fill recycled memory with NaN to prove every element is written."""
    import turbotune.ops.batch_norm as mod

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x = torch.randn(3, 9, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(x)
    w, b = torch.rand(9, device=device) + 0.5, torch.randn(9, device=device)
    rm, rv = torch.zeros(9, device=device), torch.ones(9, device=device)
    try:
        torch.empty = lambda *a, **k: nan(real_empty(*a, **k))
        torch.empty_like = lambda *a, **k: nan(real_empty_like(*a, **k))
        y, mean, invstd, nrm, nrv = mod._forward_triton(x, w, b, rm, rv, r, True, 0.1, 1e-5, ACTIVATIONS["silu"])
        grads = mod._backward_triton(torch.randn_like(y), x, w, b, mean, invstd, None, r, True, True,
                                     ACTIVATIONS["silu"], True, True)
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
    for name, t in dict(y=y, mean=mean, invstd=invstd, nrm=nrm, nrv=nrv, dx=grads[0], dw=grads[1], db=grads[2],
                        dr=grads[3]).items():
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("impl, residual", [(backend.REFERENCE, True), (backend.TRITON, True),
                                            (backend.TRITON, False)])
def test_opcheck(device, impl, residual):
    x = torch.randn(2, 5, 3, 4, device=device, requires_grad=True)
    w = torch.rand(5, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    r = torch.randn(2, 5, 3, 4, device=device, requires_grad=True) if residual else None
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    if impl == backend.TRITON and device.type == "cpu" and not backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    with backend.force(impl):
        for training in (True, False):
            torch.library.opcheck(torch.ops.turbotune.batch_norm_act, (x, w, b, rm, rv, r, training, 0.1, 1e-5, 2))
        y, mean, invstd, _, _ = torch.ops.turbotune.batch_norm_act(x, w, b, rm, rv, r, True, 0.1, 1e-5, 1)
        torch.library.opcheck(
            torch.ops.turbotune.batch_norm_act_backward,
            (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, invstd, y.detach(), None, residual, True,
             1, 1e-5, True, True),
        )


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
def test_dispatcher_path_matches_eager_path(triton_backend, device, dtype, atol, rtol):
    """torch.ops.turbotune.batch_norm_act (what torch.compile sees) and the eager
    autograd.Function give the same outputs and gradients, bit for bit."""
    x, w, b, r, rm, rv = _inputs((2, 5, 4, 3), dtype, device, True, True)
    y1 = batch_norm_act(x, w, b, rm.clone(), rv.clone(), training=True, activation="gelu", residual=r)
    y1.float().square().sum().backward()
    g1 = [t.grad.clone() for t in (x, w, b, r)]
    for t in (x, w, b, r):
        t.grad = None
    y2 = torch.ops.turbotune.batch_norm_act(x, w, b, rm.clone(), rv.clone(), r, True, 0.1, 1e-5, 3)[0]
    y2.float().square().sum().backward()
    assert torch.equal(y1, y2)
    for name, a, t in zip(["x", "w", "b", "r"], g1, (x, w, b, r)):
        assert_close(t.grad, a, atol=0, rtol=0, name=f"d{name}")


def test_torch_compile_reference_path():
    """The op is visible to torch.compile (no graph break) through the reference path."""
    torch._dynamo.reset()
    x = torch.randn(3, 4, 5, 5)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with backend.force(backend.REFERENCE):
        fn = torch.compile(lambda x: batch_norm_act(x, w, b, rm, rv, training=False, activation="relu"),
                           fullgraph=True, backend="aot_eager")
        assert_close(fn(x), torch.relu(F.batch_norm(x, rm, rv, w, b, False)), name="compiled y")


def test_inference_without_autograd(triton_backend, device):
    x, w, b, r, rm, rv = _inputs((2, 3, 4, 5), torch.float16, device, False, True)
    with torch.no_grad():
        y = batch_norm_act(x, w, b, rm, rv, training=False, activation="relu", residual=r)
    assert y.grad_fn is None
    expected = torch.relu(F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False) + r.double())
    assert_close(y, expected, name="y (no_grad)")


_X = torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=[1.0], weight=None, bias=None), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.ones(2, 4, 3, dtype=torch.long), weight=None, bias=None), TypeError, "floating"),
        (dict(x=torch.randn(5), weight=None, bias=None), ValueError, r"shape \(N, C, \*spatial\)"),
        (dict(x=_X, weight=torch.ones(3), bias=None), ValueError, r"weight must have shape \(4,\)"),
        (dict(x=_X, weight=None, bias=torch.ones(4, dtype=torch.long)), TypeError, "bias must be a floating"),
        (dict(x=_X, weight=None, bias=None, running_mean=torch.zeros(4)), ValueError, "both running_mean"),
        (dict(x=_X, weight=None, bias=None, training=False), ValueError, "eval mode"),
        (dict(x=_X, weight=None, bias=None, residual=torch.randn(2, 4, 3)), ValueError, "residual must have"),
        (dict(x=_X, weight=None, bias=None, eps=0.0), ValueError, "eps"),
        (dict(x=_X, weight=None, bias=None, momentum=1.5), ValueError, "momentum"),
        (dict(x=_X, weight=None, bias=None, activation="tanh"), ValueError, "activation must be one of"),
        (dict(x=torch.randn(1, 4, 1, 1), weight=None, bias=None), ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        batch_norm_act(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton path with inductor on a GPU")
def test_torch_compile_triton_gpu(triton_backend):
    torch._dynamo.reset()
    x = torch.randn(8, 64, 14, 14, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    r = torch.randn_like(x, requires_grad=True)
    w = torch.rand(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)

    def block(x, r):
        return batch_norm_act(x, w, b, training=True, activation="relu", residual=r).float().square().sum()

    loss = torch.compile(block, fullgraph=True)(x, r)
    loss.backward()
    ref = block(x.detach().requires_grad_(), r.detach().requires_grad_())
    assert_close(loss, ref, atol=1e-1, rtol=1e-2, name="compiled loss")
