"""Bad-input probes of the tokenizer (``(code, expected)``, see ``probe_harness``), run by
``tests/test_bad_input.py``: None, bytes, lone surrogates, non-str items (in texts, pairs, pre-split
words), bad ids, bad options, huge lengths and malformed tokenizer folders give a TypeError /
ValueError (IndexError for an id outside the vocabulary) whose message names the argument.
"""
from __future__ import annotations

import json
import os

# Run once per probe subprocess: the names every probe can use.
SETUP = r"""
import os
import numpy as np
from turbotune.data import packaged_model_dir
from turbotune.tokenizers import BertTokenizer

tok = BertTokenizer.from_pretrained(packaged_model_dir(), num_threads=2)
vocab = list(tok.vocab)
"""

# (code, expected: "ok" or "ExceptionType: regex")
INPUT_PROBES = [
    (r"tok(None)", "TypeError: text: expected str"),
    (r"tok(b'abc')", "TypeError: text: expected str.*got bytes"),
    (r"tok(3.5)", "TypeError: text: expected str.*got float"),
    (r"tok([b'abc'])", r"TypeError: text\[0\]: expected str, got bytes"),
    (r"tok(['a', None])", r"TypeError: text\[1\]: expected str, got NoneType"),
    (r"tok(('a', 'b', 7))", r"TypeError: text\[2\]: expected str, got int"),
    (r"tok('a', b'b')", "TypeError: text_pair: expected str when text is a str, got bytes"),
    (r"tok(['a'], [None])", r"TypeError: text_pair\[0\]: expected str, got NoneType"),
    (r"tok(['a'], 'b')", "TypeError: text_pair: expected a list of str"),
    (r"tok([('a', None)])", r"TypeError: text_pair\[0\]: expected str, got NoneType"),
    (r"tok([('a', 'b'), ('c',)])", r"TypeError: text\[1\]: expected a \(text, text_pair\) pair"),
    (r"tok(['a', 'b'], ['c'])", "ValueError: text_pair: expected 2 items"),
    (r"tok('ok \ud800')", "ValueError: text.*lone surrogate"),
    (r"tok(['ok', 'x\udfff'])", r"ValueError: text\[1\]: .*lone surrogate"),
    (r"tok(['ok'], ['\udc00'])", r"ValueError: text_pair\[0\]: .*lone surrogate"),
    (r"tok([('ok', '\ud800')])", r"ValueError: text_pair\[0\]: .*lone surrogate"),
    (r"tok([['a', '\ud800']], is_split_into_words=True)", r"ValueError: text\[0\]: .*lone surrogate"),
    (r"tok([['a', None]], is_split_into_words=True)", r"TypeError: text\[0\]\[1\]: expected str"),
    (r"tok(['a', b'b'], is_split_into_words=True)", r"TypeError: text\[1\]: expected str, got bytes"),
    (r"tok(None, is_split_into_words=True)", "TypeError: text: expected a list of words"),
    (r"tok([['a']], [None], is_split_into_words=True)", r"TypeError: text_pair\[0\]: expected a list of words"),
    (r"tok('a', max_length='5')", "ValueError: max_length"),
    (r"tok('a', max_length=-1, truncation=True)", "ValueError: max_length"),
    (r"tok('a', stride='2')", "ValueError: stride"),
    (r"tok('a', stride=-2)", "ValueError: stride"),
    (r"tok('a', padding_side='up', padding=True)", "ValueError: padding_side"),
    (r"tok('a', return_tensors='tf')", "ValueError: return_tensors"),
    (r"tok('a', num_threads=0)", "ValueError: num_threads"),
    (r"tok('a', num_threads='2')", "ValueError: num_threads"),
    (r"tok('a' * 10**6 + ' b' * 10**5, truncation=True, max_length=8, stride=3, return_overflowing_tokens=True)", "ok"),
    (r"tok(['a', 'b'], padding='max_length', max_length=10**15)", "ValueError: padding: the padded batch would exceed"),
    (r"tok(['a', 'b'], padding='max_length', truncation=True, max_length=2**70)", "ValueError: padding: the padded batch"),
    (r"assert BertTokenizer(vocab, model_max_length=int(1e30))(['a b', 'c'], padding='max_length', truncation=True)"
     r"['input_ids'] == [[101, 1037, 1038, 102], [101, 1039, 102]]", "ok"),
    (r"tok.encode_batch_ragged(None)", "TypeError: texts: expected a list of str"),
    (r"tok.encode_batch_ragged('abc')", "TypeError: texts: expected a list of str, got a str"),
    (r"tok.encode_batch_ragged([b'x'])", r"TypeError: text\[0\]: expected str, got bytes"),
    (r"tok.encode_batch_ragged(['x', '\ud800'])", r"ValueError: text\[1\]: .*lone surrogate"),
    (r"tok.encode(None)", "TypeError: text: expected str"),
    (r"tok.tokenize(b'x')", "TypeError: text: expected str"),
    (r"tok.decode(None)", "TypeError: token_ids: expected"),
    (r"tok.decode('abc')", "TypeError: token_ids: expected"),
    (r"tok.decode([101, None])", r"TypeError: ids\[1\]: expected an int token id, got NoneType"),
    (r"tok.decode([101, 1.5])", r"TypeError: ids\[1\]: expected an int token id, got float"),
    (r"tok.decode([10**12])", r"IndexError: ids\[0\]: 1000000000000 is outside the vocabulary"),
    (r"tok.decode([-1])", r"IndexError: ids\[0\]: -1 is outside the vocabulary"),
    (r"tok.decode(np.array([101, 102]))", "ok"),
    (r"tok.batch_decode(None)", "TypeError: sequences"),
    (r"tok.convert_ids_to_tokens('x')", "TypeError: ids: expected an int or a list of int"),
    (r"tok.convert_tokens_to_ids(5)", "TypeError: tokens: expected a str or a list of str"),
    (r"tok.convert_tokens_to_ids(['a', None])", r"TypeError: tokens\[1\]: expected str"),
    (r"assert tok.convert_tokens_to_ids('\ud800') == tok.unk_token_id", "ok"),
    (r"tok.pad(None)", "TypeError: encoded_inputs: expected a mapping"),
    (r"tok.pad(b'x')", "TypeError: encoded_inputs: expected a mapping"),
    (r"tok.pad({'input_ids': [[1, 2], None]})", "TypeError|ValueError"),
    (r"tok.pad({'input_ids': [['a']]}, return_tensors='pt')", "ValueError"),
    (r"tok.pad({'input_ids': [[1]], 'attention_mask': [[1], [1]]})", "ValueError: encoded_inputs: 'attention_mask' has 2 rows"),
    (r"tok.get_special_tokens_mask([101, 5], [7], already_has_special_tokens=True)", "ValueError: token_ids_1"),
    (r"tok.num_threads = -1", "ValueError: num_threads"),
    (r"tok.padding_side = None", "ValueError: padding_side"),
    (r"tok.model_max_length = 'big'", "TypeError: model_max_length"),
    (r"tok.clean_up_tokenization_spaces = 'yes'", "TypeError: clean_up_tokenization_spaces"),
    (r"BertTokenizer(None)", "TypeError: vocab: expected a path"),
    (r"BertTokenizer(b'vocab.txt')", "TypeError: vocab: expected a path"),
    (r"BertTokenizer(['[UNK]', None])", r"TypeError: vocab\[1\]: expected str"),
    (r"BertTokenizer(['[UNK]', 'a\ud800'], cls_token=None, sep_token=None)", r"ValueError: vocab\[1\]: .*surrogate"),
    (r"BertTokenizer({'[UNK]': '0'}, cls_token=None, sep_token=None)", "ValueError: vocab: ids must be"),
    (r"BertTokenizer({3: 0}, cls_token=None, sep_token=None)", "TypeError: vocab: expected str tokens"),
    (r"BertTokenizer(vocab, do_lower_case='no')", "TypeError: do_lower_case"),
    (r"BertTokenizer(vocab, strip_accents=1)", "TypeError: strip_accents"),
    (r"BertTokenizer(vocab, max_input_chars_per_word=-1)", "ValueError: max_input_chars_per_word"),
    (r"BertTokenizer(vocab, max_input_chars_per_word=None)", "TypeError: max_input_chars_per_word"),
    (r"BertTokenizer(vocab, additional_special_tokens='[X]')", "TypeError: additional_special_tokens"),
    (r"BertTokenizer(vocab, additional_special_tokens=[None])", r"TypeError: additional_special_tokens\[0\]"),
    (r"BertTokenizer(vocab, pad_token=5)", "TypeError: pad_token"),
    (r"BertTokenizer(vocab, unk_token=None)", "ValueError: unk_token"),
    (r"BertTokenizer(vocab, wordpieces_prefix=None)", "TypeError: wordpieces_prefix"),
    (r"BertTokenizer(vocab, model_max_length=-5)", "ValueError: model_max_length"),
    (r"BertTokenizer.from_pretrained(None)", "TypeError: path: expected a directory path"),
]


def folder_cases(model_dir):
    """Malformed tokenizer folders: ``{name: ({file: content}, expected)}``, built from the good files of
    ``model_dir``."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        good = json.load(f)
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab_text = f.read()
    cases = {
        "half_json": ({"tokenizer.json": json.dumps(good)[:5000]}, r"ValueError: .*tokenizer.json: not a valid UTF-8 JSON"),
        "json_list": ({"tokenizer.json": "[1, 2]"}, "UnsupportedTokenizerError: .*tokenizer.json: expected a JSON object"),
        "vocab_list": ({"tokenizer.json": json.dumps(dict(good, model=dict(good["model"], vocab=["a"])))},
                       "UnsupportedTokenizerError: .*model.vocab is missing"),
        "model_str": ({"tokenizer.json": json.dumps(dict(good, model="WordPiece"))}, "UnsupportedTokenizerError: .*model is a str"),
        "bad_post": ({"tokenizer.json": json.dumps(dict(good, post_processor={"type": "TemplateProcessing",
                                                                              "single": [{"x": 1}]}))},
                     "UnsupportedTokenizerError: .*malformed post_processor"),
        "added_not_list": ({"tokenizer.json": json.dumps(dict(good, added_tokens={"a": 1}))},
                           "UnsupportedTokenizerError: .*added_tokens is a dict"),
        "bad_lowercase": ({"tokenizer.json": json.dumps(dict(good, normalizer=dict(good["normalizer"], lowercase="x")))},
                          "TypeError: do_lower_case"),
        "binary_vocab": ({"vocab.txt": b"[UNK]\n\xff\xfe\x00\n"}, "ValueError: vocab: .* is not UTF-8"),
        "empty_vocab": ({"vocab.txt": ""}, "ValueError: vocab: expected at least one token"),
        "no_unk_vocab": ({"vocab.txt": "a\nb\n"}, r"ValueError: unk_token: '\[UNK\]' is not in the vocabulary"),
        "config_list": ({"vocab.txt": vocab_text, "tokenizer_config.json": "[1]"},
                        "ValueError: .*tokenizer_config.json: expected a JSON object"),
        "config_not_json": ({"vocab.txt": vocab_text, "tokenizer_config.json": "{oops"},
                            "ValueError: .*tokenizer_config.json: not a valid UTF-8 JSON"),
        "config_bad_bool": ({"vocab.txt": vocab_text, "tokenizer_config.json": '{"do_lower_case": "yes"}'},
                            "TypeError: do_lower_case"),
        "config_bad_len": ({"vocab.txt": vocab_text, "tokenizer_config.json": '{"model_max_length": "big"}'},
                           "TypeError: model_max_length"),
        "config_bad_token": ({"vocab.txt": vocab_text, "special_tokens_map.json": '{"pad_token": 5}'},
                             "ValueError: .*pad_token: expected a token string"),
        "config_bad_side": ({"vocab.txt": vocab_text, "tokenizer_config.json": '{"padding_side": "up"}'},
                            "ValueError: padding_side"),
        "nothing": ({"README.md": "hi"}, "FileNotFoundError: path: .* has neither tokenizer.json nor vocab.txt"),
    }
    return cases


def write_folders(root, model_dir):
    """Write each of :func:`folder_cases` as ``root/<name>``."""
    for name, (files, _) in folder_cases(model_dir).items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for fname, content in files.items():
            with open(os.path.join(d, fname), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))


def folder_probes(model_dir):
    """One probe per malformed folder; the probe namespace must define ``root`` (see :func:`write_folders`)."""
    return [(f"BertTokenizer.from_pretrained(os.path.join(root, {name!r}))", expected)
            for name, (_, expected) in folder_cases(model_dir).items()]
