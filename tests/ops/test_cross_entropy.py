"""Fused cross-entropy: the Triton kernels (interpreted on CPU, compiled on GPU)
against torch's ``F.cross_entropy`` in fp64, forward and gradient, over dtypes,
odd vocabulary sizes, ``ignore_index``, label smoothing and every reduction; the
CPU default path against stock ``F.cross_entropy``."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from turbotune import backend
from turbotune.ops import _rows, cross_entropy, cross_entropy_ref
from turbotune.testing import DTYPE_PARAMS, assert_close

ce_mod = importlib.import_module("turbotune.ops.cross_entropy")
REDUCTIONS = ["mean", "sum", "none"]


def _inputs(n, v, dtype, device, ignore_index=-100, n_ignored=2, scale=3.0):
    logits = (torch.randn(n, v, device=device) * scale).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    target[torch.randperm(n, device=device)[:n_ignored]] = ignore_index
    return logits, target


def _err(a, b):
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


def _check_case(n, v, dtype, atol, rtol, device, reduction, label_smoothing, ignore_index=-100, n_ignored=2):
    """Loss and dlogits against fp64 torch; for half precision also within 2x of
    stock PyTorch's own error in that dtype."""
    logits, target = _inputs(n, v, dtype, device, ignore_index, n_ignored)
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    loss = cross_entropy(logits, target, **kw)
    z64 = logits.detach().double().requires_grad_()
    loss64 = F.cross_entropy(z64, target, **kw)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    g = torch.randn(loss64.shape, device=device, dtype=torch.float64)
    (dz,) = torch.autograd.grad(loss, logits, g.to(dtype))
    (dz64,) = torch.autograd.grad(loss64, z64, g)
    assert dz.dtype == dtype
    if dtype == torch.float32:
        assert_close(loss, loss64, atol=atol, rtol=rtol, name="loss")
        assert_close(dz, dz64, atol=atol, rtol=rtol, name="dlogits")
        return
    # half precision: at most 2x the error of torch's own kernel in that dtype
    # (plus a floor of one rounding of the value, for cases where torch is exact)
    zs = logits.detach().clone().requires_grad_()
    loss_t = F.cross_entropy(zs, target, **kw)
    (dz_t,) = torch.autograd.grad(loss_t, zs, g.to(dtype))
    eps = torch.finfo(dtype).eps
    loss_floor = eps * (loss64.abs().max().item() if loss64.numel() else 0) + 1e-6
    grad_floor = eps * dz64.abs().max().item() + 1e-6
    assert _err(loss, loss64) <= 2 * _err(loss_t, loss64) + loss_floor, (
        f"loss error {_err(loss, loss64):.3g} vs torch's {_err(loss_t, loss64):.3g}")
    assert _err(dz, dz64) <= 2 * _err(dz_t, dz64) + grad_floor, (
        f"dlogits error {_err(dz, dz64):.3g} vs torch's {_err(dz_t, dz64):.3g}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("v", [1, 7, 1000])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy(triton_backend, device, dtype, atol, rtol, v, reduction, label_smoothing):
    _check_case(9, v, dtype, atol, rtol, device, reduction, label_smoothing)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
@pytest.mark.parametrize("reduction, label_smoothing", [("mean", 0.0), ("none", 0.1), ("sum", 0.2)])
def test_bert_vocabulary(triton_backend, device, dtype, atol, rtol, reduction, label_smoothing):
    """MLM over BERT's 30,522 classes: several vocabulary chunks per row, most rows ignored."""
    _check_case(12, 30522, dtype, atol, rtol, device, reduction, label_smoothing, n_ignored=8)


@pytest.mark.parametrize("ignore_index", [0, 5, -1])
def test_other_ignore_index(triton_backend, device, ignore_index):
    _check_case(10, 13, torch.float32, 1e-5, 1e-5, device, "mean", 0.05, ignore_index=ignore_index, n_ignored=3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("forced", [None, backend.TRITON])
def test_all_ignored_behaves_as_torch(device, reduction, label_smoothing, forced):
    """Every target ignored: mean is NaN (0/0), sum is 0, none is zeros, and the gradient is zeros."""
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    with backend.force(forced):
        loss = cross_entropy(logits, target, **kw)
        (dz,) = torch.autograd.grad(loss.sum(), logits)
    ref = F.cross_entropy(logits.detach(), target, **kw)
    assert torch.equal(loss.isnan(), ref.isnan()) and torch.equal(loss.nan_to_num(), ref.nan_to_num())
    assert torch.equal(dz, torch.zeros_like(dz))


def test_label_smoothing_one(triton_backend, device):
    _check_case(6, 11, torch.float32, 1e-5, 1e-5, device, "mean", 1.0)


def test_one_dim_logits(triton_backend, device):
    logits = torch.randn(17, device=device, requires_grad=True)
    target = torch.tensor(4, device=device)
    for reduction in REDUCTIONS:
        loss = cross_entropy(logits, target, reduction=reduction)
        ref = F.cross_entropy(logits.detach(), target, reduction=reduction)
        assert loss.shape == ref.shape
        assert_close(loss, ref, name=f"loss ({reduction})")
    (dz,) = torch.autograd.grad(cross_entropy(logits, target), logits)
    z = logits.detach().requires_grad_()
    (dz_ref,) = torch.autograd.grad(F.cross_entropy(z, target), z)
    assert_close(dz, dz_ref, name="dlogits")


def test_strided_rows(triton_backend, device):
    """Logits that are a row-strided view (e.g. a slice of a wider head output)."""
    big = torch.randn(6, 50, device=device)
    logits = big[:, 3:40].detach().requires_grad_()
    assert not logits.is_contiguous()
    target = torch.randint(0, 37, (6,), device=device)
    loss = cross_entropy(logits, target, label_smoothing=0.1)
    z = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(z, target, label_smoothing=0.1)
    assert_close(loss, ref, name="loss")
    loss.backward()
    ref.backward()
    assert_close(logits.grad, z.grad, name="dlogits")


def test_extreme_logits(triton_backend, device):
    """Large magnitudes (the online log-sum-exp rescales) and -inf entries."""
    logits = torch.randn(5, 300, device=device) * 80
    logits[1, :100] = float("-inf")
    logits = logits.requires_grad_()
    target = torch.tensor([3, 150, 299, 0, 17], device=device)
    loss = cross_entropy(logits, target, reduction="none")
    z = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(z, target, reduction="none")
    assert_close(loss, ref, atol=1e-4, rtol=1e-5, name="loss")
    loss.sum().backward()
    ref.sum().backward()
    assert_close(logits.grad, z.grad, name="dlogits")


def test_out_of_range_target(device):
    logits = torch.randn(3, 5, device=device)
    target = torch.tensor([1, 5, 2], device=device)
    for forced in (None, backend.TRITON):
        with backend.force(forced), pytest.raises(IndexError, match="out of bounds"):
            cross_entropy(logits, target)


def test_kernel_gives_nan_for_out_of_range_target(triton_backend, device):
    """On a GPU no host sync checks targets: the kernel itself must neither read
    outside the row nor return a plausible number."""
    logits = torch.randn(3, 5, device=device)
    target = torch.tensor([1, 5, -3], device=device)
    loss, lse = ce_mod._forward_triton(logits, target, -100, 0.0)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


def _assert_every_element_written(device, reduction="none"):
    logits, target = _inputs(7, 300, torch.float32, device, n_ignored=2)
    with _rows.poisoned_outputs() as buffers:
        loss = cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
        loss.sum().backward()
    assert len(buffers) >= 3, f"only {len(buffers)} buffers came from the poisoned allocator"
    for name, t in dict(loss=loss, dlogits=logits.grad).items():
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"


def test_every_output_element_written(triton_backend, device):
    _assert_every_element_written(device)


@pytest.mark.parametrize("kernel", ["_ce_fwd_kernel", "_ce_bwd_kernel"])
def test_poisoned_output_check_catches_a_skipped_row(triton_backend, device, monkeypatch, kernel):
    real = getattr(ce_mod, kernel)

    class SkipLastRow:
        def __getitem__(self, grid):
            return real[(grid[0] - 1,)]

    monkeypatch.setattr(ce_mod, kernel, SkipLastRow())
    with pytest.raises(AssertionError, match="unwritten"):
        _assert_every_element_written(device)


def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU allocation profile (the GPU check measures peak memory)")
def test_no_fp32_copy_of_the_logits(triton_backend):
    """Forward + backward on bf16 logits allocate nothing bigger than the bf16
    gradient itself; the check does catch a path that upcasts the logits."""
    n, v = 8, 3001
    logits = torch.randn(n, v, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,))
    bound = n * v * logits.element_size() + 1024
    cross_entropy(logits, target).backward()  # warm up
    assert _largest_allocation(lambda: cross_entropy(logits, target).backward()) <= bound
    assert _largest_allocation(lambda: cross_entropy_ref(logits, target).backward()) > bound


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_opcheck(triton_backend, device, reduction, label_smoothing):
    logits, target = _inputs(6, 37, torch.float32, device)
    args = (-100, label_smoothing, reduction)
    torch.library.opcheck(torch.ops.turbotune.cross_entropy, (logits, target, *args))
    loss, lse = torch.ops.turbotune.cross_entropy(logits, target, *args)
    torch.library.opcheck(
        torch.ops.turbotune.cross_entropy_backward,
        (torch.randn_like(loss), logits.detach(), target, lse, *args),
    )


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_PARAMS)
def test_dispatcher_path_matches_eager_path(triton_backend, device, dtype, atol, rtol):
    logits, target = _inputs(8, 257, dtype, device)
    l1 = cross_entropy(logits, target, label_smoothing=0.1)
    l1.backward()
    g1 = logits.grad.clone()
    logits.grad = None
    l2, _ = torch.ops.turbotune.cross_entropy(logits, target, -100, 0.1, "mean")
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(logits.grad, g1)


def test_empty_batch(triton_backend, device):
    logits = torch.randn(0, 10, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in REDUCTIONS:
        loss = cross_entropy(logits, target, reduction=reduction)
        ref = F.cross_entropy(logits.detach(), target, reduction=reduction)
        assert loss.shape == ref.shape and torch.equal(loss.isnan(), ref.isnan())
    cross_entropy(logits, target, reduction="sum").backward()
    assert logits.grad.shape == (0, 10)


# ----------------------------------------------------------------------------- the CPU default path


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpu_default_is_stock_cross_entropy(reduction, label_smoothing):
    """On CPU (no backend forced) fp32 runs ATen's F.cross_entropy: bit for bit."""
    logits, target = _inputs(11, 29, torch.float32, "cpu")
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    loss = cross_entropy(logits, target, **kw)
    z = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(z, target, **kw)
    assert torch.equal(loss, ref)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.equal(logits.grad, z.grad)


def test_cpu_default_bf16_computes_in_fp32():
    logits, target = _inputs(6, 50, torch.bfloat16, "cpu")
    loss = cross_entropy(logits, target)
    assert loss.dtype == torch.bfloat16
    assert_close(loss, F.cross_entropy(logits.double(), target), name="loss")


@pytest.mark.parametrize("forced", [None, backend.TRITON])
@pytest.mark.parametrize("reduction, label_smoothing", [("mean", 0.0), ("sum", 0.25), ("none", 0.1)])
def test_fp64_gradcheck(device, forced, reduction, label_smoothing):
    logits = torch.randn(5, 7, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 3], device=device)
    with backend.force(forced):
        assert torch.autograd.gradcheck(
            lambda z: cross_entropy(z, target, label_smoothing=label_smoothing, reduction=reduction), (logits,)
        )


def test_reference_row_math_matches_torch():
    """The reference's per-row losses (which the op path uses when Triton does not run) equal torch's."""
    logits, target = _inputs(9, 31, torch.float64, "cpu")
    for ls in (0.0, 0.3):
        rows, lse = ce_mod._row_losses_ref(logits.detach(), target, -100, ls)
        assert_close(rows, F.cross_entropy(logits.detach(), target, label_smoothing=ls, reduction="none"),
                     atol=1e-12, rtol=1e-12, name="row losses")
        valid = target != -100
        assert_close(lse[valid], torch.logsumexp(logits.detach()[valid], -1), atol=1e-12, rtol=1e-12, name="lse")


def test_torch_compile_reference_path():
    torch._dynamo.reset()
    logits, target = torch.randn(4, 33), torch.tensor([1, -100, 32, 0])
    with backend.force(backend.REFERENCE):
        fn = torch.compile(lambda z: cross_entropy(z, target, label_smoothing=0.1), fullgraph=True,
                           backend="aot_eager")
        assert_close(fn(logits), F.cross_entropy(logits, target, label_smoothing=0.1), name="compiled loss")


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(logits=[1.0], target=torch.tensor([0])), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.randn(2, 3), target=[0, 1]), TypeError, "target must be a torch.Tensor"),
        (dict(logits=torch.ones(2, 3, dtype=torch.long), target=torch.tensor([0, 1])), TypeError, "floating"),
        (dict(logits=torch.randn(2, 3), target=torch.tensor([0.0, 1.0])), TypeError, "int64 class indices"),
        (dict(logits=torch.randn(2, 3), target=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "int64"),
        (dict(logits=torch.randn(2, 3, 4), target=torch.zeros(2, 3, dtype=torch.long)), ValueError, "reshape"),
        (dict(logits=torch.randn(2, 0), target=torch.zeros(2, dtype=torch.long)), ValueError, "C >= 1"),
        (dict(logits=torch.randn(2, 3), target=torch.zeros(3, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(logits=torch.randn(2, 3), target=torch.zeros(2, dtype=torch.long), reduction="avg"), ValueError,
         "reduction must be"),
        (dict(logits=torch.randn(2, 3), target=torch.zeros(2, dtype=torch.long), label_smoothing=1.5), ValueError,
         "label_smoothing"),
        (dict(logits=torch.randn(2, 3), target=torch.zeros(2, dtype=torch.long), ignore_index=1.0), TypeError,
         "ignore_index"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        cross_entropy(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory and torch.compile of the Triton path")
def test_gpu_peak_memory_and_compile(triton_backend):
    """MLM shape: forward + backward on bf16 logits stay well under the size of an fp32 copy."""
    n, v = 4096, 30522
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,), device="cuda")
    target[::3] = -100
    cross_entropy(logits, target).backward()
    logits.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cross_entropy(logits, target, label_smoothing=0.1).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * v * 4 * 0.75, f"{extra / 2**20:.0f} MiB extra: an fp32 copy of the logits is being made"
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: cross_entropy(z, target, label_smoothing=0.1), fullgraph=True)
    assert math.isclose(compiled(logits).float().item(),
                        F.cross_entropy(logits.float(), target, label_smoothing=0.1).item(), rel_tol=1e-2)
