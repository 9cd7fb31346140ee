"""Hugging Face ``transformers`` (v5) integration of :func:`turbotune.ops.attention`.

Importing this module changes nothing. :func:`register` (public entry:
``turbotune.models.register_hf_attention()``) adds the name ``"turbotune"``
to BOTH of transformers' registries:

- ``AttentionInterface``: the attention function the model layers call;
- ``masking_utils.AttentionMaskInterface``: the mask builder. This matters:
  transformers v5 skips mask creation for an implementation it has no mask
  builder for and then calls the attention with ``attention_mask=None`` even
  when the batch is padded (a silently wrong result). Our builder returns the
  2-D ``(B, Lk)`` padding mask (Hugging Face's ``attention_mask``, True = real
  token; None when nothing is padded), which the kernel consumes directly, and a 4-D boolean mask for the exotic mask
  patterns (sliding windows, packed sequences) it cannot express as padding.

After registration::

    model = AutoModel.from_pretrained(path, attn_implementation="turbotune")

runs every self-/cross-attention of BERT-family models through the fused
kernel, with attention dropout honoured in train mode (``module.training``).
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "turbotune"


def turbotune_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers attention function: ``query/key/value`` ``(B, H, L, D)``;
    ``attention_mask`` None, a 2-D ``(B, Lk)`` bool/0-1 padding mask (True/1 =
    real token, passed to :func:`turbotune.ops.attention` as its
    ``attention_mask``), a 4-D bool mask (True = attend) or a 4-D additive
    float mask (passed as ``attn_bias``). Returns ``(out (B, Lq, H, D), None)``
    (attention weights are never materialized)."""
    from ..ops.attention import attention

    mask = bias = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            mask = attention_mask
        elif attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                bias = torch.zeros(attention_mask.shape, dtype=torch.float32, device=query.device)
                bias = bias.masked_fill(~attention_mask, float("-inf"))
            else:
                bias = attention_mask
        else:
            raise ValueError(f"turbotune attention: attention_mask must be 2-D (B, Lk) or 4-D, "
                             f"got shape {tuple(attention_mask.shape)}")
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    # key/value may carry fewer heads (grouped-query attention): repeat them.
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    out = attention(
        query, key, value,
        attention_mask=mask,
        attn_bias=bias,
        dropout_p=float(dropout) if module.training else 0.0,
        causal=bool(is_causal) and query.shape[2] > 1,
        softmax_scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


def turbotune_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers mask builder for ``"turbotune"``: the 2-D padding mask (causality comes
    from the module) for the plain causal/bidirectional patterns, else a 4-D bool mask."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    if mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function):
        return mu.flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                       mask_function=mask_function, attention_mask=attention_mask)
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
                        attention_mask=attention_mask, allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=False, **kwargs)


def register(name: str = NAME) -> str:
    """Register the attention function and its mask builder under ``name``
    (default ``"turbotune"``) with transformers; idempotent. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, turbotune_attention_forward)
    AttentionMaskInterface.register(name, turbotune_mask)
    return name


def is_registered(name: str = NAME) -> bool:
    """True when both transformers registries know ``name``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    return name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
