"""`turbotune infer`: embeddings equal stock mean pooling, order survives length bucketing, every input
format, classification from a fine-tuned checkpoint, errors, atomic output."""
from __future__ import annotations

import json
import os

import pytest
import torch

from turbotune import cli
from turbotune.infer import Predictor, infer_file

TEXTS = ["A gripping, funny and humane film.", "dull", "", "Not my cup of tea, though the actors try hard and "
         "the score is lovely in places.", "ok", "An unforgettable, deeply moving story about loss and love."]


def _stock_embeddings(model_dir, texts):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding at all in the reference
            enc = tok([t], return_tensors="pt")
            out.append(model(**enc).last_hidden_state[0].mean(0))
    return torch.stack(out)


def test_embeddings_match_stock_mean_pooling_in_input_order(tmp_path, capsys):
    from turbotune.data import packaged_model_dir

    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "emb.jsonl"
    # chunk_size 4 and batch_size 2: several chunks, each re-ordered by length inside
    stats = infer_file(None, str(src), str(out), batch_size=2, chunk_size=4, dtype="float32")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["index"] for l in lines] == list(range(len(TEXTS)))
    got = torch.tensor([l["embedding"] for l in lines])
    ref = _stock_embeddings(packaged_model_dir(), TEXTS)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert stats.records == len(TEXTS) and stats.tokens > len(TEXTS) and stats.records_per_s > 0
    assert "records/s" in capsys.readouterr().err
    assert [n for n in os.listdir(out.parent) if n.startswith(".tmp-")] == []


def test_csv_jsonl_inputs_id_column_and_normalize(tmp_path):
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("key,body\n7,good\n8,\"bad, really\"\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert cli.main(["infer", "--input", str(csv_path), "--output", str(out), "--text-column", "body",
                     "--id-column", "key", "--normalize", "--quiet"]) == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["id"] for l in lines] == ["7", "8"]
    assert all(abs(sum(x * x for x in l["embedding"]) - 1) < 1e-4 for l in lines)
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"q": "is it good?", "a": "yes"}\n{"q": "and the plot?", "a": "thin"}\n', encoding="utf-8")
    out2 = tmp_path / "o2.jsonl"
    assert cli.main(["infer", "--input", str(jl), "--output", str(out2), "--text-column", "q", "--text-pair-column",
                     "a", "--quiet"]) == 0
    assert len(out2.read_text().splitlines()) == 2


def test_classifier_checkpoint_gives_labels(tiny_model_dir, toy_files, tmp_path):
    import turbotune

    model = tmp_path / "clf"
    turbotune.finetune(train=toy_files["train"], eval=toy_files["eval"], model=tiny_model_dir, output=str(model),
                       epochs=1, batch_size=4, max_length=16, stock_probe_steps=0, quiet=True)
    p = Predictor(str(model))
    assert p.mode == "classify" and p.id2label == ["neg", "pos"] and p.max_length == 16
    res = p.predict(["a joy", "a mess"])
    assert [set(r) for r in res] == [{"label", "score", "probabilities"}] * 2
    for r in res:
        assert r["label"] in ("neg", "pos") and r["score"] == max(r["probabilities"].values())
    emb = Predictor(str(model), mode="embed").predict(["a joy"])
    assert len(emb[0]["embedding"]) == 32


def test_errors(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "o.jsonl"
    assert cli.main(["infer", "--input", str(tmp_path / "nope.txt"), "--output", str(out), "--quiet"]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "in.csv"
    bad.write_text("a,b\nx,y\n", encoding="utf-8")
    assert cli.main(["infer", "--input", str(bad), "--output", str(out), "--quiet"]) == 1
    assert "unknown column 'text'; the columns are: a, b" in capsys.readouterr().err
    txt = tmp_path / "in.txt"
    txt.write_text("hello\n", encoding="utf-8")
    assert cli.main(["infer", "--model", tiny_model_dir, "--mode", "classify", "--input", str(txt), "--output",
                     str(out), "--quiet"]) == 1
    assert "needs a fine-tuned sequence classifier" in capsys.readouterr().err
    assert cli.main(["infer", "--model", str(tmp_path), "--input", str(txt), "--output", str(out), "--quiet"]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not out.exists()


def test_failure_midway_writes_nothing(tmp_path, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS * 3) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")
    calls = {"n": 0}
    real = Predictor.predict

    def flaky(self, texts, pairs=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, texts, pairs)

    monkeypatch.setattr(Predictor, "predict", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        infer_file(None, str(src), str(out), batch_size=2, chunk_size=4, quiet=True)
    assert out.read_text() == "previous\n"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []
