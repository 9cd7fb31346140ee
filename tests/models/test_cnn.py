"""turbotune.optimize() on conv nets: pattern matching, train/eval parity of whole
ResNets against stock, exact BatchNorm folding, revert, layouts, autocast, AdamW."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import turbotune
from turbotune import backend
from turbotune.models import cnn
from turbotune.testing import assert_close


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: see tests/conftest.py


# ----------------------------------------------------------------------------- test-written models


class Basic(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottle(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class Net(nn.Module):
    def __init__(self, block, layers, widths=(64, 128, 256, 512), classes=10):
        super().__init__()
        expansion = 4 if block is Bottle else 1
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = widths[0], []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ResNet-18 / ResNet-50 layouts (depths, blocks, strides, downsample paths); the tests
# use narrow widths to stay fast on a 2-core CPU.
NARROW = (8, 16, 24, 32)


def resnet18(widths=NARROW, **kw):
    return Net(Basic, [2, 2, 2, 2], widths=widths, **kw)


def resnet50(widths=NARROW, **kw):
    return Net(Bottle, [3, 4, 6, 3], widths=widths, **kw)


def tiny_resnet():
    return Net(Basic, [1, 1], widths=(8, 12))


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
    return model


def _pair(make, dtype=torch.float32):
    torch.manual_seed(0)
    stock = _randomize(make()).to(dtype)
    return stock, copy.deepcopy(stock)


def _train_steps(model, xs, ys, lr=0.05, opt_cls=torch.optim.SGD, **opt_kw):
    opt = opt_cls(model.parameters(), lr=lr, **opt_kw)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _data(steps=3, n=4, size=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, 3, size, size, generator=g).to(dtype) for _ in range(steps)],
            [torch.randint(0, 10, (n,), generator=g) for _ in range(steps)])


# ----------------------------------------------------------------------------- dispatch and patterns


def test_dispatch_and_changes():
    model = resnet18()
    assert cnn.matches(model)
    handle = turbotune.optimize(model)
    assert handle.kind == "cnn" and handle.active
    text = "\n".join(handle.changes)
    assert "20 fusion(s)" in text and "conv+bn+add+relu" in text and "conv+bn+relu" in text
    handle.revert()


def test_bert_family_models_are_not_cnn():
    class Config:
        model_type = "bert"

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert cnn.matches(model)
    model.config = Config()
    assert not cnn.matches(model)
    assert not cnn.matches(nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)))  # BN before any conv


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_train_parity_bit_exact(make):
    """NCHW on the CPU: the fused path runs ATen's kernels, so three SGD steps give
    the stock losses, parameters and running statistics bit for bit."""
    stock, opt = _pair(make)
    handle = turbotune.optimize(opt, channels_last=False)
    xs, ys = _data()
    with backend.force(backend.REFERENCE):
        l_opt = _train_steps(opt, xs, ys)
    l_ref = _train_steps(stock, xs, ys)
    assert torch.equal(l_opt, l_ref)
    for (name, a), b in zip(opt.state_dict().items(), stock.state_dict().values()):
        assert torch.equal(a, b), name
    handle.revert()


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_train_parity_channels_last_fp64(make):
    """channels_last changes the summation order only: in fp64 the optimized model
    tracks stock to ~1e-10 over three steps (fp32 rounding is amplified by small-batch BN)."""
    stock, opt = _pair(make, torch.float64)
    turbotune.optimize(opt)
    assert opt.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    xs, ys = _data(dtype=torch.float64)
    l_opt = _train_steps(opt, xs, ys)
    l_ref = _train_steps(stock, xs, ys)
    assert_close(l_opt, l_ref, atol=1e-9, rtol=1e-9, name="losses")
    for (name, a), b in zip(opt.state_dict().items(), stock.state_dict().values()):
        assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_eval_parity_folded(make, channels_last):
    stock, opt = _pair(make)
    stock.eval()
    turbotune.optimize(opt, channels_last=channels_last).model.eval()
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        y_ref = stock(x)
        y = opt(x)
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, name="eval logits")
    # the folded path really ran: every fused conv holds a folded copy
    fused = [m for m in opt.forward.__self__.modules() if isinstance(m, cnn.ConvBNAct)]
    assert fused and all(m._cache is not None for m in fused if m.conv is not None)


def test_eval_with_grad_uses_unfolded_path():
    """eval() + autograd (frozen-BN fine-tuning): exact gradients, no folded copy."""
    stock, opt = _pair(tiny_resnet)
    stock.eval()
    turbotune.optimize(opt, channels_last=False).model.eval()
    x = torch.randn(2, 3, 20, 20)
    with backend.force(backend.REFERENCE):
        opt(x).square().sum().backward()
    stock(x).square().sum().backward()
    for (name, a), b in zip(opt.named_parameters(), stock.parameters()):
        assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, name=name)
    assert all(m._cache is None for m in opt.forward.__self__.modules() if isinstance(m, cnn.ConvBNAct))


def test_fold_conv_bn_is_exact():
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True).double()
    bn = _randomize(nn.Sequential(nn.BatchNorm2d(7))).double()[0].eval()
    w, b = cnn.fold_conv_bn(conv, bn)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-12, rtol=1e-12, name="folded conv")
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert_close(w, conv.weight * s[:, None, None, None], atol=1e-15, rtol=1e-15, name="weight")
    assert_close(b, (conv.bias - bn.running_mean) * s + bn.bias, atol=1e-15, rtol=1e-15, name="bias")
    with pytest.raises(ValueError, match="running statistics"):
        cnn.fold_conv_bn(conv, nn.BatchNorm2d(7, track_running_stats=False))


def test_folded_cache_follows_parameter_updates_and_train_restores():
    stock, opt = _pair(tiny_resnet)
    turbotune.optimize(opt)
    x = torch.randn(2, 3, 24, 24)
    opt.eval()
    stock.eval()
    with torch.no_grad():
        opt(x)
        for a, b in ((opt.bn1.weight, stock.bn1.weight), (opt.conv1.weight, stock.conv1.weight)):
            a.mul_(1.5)
            b.mul_(1.5)
        assert_close(opt(x), stock(x), atol=1e-4, rtol=1e-4, name="after an in-place update")
    # leaving eval: training runs the unfolded parameters (never modified) and drops the folded copy
    opt.train()
    stock.train()
    with backend.force(backend.REFERENCE):
        y = opt(x)
    assert_close(y, stock(x), atol=1e-4, rtol=1e-4, name="train after eval")
    assert all(m._cache is None for m in opt.forward.__self__.modules() if isinstance(m, cnn.ConvBNAct))


def test_revert_restores_everything():
    model = _randomize(resnet18())
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    handle = turbotune.optimize(model)
    assert "forward" in model.__dict__
    assert list(model.state_dict()) == list(before)
    assert [id(p) for p in model.parameters()] == params
    handle.revert()
    assert "forward" not in model.__dict__ and not hasattr(model, "_turbotune_handle")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    handle.revert()  # idempotent
    turbotune.optimize(model).revert()  # can be optimized again


def test_optimizer_built_before_or_after_optimize():
    """Parameters stay the same objects: an optimizer built before optimize() and one
    built after it update identical tensors (turbotune.optim.AdamW here)."""
    from turbotune.optim import AdamW

    stock, before = _pair(tiny_resnet)
    after = copy.deepcopy(stock)
    opt_before = AdamW(before.parameters(), lr=1e-2)
    turbotune.optimize(before)
    turbotune.optimize(after)
    opt_after = AdamW(after.parameters(), lr=1e-2)
    opt_stock = torch.optim.AdamW(stock.parameters(), lr=1e-2)
    xs, ys = _data(steps=2, size=20)
    for model, opt in ((before, opt_before), (after, opt_after), (stock, opt_stock)):
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for name, p in stock.named_parameters():
        q1, q2 = before.get_parameter(name), after.get_parameter(name)
        assert_close(q1, p, atol=1e-4, rtol=1e-4, name=f"{name} (before)")
        assert_close(q2, q1, atol=0, rtol=0, name=f"{name} (after vs before)")


def test_autocast_bf16_train_and_eval():
    stock, opt = _pair(tiny_resnet)
    turbotune.optimize(opt)
    x = torch.randn(4, 3, 24, 24)
    for mode in ("train", "eval"):
        getattr(stock, mode)()
        getattr(opt, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
            y_ref, y = stock(x), opt(x)
        assert y.dtype == y_ref.dtype
        assert_close(y.float(), y_ref.float(), atol=6e-2, rtol=6e-2, name=f"{mode} logits under autocast")


def test_dtype_option():
    model = tiny_resnet()
    handle = turbotune.optimize(model, dtype=torch.bfloat16)
    assert handle.options["dtype"] == torch.bfloat16
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).dtype == torch.bfloat16
    handle.revert()
    auto = turbotune.optimize(model, dtype="auto")
    assert auto.options["dtype"] == (torch.bfloat16 if cnn.fast_bf16("cpu") else None)
    auto.revert()


@pytest.mark.parametrize("kwargs, exc, match", [(dict(bogus=1), TypeError, "unknown option"),
                                                (dict(dtype="fp8"), ValueError, "dtype must be"),
                                                (dict(dtype=torch.int8), TypeError, "dtype must be")])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        turbotune.optimize(tiny_resnet(), **kwargs)


# ----------------------------------------------------------------------------- other model shapes


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent: fx cannot trace it


class Untraceable(nn.Module):
    """fx fails on the model and on its Sequential (a Gate inside): the Sequential is matched by module order."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(), Gate(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(approximate="tanh"),
                                      nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_untraceable_model_uses_sequence_matching():
    stock, opt = _pair(Untraceable)
    handle = turbotune.optimize(opt, channels_last=False)
    text = "\n".join(handle.changes)
    assert "module-sequence match, 3 fusion(s)" in text and "conv+bn+silu" in text and "bn+relu" in text
    x = torch.randn(2, 3, 9, 7)
    with backend.force(backend.REFERENCE):
        y = opt(x)
    assert_close(y, stock(x), atol=1e-5, rtol=1e-5, name="train output")
    for mode_model in (opt, stock):
        mode_model.eval()
    with torch.no_grad():
        assert_close(opt(x), stock(x), atol=1e-5, rtol=1e-5, name="eval output")
    handle.revert()
    assert "forward" not in opt.features.__dict__


class ModeDependent(nn.Module):
    """The forward reads self.training: one graph per mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return y * 3 if self.training else y


def test_mode_dependent_forward_gets_one_graph_per_mode():
    stock, opt = _pair(ModeDependent)
    handle = turbotune.optimize(opt)
    assert "one graph per train/eval mode" in handle.changes[0]
    x = torch.randn(2, 3, 8, 8)
    assert_close(opt(x), stock(x), atol=1e-5, rtol=1e-5, name="train")
    opt.eval()
    stock.eval()
    with torch.no_grad():
        assert_close(opt(x), stock(x), atol=1e-5, rtol=1e-5, name="eval")


def test_shared_intermediate_is_not_fused():
    """A BN output read twice is not fused with the activation (nothing is lost)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.bn(self.conv(x))
            return torch.relu(z) + z

    stock, opt = _pair(Branchy)
    handle = turbotune.optimize(opt)
    assert "conv+bn (" in handle.changes[0] and "relu" not in handle.changes[0]
    x = torch.randn(2, 3, 5, 5)
    assert_close(opt(x), stock(x), atol=1e-5, rtol=1e-5, name="output")


def test_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    stock, opt = _pair(lambda: tv.models.resnet18(num_classes=10))
    handle = turbotune.optimize(opt)
    assert "20 fusion(s)" in handle.changes[0]
    x = torch.randn(2, 3, 32, 32)
    stock.eval()
    opt.eval()
    with torch.no_grad():
        assert_close(opt(x), stock(x), atol=1e-4, rtol=1e-4, name="eval logits")


def test_triton_kernels_in_a_whole_model(triton_backend, device):
    """A tiny ResNet trained two steps with the Triton kernels (interpreted on the CPU)."""
    stock, opt = _pair(tiny_resnet)
    stock, opt = stock.to(device), opt.to(device)
    turbotune.optimize(opt)
    xs, ys = _data(steps=2, n=3, size=16)
    xs, ys = [x.to(device) for x in xs], [y.to(device) for y in ys]
    l_opt = _train_steps(opt, xs, ys)
    l_ref = _train_steps(stock, xs, ys)
    assert_close(l_opt, l_ref, atol=1e-4, rtol=1e-4, name="losses")
    for (name, a), b in zip(opt.state_dict().items(), stock.state_dict().values()):
        assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3, name=name)


# ----------------------------------------------------------------------------- the bench suite


def test_bench_suite_cases_and_model_steps():
    from turbotune.bench import all_suites
    from turbotune.bench.suites.cnn import model_step

    cases = list(all_suites()["cnn"](True, torch.device("cpu")))
    with_base = {c.key() for c in cases if c.baseline}
    assert cases and all(c.key() in with_base for c in cases)
    assert {c.op for c in cases} >= {"bn_add_relu", "resnet18"}
    for provider in ("torch channels_last", "turbotune"):
        for mode in ("train", "infer"):
            out = model_step("resnet18", provider, mode, torch.float32, torch.device("cpu"), 2, 32)()
            assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="provider must be one of"):
        model_step("resnet18", "tvm", "infer", torch.float32, torch.device("cpu"), 2, 32)
