"""Which models the BERT path recognises, by structure (no forward pass).

A *BERT-layout base model* has ``embeddings`` (word / position / optional
token-type lookups, LayerNorm, dropout), an optional ``embeddings_project``
(ELECTRA), ``encoder.layer`` (post-LayerNorm layers: ``attention.self.{query,
key, value}``, ``attention.output.{dense, LayerNorm, dropout}``,
``intermediate.dense`` + activation, ``output.{dense, LayerNorm, dropout}``) and
an optional ``pooler``. The child names are checked exactly, so look-alikes with
extra parts (pre-LN variants such as XLM-RoBERTa-XL, relative position tables)
do not match. This covers HF ``BertModel``, ``RobertaModel``,
``XLMRobertaModel``, ``CamembertModel``, ``ElectraModel`` and any checkpoint
built from them (e.g. all-MiniLM-L6-v2).

:func:`head_kind` then names the task head the optimized forward reproduces;
any other head runs stock on top of the optimized base model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

_EMB_CHILDREN = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm", "dropout"}
_BASE_CHILDREN = {"embeddings", "embeddings_project", "encoder", "pooler"}
_LAYER_CHILDREN = {"attention", "intermediate", "output"}
_ATT_CHILDREN = {"self", "output"}
_SELF_CHILDREN = {"query", "key", "value", "dropout"}
_OUT_CHILDREN = {"dense", "LayerNorm", "dropout"}
_INTER_CHILDREN = {"dense", "intermediate_act_fn"}

# config.hidden_act -> F.gelu(approximate=...) (anything else: the layer's own activation module)
_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


def _children(m: nn.Module) -> set:
    return {name for name, _ in m.named_children()}


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _layer_ok(layer: nn.Module) -> bool:
    if not _children(layer) <= _LAYER_CHILDREN | {"crossattention"} or not _LAYER_CHILDREN <= _children(layer):
        return False
    att, inter, out = layer.attention, layer.intermediate, layer.output
    if _children(att) != _ATT_CHILDREN:
        return False
    sa, so = att.self, att.output
    if _children(sa) != _SELF_CHILDREN or not all(_is_linear(getattr(sa, n)) for n in ("query", "key", "value")):
        return False
    if getattr(sa, "position_embedding_type", "absolute") not in ("absolute", None):
        return False
    for o in (so, out):
        if _children(o) != _OUT_CHILDREN or not _is_linear(o.dense) or not isinstance(o.LayerNorm, nn.LayerNorm):
            return False
        if not isinstance(o.dropout, nn.Dropout):
            return False
    if not isinstance(sa.dropout, nn.Dropout):
        return False
    if not _children(inter) <= _INTER_CHILDREN or not _is_linear(getattr(inter, "dense", None)):
        return False
    return callable(getattr(inter, "intermediate_act_fn", None))


def is_bert_base(m: nn.Module) -> bool:
    """True for a BERT-layout base model (see the module docstring)."""
    if not isinstance(m, nn.Module) or getattr(m, "config", None) is None:
        return False
    kids = _children(m)
    if not {"embeddings", "encoder"} <= kids or not kids <= _BASE_CHILDREN:
        return False
    emb, enc = m.embeddings, m.encoder
    ek = _children(emb)
    if not {"word_embeddings", "position_embeddings", "LayerNorm", "dropout"} <= ek or not ek <= _EMB_CHILDREN:
        return False
    if not isinstance(emb.word_embeddings, nn.Embedding) or not isinstance(emb.position_embeddings, nn.Embedding):
        return False
    if not isinstance(emb.LayerNorm, nn.LayerNorm) or not isinstance(getattr(emb, "position_ids", None), torch.Tensor):
        return False
    if _children(enc) != {"layer"} or not isinstance(enc.layer, nn.ModuleList) or len(enc.layer) == 0:
        return False
    if "pooler" in kids and m.pooler is not None:
        if _children(m.pooler) - {"activation"} != {"dense"}:
            return False
    return all(_layer_ok(layer) for layer in enc.layer)


def base_model(model: nn.Module) -> Optional[nn.Module]:
    """The BERT-layout base model of ``model`` (itself, or ``model.<base_model_prefix>``), or None."""
    if is_bert_base(model):
        return model
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix:
        sub = getattr(model, prefix, None)
        if isinstance(sub, nn.Module) and sub is not model and is_bert_base(sub):
            return sub
    return None


def unsupported_config(base: nn.Module) -> Optional[str]:
    """Why the optimized forward cannot run this configuration (None when it can)."""
    cfg = base.config
    if getattr(cfg, "is_decoder", False):
        return "config.is_decoder=True (causal decoder BERT)"
    if getattr(cfg, "add_cross_attention", False) or any(
            hasattr(layer, "crossattention") for layer in base.encoder.layer):
        return "cross-attention layers"
    pet = getattr(cfg, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        return f"position_embedding_type={pet!r}"
    if getattr(base.embeddings, "position_embedding_type", "absolute") not in (None, "absolute"):
        return "relative position embeddings"
    sa = base.encoder.layer[0].attention.self
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0 or sa.query.out_features % heads:
        return f"num_attention_heads={heads!r} does not divide the attention width {sa.query.out_features}"
    for layer in base.encoder.layer:
        s = layer.attention.self
        if not (s.query.out_features == s.key.out_features == s.value.out_features):
            return "query/key/value widths differ"
    return None


@dataclass(frozen=True)
class Spec:
    """What the packed forward needs to know about one model (plain values only)."""

    heads: int
    head_dim: int
    scale: float
    gelu: Optional[str]  # "none" / "tanh" for F.gelu, None = the layer's own activation
    position_padding_idx: Optional[int]  # RoBERTa-style positions when set
    kind: str  # head kind, see head_kind()


def make_spec(base: nn.Module, kind: str) -> Spec:
    cfg = base.config
    sa = base.encoder.layer[0].attention.self
    heads = cfg.num_attention_heads
    dim = sa.query.out_features // heads
    act = getattr(cfg, "hidden_act", None)
    gelu = _GELU.get(act) if isinstance(act, str) else None
    pad = base.embeddings.position_embeddings.padding_idx
    return Spec(heads=heads, head_dim=dim, scale=float(getattr(sa, "scaling", dim ** -0.5)), gelu=gelu,
                position_padding_idx=pad, kind=kind)


def head_kind(model: nn.Module, base: nn.Module) -> str:
    """The task head of ``model`` the optimized forward reproduces.

    ``"base"`` (the model is the base model), ``"seq_cls"`` (pooler + dropout +
    Linear), ``"seq_cls_head"`` (a RoBERTa/ELECTRA-style classification head that
    reads token 0), ``"token_cls"``, ``"qa"``, ``"mlm"``, ``"multiple_choice"``;
    ``"other"`` when the head is not one of these (it then runs stock on the
    optimized base model).
    """
    if model is base:
        return "base"
    name = type(model).__name__
    pooler = getattr(base, "pooler", None)
    cls = getattr(model, "classifier", None)
    drop = getattr(model, "dropout", None)
    if name.endswith("ForSequenceClassification"):
        if _is_linear(cls) and isinstance(drop, nn.Dropout) and pooler is not None:
            return "seq_cls"
        if type(cls).__name__.endswith("ClassificationHead") and _is_linear(getattr(cls, "out_proj", None)):
            return "seq_cls_head"
    elif name.endswith("ForMultipleChoice"):
        if _is_linear(cls) and isinstance(drop, nn.Dropout) and pooler is not None:
            return "multiple_choice"
    elif name.endswith("ForTokenClassification"):
        if _is_linear(cls) and isinstance(drop, nn.Dropout):
            return "token_cls"
    elif name.endswith("ForQuestionAnswering"):
        if _is_linear(getattr(model, "qa_outputs", None)):
            return "qa"
    elif name.endswith("ForMaskedLM"):
        head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
        if head is not None and type(head).__name__ in ("BertOnlyMLMHead", "RobertaLMHead", "XLMRobertaLMHead",
                                                        "CamembertLMHead"):
            return "mlm"
    return "other"
