"""Hypothesis fuzzing against HF BertTokenizerFast over random Unicode: all planes,
combining marks, CJK, emoji, control characters, odd whitespace, special tokens."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tok_helpers import assert_same, normalize

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Any scalar value (surrogates cannot be encoded, they are tested in test_tokenizer_api).
any_char = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
# Characters where BERT normalisation is subtle.
tricky = st.sampled_from(
    list("\x00\t\n\r\x0b\x0c\x1c\x1f\x7f\x85\xa0\xad\u200b\u200d\u2028\u3000\ufeff\ufffd\uffff")
    + list("İıßẞΣσςǅﬁÅÉéñ\u0301\u0308\u0345\u0f71\u302a\u1d165\U0001d165\U0001d16d\U0001d172")
    + list("中文字\u3400\U00020000\U0002a6d6\uf900\u2f800\u3002\uff01\uff0c")
    + list("😀👍🏽\u200d👩‍💻🇫🇷\U000e0041\U0010ffff\ue000\u0378\u2e42\u2e43\u2e4f\u2e52\u00b7\u055a\u2010")
    + list("가힣ᄀ\u0915\u093f\u0627\u064e\u05d0\u0e01\u0e48\u17b6ῼ\u1fef\u037e")
    + ["[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[mask]", "[MASK", "##", "##ing", "don't", "U.S.A."]
)
words = st.sampled_from(["the", "Running", "unaffable", "HELLO", "naïve", "café", "x" * 120, "a" * 101,
                         "tokenization", "co-operate", "3.14", "e-mail", "ΑΘΗΝΑ", "Straße", "ＡＢＣ"])
fragment = st.one_of(any_char, tricky, words, st.sampled_from([" ", "  ", "\n", "\t"]))
mixed_text = st.lists(fragment, max_size=40).map("".join)
random_text = st.text(alphabet=any_char, max_size=80)
texts = st.one_of(mixed_text, random_text)


def _check(tt, hf, text):
    kw = dict(return_offsets_mapping=True)
    assert_same(tt(text, **kw), hf(text, **kw), texts=[text])


@settings(max_examples=int(os.environ.get("TT_FUZZ_EXAMPLES", 400)), **SETTINGS)
@given(text=texts)
def test_fuzz_single_uncased(tt, hf, text):
    _check(tt, hf, text)


@settings(max_examples=250, **SETTINGS)
@given(text=texts)
def test_fuzz_single_cased(tt_cased, hf_cased, text):
    _check(tt_cased, hf_cased, text)


@settings(max_examples=200, **SETTINGS)
@given(a=texts, b=texts, max_length=st.integers(3, 40),
       strategy=st.sampled_from(["longest_first", "only_first", "only_second"]),
       padding=st.sampled_from([False, True, "max_length"]))
def test_fuzz_pairs_truncation(tt, hf, a, b, max_length, strategy, padding):
    kw = dict(truncation=strategy, max_length=max_length, padding=padding, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    try:
        ref = hf(a, b, **kw)
    except Exception as exc:  # HF: "Truncation error: Sequence to truncate too short ..."
        assert "Truncation error" in str(exc)
        with pytest.raises(ValueError, match="Truncation error"):
            tt(a, b, **kw)
        return
    assert_same(tt(a, b, **kw), ref, keys=("input_ids", "token_type_ids", "attention_mask", "offset_mapping",
                                            "special_tokens_mask"))


@settings(max_examples=60, **SETTINGS)
@given(batch=st.lists(texts, min_size=1, max_size=12), max_length=st.integers(2, 30),
       multiple=st.sampled_from([None, 1, 2, 8]))
def test_fuzz_batch_padding(tt, hf, batch, max_length, multiple):
    if multiple and max_length % multiple:
        max_length += multiple - max_length % multiple
    kw = dict(padding=True, truncation=True, max_length=max_length, pad_to_multiple_of=multiple,
              return_offsets_mapping=True, return_tensors="np")
    assert_same(tt(batch, **kw), hf(batch, **kw), texts=batch)


@settings(max_examples=150, **SETTINGS)
@given(text=texts)
def test_fuzz_decode(tt, hf, text):
    ids = hf(text)["input_ids"]
    assert tt.decode(ids) == hf.decode(ids)
    assert tt.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert normalize(tt.tokenize(text)) == normalize(hf.tokenize(text))


@settings(max_examples=int(os.environ.get("TT_FUZZ_OVERFLOW", 120)), **SETTINGS)
@given(a=texts, b=st.one_of(st.none(), texts), max_length=st.integers(3, 30), stride=st.integers(0, 6),
       strategy=st.sampled_from(["longest_first", "only_first", "only_second"]),
       padding=st.sampled_from([False, True, "max_length"]), side=st.sampled_from(["right", "left"]),
       pad_side=st.sampled_from(["right", "left"]))
def test_fuzz_overflow_and_alignment(tt, hf, a, b, max_length, stride, strategy, padding, side, pad_side):
    """Overflowing rows, stride, truncation side, padding side: every output and the row encodings."""
    from tok_helpers import assert_same_encodings

    kw = dict(truncation=strategy, max_length=max_length, stride=stride, padding=padding, padding_side=pad_side,
              return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    old = tt.truncation_side, hf.truncation_side
    tt.truncation_side = hf.truncation_side = side
    try:
        try:
            ref = hf(a, b, **kw)
        except BaseException as exc:  # Truncation error, or a PanicException for a too large stride
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            assert "Truncation error" in str(exc) or "stride" in str(exc), exc
            with pytest.raises(ValueError, match="Truncation error|stride"):
                tt(a, b, **kw)
            return
        ours = tt(a, b, **kw)
        assert_same(ours, ref, keys=tuple(ref.keys()), texts=[a, b])
        assert_same_encodings(ours, ref, rows=range(min(3, len(ref["input_ids"]))))
        assert_same_encodings(ours, ref, probe_methods=False)
    finally:
        tt.truncation_side, hf.truncation_side = old


word = st.one_of(st.text(alphabet=any_char, max_size=8), tricky, words)


@settings(max_examples=80, **SETTINGS)
@given(rows=st.lists(st.lists(word, max_size=10), min_size=1, max_size=5), max_length=st.integers(4, 24))
def test_fuzz_is_split_into_words(tt, hf, rows, max_length):
    from tok_helpers import assert_same_encodings

    kw = dict(is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
              return_offsets_mapping=True)
    assert_same(tt(rows, **kw), hf(rows, **kw), texts=rows)
    assert_same_encodings(tt(rows, **kw), hf(rows, **kw), probe_methods=False)
    half = len(rows) // 2
    if half:
        assert_same(tt(rows[:half], rows[half:2 * half], **kw), hf(rows[:half], rows[half:2 * half], **kw))
