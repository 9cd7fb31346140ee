"""Cross-entropy suite: turbotune's ``cross_entropy`` vs ``F.cross_entropy``.

The MLM head's loss: 30,522 classes (BERT's vocabulary), 15% of the tokens
carry a target and the rest are ``ignore_index``, as in masked-language-model
training; and a token-classification head (9 classes, every token). GPU rows
time the Triton kernels; CPU rows time turbotune's default CPU path (ATen's
``F.cross_entropy``, so the ratio shows only the wrapper's overhead).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import Case, grad_modes, register_suite
from ...ops.cross_entropy import cross_entropy


def _cases(rows: int, classes: int, frac_targets: float, dtype: torch.dtype, device: torch.device, smoothing=0.0):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(rows, classes, generator=g).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, classes, (rows,), generator=g)
    target[torch.rand(rows, generator=g) >= frac_targets] = -100
    target = target.to(device)
    dname = str(dtype).replace("torch.", "")
    shape = f"{rows}x{classes}" + (f" ls={smoothing}" if smoothing else "")
    providers = {
        "torch": lambda: F.cross_entropy(logits, target, label_smoothing=smoothing),
        "turbotune": lambda: cross_entropy(logits, target, label_smoothing=smoothing),
    }
    nbytes = logits.numel() * logits.element_size()  # forward reads the logits once (at most)
    for provider, fwd in providers.items():
        for mode, fn in grad_modes(fwd, [logits]).items():
            yield Case(op="cross_entropy", provider=provider, mode=mode, shape=shape, dtype=dname,
                       device=device.type, fn=fn, baseline=provider == "torch",
                       work={"bytes": nbytes} if mode == "fwd" else {})


@register_suite("cross_entropy")
def cross_entropy_suite(quick: bool, device: torch.device):
    if device.type == "cuda":
        for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]:
            yield from _cases(32 * 128, 30522, 0.15, dtype, device)
            if not quick:
                yield from _cases(32 * 128, 30522, 0.15, dtype, device, smoothing=0.1)
                yield from _cases(32 * 128, 9, 1.0, dtype, device)
        return
    yield from _cases(512, 30522, 0.15, torch.float32, device)
    if not quick:
        yield from _cases(2048, 9, 1.0, torch.float32, device)
