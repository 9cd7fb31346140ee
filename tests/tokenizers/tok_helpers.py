"""Comparison helpers shared by the tokenizer tests."""
from __future__ import annotations

KEYS = ("input_ids", "token_type_ids", "attention_mask", "offset_mapping")


def normalize(value):
    """Nested lists/tuples/arrays/tensors -> nested lists of ints (tuples become lists)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value


def assert_same(ours, ref, keys=KEYS, texts=None):
    """Every key of ref present in ours with identical values; the first differing row is shown."""
    for k in keys:
        if k not in ref:
            assert k not in ours, k
            continue
        a, b = normalize(ours[k]), normalize(ref[k])
        if a != b:
            if isinstance(a, list) and a and isinstance(a[0], list) and len(a) == len(b):
                for i, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        text = texts[i] if texts is not None and len(texts) == len(a) else texts
                        raise AssertionError(f"{k} differs at row {i} (text {ascii(text)}):\nours {x}\nhf   {y}")
            raise AssertionError(f"{k} differs (texts {ascii(texts)}):\nours {a}\nhf   {b}")


ALIGN = ("ids", "type_ids", "tokens", "offsets", "attention_mask", "special_tokens_mask", "word_ids",
         "sequence_ids", "n_sequences")


def assert_same_encodings(ours, ref, rows=None, probe_methods=True):
    """Row encodings (``BatchEncoding.encodings``) agree with HF's: every attribute and, when
    ``probe_methods``, every alignment method at every token / word / character position."""
    assert ours.n_sequences == ref.n_sequences
    assert len(ours.encodings) == len(ref.encodings)
    for r in range(len(ref.encodings)) if rows is None else rows:
        a, b = ours.encodings[r], ref.encodings[r]
        for name in ALIGN:
            assert getattr(a, name) == getattr(b, name), f"row {r}: {name}\nours {getattr(a, name)}\nhf   {getattr(b, name)}"
        assert ours.word_ids(r) == ref.word_ids(r) and ours.sequence_ids(r) == ref.sequence_ids(r)
        assert ours.tokens(r) == ref.tokens(r)
        if not probe_methods:
            continue
        n = len(b.ids)
        for t in range(n + 1):
            for m in ("token_to_sequence", "token_to_word", "token_to_chars"):
                assert getattr(a, m)(t) == getattr(b, m)(t), f"row {r}: {m}({t})"
        words = [w for w in b.word_ids if w is not None]
        nchars = max([e for _, e in b.offsets] + [0])
        for s in (0, 1, 2):
            for w in range((max(words) + 2) if words else 2):
                for m in ("word_to_tokens", "word_to_chars"):
                    assert getattr(a, m)(w, s) == getattr(b, m)(w, s), f"row {r}: {m}({w}, {s})"
            for c in range(nchars + 2):
                for m in ("char_to_token", "char_to_word"):
                    assert getattr(a, m)(c, s) == getattr(b, m)(c, s), f"row {r}: {m}({c}, {s})"
