"""``turbotune.optimize(model)`` for Hugging Face BERT-family encoders: padding-free
training and inference of stock checkpoints.

What :func:`apply` does to one model instance (never its class):

- binds an optimized ``forward`` to the model (and to its base model, so
  ``model.bert(...)`` is padding-free too). The forward packs the real tokens
  once, from the attention mask, *before* the embeddings; every encoder layer
  runs on the packed ``(T, hidden)`` rows (one fused QKV GEMM, varlen
  attention with dropout, residual-add + LayerNorm, bias + GELU, dropout);
  only caller-visible outputs are re-padded. Heads run on the rows they need:
  sequence classification / multiple choice compute the last layer for each
  sequence's first token only; token classification, QA and MLM use every real
  token (MLM: only the labeled ones with ``mlm_logits="labeled"``);
- optionally casts the parameters to ``dtype``.

Parameters, modules and ``state_dict`` keys are untouched: the optimizer keeps
holding the model's own Parameters and ``save_pretrained`` writes a stock
checkpoint. ``handle.revert()`` removes the patched forwards (and casts back to
the original dtypes), leaving a model bit-identical to one never optimized
(with ``dtype=None``).

Semantics (all documented differences from stock):

- ``last_hidden_state`` / ``hidden_states`` / token logits are zeros at padding
  positions (stock computes values there that no loss uses); QA start/end
  logits are ``finfo.min`` there, so padding is never the argmax;
- losses mean what stock's mean (``ignore_index=-100``, HF's ``problem_type``
  rules, QA's clamped positions); a label on a padding position (mask 0) other
  than -100 raises ``ValueError`` (stock would score the padding token);
- the pooler reads each sequence's first *real* token: the same as stock for
  right-padded batches; for left padding stock reads a padding token, and a
  one-time warning says so;
- ``mlm_logits="labeled"``: with ``labels``, MLM ``logits`` are
  ``(n_labeled, vocab)`` for the positions whose label is not -100, in
  row-major order (the default ``"all"`` returns stock's ``(B, L, vocab)``).

Falls back to the stock forward, with a one-line
:class:`TurbotuneFallbackWarning`, for ``output_attentions=True``,
``head_mask``, cross-attention inputs, past key values, 4-D attention masks and
unknown arguments; decoder / cross-attention configs are not patched at all.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Union

import torch

from ... import backend
from ..dispatch import OptimizeHandle, register_path
from .forward import TurbotuneFallbackWarning, install
from .layout import base_model, head_kind, make_spec, unsupported_config
from .packed import bias_gelu, cross_entropy, packed_attention

__all__ = ["apply", "matches", "TurbotuneFallbackWarning", "fast_bf16_available", "packed_attention", "bias_gelu",
           "cross_entropy"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def matches(model: torch.nn.Module) -> bool:
    """True for a Hugging Face BERT-family model: a base model with the BERT encoder layout
    (``BertModel``, ``RobertaModel``, XLM-R, ...) or a model whose ``base_model_prefix``
    attribute is one (``BertFor*``, ``RobertaFor*``, ...). Structural; no forward pass."""
    return base_model(model) is not None


def fast_bf16_available(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast on ``device`` (:func:`turbotune.backend.bf16_support`): a CUDA GPU
    with bf16, or a CPU with AVX512-BF16 / AMX (on AVX2-only CPUs bf16 GEMMs are several times slower)."""
    return backend.bf16_support(device)[0]


def _resolve_dtype(model: torch.nn.Module, dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"turbotune.optimize: dtype must be None, 'auto' or one of {_DTYPES}, got {dtype!r}")
        p = next(model.parameters(), None)
        if p is None or p.dtype != torch.float32:
            return None
        return torch.bfloat16 if fast_bf16_available(p.device) else None
    if dtype not in _DTYPES:
        raise TypeError(f"turbotune.optimize: dtype must be None, 'auto' or one of {_DTYPES}, got {dtype!r}")
    return dtype


def _cast(model: torch.nn.Module, dtype: torch.dtype):
    """Cast floating parameters and buffers in place (the Parameter objects stay); returns the undo."""
    before = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            before[name] = (t, t.dtype)
    if not before:
        return None
    for t, _ in before.values():
        t.data = t.data.to(dtype)

    def undo():
        for t, orig in before.values():
            t.data = t.data.to(orig)

    return undo


def apply(model: torch.nn.Module, padding_free: bool = True, dtype: Union[None, str, torch.dtype] = None,
          mlm_logits: str = "all", **unknown) -> OptimizeHandle:
    """Optimize a BERT-family model in place (this instance); see the module docstring.

    Args:
        model: a model :func:`matches` accepts.
        padding_free: patch the forward for padding-free execution (False: only ``dtype``).
        dtype: None (keep), ``torch.bfloat16`` / ``torch.float16`` / ``torch.float32``
            (cast parameters and buffers; with bf16/fp16 use ``turbotune.optim.AdamW``, whose
            ``master_weights="auto"`` keeps fp32 master weights), or ``"auto"`` (bf16 where bf16
            matmuls are fast: a bf16-capable GPU or a CPU with AVX512-BF16/AMX; else keep fp32).
        mlm_logits: ``"all"`` (stock ``(B, L, vocab)`` logits) or ``"labeled"`` (with labels,
            the MLM head and the last layer run only on labeled positions; logits
            ``(n_labeled, vocab)``).

    Returns:
        an :class:`~turbotune.models.dispatch.OptimizeHandle` (``kind="bert"``).

    Raises:
        TypeError: an unknown option or a bad ``dtype`` type.
        ValueError: a bad option value.
    """
    if unknown:
        raise TypeError(f"turbotune.optimize: unknown option(s) {sorted(unknown)} for the bert path; "
                        f"known: padding_free, dtype, mlm_logits")
    if not isinstance(padding_free, bool):
        raise TypeError(f"turbotune.optimize: padding_free must be a bool, got {padding_free!r}")
    if mlm_logits not in ("all", "labeled"):
        raise ValueError(f"turbotune.optimize: mlm_logits must be 'all' or 'labeled', got {mlm_logits!r}")
    base = base_model(model)
    if base is None:
        raise ValueError(f"turbotune.optimize: {type(model).__name__} does not have the BERT encoder layout")
    target = _resolve_dtype(model, dtype)
    options = dict(padding_free=padding_free, dtype=target, mlm_logits=mlm_logits)
    undo: List = []
    changes: List[str] = []
    if padding_free:
        reason = unsupported_config(base)
        if reason is not None:
            warnings.warn(f"turbotune.optimize: {type(model).__name__} has {reason}, which the padding-free path "
                          f"does not support; its forward stays stock", TurbotuneFallbackWarning, stacklevel=3)
        else:
            kind = head_kind(model, base)
            undo.append(install(base, make_spec(base, "base"), options))
            changes.append(f"{type(base).__name__}.forward (this instance): padding-free encoder")
            if model is not base:
                if kind == "other":
                    changes.append(f"{type(model).__name__}: head not recognised; it runs stock on the "
                                   f"padding-free base model")
                else:
                    undo.append(install(model, make_spec(base, kind), options))
                    changes.append(f"{type(model).__name__}.forward (this instance): padding-free encoder + "
                                   f"{kind} head on the rows it needs")
    if target is not None:
        cast_undo = _cast(model, target)
        if cast_undo is not None:
            undo.append(cast_undo)
            changes.append(f"parameters and buffers cast to {target}")

    def revert():
        for fn in reversed(undo):
            fn()

    return OptimizeHandle(model, "bert", revert if undo else None, changes, options)


register_path("bert", matches, apply,
              "Hugging Face BERT-family encoders (BERT, RoBERTa, XLM-R, ELECTRA layouts): padding-free "
              "training and inference")
