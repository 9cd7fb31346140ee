"""turbotune.tasks.text: reading CSV / TSV / JSONL / text, labels and label maps, splits, model checks."""
from __future__ import annotations

import json

import pytest

from turbotune.tasks.text import (DataError, check_model_dir, detect_format, load_text_data, parse_label,
                                  read_records)
from turbotune.training import ModelDirError


def _w(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_records_every_format(tmp_path):
    csv_p = _w(tmp_path / "a.csv", 'text,label\n"x, with comma",1\n\ny,0\n')
    assert list(read_records(csv_p)) == [(2, {"text": "x, with comma", "label": "1"}), (4, {"text": "y", "label": "0"})]
    tsv_p = _w(tmp_path / "a.tsv", "text\tlabel\nx\tpos\n")
    assert list(read_records(tsv_p)) == [(2, {"text": "x", "label": "pos"})]
    jl = _w(tmp_path / "a.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y", "label": "b"}\n')
    assert [r for _, r in read_records(jl)] == [{"text": "x", "label": 1}, {"text": "y", "label": "b"}]
    txt = _w(tmp_path / "a.txt", "one\n\ntwo\r\n")
    assert [r["text"] for _, r in read_records(txt)] == ["one", "", "two"]
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(str(tmp_path / "a.parquet"))
    assert detect_format("x.data", "jsonl") == "jsonl"
    with pytest.raises(DataError, match="line 2: 3 fields but the header has 2"):
        list(read_records(_w(tmp_path / "b.csv", "text,label\na,b,c\n")))
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        list(read_records(_w(tmp_path / "b.jsonl", "[1, 2]\n")))


def test_read_records_streams(tmp_path):
    p = _w(tmp_path / "big.txt", "".join(f"line {i}\n" for i in range(1000)))
    it = read_records(p)
    assert next(it) == (1, {"text": "line 0"})
    assert next(it) == (2, {"text": "line 1"})  # a generator: nothing forces the whole file into memory


@pytest.mark.parametrize("value,expected", [(3, 3), (3.0, 3), ("4", 4), (" -2 ", -2), ("pos", "pos"), ("1.5", "1.5")])
def test_parse_label(value, expected):
    assert parse_label("f", 1, value, "label") == expected


@pytest.mark.parametrize("value,msg", [(None, "missing value"), ("", "empty label"), (0.5, "cannot parse 0.5"),
                                       (True, "cannot parse true"), ([1], "cannot parse [1]"),
                                       (float("nan"), "cannot parse nan")])
def test_parse_label_errors(value, msg):
    with pytest.raises(DataError, match=msg.replace("[", "\\[").replace("]", "\\]")):
        parse_label("f", 7, value, "label")


def test_label_maps_and_holdout(tmp_path):
    rows = "".join(json.dumps({"t": f"text {i}", "y": [10, 2, 33][i % 3]}) + "\n" for i in range(30))
    data = load_text_data(train=_w(tmp_path / "t.jsonl", rows), text_column="t", label_column="y")
    assert data.id2label == ["2", "10", "33"]  # numeric order, not string order
    assert len(data.train) == 27 and len(data.validation) == 3 and data.test is None
    assert set(data.train.texts).isdisjoint(data.validation.texts)
    again = load_text_data(train=str(tmp_path / "t.jsonl"), text_column="t", label_column="y")
    assert again.validation.texts == data.validation.texts  # the hold-out is seeded
    s = load_text_data(train=_w(tmp_path / "s.csv", "text,label\n" + "a,zeta\nb,alpha\n" * 6))
    assert s.id2label == ["alpha", "zeta"]
    mixed = load_text_data(train=_w(tmp_path / "m.csv", "text,label\n" + "a,1\nb,one\n" * 6))
    assert mixed.id2label == ["1", "one"]


def test_eval_test_files_and_limits(tmp_path):
    train = _w(tmp_path / "t.csv", "text,pair,label\n" + "".join(f"t{i},p{i},{'ab'[i % 2]}\n" for i in range(20)))
    ev = _w(tmp_path / "e.csv", "text,pair,label\na,b,a\nc,d,b\n")
    data = load_text_data(train=train, eval=ev, test=ev, text_pair_column="pair", limit_train=10, limit_eval=1)
    assert len(data.train) == 10 and data.train.pairs[:2] == ["p0", "p1"]
    assert len(data.validation) == 1 and len(data.test) == 1
    with pytest.raises(DataError, match="--eval / --test need --train"):
        load_text_data(eval=ev)
    with pytest.raises(DataError, match="unknown dataset 'imdb'"):
        load_text_data(dataset="imdb")
    with pytest.raises(DataError, match="too few to hold out"):
        load_text_data(train=_w(tmp_path / "few.csv", "text,label\na,x\nb,y\n"))


def test_movie_reviews_default_split():
    from turbotune import data as d

    try:
        data = load_text_data()
    except d.DatasetUnavailable as exc:
        pytest.skip(str(exc))
    assert (len(data.train), len(data.validation), len(data.test)) == (8072, 1000, 1000)
    assert data.id2label == ["negative", "positive"]
    assert load_text_data().test.texts == data.test.texts  # fixed split


def test_check_model_dir(tmp_path):
    from turbotune.data import packaged_model_dir

    d, cfg = check_model_dir(None)
    assert d == packaged_model_dir() and cfg["model_type"] == "bert"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelDirError, match="no weights"):
        check_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not readable JSON"):
        check_model_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelDirError, match="unsupported architecture model_type='t5'"):
        check_model_dir(str(tmp_path))
