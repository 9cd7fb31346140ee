"""Benchmark suite ``optim``: one AdamW step over realistic BERT-family parameter sets.

Tensor-size mixes are those of all-MiniLM-L6-v2 (~22.7M params, 6 layers,
hidden 384) and BERT-base (~109.5M params, 12 layers, hidden 768). Gradients
are fixed random tensors; each case times ``optimizer.step()`` alone.

Configurations (``dtype`` column):

``fp32``          fp32 params: torch fused (baseline), torch foreach, torch
                  for-loop (full mode only), turbotune.
``bf16+master``   bf16 params: torch fused on bf16 params (baseline; it keeps
                  no fp32 copy), turbotune with fp32 master weights (fp32 and
                  bf16 moments).

``work["bytes"]`` is the memory traffic of the update (28 B/param for fp32
and for bf16+fp32-master), so ``gb_per_s`` is the achieved bandwidth; the
``copy (28 B/param floor)`` case moves the same bytes with a plain copy, so
turbotune's ``gb_per_s`` over the copy's is the fraction of the bandwidth
floor reached (the GPU goal is >= 85%).

CNN mixes (``resnet18-11.7M``, full mode also ``resnet50-25.6M``: the parameter
shapes of :mod:`turbotune.models.resnet`) have their 4-D conv weights (and
grads) in channels_last, as ``turbotune.optimize(cnn)`` leaves them; fp32 only:
torch fused (baseline), turbotune (native kernel, which walks the dense
channels_last memory) and ``single-tensor reference (old fallback)``, the single-tensor
path such params took before the kernels accepted them.

Mode ``clip+step`` (fp32): gradient clipping by global norm followed by the
step, as a training loop does. Baseline: ``torch.nn.utils.clip_grad_norm_`` +
``torch.optim.AdamW(fused=True).step()`` (40 B/param: norm read 4, scaling
read + write 8, step 28); turbotune ``AdamW(max_grad_norm=...)`` folds the
coefficient into the update (32 B/param); ``turbotune clip_grad_norm_ + step``
is the unfused turbotune pair (40 B/param).
:func:`memory_table` gives params + grads + optimizer-state bytes per param.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from .. import Case, register_suite


def bert_shapes(layers: int, hidden: int, inter: int, vocab: int = 30522, positions: int = 512) -> List[Tuple[int, ...]]:
    """Parameter shapes of a HF ``BertModel`` (embeddings, encoder layers, pooler)."""
    shapes: List[Tuple[int, ...]] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(inter, hidden), (inter,), (hidden, inter), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


MODELS: Dict[str, List[Tuple[int, ...]]] = {
    "minilm-22M": bert_shapes(6, 384, 1536),
    "bert-base-110M": bert_shapes(12, 768, 3072),
}


# CNN mixes: name -> turbotune.models.resnet constructor; conv weights channels_last in the cases.
CNN_MODELS: Dict[str, str] = {"resnet18-11.7M": "resnet18", "resnet50-25.6M": "resnet50"}


def cnn_shapes(model: str) -> List[Tuple[int, ...]]:
    """Parameter shapes of a ``CNN_MODELS`` ResNet (built on the meta device: no memory, no init)."""
    from ...models import resnet

    with torch.device("meta"):
        net = getattr(resnet, CNN_MODELS[model])()
    return [tuple(p.shape) for p in net.parameters()]


def numel(shapes) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


class _Slot:
    """Only one configuration's optimizers (and their state) alive at a time: BERT-base state is ~0.9 GB
    per optimizer. The harness times the providers of a configuration round-robin, so they coexist."""

    group = None
    holders: list = []

    @classmethod
    def enter(cls, group, holder) -> None:
        if cls.group != group:
            for h in cls.holders:
                h.clear()
            cls.holders = []
            cls.group = group
            gc.collect()
        cls.holders.append(holder)


def _params(shapes, dtype, device, seed=0, channels_last=False):
    """Params with fixed random grads; ``channels_last``: 4-D params and their grads in that layout."""
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        mf = torch.channels_last if channels_last and len(s) == 4 else torch.contiguous_format
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype, memory_format=mf))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype, memory_format=mf)
        ps.append(p)
    return ps


def cnn_providers():
    """``(name, baseline, make(params) -> step function)`` of the CNN (channels_last) cases."""
    from turbotune import backend
    from turbotune.optim import AdamW

    def reference(ps):
        opt = AdamW(ps, lr=1e-4)

        def step():
            with backend.force("reference"):
                opt.step()

        return step

    return [
        ("torch-fused", True, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True).step),
        ("turbotune", False, lambda ps: AdamW(ps, lr=1e-4).step),
        ("single-tensor reference (old fallback)", False, reference),
    ]


def _lazy_call(make: Callable[[], Callable[[], object]], group=None) -> Callable[[], None]:
    """A case function that builds its step function (optimizer, state, buffers) on first call; the cases of
    one ``group`` (a configuration, timed round-robin) coexist, an earlier group's are freed (:class:`_Slot`)."""
    holder = {}

    def fn():
        step = holder.get("step")
        if step is None:
            _Slot.enter(group, holder)
            step = make()
            holder["step"] = step
        step()

    return fn


def _lazy_step(make: Callable[[], torch.optim.Optimizer], group=None) -> Callable[[], None]:
    return _lazy_call(lambda: make().step, group)


CLIP_NORM = 1.0  # below the global norm of the bench gradients (~4.8 MiniLM, ~10.5 BERT-base): clipping is active


def clip_step_providers(quick: bool):
    """``(name, baseline, bytes per param, make(params) -> step function)`` of the ``clip+step`` mode."""
    from turbotune.optim import AdamW, clip_grad_norm_

    def torch_pair(ps):
        opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(ps, CLIP_NORM)
            opt.step()

        return step

    def turbotune_pair(ps):
        opt = AdamW(ps, lr=1e-4)

        def step():
            clip_grad_norm_(ps, CLIP_NORM)
            opt.step()

        return step

    out = [
        ("torch clip_grad_norm_ + fused", True, 40, torch_pair),
        ("turbotune max_grad_norm", False, 32, lambda ps: AdamW(ps, lr=1e-4, max_grad_norm=CLIP_NORM).step),
    ]
    if not quick:
        out.append(("turbotune clip_grad_norm_ + step", False, 40, turbotune_pair))
    return out


def _lazy_copy(n: int, device: torch.device, group=None) -> Callable[[], None]:
    def make():
        k = 7 * n // 2  # fp32 elements in 14 B/param
        src, dst = torch.ones(k, device=device), torch.empty(k, device=device)
        return lambda: dst.copy_(src)

    return _lazy_call(make, group)


def _providers(dtype: str, quick: bool):
    from turbotune.optim import AdamW

    if dtype == "fp32":
        out = [
            ("torch-fused", True, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
            ("torch-foreach", False, lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)),
            ("turbotune", False, lambda ps: AdamW(ps, lr=1e-4)),
        ]
        if not quick:
            out.insert(2, ("torch-forloop", False, lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False)))
        return out
    return [
        ("torch-fused(no master)", True, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        ("turbotune", False, lambda ps: AdamW(ps, lr=1e-4, master_weights=True)),
        ("turbotune(bf16 state)", False, lambda ps: AdamW(ps, lr=1e-4, master_weights=True, state_dtype=torch.bfloat16)),
    ]


@register_suite("optim")
def optim_suite(quick: bool, device: torch.device) -> Iterable[Case]:
    models = ["minilm-22M"] if quick else list(MODELS)
    for model in models:
        shapes = MODELS[model]
        n = numel(shapes)
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16+master", torch.bfloat16)):
            shared = {}

            def params(shapes=shapes, dtype=dtype, shared=shared):
                if "ps" not in shared:
                    shared["ps"] = _params(shapes, dtype, device)
                return shared["ps"]

            def case(provider, mode, fn, baseline, traffic, dtype_name=dtype_name, shapes=shapes, n=n):
                return Case(op="adamw_step", provider=provider, mode=mode,
                            shape=f"{model} ({n / 1e6:.1f}M params, {len(shapes)} tensors)", dtype=dtype_name,
                            device=str(device.type), fn=fn, baseline=baseline, work={"bytes": float(traffic)})

            group = (model, dtype_name)
            for name, baseline, make in _providers(dtype_name, quick):
                traffic = 28 * n
                if name == "torch-fused(no master)":
                    traffic = (2 * 2 + 2 + 2 * 2 * 2) * n  # bf16: p r/w, g r, m and v r/w
                elif name == "turbotune(bf16 state)":
                    traffic = (2 + 2 + 4 * 2 + 2 * 2 * 2) * n  # p w, g r, master r/w, bf16 m and v r/w
                yield case(name, "step", _lazy_step(lambda make=make, params=params: make(params()), group),
                           baseline, traffic)
            if dtype_name == "fp32":
                for name, baseline, bpp, make in clip_step_providers(quick):
                    yield case(name, "clip+step", _lazy_call(lambda make=make, params=params: make(params()),
                                                             (group, "clip")), baseline, bpp * n)
                # bandwidth floor: a plain copy moving the same 28 B/param (read 14, write 14)
                yield case("copy (28 B/param floor)", "step", _lazy_copy(n, device, group), False, 28 * n)
    for model in (["resnet18-11.7M"] if quick else list(CNN_MODELS)):
        shapes = cnn_shapes(model)
        n = numel(shapes)
        shape = f"{model} ({n / 1e6:.1f}M params, {len(shapes)} tensors, conv weights channels_last)"
        for name, baseline, make in cnn_providers():
            fn = _lazy_call(lambda make=make, shapes=shapes: make(_params(shapes, torch.float32, device,
                                                                          channels_last=True)), (model, "fp32"))
            yield Case(op="adamw_step", provider=name, mode="step", shape=shape, dtype="fp32",
                       device=str(device.type), fn=fn, baseline=baseline, work={"bytes": float(28 * n)})


def memory_table(n_params: int = 1000) -> List[dict]:
    """Bytes per parameter of params + grads + optimizer state, measured on real optimizer state."""
    from turbotune.optim import AdamW

    rows = []
    configs = [
        ("fp32 params, torch AdamW (fused)", torch.float32, lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("fp32 params, turbotune AdamW", torch.float32, lambda ps: AdamW(ps)),
        ("bf16 params, torch AdamW (no master copy)", torch.bfloat16, lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("bf16 params, turbotune fp32 master + fp32 state", torch.bfloat16, lambda ps: AdamW(ps)),
        ("bf16 params, turbotune fp32 master + bf16 state", torch.bfloat16,
         lambda ps: AdamW(ps, state_dtype=torch.bfloat16)),
        ("bf16 params, turbotune bf16 state + stochastic rounding", torch.bfloat16,
         lambda ps: AdamW(ps, state_dtype=torch.bfloat16, stochastic_rounding=True)),
    ]
    for label, dtype, make in configs:
        ps = _params([(n_params,)], dtype, torch.device("cpu"))
        opt = make(ps)
        opt.step()
        state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.numel() == n_params)
        pg = sum(p.numel() * p.element_size() * 2 for p in ps)
        rows.append(dict(config=label, params_grads=pg / n_params, state=state / n_params,
                         total=(pg + state) / n_params))
    return rows
