"""Per-row token alignment (``word_ids``, ``sequence_ids``, ``token_to_word``, ...) for
:class:`~turbotune.tokenizers.BertTokenizer` results.

transformers' ``BatchEncoding`` answers ``word_ids(i)``, ``sequence_ids(i)``,
``token_to_word(...)``, ``char_to_token(...)`` and friends by asking the
``tokenizers.Encoding`` objects it holds. :class:`Encoding` offers the same
attributes and methods (same results, including HF's edge cases), computed from
the native encoder's flat arrays.

They are computed lazily: a tokenizer call returns a ``BatchEncoding`` that
remembers its inputs (a tuple of the strings) and the resolved settings, and the
first access to ``.encodings`` (through any of the methods above, ``enc[i]``,
pickling or copying) runs the encoder once more over the same batch with word
ids and offsets switched on. The plain call pays for none of it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Encoding", "make_batch_encoding"]

# Positions of the flags in the native encode_batch argument tuple (see BertTokenizer._native_args).
_ARG_PAIRS, _ARG_SPECIAL_TOKENS, _ARG_PAD_LEFT = 1, 2, 12
_ARG_OFFSETS, _ARG_MASK, _ARG_TYPES, _ARG_SPECIAL, _ARG_EXTRA = 13, 14, 15, 16, 18
# The "extra" argument: None, or (text_splits, pair_splits, stride, overflow, return_word_ids).


class _RowData:
    """The flat arrays of one detailed native call, shared by the rows' :class:`Encoding` views.

    Each attribute is converted to a Python list once for the whole batch (on first use);
    a row's attribute is then a slice of it.
    """

    __slots__ = ("raw", "starts", "widths", "lengths", "tokens", "pair", "special", "pad_left", "sample", "_flat")

    def __init__(self, raw: Dict[str, Any], tokens: Sequence[str], pair: bool, special: bool, pad_left: bool,
                 overflow: bool) -> None:
        self.raw = raw
        self.widths = raw["width"].tolist()
        self.lengths = raw["length"].tolist()
        self.starts = np.concatenate(([0], np.cumsum(raw["width"]))).tolist()
        self.tokens = tokens
        self.pair = pair
        self.special = special
        self.pad_left = pad_left
        self.sample = raw["overflow_to_sample_mapping"].tolist() if overflow else None
        self._flat: Dict[str, list] = {}

    def flat(self, name: str) -> list:
        v = self._flat.get(name)
        if v is None:
            raw = self.raw
            if name in ("word_ids", "sequence_ids"):
                v = [None if x < 0 else x for x in raw[name].tolist()]
            elif name == "offsets":
                v = list(map(tuple, raw["offset_mapping"].tolist()))
            elif name == "tokens":
                toks = self.tokens
                v = [toks[i] for i in self.flat("ids")]
            else:
                v = raw[_RAW_KEYS[name]].tolist()
            self._flat[name] = v
        return v


_RAW_KEYS = {"ids": "input_ids", "type_ids": "token_type_ids", "attention_mask": "attention_mask",
             "special_tokens_mask": "special_tokens_mask"}


class Encoding:
    """One row of a tokenized batch, with the read API of ``tokenizers.Encoding``.

    Attributes (lists of length ``len(encoding)``, padding included; a new list on each
    access): ``ids``, ``type_ids``, ``tokens``, ``offsets`` (``(start, end)`` character
    spans), ``attention_mask``, ``special_tokens_mask``, ``word_ids`` (index of the
    pre-tokenized word, or of the word given with ``is_split_into_words``; ``None`` for
    special and padding tokens), ``sequence_ids`` (0 / 1 for the first / second text,
    ``None`` for special and padding tokens), ``n_sequences`` (1 or 2) and ``overflowing``
    (the overflowing rows of this row's text when the call asked for
    ``return_overflowing_tokens``, else ``[]``).
    """

    __slots__ = ("_d", "_row", "_lo", "_hi", "_ranges_cache", "_overflowing")

    def __init__(self, data: _RowData, row: int) -> None:
        self._d = data
        self._row = row
        self._lo = data.starts[row]
        self._hi = data.starts[row + 1]
        self._ranges_cache: Optional[Dict[int, Tuple[int, int]]] = None
        self._overflowing: List["Encoding"] = []

    def _row_list(self, name: str) -> list:
        return self._d.flat(name)[self._lo:self._hi]

    def __len__(self) -> int:
        return self._hi - self._lo

    def __repr__(self) -> str:
        return f"turbotune.tokenizers.Encoding(num_tokens={len(self)}, n_sequences={self.n_sequences})"

    ids = property(lambda self: self._row_list("ids"))
    type_ids = property(lambda self: self._row_list("type_ids"))
    attention_mask = property(lambda self: self._row_list("attention_mask"))
    special_tokens_mask = property(lambda self: self._row_list("special_tokens_mask"))
    offsets = property(lambda self: self._row_list("offsets"))
    tokens = property(lambda self: self._row_list("tokens"))
    word_ids = property(lambda self: self._row_list("word_ids"))
    words = word_ids  # deprecated alias in tokenizers
    sequence_ids = property(lambda self: self._row_list("sequence_ids"))

    @property
    def n_sequences(self) -> int:
        return 2 if self._d.pair else 1

    @property
    def overflowing(self) -> List["Encoding"]:
        return list(self._overflowing)

    # --------------------------------------------------------------- alignment
    def _ranges(self) -> Dict[int, Tuple[int, int]]:
        """Token range of each sequence, as tokenizers keeps them (also for an empty sequence)."""
        ranges = self._ranges_cache
        if ranges is None:
            d = self._d
            seq = self._row_list("sequence_ids")
            width, length = d.widths[self._row], d.lengths[self._row]
            start = (width - length if d.pad_left else 0) + (1 if d.special else 0)
            a_len = seq.count(0)
            ranges = {0: (start, start + a_len)}
            if d.pair:
                b_start = start + a_len + (1 if d.special else 0)
                ranges[1] = (b_start, b_start + seq.count(1))
            self._ranges_cache = ranges
        return ranges

    def _range(self, sequence_index: int) -> Tuple[int, int]:
        return self._ranges().get(sequence_index, (0, len(self)))

    @staticmethod
    def _index(value: int, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 0:
            raise OverflowError(f"{name}: expected a non-negative int, got {value}")
        return int(value)

    def token_to_sequence(self, token_index: int) -> Optional[int]:
        """Index of the sequence holding the token (``None`` for special / padding tokens)."""
        t = self._index(token_index, "token_index")
        for seq, (lo, hi) in self._ranges().items():
            if lo <= t < hi:
                return seq
        return None

    def token_to_word(self, token_index: int) -> Optional[int]:
        """Index of the word holding the token (``None`` for special / padding tokens)."""
        t = self._index(token_index, "token_index")
        if self.token_to_sequence(t) is None or t >= len(self):
            return None
        return self.word_ids[t]

    def token_to_chars(self, token_index: int) -> Optional[Tuple[int, int]]:
        """``(start, end)`` characters of the token in its text (``None`` for special / padding tokens)."""
        t = self._index(token_index, "token_index")
        if self.token_to_sequence(t) is None or t >= len(self):
            return None
        return self.offsets[t]

    def word_to_tokens(self, word_index: int, sequence_index: int = 0) -> Optional[Tuple[int, int]]:
        """``(first token, last token + 1)`` of the word in the given sequence, or ``None``."""
        w = self._index(word_index, "word_index")
        lo, hi = self._range(self._index(sequence_index, "sequence_index"))
        start = end = None
        for i, x in enumerate(self.word_ids[lo:hi]):
            if x is not None and x > w:
                break
            if x == w:
                if start is None:
                    start = i
                end = i + 1
        return None if start is None else (lo + start, lo + end)

    def word_to_chars(self, word_index: int, sequence_index: int = 0) -> Optional[Tuple[int, int]]:
        """``(start, end)`` characters of the word, or ``None``."""
        span = self.word_to_tokens(word_index, sequence_index)
        if span is None or span[1] == 0:
            return None
        offs = self.offsets
        return offs[span[0]][0], offs[span[1] - 1][1]

    def char_to_token(self, char_pos: int, sequence_index: int = 0) -> Optional[int]:
        """Index of the token covering the character of the given sequence, or ``None``."""
        c = self._index(char_pos, "char_pos")
        lo, hi = self._range(self._index(sequence_index, "sequence_index"))
        for i, (s, e) in enumerate(self.offsets[lo:hi]):
            if s <= c < e:
                return lo + i
        return None

    def char_to_word(self, char_pos: int, sequence_index: int = 0) -> Optional[int]:
        """Index of the word covering the character of the given sequence, or ``None``."""
        t = self.char_to_token(char_pos, sequence_index)
        return None if t is None else self.token_to_word(t)


def encodings_from_source(source: Tuple[Any, tuple]) -> List[Encoding]:
    """Run the native encoder again over a call's inputs (``source`` = (tokenizer, the native
    call's argument tuple)) with word ids and offsets; one Encoding per output row."""
    tokenizer, args = source
    args = list(args)
    for i in (_ARG_OFFSETS, _ARG_MASK, _ARG_TYPES, _ARG_SPECIAL):
        args[i] = True
    extra = args[_ARG_EXTRA] or (None, None, 0, False, False)
    args[_ARG_EXTRA] = extra[:4] + (True,)
    raw = tokenizer._native.encode_batch(*args)
    data = _RowData(raw, tokenizer._tokens, pair=args[_ARG_PAIRS] is not None, special=bool(args[_ARG_SPECIAL_TOKENS]),
                    pad_left=bool(args[_ARG_PAD_LEFT]), overflow=bool(extra[3]))
    rows = [Encoding(data, r) for r in range(len(data.widths))]
    if data.sample is not None:
        first: Dict[int, Encoding] = {}
        for enc, s in zip(rows, data.sample):
            if s in first:
                first[s]._overflowing.append(enc)
            else:
                first[s] = enc
    return rows


_CLASS = None


def _batch_encoding_class():
    """transformers.BatchEncoding with lazily computed ``encodings`` (created on first use)."""
    global _CLASS
    if _CLASS is None:
        from transformers import BatchEncoding as _HF

        class BatchEncoding(_HF):
            """A ``transformers.BatchEncoding`` whose ``encodings`` are computed on first use.

            ``word_ids()``, ``sequence_ids()``, ``token_to_word()``, ``char_to_token()``,
            ``tokens()``, ``enc[i]`` and the other alignment methods work as with a fast HF
            tokenizer; the first of them re-encodes the batch (same strings, same settings)
            with word ids and offsets.
            """

            def _get_encodings(self):
                d = self.__dict__
                enc = d.get("_tt_encodings")
                if enc is None and d.get("_tt_source") is not None:
                    enc = d["_tt_encodings"] = encodings_from_source(d["_tt_source"])
                    d["_tt_source"] = None
                return enc

            def _set_encodings(self, value):
                self.__dict__["_tt_encodings"] = value
                self.__dict__["_tt_source"] = None

            _encodings = property(_get_encodings, _set_encodings)

            def word_ids(self, batch_index: int = 0):
                enc = self._encodings  # one property access (HF's version makes two)
                if not enc:
                    raise ValueError("word_ids() is not available when using Python based tokenizers")
                return enc[batch_index].word_ids

            def sequence_ids(self, batch_index: int = 0):
                enc = self._encodings
                if not enc:
                    raise ValueError("sequence_ids() is not available when using Python based tokenizers")
                return enc[batch_index].sequence_ids

            word_ids.__doc__ = _HF.word_ids.__doc__
            sequence_ids.__doc__ = _HF.sequence_ids.__doc__

            @property
            def is_fast(self) -> bool:
                return self.__dict__.get("_tt_source") is not None or self._encodings is not None

            def __getstate__(self):
                return {"data": self.data, "encodings": self._encodings, "n_sequences": self._n_sequences}

            def __setstate__(self, state):
                super().__setstate__(state)
                self._n_sequences = state.get("n_sequences")

        BatchEncoding.__module__ = __name__
        BatchEncoding.__qualname__ = "BatchEncoding"
        globals()["BatchEncoding"] = BatchEncoding  # picklable by reference
        _CLASS = BatchEncoding
    return _CLASS


def make_batch_encoding(data: Dict[str, Any], source: Optional[tuple], n_sequences: Optional[int]):
    """Wrap ``data`` (already lists / arrays / tensors) without re-running ``BatchEncoding.__init__``
    (which would re-check every value for a tensor conversion that is already done)."""
    cls = _CLASS or _batch_encoding_class()
    enc = cls.__new__(cls)
    enc.data = data
    enc._tt_source = source
    enc._n_sequences = n_sequences
    return enc


def __getattr__(name: str):
    if name == "BatchEncoding":  # module attribute for pickling and isinstance checks
        return _batch_encoding_class()
    raise AttributeError(name)
