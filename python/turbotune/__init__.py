"""turbotune: faster BERT-family and CNN fine-tuning and inference in plain PyTorch.

Public API (everything else is internal):

- :func:`turbotune.optimize`  make a model (this instance) faster; ``handle.revert()`` undoes it
- :func:`turbotune.finetune`  fine-tune end to end (data, tokenizer, optimize, AdamW, eval, checkpoint)
- :mod:`turbotune.infer`    batch inference from a checkpoint (``Predictor``, ``infer_file``)
- :mod:`turbotune.ops`  fused kernels (``layer_norm``, ...) as ``torch.library`` ops
- :mod:`turbotune.nn`   drop-in modules (``LayerNorm``)
- :mod:`turbotune.optim`  fused mixed-precision ``AdamW`` and ``clip_grad_norm_``
- :mod:`turbotune.padding`  ``unpad_input`` / ``pad_input`` for varlen attention
- :mod:`turbotune.models`   ``register_hf_attention()``: ``attn_implementation="turbotune"``
- :mod:`turbotune.backend`  which implementation runs where, ``TURBOTUNE_BACKEND``
- :mod:`turbotune.bench`    the benchmark harness behind ``turbotune bench``
- :mod:`turbotune.tokenizers`  C++ WordPiece ``BertTokenizer`` with the Hugging Face API
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import backend, models, nn, ops, optim, padding, tokenizers  # noqa: E402
from .models import OptimizeHandle, optimize  # noqa: E402
from .tasks import finetune  # noqa: E402

__all__ = ["__version__", "optimize", "OptimizeHandle", "finetune", "backend", "ops", "nn", "optim", "padding", "models",
           "tokenizers"]
