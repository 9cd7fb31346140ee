"""Training with turbotune.optimize(model): fine-tuning on the real movie reviews follows
stock, dropout on, gradient checkpointing, torch.compile, HF Trainer and DDP."""
import os
import socket

import pytest
import torch
from bert_testlib import encode, load, no_dropout, pair, rel, sentences, tiny_batch, tiny_pair

import turbotune
from turbotune.data import split_dataset


@pytest.fixture(scope="module")
def reviews():
    from bert_testlib import _reviews

    return split_dataset(_reviews(), test_size=1000, val_size=1000, seed=0)


def _train(model, data, steps, bs, lr=5e-5, seed=0, max_length=64):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for i in range(steps):
        b = data[i * bs:(i + 1) * bs]
        out = model(**encode(b, max_length=max_length), labels=torch.tensor([x.label for x in b]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def _evaluate(model, data, max_length=64):
    """(accuracy, mean loss) in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(data), 100):
            b = data[i:i + 100]
            y = torch.tensor([x.label for x in b])
            out = model(**encode(b, max_length=max_length), labels=y)
            correct += int((out.logits.argmax(-1) == y).sum())
            loss += out.loss.item() * len(b)
    return correct / len(data), loss / len(data)


def test_fifty_step_finetune_follows_stock_loss_curve(reviews):
    stock, model = pair("AutoModelForSequenceClassification", num_labels=2)
    no_dropout(stock)
    no_dropout(model)
    turbotune.optimize(model)
    train = reviews["train"][:200]
    ref = _train(stock, train, steps=50, bs=4)
    got = _train(model, train, steps=50, bs=4)
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    assert max(diffs[:10]) < 1e-5 and max(diffs) < 1e-3, diffs
    val = encode(reviews["validation"][:16], max_length=64)  # the fine-tuned models agree on unseen text
    with torch.no_grad():
        assert rel(model.eval()(**val).logits, stock.eval()(**val).logits) < 1e-3


def test_dropout_on_trains_like_stock(reviews):
    # hidden dropout and the Philox attention dropout on: a different random stream from stock's,
    # so validation loss and accuracy agree within noise, not exactly. One pass over 384 reviews.
    stock, model = pair("AutoModelForSequenceClassification", num_labels=2)
    turbotune.optimize(model)
    train, val = reviews["train"][:384], reviews["validation"][:300]
    ref = _train(stock, train, steps=24, bs=16, lr=1e-4, max_length=48)
    got = _train(model, train, steps=24, bs=16, lr=1e-4, max_length=48)
    (acc_ref, loss_ref), (acc, loss) = _evaluate(stock, val, 48), _evaluate(model, val, 48)
    assert acc_ref > 0.65 and acc > 0.65, (acc_ref, acc)  # both learn (chance: 0.5)
    assert abs(acc - acc_ref) < 0.08, (acc, acc_ref)  # ~3 sigma of 300 examples
    assert abs(loss - loss_ref) < 0.06, (loss, loss_ref)
    assert len(got) == len(ref) == 24


def test_gradient_checkpointing_gives_the_same_gradients():
    # a tiny model with every dropout on (hidden and the Philox attention dropout)
    plain, ckpt = tiny_pair("AutoModelForSequenceClassification", num_labels=2, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1)
    batch = tiny_batch(plain.config, batch=6)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    for m in (plain, ckpt):
        turbotune.optimize(m)
        m.train()
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()
    torch.manual_seed(5)  # dropout on: checkpointing must replay the same masks
    a = plain(**batch, labels=labels)
    a.loss.backward()
    torch.manual_seed(5)
    b = ckpt(**batch, labels=labels)
    b.loss.backward()
    assert torch.equal(a.loss, b.loss)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8), name


def test_torch_compile_no_graph_break_inside_a_layer():
    from turbotune.models.bert import forward as fw
    from turbotune.models.bert.packed import layer_forward

    model = load("AutoModel")
    model.train()  # dropout on: the Philox attention dropout takes an explicit seed, no graph break
    turbotune.optimize(model)
    st = model.__dict__[fw.STATE_ATTR]
    batch = encode(sentences(4))
    pack = fw.prepare(st, batch)
    x = torch.randn(pack.total, 384, requires_grad=True)
    layer = model.encoder.layer[2]

    def fn(x):
        return layer_forward(layer, x, pack, st.spec, 1234, 2)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    want = fn(x)
    want.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    torch.manual_seed(0)
    got = compiled(x)
    got.sum().backward()
    assert rel(got, want) < 1e-5 and rel(x.grad, gx) < 1e-5


def test_torch_compile_whole_model_matches_eager():
    model = load("AutoModelForSequenceClassification", num_labels=2).eval()
    turbotune.optimize(model)
    batch = encode(sentences(4))
    with torch.no_grad():
        want = model(**batch).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager")(**batch).logits
    assert rel(got, want) < 1e-5


def test_hf_trainer_runs_the_optimized_model_like_stock(tmp_path, reviews):
    from transformers import Trainer, TrainingArguments

    data = reviews["train"][:32]
    from bert_testlib import tokenizer

    feats = []
    for r in data:
        e = tokenizer()(r.text, truncation=True, max_length=64)
        feats.append({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"],
                      "token_type_ids": e["token_type_ids"], "labels": r.label, "text": r.text})

    def collate(items):  # columns the forward does not take ("text") are removed by Trainer first
        assert "text" not in items[0]
        n = max(len(i["input_ids"]) for i in items)
        out = {k: torch.tensor([i[k] + [0] * (n - len(i[k])) for i in items])
               for k in ("input_ids", "attention_mask", "token_type_ids")}
        out["labels"] = torch.tensor([i["labels"] for i in items])
        return out

    losses = []
    for optimized in (False, True):
        model = no_dropout(load("AutoModelForSequenceClassification", num_labels=2))
        if optimized:
            turbotune.optimize(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(optimized)), per_device_train_batch_size=8,
                                 max_steps=4, learning_rate=5e-5, report_to=[], save_strategy="no",
                                 logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=collate)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) < 1e-4, losses


# ----------------------------------------------------------------------------- DDP (2 gloo processes)


def _ddp_worker(rank, world, port, out_dir, steps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = no_dropout(load("AutoModelForSequenceClassification", num_labels=2))
        turbotune.optimize(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # SGD: AdamW would blow the rounding noise of the key biases' exactly-zero gradients up to full steps
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(steps):
            items = sentences(4, offset=100 * step + 10 * rank)
            out = ddp(**encode(items), labels=torch.tensor([s.label for s in items]))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    steps = 2
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), steps), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # reference: stock model, gradient = mean of the two ranks' gradients (what DDP all-reduces)
    stock = no_dropout(load("AutoModelForSequenceClassification", num_labels=2))
    opt = torch.optim.SGD(stock.parameters(), lr=0.05)
    for step in range(steps):
        for rank in (0, 1):
            items = sentences(4, offset=100 * step + 10 * rank)
            (stock(**encode(items), labels=torch.tensor([s.label for s in items])).loss / 2).backward()
        opt.step()
        opt.zero_grad()
    for k, v in stock.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        assert rel(r0[k], v) < 1e-5, k
