"""turbotune.optimize(model) on BERT-family models: parity with stock on the packaged
real MiniLM and real review sentences of varied length, every head, revert,
checkpoints, malformed inputs and the stock fallbacks."""
import copy
import inspect
import warnings

import pytest
import torch
from bert_testlib import (PATH, encode, load, no_dropout, pair, rel, sentences, tiny_batch, tiny_config,
                          tiny_pair)

import turbotune
from turbotune.models.bert import TurbotuneFallbackWarning, matches

FP32_REL = 1e-5


@pytest.fixture(scope="module")
def batch():
    return encode(sentences(12))


def _real(t, mask):
    return t[mask.bool()]


# ----------------------------------------------------------------------------- parity (fp32)


def test_matches_bert_family_only():
    from transformers import AutoModelForSequenceClassification

    for mt in ("bert", "roberta", "xlm-roberta", "electra"):
        a, _ = tiny_pair("AutoModel", mt)
        assert matches(a), mt
    assert matches(load("AutoModelForSequenceClassification", num_labels=2))
    distil, _ = tiny_pair("AutoModel", "distilbert", dim=32, n_heads=4, hidden_dim=48, n_layers=2)
    assert not matches(distil)
    assert not matches(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    assert AutoModelForSequenceClassification  # imported for its side effect only


def test_base_model_hidden_states_and_mean_pooling_match_stock(batch):
    stock, model = pair("AutoModel")
    handle = turbotune.optimize(model)
    assert handle.kind == "bert" and handle.active
    with torch.no_grad():
        ref = stock(**batch, output_hidden_states=True)
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    assert rel(_real(out.last_hidden_state, mask), _real(ref.last_hidden_state, mask)) < FP32_REL
    assert torch.all(out.last_hidden_state[mask == 0] == 0)
    m = mask.unsqueeze(-1).float()
    pooled, pooled_ref = ((o.last_hidden_state * m).sum(1) / m.sum(1) for o in (out, ref))
    assert rel(pooled, pooled_ref) < FP32_REL
    assert rel(out.pooler_output, ref.pooler_output) < FP32_REL
    assert len(out.hidden_states) == len(ref.hidden_states) == 7
    for h, hr in zip(out.hidden_states, ref.hidden_states):
        assert rel(_real(h, mask), _real(hr, mask)) < FP32_REL


def test_padded_to_max_length_and_no_mask_match_stock():
    stock, model = pair("AutoModel")
    turbotune.optimize(model)
    b128 = encode(sentences(6), padding="max_length", max_length=64)
    with torch.no_grad():
        mask = b128["attention_mask"]
        assert rel(_real(model(**b128).last_hidden_state, mask), _real(stock(**b128).last_hidden_state, mask)) < FP32_REL
        ids = b128["input_ids"][:, :9]  # no mask: every token is real
        assert rel(model(input_ids=ids).last_hidden_state, stock(input_ids=ids).last_hidden_state) < FP32_REL


def _grad_check(stock, model, batch, labels_key="labels", **extra):
    for m in (stock, model):
        no_dropout(m).train()
    turbotune.optimize(model)
    ref = stock(**batch, **extra)
    out = model(**batch, **extra)
    assert rel(out.loss, ref.loss) < FP32_REL
    ref.loss.backward()
    out.loss.backward()
    gmax = max(p.grad.abs().max() for p in stock.parameters() if p.grad is not None)
    checked = 0
    for (name, p), q in zip(stock.named_parameters(), model.parameters()):
        if p.grad is None:
            assert q.grad is None or torch.all(q.grad == 0), name
            continue
        err = (q.grad - p.grad).abs().max()
        # 1e-5 of the parameter's own gradient scale; key biases have exactly-zero true
        # gradients (softmax is shift invariant), so both sides are rounding noise there
        assert err <= 1e-5 * p.grad.abs().max() + 1e-7 * gmax, (name, float(err), float(p.grad.abs().max()))
        checked += 1
    return checked


def test_every_parameter_gradient_matches_stock_sequence_classification():
    stock, model = pair("AutoModelForSequenceClassification", num_labels=2)
    batch = encode(sentences(8))
    labels = torch.tensor([s.label for s in sentences(8)])
    assert _grad_check(stock, model, batch, labels=labels) == len(list(stock.parameters()))


def test_every_parameter_gradient_matches_stock_token_classification():
    batch = encode(sentences(8))
    stock, model = pair("AutoModelForTokenClassification", num_labels=3)
    labels = (batch["input_ids"] % 3).masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 0] = -100
    assert _grad_check(stock, model, batch, labels=labels) > 90


# ----------------------------------------------------------------------------- heads (tiny random models)


def _compare_heads(cls_name, model_type="bert", choices=None, **out_kw):
    stock, model = tiny_pair(cls_name, model_type, **out_kw.pop("config", {}))
    turbotune.optimize(model)
    b = tiny_batch(stock.config, choices=choices)
    return stock, model, b


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra"])
def test_sequence_classification_heads(model_type):
    stock, model, b = _compare_heads("AutoModelForSequenceClassification", model_type, config=dict(num_labels=3))
    labels = torch.tensor([0, 2, 1, 1, 0])
    ref, out = stock(**b, labels=labels), model(**b, labels=labels)
    assert rel(out.logits, ref.logits) < FP32_REL and rel(out.loss, ref.loss) < FP32_REL
    # regression and multi-label losses follow HF's problem_type rules
    stock.config.problem_type = model.config.problem_type = "multi_label_classification"
    ml = torch.rand(5, 3).round()
    assert rel(model(**b, labels=ml).loss, stock(**b, labels=ml).loss) < FP32_REL


def test_regression_head():
    stock, model, b = _compare_heads("AutoModelForSequenceClassification", config=dict(num_labels=1))
    y = torch.randn(5)
    ref, out = stock(**b, labels=y), model(**b, labels=y)
    assert model.config.problem_type == "regression"
    assert rel(out.loss, ref.loss) < FP32_REL


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_token_classification_qa_and_mlm_heads(model_type):
    stock, model, b = _compare_heads("AutoModelForTokenClassification", model_type, config=dict(num_labels=4))
    mask = b["attention_mask"]
    labels = (b["input_ids"] % 4).masked_fill(mask == 0, -100)
    ref, out = stock(**b, labels=labels), model(**b, labels=labels)
    assert rel(_real(out.logits, mask), _real(ref.logits, mask)) < FP32_REL
    assert torch.all(out.logits[mask == 0] == 0) and rel(out.loss, ref.loss) < FP32_REL

    stock, model, b = _compare_heads("AutoModelForQuestionAnswering", model_type)
    mask = b["attention_mask"]
    sp, ep = torch.tensor([0, 1, 1, 0, 2]), torch.tensor([1, 1, 30, 1, 2])  # 30: out of range, ignored as in HF
    ref, out = stock(**b, start_positions=sp, end_positions=ep), model(**b, start_positions=sp, end_positions=ep)
    assert rel(_real(out.start_logits, mask), _real(ref.start_logits, mask)) < FP32_REL
    assert rel(_real(out.end_logits, mask), _real(ref.end_logits, mask)) < FP32_REL
    assert torch.all(out.start_logits[mask == 0] == torch.finfo(torch.float32).min)
    # the QA softmax runs over the real positions (stock's also spans the padding logits, so its
    # loss changes with the padded length): compare with stock's logits masked the same way
    ce = torch.nn.CrossEntropyLoss(ignore_index=mask.shape[1])
    low = torch.finfo(torch.float32).min
    want = (ce(ref.start_logits.masked_fill(mask == 0, low), sp.clamp(0, mask.shape[1]))
            + ce(ref.end_logits.masked_fill(mask == 0, low), ep.clamp(0, mask.shape[1]))) / 2
    assert rel(out.loss, want) < FP32_REL

    stock, model, b = _compare_heads("AutoModelForMaskedLM", model_type)
    mask = b["attention_mask"]
    labels = b["input_ids"].masked_fill(torch.rand(mask.shape) > 0.4, -100).masked_fill(mask == 0, -100)
    ref, out = stock(**b, labels=labels), model(**b, labels=labels)
    assert rel(_real(out.logits, mask), _real(ref.logits, mask)) < FP32_REL and rel(out.loss, ref.loss) < FP32_REL


def test_mlm_labeled_rows_only():
    stock, model = tiny_pair("AutoModelForMaskedLM")
    turbotune.optimize(model, mlm_logits="labeled")
    b = tiny_batch(stock.config)
    mask = b["attention_mask"]
    labels = b["input_ids"].masked_fill(torch.rand(mask.shape) > 0.3, -100).masked_fill(mask == 0, -100)
    ref, out = stock(**b, labels=labels), model(**b, labels=labels)
    keep = labels != -100
    assert out.logits.shape == (int(keep.sum()), stock.config.vocab_size)
    assert rel(out.logits, ref.logits[keep]) < FP32_REL and rel(out.loss, ref.loss) < FP32_REL
    ref.loss.backward()
    out.loss.backward()
    for p, q in zip(stock.parameters(), model.parameters()):
        if p.grad is not None:
            assert (q.grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9


def test_multiple_choice_head():
    stock, model, b = _compare_heads("AutoModelForMultipleChoice", choices=3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    ref, out = stock(**b, labels=labels), model(**b, labels=labels)
    assert out.logits.shape == (5, 3) and rel(out.logits, ref.logits) < FP32_REL and rel(out.loss, ref.loss) < FP32_REL


def test_roberta_positions_follow_input_ids_and_token_types():
    stock, model = tiny_pair("AutoModel", "roberta")
    turbotune.optimize(model)
    b = tiny_batch(stock.config)
    ref, out = stock(**b), model(**b)
    assert rel(_real(out.last_hidden_state, b["attention_mask"]), _real(ref.last_hidden_state, b["attention_mask"])) < FP32_REL
    s2, m2 = tiny_pair("AutoModel", "bert", type_vocab_size=2)
    turbotune.optimize(m2)
    b = tiny_batch(s2.config)
    tt = (torch.arange(b["input_ids"].shape[1]) > 4).long().expand_as(b["input_ids"])
    pos = torch.arange(b["input_ids"].shape[1]).flip(0).unsqueeze(0)
    mask = b["attention_mask"]
    assert rel(_real(m2(**b, token_type_ids=tt, position_ids=pos).last_hidden_state, mask),
               _real(s2(**b, token_type_ids=tt, position_ids=pos).last_hidden_state, mask)) < FP32_REL


def test_inputs_embeds_and_return_dict_false():
    stock, model = tiny_pair("AutoModelForSequenceClassification", num_labels=2)
    turbotune.optimize(model)
    b = tiny_batch(stock.config)
    emb = stock.bert.embeddings.word_embeddings(b["input_ids"])
    ref = stock(inputs_embeds=emb, attention_mask=b["attention_mask"], return_dict=False)
    out = model(inputs_embeds=emb, attention_mask=b["attention_mask"], return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) and rel(out[0], ref[0]) < FP32_REL
    out2 = model(b["input_ids"], b["attention_mask"])  # positional arguments bind like stock
    assert rel(out2.logits, stock(b["input_ids"], b["attention_mask"]).logits) < FP32_REL


def test_left_padding_matches_stock_at_real_positions():
    stock, model = pair("AutoModel")
    turbotune.optimize(model)
    b = encode(sentences(5))
    mask = b["attention_mask"]
    lens = mask.sum(1)
    left = {k: torch.stack([torch.roll(v[i], int(mask.shape[1] - lens[i])) for i in range(len(v))])
            for k, v in b.items()}
    with torch.no_grad():
        ref, out = stock(**left), model(**left)
    m = left["attention_mask"]
    assert m[:, 0].min() == 0  # really left-padded
    assert rel(_real(out.last_hidden_state, m), _real(ref.last_hidden_state, m)) < FP32_REL
    cls_model = load("AutoModelForSequenceClassification", num_labels=2)
    turbotune.optimize(cls_model)
    with pytest.warns(TurbotuneFallbackWarning, match="not right-padded"):
        cls_model(**left)


# ----------------------------------------------------------------------------- revert, instances, checkpoints


def test_revert_is_bit_identical_and_other_instances_stay_stock(batch):
    stock, model = pair("AutoModelForSequenceClassification", num_labels=2)
    other = load("AutoModelForSequenceClassification", num_labels=2)
    keys = list(model.state_dict())
    for m in (stock, model, other):
        m.eval()
    handle = turbotune.optimize(model)
    assert "forward" in model.__dict__ and "forward" not in other.__dict__
    assert type(model).forward is type(other).forward  # the class is never patched
    assert inspect.signature(model.forward) == inspect.signature(other.forward)  # HF Trainer reads it
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        ref = stock(**batch).logits
        assert torch.equal(other(**batch).logits, ref)
        optimized = model(**batch).logits
    assert rel(optimized, ref) < FP32_REL
    handle.revert()
    assert "forward" not in model.__dict__ and not handle.active
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    for (k, a), b in zip(stock.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    handle2 = turbotune.optimize(model)  # can optimize again after revert
    assert handle2.active


def test_save_pretrained_loads_in_stock_transformers(tmp_path, batch):
    from transformers import AutoModelForSequenceClassification

    model = load("AutoModelForSequenceClassification", num_labels=2).eval()
    turbotune.optimize(model)
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert "forward" not in fresh.__dict__
    with torch.no_grad():
        assert rel(fresh(**batch).logits, want) < FP32_REL


def test_deepcopy_gives_an_independent_optimized_model(batch):
    model = load("AutoModel").eval()
    turbotune.optimize(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.encoder.layer[0].output.dense.weight.mul_(0.5)
        a, b = model(**batch).last_hidden_state, clone(**batch).last_hidden_state
    assert clone.forward.__self__ is clone
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- bad input and fallbacks


def test_malformed_masks_raise_clear_errors(batch):
    model = load("AutoModel").eval()
    turbotune.optimize(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seq_len\)"):
        model(input_ids=ids, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(input_ids=ids, attention_mask=mask * 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(input_ids=ids, attention_mask=mask.float() * 0.5)
    empty = mask.clone()
    empty[3] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[3\] have no real token"):
        model(input_ids=ids, attention_mask=empty)
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        model(input_ids=ids, attention_mask=mask.tolist())
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(attention_mask=mask)
    with torch.no_grad():  # a float 0/1 mask is fine
        assert torch.equal(model(input_ids=ids, attention_mask=mask.float()).last_hidden_state,
                           model(input_ids=ids, attention_mask=mask.bool()).last_hidden_state)


def test_labels_on_padding_raise():
    stock, model = tiny_pair("AutoModelForTokenClassification", num_labels=2)
    turbotune.optimize(model)
    b = tiny_batch(stock.config)
    with pytest.raises(ValueError, match="padding position"):
        model(**b, labels=torch.zeros_like(b["input_ids"]))


def test_unsupported_arguments_fall_back_to_stock_with_one_warning(batch):
    stock, model = pair("AutoModelForSequenceClassification", num_labels=2)
    for m in (stock, model):
        m.eval()
    turbotune.optimize(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model(**batch, output_attentions=True)
    fallback = [w for w in rec if issubclass(w.category, TurbotuneFallbackWarning)]
    assert len(fallback) == 1 and "output_attentions=True" in str(fallback[0].message)
    ref = stock(**batch, output_attentions=True)
    assert torch.equal(out.logits, ref.logits) and len(out.attentions) == len(ref.attentions)
    b, l = batch["input_ids"].shape
    mask4 = batch["attention_mask"][:, None, None, :].expand(b, 1, l, l).bool()
    with pytest.warns(TurbotuneFallbackWarning, match="4-D attention_mask"):
        model.bert(input_ids=batch["input_ids"], attention_mask=mask4)


def test_unsupported_configs_and_architectures_stay_stock():
    dec, _ = tiny_pair("AutoModel", "bert", is_decoder=True)
    with pytest.warns(TurbotuneFallbackWarning, match="is_decoder"):
        handle = turbotune.optimize(dec)
    assert not handle.active and "forward" not in dec.__dict__
    distil, _ = tiny_pair("AutoModel", "distilbert", dim=32, n_heads=4, hidden_dim=48, n_layers=2)
    with pytest.warns(UserWarning, match="no model path recognises DistilBertModel"):
        assert turbotune.optimize(distil).kind == "none"
    model, _ = tiny_pair("AutoModel")
    with pytest.raises(TypeError, match="unknown option"):
        turbotune.optimize(model, fused=True)
    with pytest.raises(ValueError, match="mlm_logits"):
        turbotune.optimize(model, mlm_logits="some")
    with pytest.raises(TypeError, match="dtype"):
        turbotune.optimize(model, dtype=torch.int8)


def test_other_heads_run_stock_on_the_optimized_base():
    stock, model = tiny_pair("BertForPreTraining")
    handle = turbotune.optimize(model)
    assert any("head not recognised" in c for c in handle.changes)
    b = tiny_batch(stock.config)
    ref, out = stock(**b), model(**b)
    mask = b["attention_mask"]
    assert rel(_real(out.prediction_logits, mask), _real(ref.prediction_logits, mask)) < FP32_REL
    assert rel(out.seq_relationship_logits, ref.seq_relationship_logits) < FP32_REL


# ----------------------------------------------------------------------------- reduced precision


def test_dtype_auto_keeps_fp32_on_cpus_without_fast_bf16():
    from turbotune.models.bert import fast_bf16_available

    model, _ = tiny_pair("AutoModel")
    handle = turbotune.optimize(model, dtype="auto")
    want = torch.bfloat16 if fast_bf16_available(torch.device("cpu")) else None
    assert handle.options["dtype"] == want
    assert next(model.parameters()).dtype == (want or torch.float32)


@pytest.fixture(scope="module")
def fp64_reference():
    """(batch, fp64 stock last_hidden_state at the real positions) on 6 real sentences."""
    batch = encode(sentences(6))
    with torch.no_grad():
        want = _real(load("AutoModel").double().eval()(**batch).last_hidden_state, batch["attention_mask"])
    return batch, want


def test_bf16_within_twice_stock_bf16_error(fp64_reference):
    batch, want = fp64_reference
    stock16, model16 = pair("AutoModel")
    stock16 = stock16.to(torch.bfloat16).eval()
    handle = turbotune.optimize(model16, dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    mask = batch["attention_mask"]
    with torch.no_grad():
        err_stock = rel(_real(stock16(**batch).last_hidden_state, mask), want)
        err_ours = rel(_real(model16.eval()(**batch).last_hidden_state, mask), want)
    assert err_ours <= 2 * err_stock, (err_ours, err_stock)
    handle.revert()
    assert next(model16.parameters()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_within_twice_stock_autocast_error(fp64_reference, dtype):
    batch, want = fp64_reference
    stock, model = pair("AutoModel")
    turbotune.optimize(model)
    mask = batch["attention_mask"]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            got_stock = _real(stock.eval()(**batch).last_hidden_state, mask)
            got = _real(model.eval()(**batch).last_hidden_state, mask)
    assert rel(got, want) <= 2 * rel(got_stock, want), (rel(got, want), rel(got_stock, want))


def test_bf16_training_with_fp32_master_weights():
    # bf16 GEMMs are slow on CPUs without AVX512-BF16: a tiny model keeps this fast
    from turbotune.optim import AdamW

    model, _ = tiny_pair("AutoModelForSequenceClassification", num_labels=2)
    model.train()
    turbotune.optimize(model, dtype=torch.bfloat16)
    opt = AdamW(model.parameters(), lr=3e-3)
    b = tiny_batch(model.config, batch=8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    losses = []
    for _ in range(6):
        out = model(**b, labels=labels)
        assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
        out.loss.backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    master = [s["master_param"] for s in opt.state.values()]
    assert master and all(m.dtype == torch.float32 for m in master)
    assert losses[-1] < losses[0]


def test_tiny_config_sanity():
    assert tiny_config("roberta").pad_token_id == 1 and PATH
