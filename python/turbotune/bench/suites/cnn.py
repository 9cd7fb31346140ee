"""CNN suite: the fused BatchNorm + ReLU (+ residual add) op against torch's separate
ops, and ResNet-18 / ResNet-50 training steps and inference against stock eager,
eager channels_last and ``torch.compile``, in fp32 and bf16 (autocast).

Every provider of a model case runs the same weights, input and recipe:
``torch`` (stock eager, NCHW, the baseline), ``torch channels_last`` (model and
input converted), ``torch.compile`` (default inductor; full suite only),
``turbotune`` (``turbotune.optimize(model)``). bf16 cases run all providers
under ``torch.autocast``; on CPUs without AVX512-BF16 / AMX they are only in
the full suite (bf16 is several times slower than fp32 there).

:func:`model_step` and :func:`bn_providers` are shared with
``benchmarks/bench_cnn.py``, whose ``--paired`` mode interleaves the providers
round by round (robust on a shared machine).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import Case, grad_modes, register_suite
from ...models.cnn import fast_bf16
from ...models.resnet import resnet18, resnet50
from ...ops.batch_norm import batch_norm_act

ARCHS = {"resnet18": resnet18, "resnet50": resnet50}
MODEL_PROVIDERS = ("torch", "torch channels_last", "torch.compile", "turbotune")


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- the fused op


def bn_providers(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, residual: bool = True,
                 channels_last: bool = True) -> Dict[str, Tuple[Callable[[], torch.Tensor], List[torch.Tensor]]]:
    """``{"torch": (forward, leaves), "turbotune": (forward, leaves)}`` for training-mode
    ``relu(batch_norm(x) [+ r])`` on ``shape`` (NCHW, stored channels_last by default)."""
    mf = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=mf).requires_grad_()
    r = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=mf).requires_grad_() if residual \
        else None
    w = (torch.rand(c, device=device) + 0.5).requires_grad_()
    b = torch.randn(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    leaves = [x, w, b] + ([r] if residual else [])

    # Each call updates its own copy of the running statistics: the harness keeps one graph alive for
    # its ``bwd`` mode while other calls run, and ATen's batch-norm backward checks that the statistics
    # it saved were not modified in place since (both providers pay the same two tiny copies).
    def stock():
        z = F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
        return torch.relu(z + r) if residual else torch.relu(z)

    def fused():
        return batch_norm_act(x, w, b, rm.clone(), rv.clone(), training=True, momentum=0.1, eps=1e-5,
                              activation="relu", residual=r)

    return {"torch": (stock, leaves), "turbotune": (fused, leaves)}


# ----------------------------------------------------------------------------- whole models


def model_step(arch: str, provider: str, mode: str, dtype: torch.dtype, device: torch.device, batch: int,
               res: int, seed: int = 0) -> Callable[[], object]:
    """One callable doing a training step (``mode="train"``: forward, cross-entropy,
    backward, SGD step) or an inference forward (``mode="infer"``, ``torch.no_grad``)
    of ``arch`` with ``provider``'s set-up; same weights and data for every provider."""
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"model_step: provider must be one of {MODEL_PROVIDERS}, got {provider!r}")
    torch.manual_seed(seed)
    model = ARCHS[arch]().to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    if provider == "torch channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train(mode == "train")
    if provider == "turbotune":
        import turbotune

        turbotune.optimize(model)
    run = model
    if provider == "torch.compile":
        run = torch.compile(model)
    autocast = dtype != torch.float32
    dev = device.type

    if mode == "infer":
        def step():
            with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=autocast):
                return run(x)
        return step

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(run(x).float(), y)
        loss.backward()
        opt.step()
        return loss
    return step


def _model_configs(quick: bool, device: torch.device):
    """``(arch, mode, batch, res, dtypes, providers)`` rows."""
    if device.type == "cuda":
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
        provs = ["torch", "torch channels_last", "turbotune"] + ([] if quick else ["torch.compile"])
        archs = ["resnet18"] if quick else ["resnet18", "resnet50"]
        return [(a, m, 64 if m == "train" else 128, 224, dtypes, provs) for a in archs for m in ("train", "infer")]
    if quick:
        dtypes = [torch.float32] + ([torch.bfloat16] if fast_bf16("cpu") else [])
        return [("resnet18", "infer", 32, 112, dtypes, ["torch", "turbotune"]),
                ("resnet18", "train", 16, 112, dtypes, ["torch", "turbotune"])]
    dtypes = [torch.float32, torch.bfloat16]
    provs = ["torch", "torch channels_last", "torch.compile", "turbotune"]
    rows = []
    for arch in ("resnet18", "resnet50"):
        rows.append((arch, "infer", 32, 224, dtypes, provs))
        rows.append((arch, "train", 32, 224 if arch == "resnet18" else 160, dtypes, provs))
    return rows


def _should_compile(provider: str, device: torch.device, dtype: torch.dtype) -> bool:
    # inductor on the CPU needs a C++ compiler; bf16 on an AVX2 CPU is not worth compiling for
    return provider != "torch.compile" or device.type == "cuda" or dtype == torch.float32


@register_suite("cnn")
def cnn_suite(quick: bool, device: torch.device):
    if device.type == "cuda":
        bn_shapes = [(64, 256, 56, 56)] if quick else [(64, 64, 56, 56), (64, 256, 56, 56), (64, 512, 28, 28)]
        bn_dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    else:
        bn_shapes = [(32, 64, 56, 56)] if quick else [(32, 64, 56, 56), (32, 256, 28, 28)]
        bn_dtypes = [torch.float32]
    for dtype in bn_dtypes:
        for shape in bn_shapes:
            nelem = 1
            for s in shape:
                nelem *= s
            for provider, (fwd, leaves) in bn_providers(shape, dtype, device).items():
                for mode, fn in grad_modes(fwd, leaves).items():
                    yield Case(op="bn_add_relu", provider=provider, mode=mode, shape="x".join(map(str, shape)) + " cl",
                               dtype=_dname(dtype), device=device.type, fn=fn, baseline=provider == "torch",
                               work={"bytes": 4 * nelem * torch.finfo(dtype).bits // 8} if mode == "fwd" else {})
    for arch, mode, batch, res, dtypes, provs in _model_configs(quick, device):
        for dtype in dtypes:
            for provider in provs:
                if not _should_compile(provider, device, dtype):
                    continue
                yield Case(op=arch, provider=provider, mode=mode, shape=f"{batch}x3x{res}x{res}", dtype=_dname(dtype),
                           device=device.type, fn=_LazyStep(arch, provider, mode, dtype, device, batch, res),
                           baseline=provider == "torch", work={"items": batch, "unit": "images"})


class _LazyStep:
    """Builds the model on first call, so listing the suite's cases stays cheap."""

    def __init__(self, *args):
        self.args = args
        self.fn: Optional[Callable[[], object]] = None

    def __call__(self):
        if self.fn is None:
            self.fn = model_step(*self.args)
        return self.fn()


def paired_models(arch: str, mode: str, dtype: torch.dtype, device: torch.device, batch: int, res: int,
                  providers=("torch", "torch channels_last", "turbotune")) -> Dict[str, Callable[[], object]]:
    """Steps for several providers at once (each with its own model copy), for interleaved timing."""
    return {p: model_step(arch, p, mode, dtype, device, batch, res) for p in providers
            if _should_compile(p, device, dtype)}

