"""Shared helpers of the tests/models/test_bert_*.py files: the packaged real model,
real movie-review sentences of varied length, tiny random configs of the other
BERT-family architectures, and error measures."""
from __future__ import annotations

import functools
import warnings

import torch

from turbotune.data import movie_reviews, packaged_model_dir

PATH = packaged_model_dir()


@functools.lru_cache(maxsize=None)
def tokenizer():
    from turbotune.tokenizers import BertTokenizer

    return BertTokenizer.from_pretrained(PATH)


@functools.lru_cache(maxsize=None)
def _reviews():
    return movie_reviews()


def sentences(n: int = 12, offset: int = 0):
    """``n`` real review snippets spread over the whole length range (shortest to longest)."""
    items = sorted(_reviews()[offset:offset + 600], key=lambda r: len(r.text))
    step = (len(items) - 1) / max(n - 1, 1)
    return [items[round(i * step)] for i in range(n)]


def encode(texts, padding=True, max_length=128):
    enc = tokenizer()([t.text if hasattr(t, "text") else t for t in texts], padding=padding, truncation=True,
                      max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def load(cls_name: str = "AutoModel", **kw):
    import transformers

    cls = getattr(transformers, cls_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging

        logging.set_verbosity_error()
        torch.manual_seed(0)  # newly initialized heads get the same weights in every copy
        return cls.from_pretrained(PATH, **kw)


def pair(cls_name: str = "AutoModel", **kw):
    """Two identical copies of the packaged model (stock, to-be-optimized)."""
    return load(cls_name, **kw), load(cls_name, **kw)


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def tiny_config(model_type: str = "bert", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        base.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    if model_type == "electra":
        base.update(embedding_size=24)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def tiny_pair(cls_name: str, model_type: str = "bert", **kw):
    """Two identical tiny random models of ``cls_name`` (e.g. ``"AutoModelForTokenClassification"``)."""
    import transformers

    cls = getattr(transformers, cls_name)
    cfg = tiny_config(model_type, **kw)
    make = cls.from_config if hasattr(cls, "from_config") else cls  # Auto* classes / concrete classes
    torch.manual_seed(1)
    a = make(cfg)
    b = make(cfg)
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


def tiny_batch(cfg, batch=5, seqlen=11, choices=None, seed=3, pad_id=None):
    """Random ids with right padding of varied lengths (row 0 full length)."""
    g = torch.Generator().manual_seed(seed)
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    shape = (batch, seqlen) if choices is None else (batch, choices, seqlen)
    ids = torch.randint(3, cfg.vocab_size, shape, generator=g)
    lens = torch.randint(2, seqlen + 1, shape[:-1], generator=g)
    lens.view(-1)[0] = seqlen
    mask = (torch.arange(seqlen) < lens.unsqueeze(-1)).long()
    ids = ids.masked_fill(mask == 0, pad_id if pad_id is not None else 0)
    return {"input_ids": ids, "attention_mask": mask}
