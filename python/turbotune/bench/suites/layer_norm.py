"""LayerNorm suite: turbotune's fused kernel vs ``torch.nn.LayerNorm`` and vs
torch's unfused ``x + residual`` followed by ``LayerNorm``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import Case, grad_modes, register_suite
from ...ops.layer_norm import layer_norm


def _dtypes(device: torch.device, quick: bool):
    if device.type == "cuda":
        return [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    return [torch.float32]


def _cases(rows: int, n: int, dtype: torch.dtype, device: torch.device):
    dname = str(dtype).replace("torch.", "")
    shape = f"{rows}x{n}"
    x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(n, device=device, dtype=dtype).add_(0.5).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    elem = x.element_size() * rows * n  # forward traffic: read x (+ r), write y (+ s)
    providers = {
        ("layer_norm", "torch"): (lambda: F.layer_norm(x, (n,), w, b), [x, w, b], 2 * elem),
        ("layer_norm", "turbotune"): (lambda: layer_norm(x, w, b), [x, w, b], 2 * elem),
        ("add_layer_norm", "torch"): (lambda: F.layer_norm(x + r, (n,), w, b), [x, r, w, b], 4 * elem),
        ("add_layer_norm", "turbotune"): (lambda: layer_norm(x, w, b, residual=r), [x, r, w, b], 4 * elem),
    }
    for (op, provider), (fwd, leaves, nbytes) in providers.items():
        for mode, fn in grad_modes(fwd, leaves).items():
            yield Case(
                op=op, provider=provider, mode=mode, shape=shape, dtype=dname, device=device.type,
                fn=fn, baseline=(provider == "torch"), work={"bytes": nbytes} if mode == "fwd" else {},
            )


@register_suite("layer_norm")
def layer_norm_suite(quick: bool, device: torch.device):
    # BERT fine-tuning batches: 32 x 128 and 32 x 512 tokens on a GPU; a smaller
    # batch on the CPU, where the suite measures the reference path.
    row_counts = [32 * 128, 32 * 512] if device.type == "cuda" else [2048]
    hidden = [768, 1024] if quick else [384, 768, 1024, 4096]
    for dtype in _dtypes(device, quick):
        for rows in row_counts:
            for n in hidden:
                yield from _cases(rows, n, dtype, device)
