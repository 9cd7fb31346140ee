"""Tokenizer benchmarks: turbotune's C++ WordPiece vs Hugging Face and nanotoken.

Three configurations on real text (the corpus of :mod:`turbotune.corpus`,
lines taken evenly from it), each with the stock Hugging Face implementation as
the ``baseline=True`` case (so ``ratio_vs_torch`` reads "x faster than HF"):

* ``raw-1thread``: raw encoding ([CLS] ... [SEP], no padding / truncation) on one
  thread: ``tokenizers.Tokenizer.encode_batch`` (model's tokenizer.json with
  ``no_padding()`` / ``no_truncation()``, ``TOKENIZERS_PARALLELISM=false``) vs
  ``BertTokenizer.encode_batch_ragged(num_threads=1)`` vs ``nanotoken``
  ``encode_batch(parallel=False)`` on a cold cache (``clear_cache()`` first).
* ``raw-allcores``: the same with every core (HF's rayon pool, our thread pool,
  nanotoken's ``parallel=True``).
* ``padded-batch32``: what a fine-tuning loop calls, batches of 32 lines,
  ``tok(batch, padding="max_length", truncation=True, max_length=128,
  return_tensors="pt")``: transformers' ``BertTokenizerFast`` vs turbotune's
  ``BertTokenizer`` (one thread) vs nanotoken's ``as_hf()`` (cold cache per pass).
* ``words-batch32-word_ids``: token-classification preprocessing, batches of 32
  lines split into words, ``tok(rows, is_split_into_words=True, truncation=True,
  max_length=128)`` then ``word_ids(i)`` of every row (turbotune computes the
  alignment on that first ``word_ids`` call): transformers vs turbotune (one thread).

nanotoken is optional (``pip install nanotoken``); its cases are skipped when it
is absent. Text size: ``TURBOTUNE_TOKENIZER_BENCH_MB`` (default 2, quick 0.25).
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, List, Optional

import torch

from .. import Case, register_suite

def corpus_lines(mb: float) -> Optional[List[str]]:
    """About ``mb`` MB of corpus lines, taken evenly from the whole corpus (built on first use)."""
    from ...corpus import corpus_path

    path = corpus_path()
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    total = sum(len(s) for s in lines)
    step = max(1, int(total / (mb * 1e6)))
    return lines[::step]


@contextlib.contextmanager
def _hf_parallelism(enabled: bool) -> Iterator[None]:
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover
        return max(1, os.cpu_count() or 1)


@register_suite("tokenizer")
def tokenizer_suite(quick: bool, device: torch.device) -> Iterator[Case]:
    from transformers import BertTokenizerFast

    from ...data import packaged_model_dir
    from ...tokenizers import BertTokenizer

    mb = float(os.environ.get("TURBOTUNE_TOKENIZER_BENCH_MB", 0.25 if quick else 2.0))
    lines = corpus_lines(mb)
    if not lines:
        return
    model = packaged_model_dir()
    nbytes = sum(len(s.encode("utf-8")) for s in lines)
    ours = BertTokenizer.from_pretrained(model, num_threads=1)
    hf_fast = BertTokenizerFast.from_pretrained(model)
    hf_raw = copy.deepcopy(hf_fast.backend_tokenizer)
    hf_raw.no_padding()
    hf_raw.no_truncation()
    ntokens = int(len(ours.encode_batch_ragged(lines)[0]))
    try:
        import nanotoken
    except ImportError:
        nanotoken = None
    nt = nanotoken.Tokenizer(model) if nanotoken is not None else None
    nt_hf = nt.as_hf() if nt is not None else None

    shape = f"{nbytes / 1e6:.2f}MB/{len(lines)}lines"
    work = {"bytes": nbytes, "items": ntokens, "unit": "tokens"}

    def case(mode, provider, fn, baseline=False, dtype="int32"):
        return Case(op="tokenizer", provider=provider, mode=mode, shape=shape, dtype=dtype, device="cpu",
                    fn=fn, baseline=baseline, work=dict(work))

    for mode, threads in (("raw-1thread", 1), ("raw-allcores", _threads())):
        parallel = threads > 1

        def hf_fn(parallel=parallel):
            with _hf_parallelism(parallel):
                return hf_raw.encode_batch(lines)

        yield case(mode, "hf-tokenizers", hf_fn, baseline=True, dtype="int32")
        yield case(mode, "turbotune", lambda t=threads: ours.encode_batch_ragged(lines, num_threads=t))
        if nt is not None:
            def nt_fn(parallel=parallel):
                nt.clear_cache()
                return nt.encode_batch(lines, parallel=parallel)

            yield case(mode, "nanotoken-cold", nt_fn)

    batches = [lines[i:i + 32] for i in range(0, len(lines), 32)]
    kw = dict(padding="max_length", truncation=True, max_length=128, return_tensors="pt")

    def hf_padded():
        with _hf_parallelism(False):
            for b in batches:
                hf_fast(b, **kw)

    def ours_padded():
        for b in batches:
            ours(b, **kw)

    yield case("padded-batch32", "transformers", hf_padded, baseline=True, dtype="int64")
    yield case("padded-batch32", "turbotune", ours_padded, dtype="int64")
    word_batches = [[line.split() for line in b] for b in batches]
    wkw = dict(is_split_into_words=True, truncation=True, max_length=128)

    def words(tok):
        def run():
            for rows in word_batches:
                enc = tok(rows, **wkw)
                for i in range(len(rows)):
                    enc.word_ids(i)
        return run

    def hf_words():
        with _hf_parallelism(False):
            words(hf_fast)()

    yield case("words-batch32-word_ids", "transformers", hf_words, baseline=True, dtype="int64")
    yield case("words-batch32-word_ids", "turbotune", words(ours), dtype="int64")
    if nt_hf is not None:
        def nt_padded():
            nt.clear_cache()
            for b in batches:
                nt_hf(b, **kw)

        yield case("padded-batch32", "nanotoken-cold", nt_padded, dtype="int64")
