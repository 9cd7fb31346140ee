"""save_pretrained / from_pretrained: every option survives the round trip, a stale tokenizer.json
cannot override the saved settings, writes are atomic; the corpus builder survives concurrent builds."""
from __future__ import annotations

import builtins
import errno
import inspect
import os
import shutil
import threading

import pytest

from tok_helpers import assert_same
from turbotune.tokenizers import BertTokenizer

TEXTS = ["Hello Wörld, TOKENIZATION of Café naïve!", "ctrl\x01chars\x00 and \u4e2d\u6587\u5b57 [unused1] x",
         "unbelievably antidisestablishmentarianism", "Straße ΣΑΣ İstanbul", ""]
FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def unusual(cased_vocab):
    """A tokenizer with every option away from its default (a cased vocabulary with an '@@' prefix)."""
    vocab = ["@@" + t[2:] if t.startswith("##") else t for t in cased_vocab]
    return BertTokenizer(vocab, do_lower_case=False, strip_accents=True, tokenize_chinese_chars=False,
                         clean_text=False, unk_token="[unused7]", sep_token="[unused6]", pad_token="[unused3]",
                         cls_token="[unused5]", mask_token="[unused4]", additional_special_tokens=["[unused1]"],
                         model_max_length=77, padding_side="left", truncation_side="left", wordpieces_prefix="@@",
                         max_input_chars_per_word=7, clean_up_tokenization_spaces=True, num_threads=1)


def test_round_trip_keeps_every_option(unusual, corpus_lines, tmp_path):
    paths = unusual.save_pretrained(tmp_path)
    assert sorted(os.path.basename(p) for p in paths) == FILES
    assert sorted(os.listdir(tmp_path)) == FILES  # no temporary file left
    again = BertTokenizer.from_pretrained(tmp_path)
    assert again.init_kwargs == unusual.init_kwargs
    defaults = inspect.signature(BertTokenizer.__init__).parameters
    for name, value in unusual.init_kwargs.items():
        assert value != defaults[name].default, f"{name} is at its default: the test would not see it lost"
    texts = TEXTS + corpus_lines[::20000]
    kw = dict(padding=True, truncation=True, max_length=60, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    assert_same(again(texts, **kw), unusual(texts, **kw), keys=tuple(kw) + ("input_ids",), texts=texts)
    ids = unusual("don ' t , ok")["input_ids"]
    assert again.decode(ids) == unusual.decode(ids) != unusual.decode(ids, clean_up_tokenization_spaces=False)
    # Loading from vocab.txt + the configs alone keeps the options too.
    os.remove(tmp_path / "tokenizer.json")
    assert BertTokenizer.from_pretrained(tmp_path).init_kwargs == unusual.init_kwargs


def test_no_limit_model_max_length_round_trips(tt, hf, tmp_path):
    """transformers' "no limit" model_max_length (int(1e30)) survives the round trip and means no default
    truncation / max_length padding, as in transformers."""
    tok = BertTokenizer(tt._tokens, model_max_length=int(1e30))
    tok.save_pretrained(tmp_path)
    again = BertTokenizer.from_pretrained(tmp_path)
    assert again.model_max_length == int(1e30)
    from transformers import BertTokenizerFast

    hf_again = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert hf_again.model_max_length == int(1e30)
    long = " ".join(["word"] * 700)
    kw = dict(padding="max_length", truncation=True)
    assert again([long, "a"], **kw)["input_ids"] == hf_again([long, "a"], **kw)["input_ids"] != \
        tt([long, "a"], **kw)["input_ids"]


def test_saved_folder_loads_in_transformers(tt_cased, hf_cased, tmp_path):
    """HF reads the saved tokenizer.json / config (the options transformers 5 honours when it rebuilds a
    BERT tokenizer: case, accents, CJK, sides, lengths, decode cleanup)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizer(tt_cased._tokens, do_lower_case=False, strip_accents=True, tokenize_chinese_chars=False,
                        model_max_length=33, padding_side="left", truncation_side="left",
                        clean_up_tokenization_spaces=True)
    tok.save_pretrained(tmp_path)
    hf = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert (hf.model_max_length, hf.padding_side, hf.truncation_side, hf.clean_up_tokenization_spaces) == \
        (33, "left", "left", True)
    kw = dict(padding=True, truncation=True, return_offsets_mapping=True)
    assert_same(hf(TEXTS * 12, **kw), tok(TEXTS * 12, **kw), texts=TEXTS * 12)


def test_cased_tokenizer_saved_over_uncased_files_reloads_cased(tt_cased, hf_cased, model_dir, tmp_path):
    from transformers import BertTokenizerFast

    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, tmp_path / name)  # the uncased tokenizer.json, vocab and configs
    tt_cased.save_pretrained(tmp_path)
    again = BertTokenizer.from_pretrained(tmp_path)
    assert again.do_lower_case is False and again.init_kwargs == tt_cased.init_kwargs
    kw = dict(return_offsets_mapping=True)
    assert_same(again(TEXTS, **kw), tt_cased(TEXTS, **kw), texts=TEXTS)
    assert "Hello" in again.tokenize("Hello")
    assert_same(BertTokenizerFast.from_pretrained(str(tmp_path))(TEXTS, **kw), hf_cased(TEXTS, **kw), texts=TEXTS)


class _DiskFull:
    """A file whose second write fails with ENOSPC after writing half of its data."""

    def __init__(self, f):
        self._f, self._writes = f, 0

    def write(self, data):
        self._writes += 1
        if self._writes >= 2 or len(data) > 64:
            self._f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_failed_save_changes_nothing_and_leaves_no_temporary_file(tt, tt_cased, monkeypatch, tmp_path):
    tt.save_pretrained(tmp_path)
    (tmp_path / "keep.txt").write_text("unrelated")
    before = _files(tmp_path)
    real_open, opened = builtins.open, []

    def flaky_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wxa") and os.path.dirname(os.path.abspath(file)) == str(tmp_path):
            opened.append(file)
            if len(opened) == 2:
                return _DiskFull(f)
        return f

    monkeypatch.setattr(builtins, "open", flaky_open)
    with pytest.raises(OSError, match="No space left"):
        tt_cased.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(opened) == 2
    assert _files(tmp_path) == before  # every old file intact, no temporary file
    assert BertTokenizer.from_pretrained(tmp_path).do_lower_case is True


def test_save_and_load_bad_paths(tt, tmp_path):
    with pytest.raises(TypeError, match="path: expected a directory path"):
        tt.save_pretrained(None)
    with pytest.raises(TypeError, match="path: expected a directory path"):
        BertTokenizer.from_pretrained(3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        tt.save_pretrained(tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_concurrent_corpus_builds_do_not_clobber_each_other(monkeypatch, tmp_path):
    """Two builds of the same corpus at the same time: both succeed and the file is whole."""
    import turbotune.corpus as corpus

    lines = [f"line {i} " + "x" * (i % 50) for i in range(3000)]
    both_writing = threading.Barrier(2, timeout=30)

    def sources():
        def files():
            yield "a", "\n".join(lines[:1000])
            both_writing.wait()  # the two builds now hold their output files open at the same time
            yield "b", "\n".join(lines[1000:])
        return [("test", 1.0, files())]

    monkeypatch.setattr(corpus, "_sources", sources)
    out = tmp_path / "corpus.txt"
    mb = sum(len(s) + 1 for s in lines) / corpus.MB * 0.99
    errors = []

    def build():
        try:
            corpus.build_corpus(str(out), mb=mb, quiet=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert out.read_text(encoding="utf-8") == "".join(s.strip() + "\n" for s in lines)
    assert os.listdir(tmp_path) == ["corpus.txt"]
