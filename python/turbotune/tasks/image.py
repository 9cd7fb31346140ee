"""Train a small ResNet on Fashion-MNIST with turbotune (and, optionally, the
same recipe on stock PyTorch for comparison).

Python API::

    from turbotune.tasks.image import finetune_image
    metrics = finetune_image(compare_stock=True)          # 7 epochs by default
    metrics["test_accuracy"], metrics["train_seconds"], metrics["stock"]["train_seconds"]

Command line (the ``turbotune finetune --task image`` CLI wraps the same function)::

    python -m turbotune.tasks.image --compare-stock --output metrics.json

The recipe (identical for the turbotune and the stock run): :func:`small_resnet`
(widths 32-64-128, one basic block per stage, the first stage at 14x14),
random 2-pixel translations and horizontal flips, label smoothing 0.1, AdamW
with a one-cycle learning-rate schedule, batch 256. The turbotune run calls
``turbotune.optimize(model)`` and trains with ``turbotune.optim.AdamW``; the
stock run uses the unmodified model and ``torch.optim.AdamW``. Both start from
the same initial weights and see the batches in the same order.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import data as tt_data

__all__ = ["finetune_image", "build_model", "load_fashion_mnist", "evaluate", "main"]

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def build_model(widths: Sequence[int] = (32, 64, 128), num_classes: int = 10) -> torch.nn.Module:
    """The recipe's model: a 3x3 stride-2 stem to 14x14, then one basic block per stage."""
    from ..models.resnet import small_resnet

    model = small_resnet(num_classes=num_classes, in_channels=1, widths=widths)
    model.conv1.stride = (2, 2)  # 28x28 -> 14x14: most of the accuracy at a quarter of the cost
    return model


def load_fashion_mnist(data_dir: Optional[str] = None, limit: Optional[int] = None):
    """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 1, 28, 28)`` normalized
    images and int64 labels. ``limit`` keeps the first ``limit`` training and test images."""
    out = []
    for split in ("train", "test"):
        ds = tt_data.fashion_mnist(split, data_dir)
        x = torch.from_numpy(ds.images.copy()).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
        y = torch.from_numpy(ds.labels.copy())
        if limit is not None:
            x, y = x[:limit], y[:limit]
        out += [x, y]
    return tuple(out)


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random per-image translation by up to ``pad`` pixels and horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(-MEAN / STD))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             dtype: Optional[torch.dtype] = None) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(x[i:i + batch_size])
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def _train(model, optimizer, x, y, *, epochs, batch_size, lr, seed, dtype, progress, desc):
    steps_per_epoch = len(x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            xb = _augment(x[idx], gen)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if s % 20 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return seconds, losses


def _run(kind, init_state, data, *, epochs, batch_size, lr, seed, dtype, progress, widths):
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = build_model(widths)
    model.load_state_dict(init_state)
    if kind == "turbotune":
        import turbotune
        from turbotune.optim import AdamW

        handle = turbotune.optimize(model)
        optimizer = AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    else:
        handle = None
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    train_s, losses = _train(model, optimizer, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             dtype=dtype, progress=progress, desc=f"{kind} fashion-mnist")
    t0 = time.perf_counter()
    acc = evaluate(model, xt, yt, dtype=dtype)
    eval_s = time.perf_counter() - t0
    steps = len(losses)
    out = dict(test_accuracy=acc, train_seconds=train_s, eval_seconds=eval_s,
               samples_per_second=steps * batch_size / train_s, final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
               steps=steps)
    if handle is not None:
        out["optimize_changes"] = len(handle.changes)
        handle.revert()
    return out


def _atomic_write_json(path: str, obj: dict) -> None:
    tt_data._atomic_write_text(os.path.abspath(path), json.dumps(obj, indent=2) + "\n")


def finetune_image(data_dir: Optional[str] = None, epochs: int = 7, batch_size: int = 256, lr: float = 4e-3,
                   seed: int = 0, dtype: Optional[torch.dtype] = None, compare_stock: bool = False,
                   progress: bool = True, output: Optional[str] = None, limit: Optional[int] = None,
                   widths: Sequence[int] = (32, 64, 128)) -> dict:
    """Train the recipe's small ResNet on Fashion-MNIST with turbotune; return metrics.

    Args:
        data_dir: directory with the Fashion-MNIST IDX files (default: ``$TURBOTUNE_FASHION_MNIST``
            or Debian's ``/usr/share/datasets/fashion-mnist``; see :func:`turbotune.data.fashion_mnist`).
        epochs, batch_size, lr, seed: the recipe (``lr`` is the one-cycle peak).
        dtype: ``None`` (fp32) or ``torch.bfloat16`` (autocast; only fast on CPUs with AVX512-BF16/AMX).
        compare_stock: also run the identical recipe on stock PyTorch (same initial weights and batches).
        progress: show a tqdm progress bar.
        output: write the metrics as JSON to this path (atomically).
        limit: use only the first ``limit`` training and test images (quick checks).
        widths: channel widths of the three stages.

    Returns:
        ``{"test_accuracy", "train_seconds", "eval_seconds", "samples_per_second", "final_loss",
        "steps", "recipe": {...}, "stock": {...same keys...} (with compare_stock),
        "speedup_vs_stock" (with compare_stock)}``.

    Raises:
        turbotune.data.DatasetUnavailable: the IDX files are missing (the message gives the apt command).
        ValueError: a bad argument.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"finetune_image: {name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"finetune_image: lr must be a positive number, got {lr!r}")
    if dtype not in (None, torch.bfloat16, torch.float32):
        raise ValueError(f"finetune_image: dtype must be None, torch.float32 or torch.bfloat16, got {dtype!r}")
    if dtype == torch.float32:
        dtype = None
    data = load_fashion_mnist(data_dir, limit)
    if len(data[0]) < batch_size:
        raise ValueError(f"finetune_image: batch_size {batch_size} is larger than the {len(data[0])} training images")
    torch.manual_seed(seed)
    init_state = copy.deepcopy(build_model(widths).state_dict())
    common = dict(epochs=epochs, batch_size=batch_size, lr=float(lr), seed=seed, dtype=dtype, progress=progress,
                  widths=tuple(widths))
    metrics = _run("turbotune", init_state, data, **common)
    metrics["recipe"] = dict(epochs=epochs, batch_size=batch_size, lr=float(lr), seed=seed,
                             dtype=str(dtype or torch.float32).replace("torch.", ""), widths=list(widths),
                             train_images=len(data[0]), test_images=len(data[2]), torch_threads=torch.get_num_threads(),
                             model="small_resnet (stride-2 stem)", optimizer="AdamW wd=5e-4, one-cycle",
                             augmentation="2-px translation + horizontal flip", label_smoothing=0.1)
    if compare_stock:
        metrics["stock"] = _run("stock", init_state, data, **common)
        metrics["speedup_vs_stock"] = metrics["stock"]["train_seconds"] / metrics["train_seconds"]
    if output:
        _atomic_write_json(output, metrics)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbotune.tasks.image", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compare-stock", action="store_true", help="also run the same recipe on stock PyTorch")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train/test images")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--output", default=None, help="write the metrics JSON here")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        m = finetune_image(a.data_dir, a.epochs, a.batch_size, a.lr, a.seed,
                           torch.bfloat16 if a.dtype == "bf16" else None, a.compare_stock, not a.no_progress,
                           a.output, a.limit)
    except tt_data.DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = (f"turbotune: test accuracy {m['test_accuracy']:.4f}, train {m['train_seconds']:.1f} s "
            f"({m['samples_per_second']:.0f} images/s)")
    if "stock" in m:
        s = m["stock"]
        line += (f"\nstock:     test accuracy {s['test_accuracy']:.4f}, train {s['train_seconds']:.1f} s "
                 f"({s['samples_per_second']:.0f} images/s); turbotune speed-up {m['speedup_vs_stock']:.2f}x")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
