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
