"""Attention suite: turbotune's fused attention vs stock PyTorch.

Providers, for BERT shapes (GPU: B=32, H=12, D=64, L in {128, 256, 512}):

- ``torch`` (baseline): ``F.scaled_dot_product_attention`` with PyTorch's own
  backend choice;
- ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-math`` / ``sdpa-cudnn``: SDPA
  pinned to one backend, for each backend that accepts the inputs (flash
  rejects any mask);
- ``eager``: ``softmax(q k^T * scale + mask) v`` written out;
- ``turbotune``: :func:`turbotune.ops.attention` (with an ``attention_mask``
  for padded batches); its backward is FlashAttention-2's layout (dQ accumulated
  with fp32 atomics);
- ``turbotune-det`` (GPU only): the same with ``deterministic=True`` (dQ in a
  second kernel, bit-reproducible);
- ``turbotune-varlen``: :func:`turbotune.ops.attention_varlen` on the same
  padded batch unpadded once outside the timed region (as a padding-free
  encoder does: it unpads once per forward, not per layer).

Configurations (``shape`` column): ``nomask`` and ``pad50`` (about 50% of the
keys padded: lengths uniform in [L/8, 7L/8]), optionally with ``+drop0.1``
(BERT's attention dropout). Modes: fwd, bwd, fwd+bwd. ``work`` counts the
dense FLOPs of the padded problem (4*B*H*L*L*D forward, 2.5x that backward)
for every provider, so TFLOP/s columns compare like with like.

On a machine without a GPU the ``turbotune`` rows time the PyTorch reference
path (the Triton interpreter is for correctness only); the suite then uses a
smaller batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import Case, grad_modes, register_suite
from ...ops.attention import attention, attention_varlen
from ...padding import unpad_input


def _sdpa_backends(device: torch.device):
    """Pinned SDPA backends worth trying on ``device`` (name -> SDPBackend)."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - old torch
        return {}
    if device.type != "cuda":
        return {"sdpa-math": SDPBackend.MATH}
    out = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def _pinned(backend_enum):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend_enum])


def _eager(q, k, v, bias, dropout_p):
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    p = torch.softmax(s, dim=-1)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def _accepts(fn) -> bool:
    """True when ``fn`` (forward + backward) runs: SDPA backends raise on inputs they reject."""
    try:
        with torch.enable_grad():
            out = fn()
            out.float().sum().backward()
        return True
    except RuntimeError:
        return False


def _config_cases(b, h, l, d, dtype, device, padded, dropout_p):
    dname = str(dtype).replace("torch.", "")
    shape = f"B{b} H{h} L{l} D{d} {'pad50' if padded else 'nomask'}" + (f" +drop{dropout_p:g}" if dropout_p else "")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, b, l, h, d, generator=g).to(device=device, dtype=dtype)
    # (B, L, H, D) projections viewed as (B, H, L, D), exactly what a BERT layer passes.
    leaves = [x[i].clone().requires_grad_() for i in range(3)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    mask = bias = bool_mask = None
    if padded:
        lens = torch.randint(l // 8, 7 * l // 8 + 1, (b,), generator=g)
        mask = (torch.arange(l).view(1, -1) < lens.view(-1, 1)).to(device)
        bias = torch.zeros(b, 1, 1, l, device=device, dtype=dtype).masked_fill(~mask.view(b, 1, 1, l), float("-inf"))
        bool_mask = mask.view(b, 1, 1, l)
    flop = 4.0 * b * h * l * l * d
    work = {"fwd": {"flop": flop}, "bwd": {"flop": 2.5 * flop}, "fwd+bwd": {"flop": 3.5 * flop}}

    providers = {
        "torch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=dropout_p),
        "eager": lambda: _eager(q, k, v, bias, dropout_p),
        "turbotune": lambda: attention(q, k, v, attention_mask=mask, dropout_p=dropout_p),
    }
    if device.type == "cuda":  # on CPU the flag changes nothing (no atomics there)
        providers["turbotune-det"] = lambda: attention(q, k, v, attention_mask=mask, dropout_p=dropout_p,
                                                       deterministic=True)
    for name, be in _sdpa_backends(device).items():
        def run(be=be):
            with _pinned(be):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=dropout_p)

        providers[name] = run
    varlen_leaves = None
    if padded:
        packed, _, cu, mx = unpad_input(torch.stack([t.detach() for t in leaves], 2), mask)
        varlen_leaves = [packed[:, i].contiguous().requires_grad_() for i in range(3)]
        qv, kv, vv = varlen_leaves
        providers["turbotune-varlen"] = lambda: attention_varlen(qv, kv, vv, cu, cu, mx, mx, dropout_p=dropout_p)

    for provider, fwd in providers.items():
        inputs = varlen_leaves if provider == "turbotune-varlen" else leaves
        if provider.startswith("sdpa-") and not _accepts(fwd):
            continue
        for mode, fn in grad_modes(fwd, inputs).items():
            yield Case(op="attention", provider=provider, mode=mode, shape=shape, dtype=dname, device=device.type,
                       fn=fn, baseline=(provider == "torch"), work=work[mode])


@register_suite("attention")
def attention_suite(quick: bool, device: torch.device):
    if device.type == "cuda":
        b, h, d = 32, 12, 64
        lengths = [512] if quick else [128, 256, 512]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
        drops = [0.0] if quick else [0.0, 0.1]
    else:
        b, h, d = 4, 12, 64
        lengths = [128] if quick else [128, 256]
        dtypes = [torch.float32]
        drops = [0.0] if quick else [0.0, 0.1]
    for dtype in dtypes:
        for l in lengths:
            for padded in (False, True):
                for p in drops:
                    yield from _config_cases(b, h, l, d, dtype, device, padded, p)
