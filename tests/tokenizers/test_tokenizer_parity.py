"""Parity with Hugging Face on real text: the whole >= 20 MB corpus (raw ids and
offsets against the Rust tokenizer that BertTokenizerFast wraps), and samples of
it through the full ``__call__`` API (pairs, truncation, padding, tensors, cased vocab)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from tok_helpers import assert_same


def _flat_hf(encodings, offsets=True):
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
    lens = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    offs = None
    if offsets:
        offs = np.array([o for e in encodings for o in e.offsets], dtype=np.int64).reshape(-1, 2)
    return ids, lens, offs


def _first_diff(ours_ids, ours_len, ref_ids, ref_len, lines, start):
    for i in range(len(ours_len)):
        if ours_len[i] != ref_len[i]:
            return i
    bounds = np.concatenate(([0], np.cumsum(ref_len)))
    bad = np.nonzero(ours_ids != ref_ids)[0][0]
    return int(np.searchsorted(bounds, bad, side="right") - 1)


def test_corpus_is_real_and_large(corpus_path, corpus_lines):
    import os

    assert os.path.getsize(corpus_path) >= 20 * (1 << 20)
    assert len(corpus_lines) > 100_000
    non_ascii = sum(1 for s in corpus_lines if not s.isascii())
    assert non_ascii >= 500  # translations, names, symbols: not only English


@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
def test_whole_corpus_raw_parity(tt, hf, corpus_lines, chunk):
    """All corpus lines (in 4 parts): input_ids and offset_mapping identical to
    tokenizers.Tokenizer.encode_batch with [CLS]/[SEP], no padding, no truncation."""
    ref = copy.deepcopy(hf.backend_tokenizer)
    ref.no_padding()
    ref.no_truncation()
    n = len(corpus_lines)
    lines = corpus_lines[chunk * n // 4:(chunk + 1) * n // 4]
    raw = tt._native.encode_batch(*tt._native_args(
        lines, None, None, None, True, 0, None, 0, None, False, 0, False, True, False, False, False, None))
    ref_ids, ref_len, ref_off = _flat_hf(ref.encode_batch(lines, add_special_tokens=True))
    same = (raw["length"].shape == ref_len.shape and np.array_equal(raw["length"], ref_len)
            and np.array_equal(raw["input_ids"], ref_ids))
    if not same:
        i = _first_diff(raw["input_ids"], raw["length"], ref_ids, ref_len, lines, 0)
        enc = tt(lines[i])
        raise AssertionError(f"ids differ on line {i}: {lines[i]!r}\nours {enc['input_ids']}\n"
                             f"hf   {hf(lines[i])['input_ids']}")
    ids, splits = tt.encode_batch_ragged(lines, num_threads=1 + chunk % 2)
    assert ids.dtype == np.int32 and splits.dtype == np.int64
    assert np.array_equal(ids, ref_ids)
    assert np.array_equal(np.diff(splits), ref_len) and splits[0] == 0
    if not np.array_equal(raw["offset_mapping"], ref_off):
        bounds = np.concatenate(([0], np.cumsum(ref_len)))
        bad = np.nonzero((raw["offset_mapping"] != ref_off).any(axis=1))[0][0]
        i = int(np.searchsorted(bounds, bad, side="right") - 1)
        raise AssertionError(f"offsets differ on line {i}: {lines[i]!r}")


def _sample(lines, step, limit=None):
    out = [s for s in lines[::step]]
    return out[:limit] if limit else out


def test_call_parity_sample(tt, hf, corpus_lines):
    """A 1/40 sample through __call__: lists of ids, types, mask, offsets, special mask, length."""
    texts = _sample(corpus_lines, 40)
    kw = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True)
    ours = tt(texts, **kw)
    ref = hf(texts, **kw)
    assert_same(ours, ref, keys=("input_ids", "token_type_ids", "attention_mask", "offset_mapping",
                                 "special_tokens_mask", "length"), texts=texts)


@pytest.mark.parametrize("padding,truncation,max_length,multiple", [
    (True, True, 64, None),
    ("max_length", True, 128, None),
    ("longest", "longest_first", 32, 8),
    (False, "only_first", 48, None),
    ("max_length", "only_second", 48, 16),
    (True, False, None, None),
    ("max_length", True, 7, None),
])
def test_pairs_truncation_padding(tt, hf, corpus_lines, padding, truncation, max_length, multiple):
    """Pairs of consecutive corpus lines in every truncation strategy and padding mode."""
    lines = _sample(corpus_lines, 97, 3000)
    a, b = lines[0::2], lines[1::2]
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if truncation in ("only_first", "only_second"):
        # HF raises when the sequence to truncate is too short: keep the pairs where it is not.
        keep = []
        for x, y in zip(a, b):
            try:
                hf(x, y, truncation=truncation, max_length=max_length)
                keep.append((x, y))
            except Exception:
                continue
        assert len(keep) > 100
        a, b = [k[0] for k in keep], [k[1] for k in keep]
    kw = dict(padding=padding, truncation=truncation, max_length=max_length, pad_to_multiple_of=multiple,
              return_offsets_mapping=True, return_special_tokens_mask=True)
    ours = tt(a, b, **kw)
    ref = hf(a, b, **kw)
    assert_same(ours, ref, keys=("input_ids", "token_type_ids", "attention_mask", "offset_mapping",
                                 "special_tokens_mask"), texts=list(zip(a, b)))
    if padding:
        ours_t = tt(a, b, return_tensors="pt", **kw)
        ref_t = hf(a, b, return_tensors="pt", **kw)
        for k in ("input_ids", "token_type_ids", "attention_mask", "offset_mapping"):
            assert ours_t[k].dtype == ref_t[k].dtype and ours_t[k].shape == ref_t[k].shape, k
            assert bool((ours_t[k] == ref_t[k]).all()), k


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_truncation_side(tt, hf, corpus_lines, side):
    texts = _sample(corpus_lines, 211, 400)
    old = (tt.padding_side, tt.truncation_side, hf.padding_side, hf.truncation_side)
    try:
        tt.padding_side = tt.truncation_side = hf.padding_side = hf.truncation_side = side
        kw = dict(padding="max_length", truncation=True, max_length=24, return_offsets_mapping=True,
                  return_tensors="np")
        assert_same(tt(texts, **kw), hf(texts, **kw), texts=texts)
        assert_same(tt(texts[:50], texts[50:100], **kw), hf(texts[:50], texts[50:100], **kw))
    finally:
        tt.padding_side, tt.truncation_side, hf.padding_side, hf.truncation_side = old


def test_cased_vocab_parity(tt_cased, hf_cased, corpus_lines):
    """do_lower_case=False (no lowercasing, no accent stripping) on a 1/60 sample, singles and pairs."""
    texts = _sample(corpus_lines, 60)
    texts += ["Café naïve Ünïcödé ΣΑΣ İstanbul Straße", "Hello WORLD [MASK] The END", "ÉÇ é"]
    kw = dict(return_offsets_mapping=True)
    assert_same(tt_cased(texts, **kw), hf_cased(texts, **kw), texts=texts)
    a, b = texts[:2000:2], texts[1:2000:2]
    kw = dict(return_offsets_mapping=True, padding=True, truncation=True, max_length=50)
    assert_same(tt_cased(a, b, **kw), hf_cased(a, b, **kw))


def test_threads_give_identical_results(tt, corpus_lines):
    texts = _sample(corpus_lines, 7, 40000)
    kw = dict(padding=True, truncation=True, max_length=128, return_tensors="np", return_offsets_mapping=True)
    one = tt(texts, num_threads=1, **kw)
    two = tt(texts, num_threads=2, **kw)
    three = tt(texts, num_threads=3, **kw)
    for k in one:
        assert np.array_equal(one[k], two[k]) and np.array_equal(one[k], three[k]), k
