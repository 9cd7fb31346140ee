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


def gpu_report(budget_s: float = 0.3, device=None, shapes=((32 * 128, 768), (32 * 512, 1024)),
               suites=("layer_norm", "gelu", "cross_entropy")) -> None:
    """For ``scripts/gpu_check.sh``: the row-wise ops (LayerNorm, bias + GELU,
    cross-entropy) against torch on the GPU, then a sweep of LayerNorm backward
    launch plans (rows per 2-D tile x programs per SM) at BERT shapes, so the
    defaults can be chosen from measurements. Prints two short tables."""
    import importlib

    from .. import measure, run

    ln = importlib.import_module("turbotune.ops.layer_norm")
    device = torch.device(device or "cuda")
    rows = [] if not suites else run(list(suites), quick=True, device=device, progress=False, budget_s=budget_s)
    print(f"{'op':<16} {'mode':<8} {'shape':<22} {'dtype':<9} {'torch ms':>9} {'turbotune ms':>13} {'vs torch':>9}")
    base = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["p50"] for r in rows if r["baseline"]}
    for r in rows:
        if r["baseline"] or r["mode"] not in ("fwd", "fwd+bwd"):
            continue
        b = base.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        ratio = f"{b / r['p50']:.2f}x" if b else "-"
        print(f"{r['op']:<16} {r['mode']:<8} {r['shape']:<22} {r['dtype']:<9} {b or float('nan'):>9.4f} "
              f"{r['p50']:>13.4f} {ratio:>9}")

    print("\nLayerNorm backward launch plans (turbotune: dx + dresidual + dw + db; torch: dx + dw + db); default: "
          f"BLOCK_M from {ln.BWD_TILE_ELEMENTS} elements per tile, {ln.BWD_PROGRAMS_PER_SM} programs per SM")
    print(f"{'shape':<12} {'BLOCK_M':>7} {'per SM':>6} {'ms':>8} {'vs torch':>9}")
    for m, n in shapes:
        x = torch.randn(m, n, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(n, device=device, requires_grad=True)
        b = torch.randn(n, device=device, requires_grad=True)
        dy = torch.randn_like(x)
        y_t = F.layer_norm(x, (n,), w, b)
        t_torch = measure(lambda: torch.autograd.grad(y_t, (x, w, b), dy, retain_graph=True), device,
                          budget_s=budget_s).p50
        y, s, mean, rstd = torch.ops.turbotune.layer_norm(x.detach(), w.detach(), b.detach(), None, 1e-5)
        default_bm = ln._bwd_plan(m, n, device)[0]
        print(f"{m}x{n:<7} {'torch':>7} {'':>6} {t_torch:>8.4f} {'1.00x':>9}")
        for bm in sorted({1, 2, 4, 8, default_bm}):
            for per_sm in (2, 4, 8):
                fn = lambda: ln._backward_triton(dy, dy, x.detach(), w.detach(), mean, rstd, True,  # noqa: E731
                                                 block_m=bm, per_sm=per_sm)
                t = measure(fn, device, budget_s=budget_s).p50
                mark = " *" if (bm == default_bm and per_sm == ln.BWD_PROGRAMS_PER_SM) else ""
                print(f"{m}x{n:<7} {bm:>7} {per_sm:>6} {t:>8.4f} {t_torch / t:>8.2f}x{mark}")
