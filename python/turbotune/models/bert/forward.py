"""The optimized ``forward`` installed on a model instance, and the task heads.

:func:`install` binds a new ``forward`` to one module instance (never the
class). It accepts exactly the stock signature (``inspect.signature`` shows the
stock one, so HF ``Trainer``'s column filtering keeps working), runs the
packed encoder and the head, and builds the stock output class. Anything the
packed path does not implement falls back to the stock forward with a
one-line :class:`TurbotuneFallbackWarning`.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import types
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import Spec
from .packed import (Pack, check_mask, cross_entropy, embed, gather_rows, make_pack, repad, run_encoder,
                     sub_pack)

STATE_ATTR = "_turbotune_bert"


class TurbotuneFallbackWarning(UserWarning):
    """A call used the stock forward because the padding-free path does not support one of its arguments."""


# Arguments the packed path understands (others -> stock fallback).
_HANDLED = {
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
    "start_positions", "end_positions", "output_hidden_states", "output_attentions", "return_dict", "use_cache",
    "head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache", "cache_position",
    "num_items_in_batch",  # HF Trainer passes it to models whose forward takes **kwargs; stock heads ignore it
}

_in_stock = contextvars.ContextVar("turbotune_bert_in_stock", default=False)


class State:
    """Per-instance state of a patched module (plain values: deep-copies with the model)."""

    def __init__(self, spec: Spec, signature: inspect.Signature, own_forward, options: dict):
        self.spec = spec
        self.signature = signature
        self.own_forward = own_forward
        self.options = dict(options)
        self.warned = set()
        params = signature.parameters.values()
        self.var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
        self.var_pos = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)


def install(module: torch.nn.Module, spec: Spec, options: dict) -> Callable[[], None]:
    """Bind the optimized forward to ``module`` (this instance only); returns the undo function."""
    cls_forward = type(module).forward
    sig = inspect.signature(cls_forward)
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self
    own = module.__dict__.get("forward")
    module.__dict__[STATE_ATTR] = State(spec, sig, own, options)

    def forward(self, *args, **kwargs):
        return _optimized_forward(self, args, kwargs)

    functools.update_wrapper(forward, cls_forward)  # inspect.signature(model.forward) = the stock one
    module.__dict__["forward"] = types.MethodType(forward, module)

    def undo():
        module.__dict__.pop("forward", None)
        if own is not None:
            module.__dict__["forward"] = own
        module.__dict__.pop(STATE_ATTR, None)

    return undo


def _stock(module, st: State, args, kwargs):
    fn = st.own_forward if st.own_forward is not None else type(module).forward.__get__(module)
    token = _in_stock.set(True)
    try:
        return fn(*args, **kwargs)
    finally:
        _in_stock.reset(token)


def _warn(st: State, module, reason: str) -> None:
    warnings.warn(f"turbotune.optimize: {type(module).__name__} called with {reason}, which the padding-free path "
                  f"does not support; this call runs the stock forward", TurbotuneFallbackWarning, stacklevel=4)


def _optimized_forward(module, args, kwargs):
    st = module.__dict__.get(STATE_ATTR)
    if st is None or _in_stock.get():
        return type(module).forward(module, *args, **kwargs) if st is None else _stock(module, st, args, kwargs)
    try:
        bound = st.signature.bind(*args, **kwargs)
    except TypeError:
        return _stock(module, st, args, kwargs)  # let the stock forward raise its own error
    named = dict(bound.arguments)
    if st.var_kw is not None:
        named.update(named.pop(st.var_kw, {}))
    if st.var_pos is not None and named.pop(st.var_pos, ()):
        _warn(st, module, "extra positional arguments")
        return _stock(module, st, args, kwargs)
    reason = _fallback_reason(module, named)
    if reason is not None:
        _warn(st, module, reason)
        return _stock(module, st, args, kwargs)
    out = _RUNNERS[st.spec.kind](module, st, named)
    cfg = module.config
    return_dict = named.get("return_dict")
    if return_dict is None:
        return_dict = getattr(cfg, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _fallback_reason(module, a: Dict) -> Optional[str]:
    cfg = module.config
    if a.get("head_mask") is not None:
        return "head_mask"
    if a.get("encoder_hidden_states") is not None or a.get("encoder_attention_mask") is not None:
        return "encoder_hidden_states (cross-attention)"
    if a.get("past_key_values") is not None or a.get("cache") is not None:
        return "past key values"
    oa = a.get("output_attentions")
    if oa or (oa is None and getattr(cfg, "output_attentions", False)):
        return "output_attentions=True"
    oh = a.get("output_hidden_states")
    if oh is not None and not isinstance(oh, bool):
        return f"output_hidden_states={oh!r} (a selection of layers)"
    m = a.get("attention_mask")
    if isinstance(m, Tensor) and m.dim() != 2 and not (m.dim() == 3 and module.__dict__[STATE_ATTR].spec.kind ==
                                                         "multiple_choice"):
        return f"a {m.dim()}-D attention_mask"
    for k, v in a.items():
        if k not in _HANDLED and v is not None:
            return f"argument {k!r}"
    return None


# ----------------------------------------------------------------------------- encoder


class Encoded:
    """Result of the packed encoder: ``final`` rows, optional packed hidden states, the pack."""

    def __init__(self, final, hidden, pack, rows_are_cls):
        self.final = final
        self.hidden = hidden
        self.pack = pack
        self.rows_are_cls = rows_are_cls

    def cls(self) -> Tensor:
        """``(B, hidden)``: each sequence's first real token ([CLS])."""
        return self.final if self.rows_are_cls else self.final.index_select(0, self.pack.starts())

    def hidden_states(self):
        return None if self.hidden is None else tuple(repad(h, self.pack) for h in self.hidden)


def _attention_dropout_active(base) -> bool:
    return any(layer.attention.self.dropout.training and layer.attention.self.dropout.p > 0
               for layer in base.encoder.layer)


def _want_hidden(module, a) -> bool:
    oh = a.get("output_hidden_states")
    return bool(oh if oh is not None else getattr(module.config, "output_hidden_states", False))


def prepare(st: State, a: Dict, need: str = "all") -> Pack:
    """Validate the inputs and build the pack (the one host sync of the forward)."""
    input_ids, inputs_embeds = a.get("input_ids"), a.get("inputs_embeds")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("turbotune.optimize: pass exactly one of input_ids or inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"turbotune.optimize: input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"turbotune.optimize: inputs_embeds must have shape (batch, seq_len, hidden), got "
                         f"{tuple(inputs_embeds.shape)}")
    b, l = ref.shape[0], ref.shape[1]
    mask = a.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"turbotune.optimize: attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        mask = check_mask(mask, b, l, ref.device)
    pack, right_padded = make_pack(mask, b, l, ref.device)
    if not right_padded and need == "cls" and "left" not in st.warned:
        st.warned.add("left")
        warnings.warn("turbotune.optimize: attention_mask is not right-padded: the pooler / classifier read each "
                      "sequence's first real token ([CLS]); stock BERT reads column 0, which is padding there",
                      TurbotuneFallbackWarning, stacklevel=5)
    return pack


def encode(module, st: State, a: Dict, base, *, need: str = "all", label_rows: Optional[Tensor] = None,
           pack: Optional[Pack] = None) -> Encoded:
    """Validate the inputs, pack once, embed and run the encoder.

    ``need``: ``"all"`` (every real token), ``"cls"`` (the last layer computes
    only each sequence's first real token) or ``"rows"`` (only ``label_rows``,
    packed row indices grouped by sequence). ``pack``: from :func:`prepare`
    when the caller already built it.
    """
    if pack is None:
        pack = prepare(st, a, need)
    b = pack.batch
    device = pack.indices.device
    want_hidden = _want_hidden(module, a)
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item()) if _attention_dropout_active(base) else 0
    x = embed(base, pack, st.spec, a.get("input_ids"), a.get("token_type_ids"), a.get("position_ids"),
              a.get("inputs_embeds"))
    q_rows = q_pack = None
    if need == "cls" and not want_hidden:
        q_rows = pack.starts()
        q_pack = sub_pack(pack, [1] * b, torch.arange(b + 1, dtype=torch.int32, device=device))
    elif need == "rows" and not want_hidden:
        q_rows = label_rows
        seq_of_row = torch.repeat_interleave(torch.arange(b, device=device),
                                             (pack.cu_seqlens[1:] - pack.cu_seqlens[:-1]).to(torch.int64))
        counts = torch.bincount(seq_of_row.index_select(0, label_rows), minlength=b)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(counts, 0).to(torch.int32)
        q_pack = sub_pack(pack, counts.tolist(), cu)
    final, hidden = run_encoder(base, x, pack, st.spec, seed=seed, want_hidden=want_hidden, q_rows=q_rows,
                                q_pack=q_pack)
    return Encoded(final, hidden, pack, need == "cls" and q_rows is not None)


def _base(module):
    """The base model under a head model (``model.bert``, ``model.roberta``, ...)."""
    return getattr(module, module.base_model_prefix)


def _padded_labels(labels: Tensor, pack: Pack, what: str) -> Tensor:
    """Labels of the real tokens; raises when a padding position carries a label (stock would
    score the padding token's prediction there, which the packed path never computes)."""
    if labels.shape != (pack.batch, pack.seqlen):
        raise ValueError(f"turbotune.optimize: {what} must have shape (batch, seq_len) = ({pack.batch}, "
                         f"{pack.seqlen}), got {tuple(labels.shape)}")
    real = gather_rows(labels, pack)
    n_all, n_real = torch.stack([(labels != -100).sum(), (real != -100).sum()]).tolist()
    if n_all != n_real:
        raise ValueError(f"turbotune.optimize: {n_all - n_real} padding position(s) (attention_mask 0) carry a "
                         f"label other than -100; set them to -100 (the loss of padding tokens is undefined "
                         f"in the padding-free path)")
    return real


# ----------------------------------------------------------------------------- heads


def _out_classes():
    from transformers import modeling_outputs as mo

    return mo


def _run_base(module, st, a):
    mo = _out_classes()
    enc = encode(module, st, a, module, need="all")
    pooler = getattr(module, "pooler", None)
    pooled = pooler(enc.cls().unsqueeze(1)) if pooler is not None else None
    return mo.BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=repad(enc.final, enc.pack), pooler_output=pooled, hidden_states=enc.hidden_states())


def _seq_cls_loss(module, logits: Tensor, labels: Tensor) -> Tensor:
    """Stock HF sequence-classification loss (problem_type inferred and stored as stock does)."""
    cfg = module.config
    num_labels = module.num_labels
    labels = labels.to(logits.device)
    if cfg.problem_type is None:
        if num_labels == 1:
            cfg.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            cfg.problem_type = "single_label_classification"
        else:
            cfg.problem_type = "multi_label_classification"
    if cfg.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if cfg.problem_type == "single_label_classification":
        return cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if cfg.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    return None


def _run_seq_cls(module, st, a):
    mo = _out_classes()
    base = _base(module)
    enc = encode(module, st, a, base, need="cls")
    cls = enc.cls()
    if st.spec.kind == "seq_cls":
        logits = module.classifier(module.dropout(base.pooler(cls.unsqueeze(1))))
    else:  # a classification head module that reads token 0 of (B, L, H)
        logits = module.classifier(cls.unsqueeze(1))
    labels = a.get("labels")
    loss = _seq_cls_loss(module, logits, labels) if labels is not None else None
    return mo.SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states())


def _run_multiple_choice(module, st, a):
    mo = _out_classes()
    base = _base(module)
    ids, emb = a.get("input_ids"), a.get("inputs_embeds")
    ref = ids if ids is not None else emb
    if ref is None or ref.dim() < 3:
        raise ValueError("turbotune.optimize: multiple choice expects input_ids of shape (batch, num_choices, "
                         "seq_len) (or inputs_embeds (batch, num_choices, seq_len, hidden))")
    choices = ref.shape[1]
    flat = dict(a)
    for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        if flat.get(k) is not None:
            flat[k] = flat[k].reshape(-1, flat[k].shape[-1])
    if emb is not None:
        flat["inputs_embeds"] = emb.reshape(-1, emb.shape[-2], emb.shape[-1])
    enc = encode(module, st, flat, base, need="cls")
    logits = module.classifier(module.dropout(base.pooler(enc.cls().unsqueeze(1)))).view(-1, choices)
    labels = a.get("labels")
    loss = cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
    return mo.MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states())


def _run_token_cls(module, st, a):
    mo = _out_classes()
    enc = encode(module, st, a, _base(module), need="all")
    logits_p = module.classifier(module.dropout(enc.final))
    labels = a.get("labels")
    loss = None
    if labels is not None:
        loss = cross_entropy(logits_p, _padded_labels(labels.to(logits_p.device), enc.pack, "labels"))
    return mo.TokenClassifierOutput(loss=loss, logits=repad(logits_p, enc.pack), hidden_states=enc.hidden_states())


def _run_qa(module, st, a):
    mo = _out_classes()
    enc = encode(module, st, a, _base(module), need="all")
    logits_p = module.qa_outputs(enc.final)
    fill = torch.finfo(logits_p.dtype).min  # padding can never be the argmax
    logits = repad(logits_p, enc.pack, fill)
    start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
    sp, ep = a.get("start_positions"), a.get("end_positions")
    loss = None
    if sp is not None and ep is not None:
        sp = sp.squeeze(-1) if sp.dim() > 1 else sp
        ep = ep.squeeze(-1) if ep.dim() > 1 else ep
        ignored = start_logits.size(1)
        sp, ep = sp.clamp(0, ignored), ep.clamp(0, ignored)
        loss = (cross_entropy(start_logits, sp, ignored) + cross_entropy(end_logits, ep, ignored)) / 2
    return mo.QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                           hidden_states=enc.hidden_states())


def _run_mlm(module, st, a):
    mo = _out_classes()
    base = _base(module)
    head = module.cls if hasattr(module, "cls") else module.lm_head
    labels = a.get("labels")
    vocab = module.config.vocab_size
    if labels is not None and st.options.get("mlm_logits") == "labeled" and not _want_hidden(module, a):
        # pack first to find the labeled rows, then let the last layer compute only those
        pack = prepare(st, a)
        lab = _padded_labels(labels.to(pack.indices.device), pack, "labels")
        rows = torch.nonzero(lab != -100).reshape(-1)
        enc = encode(module, st, a, base, need="rows", label_rows=rows, pack=pack)
        logits = head(enc.final)
        loss = cross_entropy(logits.view(-1, vocab), lab.index_select(0, rows))
        return mo.MaskedLMOutput(loss=loss, logits=logits, hidden_states=None)
    enc = encode(module, st, a, base, need="all")
    logits_p = head(enc.final)
    loss = None
    if labels is not None:
        loss = cross_entropy(logits_p.view(-1, vocab), _padded_labels(labels.to(logits_p.device), enc.pack, "labels"))
    return mo.MaskedLMOutput(loss=loss, logits=repad(logits_p, enc.pack), hidden_states=enc.hidden_states())


_RUNNERS = {
    "base": _run_base,
    "seq_cls": _run_seq_cls,
    "seq_cls_head": _run_seq_cls,
    "multiple_choice": _run_multiple_choice,
    "token_cls": _run_token_cls,
    "qa": _run_qa,
    "mlm": _run_mlm,
}
