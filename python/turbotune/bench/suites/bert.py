"""Benchmark suite ``bert``: end-to-end MiniLM inference and training steps on real
movie-review batches, stock Hugging Face vs ``turbotune.optimize(model)``.

Every provider gets the same padded batches (batch 32 of real Rotten Tomatoes
snippets, tokenized by the packaged MiniLM vocabulary), padded two ways:

- ``pad=128``: ``padding="max_length", max_length=128`` (the classic recipe);
- ``pad=longest``: padded to the longest snippet of each batch.

The shape column carries ``L`` = padded tokens / real tokens of the measured
batches: the padding limit, i.e. the speed-up of a path that computes exactly
the real tokens at the same per-token speed.

Providers: ``hf-sdpa`` (the baseline), ``hf-eager``, ``turbotune``; for
inference also ``onnxruntime`` when the ``onnx`` extra is installed
(``torch.onnx.export(..., dynamo=True)``, outputs checked against eager first).
Modes: ``infer`` (``no_grad`` forward, ``work["items"]`` = sentences) and
``train`` (forward + backward + AdamW step: ``torch.optim.AdamW(fused=True)``
for stock, ``turbotune.optim.AdamW`` for turbotune). ``train`` runs with the
model's dropout (attention dropout 0.1) and, as ``train(attn-dropout 0)``,
with attention-probability dropout off for every provider.

:func:`paired_rounds` (used by ``benchmarks/bench_bert.py``) times providers
interleaved round by round, which is what a shared machine needs.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .. import Case, register_suite

BATCH = 32


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from turbotune.data import packaged_model_dir
    from turbotune.tokenizers import BertTokenizer

    return BertTokenizer.from_pretrained(packaged_model_dir())


def batches(n: int, padding: str, batch: int = BATCH, offset: int = 0) -> Tuple[List[dict], float]:
    """``n`` batches of real movie reviews (test split order) padded as ``padding``
    (``"max_length"`` to 128 or ``"longest"``), and their padding limit ``L``."""
    from turbotune.data import movie_reviews, split_dataset

    items = split_dataset(movie_reviews(), test_size=1000, val_size=1000, seed=0)["test"]
    out, real, padded = [], 0, 0
    for i in range(n):
        chunk = items[offset + i * batch: offset + (i + 1) * batch]
        enc = _tokenizer()([r.text for r in chunk], padding=True if padding == "longest" else "max_length",
                           truncation=True, max_length=128, return_tensors="pt")
        b = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        b["labels"] = torch.tensor([r.label for r in chunk])
        real += int(b["attention_mask"].sum())
        padded += b["attention_mask"].numel()
        out.append(b)
    return out, padded / real


def load_model(attn: str = "sdpa", attention_dropout: Optional[float] = None, dtype=None):
    """The packaged MiniLM with a 2-label classification head (same init every call)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from turbotune.data import packaged_model_dir

    logging.set_verbosity_error()
    kw = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(packaged_model_dir(), num_labels=2,
                                                                   attn_implementation=attn, **kw)
    return model if dtype is None else model.to(dtype)


def _inputs(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


def _infer_fn(model, bs: List[dict], autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    model.eval()
    it = {"i": 0}

    def fn():
        b = bs[it["i"] % len(bs)]
        it["i"] += 1
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            model(**_inputs(b))

    return fn


def _train_fn(model, bs: List[dict], opt, autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    model.train()
    it = {"i": 0}

    def fn():
        b = bs[it["i"] % len(bs)]
        it["i"] += 1
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fn


def providers(mode: str, bs: List[dict], dtype: str = "fp32", attention_dropout: Optional[float] = None,
              onnx: bool = True) -> Dict[str, Callable[[], None]]:
    """``{provider: fn}`` for one configuration; built lazily by the caller (models are ~90 MB).
    ``onnx``: add ONNX Runtime for fp32 inference when the ``onnx`` extra is installed."""
    import turbotune
    from turbotune.optim import AdamW

    out: Dict[str, Callable[[], None]] = {}
    bf16 = dtype == "bf16"
    for attn in ("sdpa", "eager"):
        m = load_model(attn, attention_dropout)
        if mode == "infer":
            out[f"hf-{attn}"] = _infer_fn(m, bs)
        else:
            out[f"hf-{attn}"] = _train_fn(m, bs, torch.optim.AdamW(m.parameters(), lr=2e-5, fused=True))
    if bf16:
        m = load_model("sdpa", attention_dropout)
        out["hf-sdpa+autocast-bf16"] = (_infer_fn(m, bs, torch.bfloat16) if mode == "infer" else
                                        _train_fn(m, bs, torch.optim.AdamW(m.parameters(), lr=2e-5, fused=True),
                                                  torch.bfloat16))
    m = load_model("sdpa", attention_dropout)
    turbotune.optimize(m, dtype=torch.bfloat16 if bf16 else None)
    name = "turbotune-bf16" if bf16 else "turbotune"
    out[name] = _infer_fn(m, bs) if mode == "infer" else _train_fn(m, bs, AdamW(m.parameters(), lr=2e-5))
    if mode == "infer" and not bf16 and onnx:
        ort = onnxruntime_fn(bs)
        if ort is not None:
            out["onnxruntime"] = ort
    return out


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_fn(bs: List[dict], threads: Optional[int] = None) -> Optional[Callable[[], None]]:
    """ONNX Runtime on the same batches (None without the ``onnx`` extra).

    Exported with ``torch.onnx.export(..., dynamo=True)`` with dynamic batch and
    sequence axes; the logits are checked against eager PyTorch (1e-4 relative)
    on every batch before anything is timed (the older TorchScript exporter bakes
    the attention mask in under transformers v5 and silently gives wrong results)."""
    if not onnxruntime_available():
        return None
    import onnxruntime as ort

    model = load_model("sdpa").eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(_inputs(bs[0])[k] for k in names)
    tmp = tempfile.mkdtemp(prefix="turbotune-onnx-")
    path = os.path.join(tmp, "minilm.onnx")
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    seq_dim = torch.export.Dim("seq", min=2, max=512)
    dyn = {k: {0: batch_dim, 1: seq_dim} for k in names}

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped(model), example, path, input_names=names, output_names=["logits"],
                          dynamic_shapes=dyn, dynamo=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = [{k: _inputs(b)[k].numpy() for k in names} for b in bs]
    with torch.no_grad():
        for b, f in zip(bs, feeds):
            want = model(**_inputs(b)).logits
            got = torch.from_numpy(sess.run(None, f)[0])
            err = float((got - want).abs().max() / want.abs().max())
            if err > 1e-4:
                raise RuntimeError(f"onnxruntime export disagrees with eager PyTorch: relative error {err:.3g}")
    it = {"i": 0}

    def fn():
        f = feeds[it["i"] % len(feeds)]
        it["i"] += 1
        sess.run(None, f)

    return fn


CONFIGS = [  # (mode, dtype, attention dropout override)
    ("infer", "fp32", None),
    ("train", "fp32", None),
    ("train", "fp32", 0.0),
    ("infer", "bf16", None),
    ("train", "bf16", 0.0),
]


@register_suite("bert")
def bert_suite(quick: bool, device: torch.device) -> Iterable[Case]:
    if device.type != "cpu":
        return  # the GPU numbers come from scripts/gpu_check.sh (BERT-base bf16)
    n = 1 if quick else 3
    configs = [("infer", "fp32", None), ("train", "fp32", 0.0)] if quick else CONFIGS
    for padding in ("max_length", "longest"):
        bs, limit = batches(n, padding)
        pad = "128" if padding == "max_length" else "longest"
        for mode, dtype, attn_drop in configs:
            holder: Dict[str, Dict[str, Callable[[], None]]] = {}
            label = mode if attn_drop is None else f"{mode}(attn-dropout 0)"

            def get(name, mode=mode, dtype=dtype, attn_drop=attn_drop, holder=holder, bs=bs):
                if "fns" not in holder:
                    holder.clear()
                    holder["fns"] = providers(mode, bs, dtype, attn_drop, onnx=not quick)
                return holder["fns"][name]

            names = ["hf-sdpa", "hf-eager"] + (["hf-sdpa+autocast-bf16", "turbotune-bf16"] if dtype == "bf16"
                                               else ["turbotune"])
            if mode == "infer" and dtype == "fp32" and not quick and onnxruntime_available():
                names.append("onnxruntime")
            for name in names:
                yield Case(op="minilm", provider=name, mode=label, shape=f"B={BATCH} pad={pad} L={limit:.2f}",
                           dtype=dtype, device="cpu", fn=lambda name=name, get=get: get(name)(),
                           baseline=name == "hf-sdpa", work={"items": float(BATCH), "unit": "sentences"})


def paired_rounds(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Time every provider once per round, interleaved (ms per call); robust to machine load."""
    import time

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times
