"""`turbotune finetune` / `turbotune.finetune`: end to end on real data, every error path, save safety."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import torch

import turbotune
from turbotune import cli
from turbotune.training import FinetuneError

FAST = ["--epochs", "1", "--batch-size", "16", "--max-length", "32", "--stock-probe-steps", "1", "--threads", "2"]


def _tree_digest(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _no_temp_left(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or n.endswith(".old")] == []


def test_cli_end_to_end_on_real_reviews(reviews, tmp_path, capsys):
    """The packaged MiniLM on 64 real training / 32 validation / 32 test snippets, one epoch: a stock HF
    checkpoint comes out, the summary reports accuracy and a speed-up, infer uses the checkpoint."""
    out = tmp_path / "model"
    rc = cli.main(["finetune", "--train", reviews["train"], "--eval", reviews["eval"], "--test", reviews["test"],
                   "--text-column", "review", "--label-column", "sentiment", "--output", str(out)] + FAST)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "speed-up vs stock:" in printed
    assert "val acc" in printed and "samples/s" in printed  # the per-epoch summary table
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json", "metrics.json",
            "label_map.json"} <= files
    assert _no_temp_left(tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["examples"] == 32 and 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["validation"]["examples"] == 32 and "macro_f1" in metrics["validation"]
    assert metrics["probe"]["speedup"] > 0 and metrics["speedup_vs_stock"] == metrics["probe"]["speedup"]
    assert json.loads((out / "label_map.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    # a stock transformers user loads it as is
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    # and turbotune infer predicts with it
    pred = tmp_path / "pred.jsonl"
    assert cli.main(["infer", "--model", str(out), "--input", reviews["test"], "--text-column", "review",
                     "--output", str(pred), "--quiet"]) == 0
    lines = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(lines) == 32 and {l["label"] for l in lines} <= {"negative", "positive"}
    assert all(abs(sum(l["probabilities"].values()) - 1) < 1e-5 for l in lines)


def test_python_api_int_labels_and_pairs(tiny_model_dir, toy_files, tmp_path):
    """Integer labels (sorted numerically: 2 < 10), a text-pair column, label map saved, no output when None."""
    rows = []
    for i, t in enumerate(["good", "bad", "fine", "awful", "nice", "poor"] * 4):
        rows.append((t, f"pair {i % 3}", 10 if i % 2 else 2))
    train = toy_files["write_csv"](tmp_path / "ints.csv", ["a", "b", "y"], rows)
    out = tmp_path / "m"
    res = turbotune.finetune(train=train, text_column="a", text_pair_column="b", label_column="y",
                             model=tiny_model_dir, output=str(out), epochs=2, batch_size=4, max_length=16,
                             stock_probe_steps=0, quiet=True)
    assert res.turbotune.epochs_run >= 1 and len(res.turbotune.history) == res.turbotune.epochs_run
    assert res.test_accuracy != res.test_accuracy  # no test file: NaN, the summary reports validation
    assert "validation accuracy" in res.summary()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "2", "1": "10"}
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["text_pair_column"] == "b" and doc["recipe"]["epochs"] == 2
    res2 = turbotune.finetune(train=train, text_column="a", text_pair_column="b", label_column="y",
                              model=tiny_model_dir, output=None, epochs=1, batch_size=4, max_length=16,
                              stock_probe_steps=0, quiet=True)
    assert res2.output is None


def _err(capsys, argv):
    rc = cli.main(["finetune"] + argv + ["--quiet", "--stock-probe-steps", "0"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing-file", "unknown-column-csv", "unknown-column-jsonl", "empty", "one-class",
                                  "float-label", "null-label", "empty-label", "unseen-eval-label", "bad-json",
                                  "txt-train"])
def test_data_errors_exit_nonzero_and_write_nothing(case, tiny_model_dir, toy_files, tmp_path, capsys):
    d, w = toy_files["dir"], toy_files["write_csv"]
    train, eval_, extra = toy_files["train"], toy_files["eval"], []
    if case == "missing-file":
        train, expect = str(d / "nope.csv"), "no such file"
    elif case == "unknown-column-csv":
        extra, expect = ["--text-column", "review"], "unknown column 'review'; the columns are: text, label"
    elif case == "unknown-column-jsonl":
        with open(d / "e.jsonl", "w") as f:
            f.write('{"text": "x", "label": "pos"}\n{"txt": "y", "label": "neg"}\n')
        eval_, expect = str(d / "e.jsonl"), "line 2: unknown column 'text'"
    elif case == "empty":
        train, expect = w(d / "empty.csv", ["text", "label"], []), "no examples"
    elif case == "one-class":
        train, expect = w(d / "one.csv", ["text", "label"], [("a", "pos"), ("b", "pos")] * 6), "at least two classes"
    elif case == "float-label":
        with open(d / "f.jsonl", "w") as f:
            f.write('{"text": "x", "label": 1}\n{"text": "y", "label": 0.5}\n')
        train, expect = str(d / "f.jsonl"), "line 2: label column 'label': cannot parse 0.5"
    elif case == "null-label":
        with open(d / "n.jsonl", "w") as f:
            f.write('{"text": "x", "label": 1}\n{"text": "y", "label": null}\n')
        train, expect = str(d / "n.jsonl"), "line 2: label column 'label': missing value"
    elif case == "empty-label":
        train, expect = w(d / "el.csv", ["text", "label"], [("a", "pos"), ("b", " ")]), "line 3: label column 'label': empty"
    elif case == "unseen-eval-label":
        with open(d / "u.jsonl", "w") as f:
            f.write('{"text": "x", "label": "pos"}\n{"text": "y", "label": "neutral"}\n')
        eval_, expect = str(d / "u.jsonl"), "label 'neutral' does not occur in the training data"
    elif case == "bad-json":
        with open(d / "b.jsonl", "w") as f:
            f.write('{"text": "x", "label": "pos"}\n{"text": \n')
        eval_, expect = str(d / "b.jsonl"), "line 2: not valid JSON"
    else:
        with open(d / "t.txt", "w") as f:
            f.write("just text\n")
        train, expect = str(d / "t.txt"), "has no labels"
    out = tmp_path / "never"
    rc, err = _err(capsys, ["--train", train, "--eval", eval_, "--model", tiny_model_dir, "--output", str(out)] + extra)
    assert rc == 1
    assert err.startswith("turbotune finetune: error:") and expect in err, err
    assert not out.exists()


def test_model_dir_errors(tmp_path, toy_files, tiny_model_dir, capsys):
    empty = tmp_path / "no-config"
    empty.mkdir()
    rc, err = _err(capsys, ["--train", toy_files["train"], "--model", str(empty), "--output", str(tmp_path / "o")])
    assert rc == 1 and "no config.json" in err
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc, err = _err(capsys, ["--train", toy_files["train"], "--model", str(gpt), "--output", str(tmp_path / "o")])
    assert rc == 1 and "unsupported architecture model_type='gpt2'" in err and "bert" in err
    rc, err = _err(capsys, ["--train", toy_files["train"], "--model", str(tmp_path / "missing"),
                            "--output", str(tmp_path / "o")])
    assert rc == 1 and "is not a directory" in err
    assert not (tmp_path / "o").exists()


def test_option_errors(toy_files, tiny_model_dir, tmp_path, capsys):
    base = ["--train", toy_files["train"], "--model", tiny_model_dir, "--output", str(tmp_path / "o")]
    rc, err = _err(capsys, base + ["--lr", "-1"])
    assert rc == 1 and "lr: expected a positive number" in err
    rc, err = _err(capsys, base + ["--epochs", "0"])
    assert rc == 1 and "epochs: expected a positive int" in err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, err = _err(capsys, ["--train", toy_files["train"], "--model", tiny_model_dir, "--output", str(foreign)])
    assert rc == 1 and "is not a turbotune checkpoint" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_out_of_memory_is_reported_with_a_hint(toy_files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from turbotune import training

    def oom(self, local, global_count):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training.Trainer, "step", oom)
    out = tmp_path / "o"
    rc, err = _err(capsys, ["--train", toy_files["train"], "--model", tiny_model_dir, "--output", str(out),
                            "--batch-size", "8"])
    assert rc == 1
    assert "out of memory" in err and "smaller --batch-size (now 8)" in err and "--dtype bfloat16" in err
    assert not out.exists()


def test_image_task_without_the_cnn_module(capsys):
    if importlib.util.find_spec("turbotune.tasks.image") is not None:
        pytest.skip("turbotune.tasks.image is installed")
    rc = cli.main(["finetune", "--task", "image", "--quiet"])
    assert rc == 1 and "needs turbotune.tasks.image" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="needs turbotune.tasks.image"):
        turbotune.finetune("image")


def test_failed_save_leaves_previous_best_intact(toy_files, tiny_model_dir, tmp_path, monkeypatch):
    """A second run into the same directory dies in the middle of writing its checkpoint (after the
    weights, before the tokenizer): the first run's checkpoint is still there, byte for byte."""
    out = tmp_path / "model"
    kw = dict(train=toy_files["train"], eval=toy_files["eval"], model=tiny_model_dir, output=str(out), epochs=1,
              batch_size=4, max_length=16, stock_probe_steps=0, quiet=True)
    turbotune.finetune(**kw)
    before = _tree_digest(out)
    from turbotune.tokenizers import BertTokenizer

    calls = []

    def dying_save(self, path):
        calls.append(sorted(os.listdir(path)))  # the weights are already in the temporary directory
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(BertTokenizer, "save_pretrained", dying_save)
    with pytest.raises(OSError, match="disk full"):
        turbotune.finetune(**dict(kw, seed=1))
    assert calls and "model.safetensors" in calls[0]
    assert _tree_digest(out) == before
    assert _no_temp_left(tmp_path)


def test_checkpoint_survives_a_killed_save(tiny_model_dir, tmp_path):
    """A process killed (os._exit) while writing a checkpoint leaves the previous one; the next save
    cleans the stale temporary directory up."""
    import subprocess
    import sys
    import textwrap

    from transformers import AutoModelForSequenceClassification

    from turbotune.tasks.text import load_tokenizer, save_checkpoint

    out = tmp_path / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = load_tokenizer("turbotune", tiny_model_dir)
    save_checkpoint(str(out), model, tok, {"turbotune": "test", "n": 1}, ["neg", "pos"])
    before = _tree_digest(out)
    script = textwrap.dedent(f"""
        import os
        from transformers import AutoModelForSequenceClassification
        from turbotune.tasks.text import save_checkpoint, load_tokenizer
        m = AutoModelForSequenceClassification.from_pretrained({tiny_model_dir!r}, num_labels=2)
        tok = load_tokenizer("turbotune", {tiny_model_dir!r})
        def half(self, path, **kw):
            with open(os.path.join(path, "model.safetensors"), "wb") as f:
                f.write(b"partial")
            os._exit(9)
        type(m).save_pretrained = half
        save_checkpoint({str(out)!r}, m, tok, {{"turbotune": "test", "n": 2}}, ["neg", "pos"])
    """)
    env = dict(os.environ, TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=300).returncode == 9
    assert _tree_digest(out) == before
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # the killed save's leftovers
    save_checkpoint(str(out), model, tok, {"turbotune": "test", "n": 3}, ["neg", "pos"])
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
    assert _no_temp_left(tmp_path)


def test_ddp_two_gloo_processes_match_one_process(tiny_model_dir, toy_files, tmp_path):
    """--nproc 2 (torchrun machinery, gloo) with the same global batch gives the weights one process gives."""
    from safetensors.torch import load_file

    # global batch 5: the two processes get 3 and 2 examples, so a per-process mean would weight them wrongly
    kw = dict(train=toy_files["train"], eval=toy_files["eval"], model=tiny_model_dir, epochs=2, batch_size=5,
              max_length=16, lr=1e-3, patience=None, stock_probe_steps=0, quiet=True, threads=1)
    one = turbotune.finetune(output=str(tmp_path / "one"), **kw)
    two = turbotune.finetune(output=str(tmp_path / "two"), nproc=2, **kw)
    assert one.turbotune.world == 1 and two.turbotune.world == 2
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    init = turbotune.tasks.text.build_model(tiny_model_dir, ["neg", "pos"], 0).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        if k in init and not torch.equal(init[k], a[k]):
            moved += 1
    assert moved > 10  # training changed the weights (the comparison is not trivially true)
    assert one.turbotune.validation["accuracy"] == pytest.approx(two.turbotune.validation["accuracy"])


def test_compare_stock_runs_both_recipes(toy_files, tiny_model_dir, tmp_path):
    res = turbotune.finetune(train=toy_files["train"], eval=toy_files["eval"], model=tiny_model_dir,
                             output=str(tmp_path / "m"), epochs=1, batch_size=6, max_length=16, quiet=True,
                             compare_stock=True, threads=1)
    names = [r.recipe for r in res.runs]
    assert names == ["turbotune", "stock", "stock+bf16"]
    stock = res.runs[1]
    assert not stock.skipped and stock.samples_per_s > 0 and stock.peak_memory_bytes > 0
    assert stock.validation["examples"] == 12
    assert stock.padded_tokens >= stock.real_tokens > 0 and "padded/real tokens" in res.summary()
    bf16 = res.runs[2]
    from turbotune.training import bf16_support

    if not bf16_support(torch.device("cpu"))[0]:
        assert bf16.skipped and "AVX512-BF16" in bf16.skipped
    assert res.speedup() == pytest.approx(stock.train_seconds / res.turbotune.train_seconds)
    text = res.summary()
    assert "stock" in text and "speed-up vs stock:" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_run(toy_files, tiny_model_dir, tmp_path):
    """On a GPU the default precision is bf16 (auto) and the checkpoint still loads in stock transformers."""
    res = turbotune.finetune(train=toy_files["train"], eval=toy_files["eval"], model=tiny_model_dir,
                             output=str(tmp_path / "m"), epochs=2, batch_size=4, max_length=16, quiet=True,
                             stock_probe_steps=2)
    assert res.turbotune.dtype == "bfloat16" and res.turbotune.peak_memory_kind == "CUDA max allocated"
    assert res.probe["speedup"] > 0
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m"))


def test_torchrun_launch(toy_files, tiny_model_dir, tmp_path):
    """The documented multi-node form, on one node: `torchrun ... -m turbotune finetune` (2 gloo workers);
    only rank 0 writes the checkpoint and prints the summary."""
    import subprocess
    import sys

    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "turbotune",
           "finetune", "--train", toy_files["train"], "--eval", toy_files["eval"], "--model", tiny_model_dir,
           "--output", str(out), "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("validation accuracy:") == 1  # the summary once, from rank 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["runs"][0]["world"] == 2 and doc["probe"] is None
    assert _no_temp_left(tmp_path)


def test_image_task_options_are_mapped(monkeypatch, capsys):
    """`--task image` hands the image task (turbotune.tasks.image.finetune_image) the options it takes."""
    import sys
    import types

    import turbotune.tasks as tasks

    seen = {}

    def finetune_image(data_dir=None, epochs=5, batch_size=256, lr=4e-3, seed=0, dtype=None, compare_stock=False,
                       progress=True, output=None, limit=None):
        seen.update(epochs=epochs, batch_size=batch_size, dtype=dtype, progress=progress, limit=limit,
                    compare_stock=compare_stock)
        return {"test_accuracy": 0.9123, "train_seconds": 12.5, "speedup_vs_stock": 1.5}

    mod = types.ModuleType("fake_image_task")
    mod.finetune_image = finetune_image
    monkeypatch.setitem(sys.modules, "fake_image_task", mod)
    monkeypatch.setitem(tasks.TASKS, "image", "fake_image_task:finetune_image")
    assert cli.main(["finetune", "--task", "image", "--epochs", "2", "--dtype", "float32", "--limit-train", "100",
                     "--compare-stock"]) == 0
    assert seen == dict(epochs=2, batch_size=256, dtype=None, progress=True, limit=100, compare_stock=True)
    assert "test accuracy: 0.9123" in capsys.readouterr().out
    assert cli.main(["finetune", "--task", "image", "--text-column", "x"]) == 1
    assert "--task image does not take --text-column" in capsys.readouterr().err
