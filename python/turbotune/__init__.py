"""turbotune: faster BERT-family and CNN fine-tuning and inference in plain PyTorch.

Public API (everything else is internal):

- :mod:`turbotune.ops`  fused kernels (``layer_norm``, ...) as ``torch.library`` ops
- :mod:`turbotune.nn`   drop-in modules (``LayerNorm``)
- :mod:`turbotune.backend`  which implementation runs where, ``TURBOTUNE_BACKEND``
- :mod:`turbotune.bench`    the benchmark harness behind ``turbotune bench``
- :mod:`turbotune.tokenizers`  C++ WordPiece ``BertTokenizer`` with the Hugging Face API
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import backend, nn, ops, tokenizers  # noqa: E402

__all__ = ["__version__", "backend", "ops", "nn", "tokenizers"]
