"""Bias + GELU suite: turbotune's ``bias_gelu`` vs stock PyTorch.

- ``bias_gelu``: the elementwise op alone, ``bias_gelu(x, b)`` vs ``F.gelu(x + b)``;
- ``linear_gelu``: BERT's intermediate block as each side writes it,
  ``F.gelu(F.linear(h, W, b))`` (stock) vs ``bias_gelu(F.linear(h, W), b)``
  (turbotune: the matmul without its bias, then the fused op). CPU rows measure
  turbotune's default CPU path; the padding-free BERT calls it every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import Case, grad_modes, register_suite
from ...ops.gelu import bias_gelu


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _elementwise_cases(rows: int, n: int, dtype: torch.dtype, device: torch.device):
    x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    nbytes = 2 * x.numel() * x.element_size()  # forward: read x, write y
    providers = {
        "torch": lambda: F.gelu(x + b),
        "turbotune": lambda: bias_gelu(x, b),
    }
    for provider, fwd in providers.items():
        for mode, fn in grad_modes(fwd, [x, b]).items():
            yield Case(op="bias_gelu", provider=provider, mode=mode, shape=f"{rows}x{n}", dtype=_dname(dtype),
                       device=device.type, fn=fn, baseline=provider == "torch",
                       work={"bytes": nbytes} if mode == "fwd" else {})


def _linear_cases(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, modes):
    inter = 4 * hidden
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(inter, hidden, device=device, dtype=dtype) * hidden ** -0.5).requires_grad_()
    b = torch.randn(inter, device=device, dtype=dtype, requires_grad=True)
    providers = {
        "torch": lambda: F.gelu(F.linear(h, w, b)),
        "turbotune": lambda: bias_gelu(F.linear(h, w), b),
    }
    for provider, fwd in providers.items():
        for mode, fn in grad_modes(fwd, [h, w, b], modes=modes).items():
            yield Case(op="linear_gelu", provider=provider, mode=mode, shape=f"{tokens}x{hidden}->{inter}",
                       dtype=_dname(dtype), device=device.type, fn=fn, baseline=provider == "torch",
                       work={"flop": 2 * tokens * hidden * inter} if mode == "fwd" else {})


@register_suite("gelu")
def gelu_suite(quick: bool, device: torch.device):
    if device.type == "cuda":
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
        for dtype in dtypes:
            for rows in [32 * 128] if quick else [32 * 128, 32 * 512]:
                yield from _elementwise_cases(rows, 3072, dtype, device)
            yield from _linear_cases(32 * 128, 768, dtype, device, ("fwd", "fwd+bwd"))
        return
    # CPU: the default path inside BERT's intermediate block, MiniLM (384) and
    # BERT-base (768) widths, about one padding-free batch of 32 movie reviews.
    for hidden in [384] if quick else [384, 768]:
        yield from _linear_cases(1024, hidden, torch.float32, device, ("fwd", "fwd+bwd"))
    yield from _elementwise_cases(1024, 1536, torch.float32, device)
