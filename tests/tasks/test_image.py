"""Image data loaders (IDX files, Fashion-MNIST, scikit-learn digits) and the
Fashion-MNIST fine-tune task; a convergence check of optimize() on real digits."""
import copy
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import turbotune
from turbotune import backend, data
from turbotune.tasks import image

HAS_FASHION = os.path.isdir(data.FASHION_MNIST_DIR) and bool(os.listdir(data.FASHION_MNIST_DIR))


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: see tests/conftest.py


def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype({0x08: "u1", 0x0C: ">i4"}[code]).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _fake_fashion(root, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), rng.integers(0, 10, (n,)))


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    a = np.arange(2 * 3 * 5, dtype=np.int64).reshape(2, 3, 5) * 1000 - 7000
    path = str(tmp_path / f"a.idx{suffix}")
    _write_idx(path, a, code=0x0C)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 5) and np.array_equal(out, a)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(bad))
    short = str(tmp_path / "short")
    _write_idx(short, np.zeros((4, 2), dtype=np.uint8))
    with open(short, "rb") as f:
        blob = f.read()
    with open(short, "wb") as f:
        f.write(blob[:-1])
    with pytest.raises(ValueError, match="the file has"):
        data.read_idx(short)


def test_fashion_mnist_missing_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(data.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", str(tmp_path))
    with pytest.raises(ValueError, match="split must be"):
        data.fashion_mnist("validation", str(tmp_path))


def test_fashion_mnist_configurable_path(tmp_path, monkeypatch):
    _fake_fashion(str(tmp_path))
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
    train, test = data.fashion_mnist("train"), data.fashion_mnist("test")
    assert train.images.shape == (12, 28, 28) and train.images.dtype == np.uint8
    assert test.labels.shape == (5,) and test.labels.dtype == np.int64 and len(train.classes) == 10


@pytest.mark.skipif(not HAS_FASHION, reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files():
    test = data.fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10  # the test set is balanced
    assert 0.25 < test.images.mean() / 255 < 0.32


def test_digits():
    pytest.importorskip("sklearn")
    d = data.digits()
    assert d.images.shape == (1797, 8, 8) and d.labels.shape == (1797,)
    assert d.images.min() == 0 and d.images.max() == 16 and set(d.labels.tolist()) == set(range(10))


# ----------------------------------------------------------------------------- convergence on real digits


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.SiLU(),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_digits_convergence_matches_stock(dtype):
    """60 steps on the real digits with and without optimize(): the same losses (fp32:
    tight; bf16 autocast: loose) and a trained, accurate model."""
    pytest.importorskip("sklearn")
    d = data.digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)
    y = torch.from_numpy(d.labels)
    torch.manual_seed(0)
    stock = DigitNet()
    opt = copy.deepcopy(stock)
    turbotune.optimize(opt)
    curves = []
    for model in (opt, stock):
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(60):
            idx = torch.randint(0, 1500, (64,), generator=g)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(x[idx])
            loss = F.cross_entropy(logits.float(), y[idx])
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    tol = 2e-3 if dtype is None else 0.15
    assert (curves[0] - curves[1]).abs().max() < tol, (curves[0], curves[1])
    assert curves[0][-5:].mean() < 0.5 * curves[0][:5].mean()
    acc = image.evaluate(opt, x[1500:], y[1500:])
    assert acc > 0.6  # chance: 0.1


# ----------------------------------------------------------------------------- the fine-tune task


def test_finetune_image_on_fake_data(tmp_path):
    _fake_fashion(str(tmp_path), n_train=64, n_test=16)
    out = tmp_path / "metrics.json"
    m = image.finetune_image(str(tmp_path), epochs=1, batch_size=32, compare_stock=True, progress=False,
                             output=str(out), widths=(8, 8, 8))
    for key in ("test_accuracy", "train_seconds", "samples_per_second", "final_loss", "recipe", "stock",
                "speedup_vs_stock"):
        assert key in m
    assert m["steps"] == 2 and m["stock"]["steps"] == 2 and 0.0 <= m["test_accuracy"] <= 1.0
    assert json.loads(out.read_text())["recipe"]["batch_size"] == 32


@pytest.mark.skipif(not HAS_FASHION, reason="dataset-fashion-mnist is not installed")
def test_finetune_image_learns_fashion_mnist():
    """One short epoch on 3,000 real images clearly beats chance (10%)."""
    m = image.finetune_image(epochs=1, batch_size=100, limit=3000, progress=False, widths=(16, 32, 64))
    assert m["test_accuracy"] > 0.55, m


@pytest.mark.parametrize("kwargs, match", [(dict(epochs=0), "epochs"), (dict(batch_size=1.5), "batch_size"),
                                           (dict(lr=-1.0), "lr"), (dict(dtype=torch.int8), "dtype")])
def test_finetune_image_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        image.finetune_image(progress=False, **kwargs)


def test_cli_missing_data(tmp_path, capsys):
    rc = image.main(["--data-dir", str(tmp_path), "--no-progress"])
    assert rc == 2 and "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_augment_keeps_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 28, 28)
    out = image._augment(x, g)
    assert out.shape == x.shape
    # each output is the input shifted by <= 2 pixels (possibly flipped): the centre 24x24 survives
    for i in range(5):
        cand = [x[i, 0], x[i, 0].flip(1)]
        ok = any(torch.equal(out[i, 0, 2 + dy:26 + dy, 2 + dx:26 + dx], c[2 + ddy:26 + ddy, 2 + ddx:26 + ddx])
                 for c in cand for dy in (0,) for dx in (0,) for ddy in range(-2, 3) for ddx in range(-2, 3))
        assert ok
    with backend.force(backend.REFERENCE):  # deterministic for a seed
        again = image._augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
