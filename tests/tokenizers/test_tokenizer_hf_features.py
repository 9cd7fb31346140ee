"""Drop-in fidelity with transformers' fast BERT tokenizer for what fine-tuning code calls:
word_ids / sequence_ids / token_to_word & co., is_split_into_words, overflowing tokens with a
stride, special-token masks, pad() and the data collators built on it, decode's cleanup, len().

Every test compares turbotune.tokenizers.BertTokenizer with transformers.BertTokenizerFast
(from the packaged MiniLM checkpoint) on real text: the movie-review snippets and the corpus.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tok_helpers import assert_same, assert_same_encodings, normalize

def same_batch(ours, ref, texts=None):
    """Same keys, same values, and for tensors the same type, dtype and shape."""
    assert list(ours.keys()) == list(ref.keys())
    for k in ref:
        a, b = ours[k], ref[k]
        if isinstance(b, (torch.Tensor, np.ndarray)):
            assert type(a) is type(b), k
            assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), (k, a.dtype, b.dtype, a.shape, b.shape)
    assert_same(ours, ref, keys=list(ref.keys()), texts=texts)


def same_result(ours, ref):
    """Call both; the same batch, or the same exception type and message."""
    try:
        expected = ref()
    except Exception as exc:  # e.g. transformers refusing a tensor of ragged rows
        with pytest.raises(type(exc)) as got:
            ours()
        assert str(got.value) == str(exc)
        return
    same_batch(ours(), expected)


# ---------------------------------------------------------------- alignment
@pytest.mark.parametrize("kw", [
    dict(),
    dict(padding=True),
    dict(padding="max_length", truncation=True, max_length=24, padding_side="left"),
    dict(truncation=True, max_length=16, add_special_tokens=False),
], ids=["plain", "padded", "left-truncated", "no-specials"])
def test_word_and_sequence_ids_match_hf(tt, hf, reviews, kw):
    texts = reviews[:40] + ["", "[MASK] x", "a \u0301 b", "co-operate, U.S.A.!"]
    assert_same_encodings(tt(texts, **kw), hf(texts, **kw), rows=range(0, len(texts), 3))
    pairs = reviews[100:100 + len(texts)]
    ours, ref = tt(texts, pairs, **kw), hf(texts, pairs, **kw)
    assert_same_encodings(ours, ref, rows=range(0, len(texts), 3))
    # Without probing every method: every row, and the single-text form.
    assert_same_encodings(ours, ref, probe_methods=False)
    one, one_ref = tt(texts[0], pairs[0], **kw), hf(texts[0], pairs[0], **kw)
    assert_same_encodings(one, one_ref)
    assert one.word_ids() == one_ref.word_ids() and one.token_to_word(3) == one_ref.token_to_word(3)
    assert one[0].ids == one_ref[0].ids  # enc[int] is the row's Encoding, as with HF


def test_alignment_on_corpus_lines(tt, hf, corpus_lines):
    """All scripts of the corpus (CJK, accents, control characters): word ids and sequence ids of every row."""
    sample = corpus_lines[::1500]
    ours, ref = tt(sample, return_offsets_mapping=True), hf(sample, return_offsets_mapping=True)
    assert_same_encodings(ours, ref, probe_methods=False)
    assert_same(ours, ref, texts=sample)


def test_encodings_are_computed_lazily_from_the_call(hf, reviews, model_dir):
    """The encodings reflect the call, even when the tokenizer or the input list changes afterwards."""
    from turbotune.tokenizers import BertTokenizer

    tok = BertTokenizer.from_pretrained(model_dir)
    texts = list(reviews[:8])
    enc = tok(texts, padding=True, truncation=True, max_length=20)
    assert enc.__dict__.get("_tt_encodings") is None  # nothing computed yet
    tok.padding_side, tok.truncation_side = "left", "left"
    texts[:] = ["changed"] * 8
    ref = hf(reviews[:8], padding=True, truncation=True, max_length=20)
    assert_same_encodings(enc, ref, probe_methods=False)
    assert enc.is_fast and enc.n_sequences == 1


@pytest.mark.parametrize("rt", [None, "pt"])
def test_batch_encoding_pickles_with_its_encodings(tt, hf, reviews, rt):
    texts, pairs = reviews[:6], reviews[6:12]
    enc = tt(texts, pairs, padding=True, return_tensors=rt)
    again = pickle.loads(pickle.dumps(enc))
    assert type(again) is type(enc)
    assert again.n_sequences == 2
    assert_same_encodings(again, hf(texts, pairs, padding=True, return_tensors=rt), probe_methods=False)
    for k in enc:
        assert normalize(again[k]) == normalize(enc[k])


# ---------------------------------------------------------------- is_split_into_words
def _word_rows(lines, n):
    rows = [line.split() for line in lines if line.split()][:n]
    rows[0] = rows[0] + ["", "  ", "a b", "[MASK]x", "naïve,", "\u4e2d\u6587"]
    return rows


@pytest.mark.parametrize("kw", [
    dict(return_offsets_mapping=True),
    dict(padding=True, truncation=True, max_length=20, return_special_tokens_mask=True),
    dict(padding="max_length", max_length=48, truncation=True, padding_side="left", return_tensors="pt",
         return_offsets_mapping=True),
], ids=["offsets", "padded", "tensors-left"])
def test_is_split_into_words_matches_hf(tt, hf, reviews, corpus_lines, kw):
    rows = _word_rows(reviews[:30], 30) + _word_rows(corpus_lines[::20000], 10)
    kw = dict(kw, is_split_into_words=True)
    ours, ref = tt(rows, **kw), hf(rows, **kw)
    same_batch(ours, ref)
    assert_same_encodings(ours, ref, rows=range(0, len(rows), 4))
    # One example (a list of words), pairs as two lists, and a batch of (words, words) tuples.
    same_batch(tt(rows[0], **kw), hf(rows[0], **kw))
    assert tt(rows[0], **kw).word_ids() == hf(rows[0], **kw).word_ids()
    same_batch(tt(rows[:5], rows[5:10], **kw), hf(rows[:5], rows[5:10], **kw))
    tuples = list(zip(rows[:5], rows[5:10]))
    ours, ref = tt(tuples, **kw), hf(tuples, **kw)
    same_batch(ours, ref)
    assert_same_encodings(ours, ref)
    same_batch(tt([], **kw), hf([], **kw))


def test_is_split_into_words_bad_items_name_the_word(tt):
    with pytest.raises(TypeError, match=r"text\[1\]\[2\]: expected str, got int"):
        tt([["a"], ["b", "c", 3]], is_split_into_words=True)
    with pytest.raises(TypeError, match=r"text\[1\]: expected str, got NoneType"):
        tt(["a", None], is_split_into_words=True)
    with pytest.raises(TypeError, match=r"text_pair\[0\]\[0\]: expected str, got bytes"):
        tt([["a"]], [[b"x"]], is_split_into_words=True)
    with pytest.raises(TypeError, match=r"text\[1\]: expected a list of words"):
        tt([["a"], "b c"], is_split_into_words=True)
    with pytest.raises(TypeError, match=r"text: expected a list of words"):
        tt("a b", is_split_into_words=True)
    with pytest.raises(ValueError, match=r"text\[0\]: .*lone surrogate"):
        tt([["ok", "\ud800"]], is_split_into_words=True)


# ---------------------------------------------------------------- overflow + stride
@pytest.mark.parametrize("kw", [
    dict(truncation="only_second", max_length=48, stride=12, padding="max_length"),
    dict(truncation="only_second", max_length=40, stride=0, return_tensors="pt", padding=True),
    dict(truncation="only_first", max_length=30, stride=5),
    dict(truncation="longest_first", max_length=24, stride=3),
    dict(truncation="longest_first", max_length=24, stride=3, padding=True, padding_side="left"),
], ids=["qa", "qa-tensors", "only-first", "longest-first", "longest-first-left-pad"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_overflowing_tokens_match_hf(tt, hf, reviews, corpus_lines, kw, side):
    """The question-answering layout: question + long context, overflowing windows with a stride."""
    questions = [" ".join(r.split()[:6]) for r in reviews[200:212]]
    contexts = [" ".join(reviews[300 + 7 * i:307 + 7 * i]) for i in range(12)]
    contexts[3] = " ".join(corpus_lines[5000:5040])
    kw = dict(kw, return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True,
              return_length=True)
    if kw["truncation"] == "only_first":
        questions, contexts = contexts, questions
    old = (tt.truncation_side, hf.truncation_side)
    tt.truncation_side = hf.truncation_side = side
    try:
        ours, ref = tt(questions, contexts, **kw), hf(questions, contexts, **kw)
        same_batch(ours, ref)
        assert len(ref["input_ids"]) > len(questions)  # the case overflows
        assert_same_encodings(ours, ref, rows=range(0, len(ref["input_ids"]), 5))
        assert_same_encodings(ours, ref, probe_methods=False)
        # A single pair keeps the batch axis, as HF does with overflowing tokens.
        same_batch(tt(questions[3], contexts[3], **kw), hf(questions[3], contexts[3], **kw))
    finally:
        tt.truncation_side, hf.truncation_side = old


@pytest.mark.parametrize("side", ["right", "left"])
def test_overflow_single_texts_match_hf(tt, hf, reviews, side):
    texts = reviews[:20]
    kw = dict(truncation=True, max_length=12, stride=4, return_overflowing_tokens=True, return_offsets_mapping=True)
    old = (tt.truncation_side, hf.truncation_side)
    tt.truncation_side = hf.truncation_side = side
    try:
        ours, ref = tt(texts, **kw), hf(texts, **kw)
        same_batch(ours, ref)
        assert_same_encodings(ours, ref, probe_methods=False)
        for r in range(0, len(ref["input_ids"]), 7):
            assert [len(e) for e in ours.encodings[r].overflowing] == [len(e) for e in ref.encodings[r].overflowing]
    finally:
        tt.truncation_side, hf.truncation_side = old


def test_stride_not_below_the_truncated_length_raises(tt, hf):
    kw = dict(truncation=True, max_length=6, stride=4, return_overflowing_tokens=True)
    with pytest.raises(BaseException, match="stride"):  # HF's Rust code panics (pyo3 PanicException)
        hf("a b c d e f g h", **kw)
    with pytest.raises(ValueError, match=r"stride: `stride` must be strictly less than `max_len=4`"):
        tt("a b c d e f g h", **kw)
    assert normalize(tt("a b", **kw)["input_ids"]) == normalize(hf("a b", **kw)["input_ids"])  # nothing cut: fine
    with pytest.raises(ValueError, match="stride"):
        tt("a b", stride=-1)
    # Checked up front for any input, as HF's enable_truncation does (same message).
    kw = dict(truncation=True, max_length=6, stride=5)
    with pytest.raises(ValueError) as ref:
        hf("", **kw)
    with pytest.raises(ValueError) as ours:
        tt("", **kw)
    assert str(ours.value) == "stride: " + str(ref.value).rstrip(", ")


def test_qa_preprocessing_recipe(tt, hf, reviews):
    """transformers' run_qa.py prepare_train_features, with each tokenizer: identical features."""
    questions = [r[:60] for r in reviews[400:424]]
    contexts = [" ".join(reviews[500 + 5 * i:505 + 5 * i]) for i in range(24)]
    answers = []
    for c in contexts:
        start = c.find(" the ")
        answers.append({"text": [c[start + 1:start + 4]] if start >= 0 else [], "answer_start": [start + 1] if start >= 0 else []})

    def prepare(tok):
        feats = tok(questions, contexts, truncation="only_second", max_length=64, stride=16,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
        sample_mapping = feats.pop("overflow_to_sample_mapping")
        offset_mapping = feats.pop("offset_mapping")
        feats["start_positions"], feats["end_positions"] = [], []
        for i, offsets in enumerate(offset_mapping):
            input_ids = feats["input_ids"][i]
            cls_index = input_ids.index(tok.cls_token_id)
            sequence_ids = feats.sequence_ids(i)
            ans = answers[sample_mapping[i]]
            if len(ans["answer_start"]) == 0:
                feats["start_positions"].append(cls_index)
                feats["end_positions"].append(cls_index)
                continue
            start_char = ans["answer_start"][0]
            end_char = start_char + len(ans["text"][0])
            ts = 0
            while sequence_ids[ts] != 1:
                ts += 1
            te = len(input_ids) - 1
            while sequence_ids[te] != 1:
                te -= 1
            if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
                feats["start_positions"].append(cls_index)
                feats["end_positions"].append(cls_index)
            else:
                while ts < len(offsets) and offsets[ts][0] <= start_char:
                    ts += 1
                feats["start_positions"].append(ts - 1)
                while offsets[te][1] >= end_char:
                    te -= 1
                feats["end_positions"].append(te + 1)
        return dict(feats)

    ours, ref = prepare(tt), prepare(hf)
    assert ours == ref
    assert len(ref["input_ids"]) > len(questions)


def test_token_classification_recipe(tt, hf, reviews):
    """transformers' run_ner.py tokenize_and_align_labels (word labels -> token labels via word_ids)."""
    rows = [r.split() for r in reviews[600:664]]
    word_labels = [[len(w) % 5 for w in row] for row in rows]

    def align(tok, label_all_tokens):
        enc = tok(rows, padding=False, truncation=True, max_length=32, is_split_into_words=True)
        labels = []
        for i, label in enumerate(word_labels):
            previous = None
            ids = []
            for w in enc.word_ids(batch_index=i):
                if w is None:
                    ids.append(-100)
                elif w != previous:
                    ids.append(label[w])
                else:
                    ids.append(label[w] if label_all_tokens else -100)
                previous = w
            labels.append(ids)
        enc["labels"] = labels
        return dict(enc)

    for label_all in (False, True):
        assert align(tt, label_all) == align(hf, label_all)


# ---------------------------------------------------------------- special tokens
@pytest.mark.parametrize("kw", [
    dict(),
    dict(padding="max_length", max_length=40, truncation=True, padding_side="left"),
    dict(add_special_tokens=False, padding=True),
    dict(truncation="longest_first", max_length=40, stride=4, return_overflowing_tokens=True, padding=True),
])
def test_special_tokens_mask_matches_hf(tt, hf, reviews, kw):
    texts = reviews[700:730] + ["[MASK] and [CLS] in the text"]
    pairs = reviews[730:761]
    kw = dict(kw, return_special_tokens_mask=True)
    same_batch(tt(texts, pairs, **kw), hf(texts, pairs, **kw))
    if not kw.get("return_overflowing_tokens"):
        same_batch(tt(texts, **kw), hf(texts, **kw))


def test_special_token_helpers_match_hf(tt, hf, reviews):
    assert len(tt) == len(hf)
    rows = hf(reviews[:20], reviews[20:40], padding=True)["input_ids"]
    for row in rows + [[103, 7592, 100, 0]]:
        assert tt.get_special_tokens_mask(row, already_has_special_tokens=True) == \
            hf.get_special_tokens_mask(row, already_has_special_tokens=True)
    for pair in (False, True):
        assert tt.num_special_tokens_to_add(pair) == hf.num_special_tokens_to_add(pair)
    ids_a, ids_b = hf.encode("hello world", add_special_tokens=False), hf.encode("again", add_special_tokens=False)
    assert tt.build_inputs_with_special_tokens(ids_a, ids_b) == hf("hello world", "again")["input_ids"]
    assert tt.get_special_tokens_mask(ids_a, ids_b) == hf("hello world", "again",
                                                          return_special_tokens_mask=True)["special_tokens_mask"]
    assert tt.is_fast


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("cleanup", [None, True, False])
def test_decode_clean_up_tokenization_spaces(tt, hf, reviews, corpus_lines, cleanup):
    texts = reviews[800:900] + corpus_lines[::30000] + ["I can't , won't . don 't 's 're 've 'm ! ?", "a ' b"]
    batch = hf(texts)["input_ids"]
    for ids in batch:
        for skip in (False, True):
            assert tt.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup) == \
                hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=cleanup)
    assert tt.batch_decode(batch, clean_up_tokenization_spaces=cleanup) == \
        hf.batch_decode(batch, clean_up_tokenization_spaces=cleanup)
    assert tt.decode(batch[:3], clean_up_tokenization_spaces=cleanup) == \
        hf.decode(batch[:3], clean_up_tokenization_spaces=cleanup)  # a batch decodes to a list


def test_decode_cleanup_default_follows_the_attribute(tt, hf, model_dir):
    from turbotune.tokenizers import BertTokenizer

    ids = hf("don ' t stop , they ' re here")["input_ids"]
    tok = BertTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=True)
    assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=True) != tt.decode(ids)


# ---------------------------------------------------------------- pad + collators
def _features(tok, texts, **kw):
    enc = tok(texts, **kw)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(padding="longest", pad_to_multiple_of=8, return_tensors="pt"),
    dict(padding="max_length", max_length=64, return_tensors="np"),
    dict(padding=False, return_tensors=None),
    dict(padding=True, padding_side="left", return_tensors="pt", return_attention_mask=False),
    dict(padding="max_length", max_length=10),  # rows longer than max_length stay as they are
])
def test_pad_matches_hf(tt, hf, reviews, kw):
    feats = _features(hf, reviews[900:932], return_special_tokens_mask=True)
    for f, label in zip(feats, range(32)):
        f["label"] = label % 2
    same_result(lambda: tt.pad([dict(f) for f in feats], **kw), lambda: hf.pad([dict(f) for f in feats], **kw))
    # A dict of lists, one example, and tensors in (-> tensors out).
    batch = {k: [f[k] for f in feats] for k in feats[0]}
    same_result(lambda: tt.pad(dict(batch), **kw), lambda: hf.pad(dict(batch), **kw))
    one = {k: v for k, v in feats[0].items() if k != "label"}
    same_result(lambda: tt.pad(dict(one), **kw), lambda: hf.pad(dict(one), **kw))
    tensors = [{"input_ids": torch.tensor(f["input_ids"]), "token_type_ids": torch.tensor(f["token_type_ids"])}
               for f in feats[:5]]
    same_result(lambda: tt.pad(list(tensors), **kw), lambda: hf.pad(list(tensors), **kw))


def test_pad_bad_input(tt):
    with pytest.raises(TypeError, match="encoded_inputs: expected a mapping"):
        tt.pad(None)
    with pytest.raises(TypeError, match="encoded_inputs: expected a mapping"):
        tt.pad([[1, 2, 3]])
    with pytest.raises(ValueError, match="that includes input_ids"):
        tt.pad({"attention_mask": [[1]]})
    with pytest.raises(TypeError, match=r"encoded_inputs\[1\]: expected a mapping"):
        tt.pad([{"input_ids": [1]}, [2]])
    with pytest.raises(ValueError, match=r"encoded_inputs\[1\]: has no 'label'"):
        tt.pad([{"input_ids": [1], "label": 0}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="padding"):
        tt.pad({"input_ids": [[1]]}, padding="sideways")


def test_data_collator_with_padding(tt, hf, labeled_reviews):
    from transformers import DataCollatorWithPadding

    items = labeled_reviews[1000:1064]
    for kw in (dict(), dict(pad_to_multiple_of=8), dict(padding="max_length", max_length=96)):
        batches = []
        for tok in (tt, hf):
            feats = _features(tok, [r.text for r in items], truncation=True, max_length=96)
            for f, r in zip(feats, items):
                f["label"] = r.label
            batches.append(DataCollatorWithPadding(tok, **kw)(feats))
        same_batch(*batches)
        assert batches[0]["labels"].dtype == torch.int64


@pytest.mark.parametrize("with_special_mask", [False, True])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_data_collator_for_language_modeling(tt, hf, reviews, with_special_mask, pad_to_multiple_of):
    from transformers import DataCollatorForLanguageModeling

    texts = reviews[1100:1148]
    batches = []
    for tok in (tt, hf):
        feats = _features(tok, texts, truncation=True, max_length=64, return_special_tokens_mask=with_special_mask)
        collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.3, pad_to_multiple_of=pad_to_multiple_of,
                                                  seed=1234)
        batches.append(collate(feats))
    same_batch(*batches)
    assert (batches[0]["labels"] != -100).any()
    # Plain id lists (no dicts) go through _torch_collate_batch (pad_token_id, padding_side, ...).
    ids = [hf(t)["input_ids"] for t in texts[:8]]
    plain = [DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=pad_to_multiple_of)(ids)
             for tok in (tt, hf)]
    same_batch(*plain)


def test_data_collator_for_token_classification(tt, hf, reviews):
    from transformers import DataCollatorForTokenClassification

    rows = [r.split() for r in reviews[1200:1240]]
    batches = []
    for tok in (tt, hf):
        enc = tok(rows, truncation=True, max_length=40, is_split_into_words=True)
        feats = []
        for i, row in enumerate(rows):
            labels = [-100 if w is None else len(row[w]) % 3 for w in enc.word_ids(i)]
            feats.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                          "attention_mask": enc["attention_mask"][i], "labels": labels})
        for kw in (dict(), dict(pad_to_multiple_of=16)):
            batches.append(DataCollatorForTokenClassification(tok, **kw)(feats))
    same_batch(batches[0], batches[2])
    same_batch(batches[1], batches[3])
    old = tt.padding_side, hf.padding_side
    try:
        tt.padding_side = hf.padding_side = "left"
        left = []
        for tok in (tt, hf):
            feats = [{"input_ids": tok(r, is_split_into_words=True)["input_ids"], "labels": [1] * 3} for r in rows[:6]]
            left.append(DataCollatorForTokenClassification(tok)(feats))
        same_batch(*left)
    finally:
        tt.padding_side, hf.padding_side = old
