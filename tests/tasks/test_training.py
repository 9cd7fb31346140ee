"""turbotune.training: batches, metrics, precision choice, the loop on a small model, atomic directories."""
from __future__ import annotations

import os

import pytest
import torch

from turbotune import backend, training
from turbotune.training import (RECIPES, Dist, FinetuneError, Trainer, atomic_dir, bf16_support,
                                check_output_dir, classification_metrics, plan_batches, recover_dir, resolve_dtype,
                                shard)


def test_plan_batches_is_seeded_and_complete():
    a = plan_batches(103, 10, seed=1, epoch=1)
    assert a == plan_batches(103, 10, seed=1, epoch=1)
    assert a != plan_batches(103, 10, seed=1, epoch=2) and a != plan_batches(103, 10, seed=2, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103)) and len(a[-1]) == 3
    assert len(plan_batches(103, 10, seed=1, epoch=1, min_size=4)) == 10  # the 3-item batch is dropped


def test_group_by_length_pads_less():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 80) for _ in range(2000)]
    plain = plan_batches(2000, 32, seed=0, epoch=1)
    grouped = plan_batches(2000, 32, seed=0, epoch=1, lengths=lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(2000))

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded(grouped) < 0.75 * padded(plain)
    with pytest.raises(ValueError, match="needs lengths"):
        plan_batches(10, 2, seed=0, epoch=1, group_by_length=True)


def test_shard_splits_a_global_batch():
    b = list(range(7))
    parts = [shard(b, Dist(r, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == b and [len(p) for p in parts] == [3, 2, 2]


def test_classification_metrics():
    # true 0: predicted 0,0,1 ; true 1: predicted 1 ; true 2: predicted 0
    c = torch.tensor([[2, 1, 0], [0, 1, 0], [1, 0, 0]])
    m = classification_metrics(c, loss_sum=2.5)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["examples"] == 5 and m["loss"] == pytest.approx(0.5)
    f1 = [2 * 2 / (3 + 3), 2 * 1 / (1 + 2), 0.0]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    only = classification_metrics(torch.tensor([[4, 0, 0], [0, 0, 0], [0, 0, 0]]))
    assert only["macro_f1"] == 1.0  # classes absent from labels and predictions do not count


def test_bf16_choice_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(backend, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    ok, why = bf16_support(torch.device("cpu"))
    assert not ok and "neither AVX512-BF16 nor AMX" in why
    assert resolve_dtype("auto", torch.device("cpu"))[0] == torch.float32
    monkeypatch.setattr(backend, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert bf16_support(torch.device("cpu")) == (True, "CPU has avx512_bf16")
    assert resolve_dtype("auto", torch.device("cpu"))[0] == torch.bfloat16
    monkeypatch.setattr(backend, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert resolve_dtype(None, torch.device("cpu"))[0] == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == (torch.float32, "requested")
    assert resolve_dtype(torch.bfloat16, torch.device("cpu"))[0] == torch.bfloat16
    with pytest.raises(ValueError, match="dtype: expected 'auto'"):
        resolve_dtype("float16", torch.device("cpu"))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(50, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.out(self.norm(self.emb(input_ids).mean(1)))


def _toy_data(n=40):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 50, (n, 6), generator=g)
    labels = (ids[:, 0] % 3).long()
    return ids, labels


def _trainer(recipe, ids, labels, **kw):
    model = _Toy()
    return Trainer(model, RECIPES[recipe], collate=lambda idx: ({"input_ids": ids[idx]}, labels[idx], 6 * len(idx)),
                   forward=lambda m, x: m(**x), lr=5e-2, warmup_steps=2, total_steps=20, **kw)


@pytest.mark.parametrize("recipe", ["turbotune", "stock"])
def test_trainer_learns_and_evaluates(recipe):
    ids, labels = _toy_data()
    tr = _trainer(recipe, ids, labels)
    before = tr.evaluate(tr.collate, len(ids), 3, 16)
    logs = tr.fit(n_train=len(ids), batch_size=8, epochs=4, seed=0, progress=False,
                  evaluate=lambda: tr.evaluate(tr.collate, len(ids), 3, 16))
    after = logs[-1].validation
    assert after["loss"] < before["loss"] and after["accuracy"] >= before["accuracy"]
    assert logs[0].samples == 40 and logs[0].samples_per_s > 0 and tr.steps == 20
    assert logs[0].real_tokens == logs[0].padded_tokens == 240 and tr.real_tokens == 960
    assert tr.scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends at zero


def test_turbotune_and_stock_recipes_agree_in_fp32():
    """Same batches, same schedule: the turbotune recipe (its AdamW + fused clipping) and the stock one
    (torch fused AdamW + clip_grad_norm_) reach the same weights."""
    ids, labels = _toy_data()
    finals = []
    for recipe in ("turbotune", "stock"):
        tr = _trainer(recipe, ids, labels, max_grad_norm=0.5)
        tr.fit(n_train=len(ids), batch_size=8, epochs=2, seed=0, progress=False, evaluate=lambda: {"accuracy": 0.0})
        finals.append([p.detach().clone() for p in tr.module.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_loss_is_the_global_batch_mean():
    """With world=2 the local loss is scaled so that DDP's gradient average equals the global mean:
    two half-batch gradients at world=2, averaged, equal the full-batch gradient."""
    ids, labels = _toy_data(7)  # 7 = 4 + 3: the two processes get unequal shares
    full = _trainer("stock", ids, labels, max_grad_norm=None)
    full.optimizer.step = lambda *a, **k: None  # keep the weights; look at the gradients only
    full.optimizer.zero_grad = lambda *a, **k: None
    full.step(list(range(7)), 7)
    g_full = [p.grad.clone() for p in full.params]
    halves = []
    for r in range(2):
        t = _trainer("stock", ids, labels, max_grad_norm=None)
        t.dist = Dist(r, 2, r)
        t.optimizer.step = lambda *a, **k: None
        t.optimizer.zero_grad = lambda *a, **k: None
        t.step(shard(list(range(7)), t.dist), 7)
        halves.append([p.grad.clone() for p in t.params])
    for g, a, b in zip(g_full, *halves):
        torch.testing.assert_close((a + b) / 2, g, rtol=1e-5, atol=1e-7)


def test_atomic_dir_replaces_or_keeps(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(str(final)) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("one")
    assert (final / "a").read_text() == "one"
    mask = os.umask(0)
    os.umask(mask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    with pytest.raises(RuntimeError):
        with atomic_dir(str(final)) as tmp:
            (open(os.path.join(tmp, "a"), "w")).write("two")
            raise RuntimeError("died mid-save")
    assert (final / "a").read_text() == "one" and os.listdir(tmp_path) == ["ckpt"]
    with atomic_dir(str(final)) as tmp:
        (open(os.path.join(tmp, "b"), "w")).write("three")
    assert os.listdir(final) == ["b"] and os.listdir(tmp_path) == ["ckpt"]


def test_atomic_dir_fallback_and_recovery(tmp_path, monkeypatch):
    """Without renameat2(RENAME_EXCHANGE) the swap is two renames; a crash between them is recovered."""
    final = tmp_path / "ckpt"
    with atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "v"), "w").write("1")
    monkeypatch.setattr(training, "_renameat2_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def crash_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(a, b)

    monkeypatch.setattr(training.os, "rename", crash_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(final)) as tmp:
            open(os.path.join(tmp, "v"), "w").write("2")
    monkeypatch.setattr(training.os, "rename", real_rename)
    assert not final.exists() and (tmp_path / ".ckpt.old").is_dir()
    recover_dir(str(final))
    assert (final / "v").read_text() == "1"
    with atomic_dir(str(final)) as tmp:  # the fallback path on its own
        open(os.path.join(tmp, "v"), "w").write("3")
    assert (final / "v").read_text() == "3" and os.listdir(tmp_path) == ["ckpt"]


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "metrics.json").write_text('{"turbotune": "0.1.0"}')
    check_output_dir(str(tmp_path / "ours"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "metrics.json").write_text('{"accuracy": 1}')
    with pytest.raises(FinetuneError, match="not a turbotune checkpoint"):
        check_output_dir(str(tmp_path / "theirs"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(FinetuneError, match="is a file"):
        check_output_dir(str(tmp_path / "f"))
