"""Model-level integrations.

- :func:`optimize` (also ``turbotune.optimize``): instance-scoped, reversible
  acceleration of a whole model; each model path registers itself in
  :mod:`turbotune.models.dispatch`.
- :func:`register_hf_attention`: makes ``attn_implementation="turbotune"``
  available to Hugging Face ``from_pretrained``.

Nothing here touches transformers at import time.
"""
from .hf_attention import is_registered as hf_attention_registered
from .hf_attention import register as register_hf_attention
from .dispatch import OptimizeHandle, optimize, register_path, registered_paths

__all__ = ["optimize", "OptimizeHandle", "register_path", "registered_paths", "register_hf_attention",
           "hf_attention_registered"]

# Model paths register themselves with optimize(), in dispatch order: BERT family first, then conv nets.
from . import bert  # noqa: E402,F401
from . import cnn  # noqa: E402,F401
