"""Fixtures for the tokenizer tests: HF reference tokenizers, turbotune's, the corpus."""
from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def model_dir() -> str:
    from turbotune.data import packaged_model_dir

    return packaged_model_dir()


@pytest.fixture(scope="session")
def hf(model_dir):
    """transformers' fast BERT tokenizer on the packaged uncased MiniLM vocab (the reference)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tt(model_dir):
    from turbotune.tokenizers import BertTokenizer

    return BertTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def cased_vocab(model_dir):
    """A cased vocabulary: the MiniLM vocab plus capitalised / upper-case / accented
    variants of its first whole words (so case and accents change the ids)."""
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        base = [line.rstrip("\n") for line in f]
    seen = set(base)
    extra = []
    for tok in base[1996:9000]:
        if not tok.isalpha() or not tok.isascii():
            continue
        for v in (tok.capitalize(), tok.upper(), "##" + tok.capitalize()):
            if v not in seen:
                seen.add(v)
                extra.append(v)
    for v in ("Café", "naïve", "Ünïcödé", "ΣΑΣ", "Σ", "İ", "Straße", "ß", "##é", "é", "É", "Ç"):
        if v not in seen:
            seen.add(v)
            extra.append(v)
    return base + extra


@pytest.fixture(scope="session")
def hf_cased(cased_vocab):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={t: i for i, t in enumerate(cased_vocab)}, do_lower_case=False)


@pytest.fixture(scope="session")
def tt_cased(cased_vocab):
    from turbotune.tokenizers import BertTokenizer

    return BertTokenizer(cased_vocab, do_lower_case=False)


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> str:
    """Builds the >= 20 MB corpus from files on this machine (once; cached at
    turbotune.corpus.default_path(), or in a temporary directory when that is not writable)."""
    from turbotune.corpus import build_corpus as build, default_path

    path = default_path()
    try:
        return build(path, quiet=True)
    except OSError:
        return build(str(tmp_path_factory.mktemp("corpus") / "corpus.txt"), quiet=True)


@pytest.fixture(scope="session")
def corpus_lines(corpus_path):
    with open(corpus_path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.fixture(scope="session")
def gen_unicode_tables():
    return _load_script("gen_unicode_tables")


@pytest.fixture(scope="session")
def reviews():
    """The real movie-review snippets (text only), in file order."""
    from turbotune.data import movie_reviews

    return [r.text for r in movie_reviews()]


@pytest.fixture(scope="session")
def labeled_reviews():
    from turbotune.data import movie_reviews

    return movie_reviews()
