"""Model-level integrations (Hugging Face transformers).

Nothing here touches transformers at import time; call
:func:`register_hf_attention` to make ``attn_implementation="turbotune"``
available to ``from_pretrained``.
"""
from .hf_attention import is_registered as hf_attention_registered
from .hf_attention import register as register_hf_attention

__all__ = ["register_hf_attention", "hf_attention_registered"]
