"""Fast BERT WordPiece tokenization with the Hugging Face API.

:class:`BertTokenizer` is a drop-in for ``transformers.BertTokenizerFast`` on
BERT WordPiece vocabularies: the same ``input_ids``, ``token_type_ids``,
``attention_mask`` and ``offset_mapping``, computed by turbotune's C++ core
(``csrc/tokenizer``) with the GIL released, on several threads for batches,
written straight into int64 numpy / torch buffers.

The results are ``transformers.BatchEncoding`` objects whose ``word_ids()``,
``sequence_ids()``, ``token_to_word()``, ``char_to_token()``... work as with
HF's fast tokenizer (row :class:`Encoding` views, computed on first use), and
``BertTokenizer.pad`` lets transformers' data collators run on it.
"""
from .bert import BertTokenizer, UnsupportedTokenizerError
from .encoding import Encoding

__all__ = ["BertTokenizer", "Encoding", "UnsupportedTokenizerError"]
