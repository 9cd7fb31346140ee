"""Batch inference from a checkpoint: class predictions or sentence embeddings, streamed to JSONL.

- A fine-tuned classifier (``config.json`` lists a ``...ForSequenceClassification`` architecture, e.g.
  what ``turbotune finetune`` saves) gives ``{"index", "label", "score", "probabilities"}`` per text.
- Any other BERT-family encoder gives ``{"index", "embedding"}``: the mean of the last hidden
  states over the real tokens (sentence-transformers' mean pooling; ``normalize=True`` for unit length).

Input: a text file (one text per line), CSV / TSV or JSONL (``text_column``, optional
``text_pair_column`` and ``id_column``, copied to the output). The input is read in chunks of
``chunk_size`` records; inside a chunk the texts are sorted by length and cut into batches, so a
batch pads little (padding-free once :func:`turbotune.optimize` has a path for the model), and the
results are written back in input order. The output file is written through a temporary file and
renamed at the end: it is complete or absent.

Python::

    from turbotune.infer import Predictor, infer_file
    p = Predictor("turbotune-model")                 # a checkpoint directory
    p.predict(["a gripping, funny film", "dull"])    # [{"label": "positive", "score": 0.98, ...}, ...]
    infer_file("turbotune-model", "reviews.txt", "predictions.jsonl")
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .tasks.text import _quiet_transformers, check_model_dir, detect_format, get_text, load_tokenizer, read_records
from .training import DataError, ModelDirError, apply_optimize, atomic_file, resolve_dtype

__all__ = ["Predictor", "infer_file", "InferStats"]


def _is_classifier(cfg: Dict[str, Any]) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (cfg.get("architectures") or []))


class Predictor:
    """A loaded checkpoint ready for batched inference.

    Args:
        model: a local HF checkpoint directory (default: the packaged MiniLM, which embeds).
        mode: ``"auto"`` (classify when the checkpoint is a sequence classifier, else embed),
            ``"classify"`` or ``"embed"``.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA when available).
        dtype: ``"auto"`` (bf16 where fast), ``"float32"`` or ``"bfloat16"``.
        max_length: truncation length in tokens (default: the fine-tuning run's, else 512).
        normalize: L2-normalize embeddings.
    """

    def __init__(self, model: Optional[str] = None, *, mode: str = "auto", device: Optional[str] = None,
                 dtype: str = "auto", max_length: Optional[int] = None, normalize: bool = False):
        if mode not in ("auto", "classify", "embed"):
            raise ValueError(f"mode: expected 'auto', 'classify' or 'embed', got {mode!r}")
        self.model_dir, cfg = check_model_dir(model)
        classifier = _is_classifier(cfg)
        if mode == "classify" and not classifier:
            raise ModelDirError(f"{self.model_dir}: mode 'classify' needs a fine-tuned sequence classifier "
                                f"(architectures: {cfg.get('architectures')}); use mode 'embed'")
        self.mode = "classify" if (mode == "classify" or (mode == "auto" and classifier)) else "embed"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype, _ = resolve_dtype(dtype, self.device)
        self.normalize = normalize
        self.last_tokens = 0  # real tokens of the last predict() batch
        self.notes: List[str] = []
        self.tokenizer = load_tokenizer("turbotune", self.model_dir, self.notes)
        if max_length is None:
            max_length = _saved_max_length(self.model_dir) or min(512, int(cfg.get("max_position_embeddings", 512)))
        if max_length < 2:
            raise ValueError(f"max_length: expected >= 2, got {max_length}")
        self.max_length = max_length
        from transformers import AutoModel, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if self.mode == "classify" else AutoModel
        with _quiet_transformers():
            try:
                m = cls.from_pretrained(self.model_dir)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelDirError(f"{self.model_dir}: cannot load the model ({exc})") from None
        m.eval().to(self.device)
        self.handle, self.autocast, notes = apply_optimize(m, self.dtype)
        self.notes += notes
        self.model = m
        import inspect

        self._accepted = set(inspect.signature(m.forward).parameters)
        self.id2label = None
        if self.mode == "classify":
            n = m.config.num_labels
            self.id2label = [str(m.config.id2label.get(i, i)) for i in range(n)]

    @torch.no_grad()
    def predict(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """Results for one batch, in order: ``{"label", "score", "probabilities"}`` or ``{"embedding"}``.

        ``texts`` (and ``pairs``): lists of str of the same length. Embeddings are lists of
        ``hidden_size`` floats (fp32 values).
        """
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of str, got a str")
        if not texts:
            return []
        enc = self.tokenizer(list(texts), None if pairs is None else list(pairs), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        inputs = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in enc and k in self._accepted}
        self.last_tokens = int(enc["attention_mask"].sum())
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            out = self.model(**inputs)
        if self.mode == "classify":
            probs = torch.softmax(out.logits.float(), -1).cpu()
            res = []
            for row in probs.tolist():
                k = max(range(len(row)), key=row.__getitem__)
                res.append({"label": self.id2label[k], "score": row[k],
                            "probabilities": dict(zip(self.id2label, row))})
            return res
        h = out.last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
        emb = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return [{"embedding": e} for e in emb.cpu().tolist()]


def _saved_max_length(model_dir: str) -> Optional[int]:
    p = os.path.join(model_dir, "metrics.json")
    with contextlib.suppress(Exception):
        with open(p, encoding="utf-8") as f:
            return int(json.load(f)["recipe"]["max_length"])
    return None


@dataclass
class InferStats:
    records: int
    tokens: int
    seconds: float
    mode: str
    output: str

    @property
    def records_per_s(self) -> float:
        return self.records / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (f"{self.mode}: {self.records} records in {self.seconds:.2f} s ({self.records_per_s:.1f} records/s, "
                f"{self.tokens_per_s:.0f} tokens/s) -> {self.output}")


def _chunks(path: str, fmt: str, text_column: str, pair_column: Optional[str], id_column: Optional[str],
            size: int) -> Iterator[List[tuple]]:
    chunk: List[tuple] = []
    for line, rec in read_records(path, fmt):
        text = get_text(path, line, rec, text_column)
        pair = get_text(path, line, rec, pair_column) if pair_column else None
        if id_column is not None and id_column not in rec:
            raise DataError(f"{path}: line {line}: unknown column {id_column!r}; this record has: {', '.join(rec)}")
        chunk.append((text, pair, rec.get(id_column) if id_column else None))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def infer_file(model: Optional[str], input: str, output: str, *, text_column: str = "text",
               text_pair_column: Optional[str] = None, id_column: Optional[str] = None,
               data_format: Optional[str] = None, batch_size: int = 64, chunk_size: int = 4096, mode: str = "auto",
               device: Optional[str] = None, dtype: str = "auto", max_length: Optional[int] = None,
               normalize: bool = False, quiet: bool = False, predictor: Optional[Predictor] = None) -> InferStats:
    """Predict (or embed) every record of ``input`` and write one JSON line per record to ``output``.

    Args:
        model: checkpoint directory (see :class:`Predictor`), unless ``predictor`` is given.
        input: ``.txt`` (one text per line; every line is a record, empty ones too), ``.csv`` /
            ``.tsv`` (header row) or ``.jsonl``; ``data_format`` overrides the extension.
        output: the JSONL file to write (atomically; its directory is created).
        text_column, text_pair_column, id_column: columns of CSV / JSONL input (``id_column`` is
            copied to each output line as ``"id"``).
        batch_size: records per forward; chunk_size: records read (and length-sorted) at a time.

    Returns:
        :class:`InferStats` (records, tokens, seconds, ``records_per_s``, ``tokens_per_s``).
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size: expected >= 1, got {batch_size} and {chunk_size}")
    fmt = detect_format(input, data_format)
    if not os.path.exists(input):
        raise FileNotFoundError(f"{input}: no such file")
    from .tasks.text import check_columns

    check_columns(input, fmt, [c for c in (text_column, text_pair_column, id_column) if c])
    p = predictor or Predictor(model, mode=mode, device=device, dtype=dtype, max_length=max_length,
                               normalize=normalize)
    records = tokens = 0
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"infer ({p.mode})", unit="rec", disable=quiet, leave=False, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        with atomic_file(output) as f:
            for chunk in _chunks(input, fmt, text_column, text_pair_column, id_column, chunk_size):
                order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][0]) + len(chunk[i][1] or ""))
                results: List[Optional[dict]] = [None] * len(chunk)
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    texts = [chunk[i][0] for i in idx]
                    pairs = [chunk[i][1] for i in idx] if text_pair_column else None
                    for i, r in zip(idx, p.predict(texts, pairs)):
                        results[i] = r
                    tokens += p.last_tokens
                    bar.update(len(idx))
                for i, r in enumerate(results):
                    line = {"index": records + i}
                    if id_column:
                        line["id"] = chunk[i][2]
                    line.update(r)
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                records += len(chunk)
    finally:
        bar.close()
    stats = InferStats(records, tokens, time.perf_counter() - t0, p.mode, output)
    if not quiet:
        print(stats.summary(), file=sys.stderr)
        for n in p.notes:
            print(f"note: {n}", file=sys.stderr)
    return stats
