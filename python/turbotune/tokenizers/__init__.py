"""Fast BERT WordPiece tokenization with the Hugging Face API.

:class:`BertTokenizer` is a drop-in for ``transformers.BertTokenizerFast`` on
BERT WordPiece vocabularies: the same ``input_ids``, ``token_type_ids``,
``attention_mask`` and ``offset_mapping``, computed by turbotune's C++ core
(``csrc/tokenizer``) with the GIL released, on several threads for batches,
written straight into int64 numpy / torch buffers.
"""
from .bert import BertTokenizer, UnsupportedTokenizerError

__all__ = ["BertTokenizer", "UnsupportedTokenizerError"]
