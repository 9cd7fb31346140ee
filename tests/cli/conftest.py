"""Fixtures for the finetune / infer tests: a tiny BERT checkpoint (real vocabulary, random weights,
no dropout) and small real subsets of the movie reviews written as CSV / JSONL files."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT with the packaged MiniLM vocabulary; dropout 0 (deterministic training)."""
    from transformers import BertConfig, BertModel

    from turbotune.data import packaged_model_dir

    src = packaged_model_dir()
    d = tmp_path_factory.mktemp("tiny-bert")
    with open(os.path.join(src, "vocab.txt"), encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(d))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), d / name)
    return str(d)


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """Real movie-review snippets: ``{"train": csv (64), "eval": jsonl (32), "test": tsv (32)}`` with string
    labels, plus the raw items. Skips when the data set is neither cached nor fetchable."""
    from turbotune import data

    try:
        items = data.movie_reviews()
    except data.DatasetUnavailable as exc:
        pytest.skip(str(exc))
    sp = data.split_dataset(items, test_size=1000, val_size=1000, seed=0)
    d = tmp_path_factory.mktemp("reviews")
    name = {0: "negative", 1: "positive"}
    with open(d / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "sentiment"])
        for i, x in enumerate(sp["train"][:64]):
            w.writerow([f"r{i}", x.text, name[x.label]])
    with open(d / "eval.jsonl", "w", encoding="utf-8") as f:
        for x in sp["validation"][:32]:
            f.write(json.dumps({"review": x.text, "sentiment": name[x.label]}) + "\n")
    with open(d / "test.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["review", "sentiment"])
        for x in sp["test"][:32]:
            w.writerow([x.text, name[x.label]])
    return {"train": str(d / "train.csv"), "eval": str(d / "eval.jsonl"), "test": str(d / "test.tsv"),
            "items": sp}


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def toy_files(tmp_path):
    """A small two-class CSV (train) and JSONL (eval) of made-up sentences, and the writer helper."""
    pos = ["a wonderful film", "great acting and a fine story", "loved every minute", "brilliant and moving",
           "funny, warm and clever", "a joy to watch"]
    neg = ["a dull mess", "boring and far too long", "the plot makes no sense", "awful dialogue",
           "i wanted my money back", "tedious and flat"]
    rows = [(t, "pos") for t in pos] + [(t, "neg") for t in neg]
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows * 2)
    with open(tmp_path / "eval.jsonl", "w", encoding="utf-8") as f:
        for t, l in rows:
            f.write(json.dumps({"text": t, "label": l}) + "\n")
    return {"train": train, "eval": str(tmp_path / "eval.jsonl"), "dir": tmp_path, "write_csv": write_csv}
