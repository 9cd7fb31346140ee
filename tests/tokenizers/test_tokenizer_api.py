"""The HF-compatible API of turbotune.tokenizers.BertTokenizer and its behaviour on bad input."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from tok_helpers import assert_same, normalize
from turbotune.tokenizers import BertTokenizer, UnsupportedTokenizerError

TEXTS = ["Hello, World! [MASK] naïve café", "Tokenization with WordPiece is fun.", "中文字符 and ΣΑΣ", ""]


def test_unicode_tables_are_up_to_date(gen_unicode_tables):
    """The checked-in generated source equals a fresh probe of the installed HF tokenizers."""
    fresh = gen_unicode_tables.emit(*gen_unicode_tables.probe())
    path = os.path.join(os.path.dirname(gen_unicode_tables.__file__), "..", "csrc", "tokenizer", "unicode_tables.cpp")
    with open(path, encoding="utf-8") as f:
        checked_in = f.read()

    def body(text):  # the header names the tokenizers version; the tables are what matter
        return [line for line in text.splitlines() if "tokenizers" not in line]

    assert body(fresh) == body(checked_in), "re-run scripts/gen_unicode_tables.py"


def test_single_and_batch_shapes(tt, hf):
    assert_same(tt(TEXTS[0]), hf(TEXTS[0]))
    assert_same(tt(TEXTS), hf(TEXTS))
    assert_same(tt("a b", "c"), hf("a b", "c"))
    assert_same(tt([("a b", "c"), ("d", "e f")]), hf([("a b", "c"), ("d", "e f")]))
    assert_same(tt(TEXTS, TEXTS[::-1]), hf(TEXTS, TEXTS[::-1]))


@pytest.mark.parametrize("rt", ["pt", "np"])
def test_tensors(tt, hf, rt):
    kw = dict(padding=True, truncation=True, max_length=16, return_tensors=rt, return_offsets_mapping=True,
              return_special_tokens_mask=True, return_length=True)
    ours, ref = tt(TEXTS, **kw), hf(TEXTS, **kw)
    assert set(ours.keys()) == set(ref.keys())
    for k in ref:
        assert type(ours[k]) is type(ref[k]), k
        assert ours[k].dtype == ref[k].dtype and tuple(ours[k].shape) == tuple(ref[k].shape), k
        assert normalize(ours[k]) == normalize(ref[k]), k
    one = tt("single text", return_tensors=rt)
    assert tuple(one["input_ids"].shape) == tuple(hf("single text", return_tensors=rt)["input_ids"].shape)


def test_batch_encoding_feeds_the_model(tt, hf, model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tt(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt").to("cpu")
    ref = hf(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert enc.input_ids.shape == ref.input_ids.shape
    with torch.no_grad():
        a = model(**enc).last_hidden_state
        b = model(**ref).last_hidden_state
    assert torch.equal(a, b)


def test_ragged_tensors_raise(tt):
    with pytest.raises(ValueError, match="different lengths"):
        tt(["a", "a b c"], return_tensors="pt")


def test_encode_decode_tokenize(tt, hf, corpus_lines):
    sample = corpus_lines[::5000]
    for text in sample + TEXTS:
        assert tt.encode(text) == hf.encode(text)
        assert tt.tokenize(text) == hf.tokenize(text)
        ids = hf.encode(text)
        assert tt.decode(ids) == hf.decode(ids)
        assert tt.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    batch = hf(sample, padding=True)["input_ids"]
    assert tt.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    assert tt.batch_decode(torch.tensor(batch)) == hf.batch_decode(torch.tensor(batch))
    assert tt.encode("a", "b") == hf.encode("a", "b")
    assert tt.encode("a b c d", max_length=4, truncation=True) == hf.encode("a b c d", max_length=4, truncation=True)


def test_vocab_accessors(tt, hf):
    assert tt.vocab_size == hf.vocab_size == len(tt)
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(tt, name) == getattr(hf, name), name
    assert sorted(tt.all_special_ids) == sorted(hf.all_special_ids)
    assert sorted(tt.all_special_tokens) == sorted(hf.all_special_tokens)
    toks = ["hello", "world", "##ing", "not-a-token-xyz"]
    assert tt.convert_tokens_to_ids(toks) == hf.convert_tokens_to_ids(toks)
    assert tt.convert_tokens_to_ids("hello") == hf.convert_tokens_to_ids("hello")
    assert tt.convert_ids_to_tokens([0, 101, 7592]) == hf.convert_ids_to_tokens([0, 101, 7592])
    assert tt.convert_ids_to_tokens([101, 7592], skip_special_tokens=True) == ["hello"]
    assert tt.convert_ids_to_tokens(7592) == "hello"
    assert tt.get_vocab() == hf.get_vocab()
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tt.convert_ids_to_tokens([10**9])
    assert "BertTokenizer" in repr(tt)


def test_save_and_load_roundtrip(tt, hf, tmp_path):
    from transformers import BertTokenizerFast

    tt.save_pretrained(tmp_path)
    again = BertTokenizer.from_pretrained(tmp_path)
    hf_again = BertTokenizerFast.from_pretrained(str(tmp_path))
    kw = dict(return_offsets_mapping=True)
    assert_same(again(TEXTS, **kw), tt(TEXTS, **kw))
    assert_same(hf_again(TEXTS, **kw), hf(TEXTS, **kw))


def test_vocab_txt_and_tokenizer_json_agree(tt, model_dir, tmp_path):
    shutil.copy(os.path.join(model_dir, "vocab.txt"), tmp_path / "vocab.txt")
    shutil.copy(os.path.join(model_dir, "tokenizer_config.json"), tmp_path / "tokenizer_config.json")
    from_txt = BertTokenizer.from_pretrained(tmp_path)
    assert_same(from_txt(TEXTS, return_offsets_mapping=True), tt(TEXTS, return_offsets_mapping=True))
    assert from_txt.model_max_length == tt.model_max_length == 512


@pytest.mark.parametrize("edit,match", [
    (lambda j: j["model"].update(type="BPE"), "model type 'BPE'"),
    (lambda j: j.update(normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'"),
    (lambda j: j.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer 'Whitespace'"),
    (lambda j: j.update(post_processor={"type": "RobertaProcessing"}), "post_processor 'RobertaProcessing'"),
    (lambda j: j["added_tokens"][0].update(normalized=True), "normalized"),
])
def test_unsupported_tokenizer_json(model_dir, tmp_path, edit, match):
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        j = json.load(f)
    edit(j)
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(j, f)
    with pytest.raises(UnsupportedTokenizerError, match=re.escape(match)):
        BertTokenizer.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        BertTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        BertTokenizer.from_pretrained(tmp_path / "nope")


def test_bad_vocab():
    with pytest.raises(ValueError, match=r"unk_token: '\[UNK\]' is not in the vocabulary"):
        BertTokenizer(["[CLS]", "[SEP]", "hello"])
    with pytest.raises(ValueError, match="duplicate token 'hello' at ids 3 and 4"):
        BertTokenizer(["[UNK]", "[CLS]", "[SEP]", "hello", "hello"])
    with pytest.raises(ValueError, match="empty vocabulary"):
        BertTokenizer([], unk_token=None, cls_token=None, sep_token=None)
    with pytest.raises(TypeError, match=r"vocab\[1\]: expected str"):
        BertTokenizer(["[UNK]", 3])
    with pytest.raises(FileNotFoundError):
        BertTokenizer("/nonexistent/vocab.txt")


def test_non_str_items_name_the_index(tt):
    with pytest.raises(TypeError, match=r"text\[2\]: expected str, got int"):
        tt(["a", "b", 3])
    with pytest.raises(TypeError, match=r"text_pair\[1\]: expected str, got NoneType"):
        tt(["a", "b"], ["c", None])
    with pytest.raises(TypeError, match=r"text: expected str"):
        tt(5)
    with pytest.raises(ValueError, match="text_pair: expected 2 items"):
        tt(["a", "b"], ["c"])


def test_lone_surrogate_is_a_clear_value_error(tt, hf):
    bad = "ok \ud800 then"
    with pytest.raises(Exception):
        hf(bad)  # HF refuses it too (TypeError without naming the item)
    with pytest.raises(ValueError, match=r"text\[1\]: .*lone surrogate"):
        tt(["fine", bad])


def test_empty_inputs(tt, hf):
    assert_same(tt(""), hf(""))
    assert_same(tt(["", "", "a"], padding=True), hf(["", "", "a"], padding=True))
    assert_same(tt("", ""), hf("", ""))
    empty = tt([])
    assert empty["input_ids"] == [] and empty["attention_mask"] == []
    t = tt([], padding=True, return_tensors="pt")
    assert t["input_ids"].shape == (0, 0)


def test_one_megabyte_word(tt, hf):
    word = "a" * (1 << 20)
    enc = tt(word + " end", return_offsets_mapping=True)
    assert enc["input_ids"] == hf(word + " end")["input_ids"] == [101, 100, 2203, 102]
    assert enc["offset_mapping"][1] == (0, 1 << 20)
    # A huge word made of many short tokens still maps to one [UNK] (max_input_chars_per_word=100).
    assert tt("ab" * 200_000)["input_ids"] == [101, 100, 102]


def test_nul_and_control_characters(tt, hf):
    texts = ["a\x00b", "\x00", "x\x01\x02\x1b[31mred\x1b[0m", "tab\there\r\nnext\x0bline\x0c", "\ufffd\ufffdq",
             "zero\u200bwidth", "soft\u00adhyphen", "bidi\u202eevil\u202c"]
    kw = dict(return_offsets_mapping=True)
    assert_same(tt(texts, **kw), hf(texts, **kw), texts=texts)


def test_greek_final_sigma_follows_the_fast_tokenizer(tt, hf):
    # The fast (Rust) tokenizer lowercases character by character: final Σ -> σ, not ς.
    assert tt.tokenize("ΟΔΥΣΣΕΥΣ") == hf.tokenize("ΟΔΥΣΣΕΥΣ")
    assert "ς" not in "".join(tt.tokenize("ΟΔΥΣΣΕΥΣ"))


def test_argument_validation(tt):
    with pytest.raises(ValueError, match="padding"):
        tt("a", padding="sideways")
    with pytest.raises(ValueError, match="truncation"):
        tt("a", truncation="middle")
    with pytest.raises(ValueError, match="return_tensors"):
        tt("a", return_tensors="tf")
    with pytest.raises(ValueError, match="max_length"):
        tt("a", max_length=-3, truncation=True)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        tt("a", padding=True, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="special tokens"):
        tt("a b c", truncation=True, max_length=1)
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        tt("a", padding=True, truncation=True, max_length=10, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="Second sequence not provided"):
        tt("a b c d e", truncation="only_second", max_length=4)
    with pytest.raises(ValueError, match="num_threads"):
        tt.num_threads = 0


def test_default_max_length_and_model_max_length(tt, hf):
    long = " ".join(["word"] * 700)
    assert_same(tt(long, truncation=True), hf(long, truncation=True))
    assert_same(tt([long, "a"], padding="max_length", truncation=True), hf([long, "a"], padding="max_length",
                                                                               truncation=True))
    # max_length without truncation and without padding: transformers truncates (longest_first).
    assert_same(tt(long, max_length=10), hf(long, max_length=10))
    assert_same(tt([long, "a"], padding="max_length", max_length=12), hf([long, "a"], padding="max_length",
                                                                         max_length=12))


def test_no_special_tokens_and_optional_outputs(tt, hf):
    kw = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    ours, ref = tt(TEXTS, **kw), hf(TEXTS, **kw)
    assert set(ours.keys()) == set(ref.keys()) == {"input_ids"}
    assert_same(ours, ref)


def test_concurrent_python_threads(tt, corpus_lines):
    from concurrent.futures import ThreadPoolExecutor

    chunks = [corpus_lines[i:i + 2000] for i in range(0, 16000, 2000)]
    expected = [tt(c, padding=True, truncation=True, return_tensors="np", num_threads=1)["input_ids"] for c in chunks]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda c: tt(c, padding=True, truncation=True, return_tensors="np",
                                       num_threads=2)["input_ids"], chunks))
    for a, b in zip(expected, got):
        assert np.array_equal(a, b)


def test_thread_pool_survives_fork(tt, corpus_lines):
    """A forked child (DataLoader worker) must not wait for the parent's pool threads."""
    import multiprocessing as mp

    texts = corpus_lines[:20000]
    expected = tt(texts, padding=True, truncation=True, return_tensors="np", num_threads=2)["input_ids"]
    _FORKED.update(tok=tt, texts=texts)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_encode_in_child).get(timeout=60)
    assert np.array_equal(got, expected)


_FORKED = {}


def _encode_in_child():
    tok, texts = _FORKED["tok"], _FORKED["texts"]
    return tok(texts, padding=True, truncation=True, return_tensors="np", num_threads=2)["input_ids"]


def test_pickle_roundtrip(tt):
    import pickle

    again = pickle.loads(pickle.dumps(tt))
    assert_same(again(TEXTS, return_offsets_mapping=True), tt(TEXTS, return_offsets_mapping=True))
    assert again.model_max_length == tt.model_max_length and again.num_threads == tt.num_threads


@pytest.mark.parametrize("text", ["latin-1 caf\xe9 na\xefve \xa0nbsp", "ucs2 \u4e2d\u6587 \u03a3\u0391\u03a3 \u0130",
                                  "ucs4 \U0001f600 \U00020000 \U0001d165\u0301", "mixed [MASK] \xe9\u4e2d\U0001f600"])
def test_every_python_string_kind(tt, hf, text):
    """Python stores str as Latin-1, UCS-2 or UCS-4; each is read directly (with specials, offsets)."""
    kw = dict(return_offsets_mapping=True)
    assert_same(tt(text, **kw), hf(text, **kw))
    assert_same(tt([text, text + " [SEP] x"], **kw), hf([text, text + " [SEP] x"], **kw))
    ids, splits = tt.encode_batch_ragged([text])
    assert ids.tolist() == hf(text)["input_ids"]


def test_lone_surrogate_in_every_entry_point(tt):
    for bad in ("x\udfff", "\u4e2d\ud800", "\U0001f600\udc00"):
        with pytest.raises(ValueError, match=r"text\[0\]"):
            tt([bad])
        with pytest.raises(ValueError, match=r"text_pair\[0\]"):
            tt(["ok"], [bad])
        with pytest.raises(ValueError, match=r"text\[1\]"):
            tt.encode_batch_ragged(["ok", bad])


def test_malformed_pair_batches(tt):
    with pytest.raises(TypeError, match=r"text\[1\]: expected a \(text, text_pair\) pair"):
        tt([("a", "b"), "cd"])
    with pytest.raises(TypeError, match=r"text\[0\]: expected a \(text, text_pair\) pair.*3 items"):
        tt([("a", "b", "c")])
    with pytest.raises(TypeError, match=r"text_pair\[0\]: expected str"):
        tt([("a", 5)])
