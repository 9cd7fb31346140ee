"""End-to-end suite ``finetune``: the whole training step and batch inference of the default task.

The packaged MiniLM (a new 2-way head) on real movie-review snippets (:func:`turbotune.data.movie_reviews`),
batches drawn at random from the training split, the same batch sequence for every provider:

- ``train-step``: what ``turbotune finetune`` runs per step, through the same
  :class:`turbotune.training.Trainer`: tokenize (padded to the batch's longest), forward, backward,
  clip to norm 1.0, AdamW, LR schedule. ``stock`` (baseline): transformers' tokenizer, the stock fp32
  model, ``torch.optim.AdamW(fused=True)`` + ``torch.nn.utils.clip_grad_norm_``. ``turbotune``: the
  turbotune tokenizer, ``turbotune.optimize(model)``, turbotune AdamW + fused clipping.
- ``inference``: tokenize + forward (no grad) of a batch of 64, as ``turbotune infer`` does:
  stock tokenizer + model vs turbotune tokenizer + ``optimize(model)``.

Where bf16 is fast (CUDA; CPUs with AVX512-BF16 / AMX) the ``bfloat16`` rows add stock under
``torch.autocast`` (baseline) and turbotune in bf16. ``work`` counts samples, so the table has
``samples_per_s``. The suite is empty when the movie reviews are neither cached nor fetchable.
"""
from __future__ import annotations

import random
from typing import Iterator, List

import torch

from .. import Case, register_suite


def _cycle(batches: List[List[int]]):
    state = {"i": 0}

    def nxt():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b

    return nxt


@register_suite("finetune")
def finetune_suite(quick: bool, device: torch.device) -> Iterator[Case]:
    from ... import data
    from ...tasks.text import Split, _forward_for, build_model, load_tokenizer, make_collate, token_lengths
    from ...training import RECIPES, Trainer, apply_optimize, bf16_support

    try:
        items = data.movie_reviews()
    except data.DatasetUnavailable:
        return
    train = data.split_dataset(items, test_size=1000, val_size=1000, seed=0)["train"]
    split = Split([x.text for x in train], None, [x.label for x in train])
    model_dir = data.packaged_model_dir()
    id2label = ["negative", "positive"]
    rng = random.Random(0)
    n_batches = 8 if quick else 32
    lens = token_lengths(split, model_dir, 128)
    train_batches = [rng.sample(range(len(split)), 32) for _ in range(n_batches)]
    infer_batches = [rng.sample(range(len(split)), 64) for _ in range(n_batches)]
    mean_padded = sum(max(lens[i] for i in b) for b in train_batches) / n_batches
    mean_real = sum(lens[i] for b in train_batches for i in b) / (32 * n_batches)
    shape = f"MiniLM-L6 B32 movie-reviews (mean {mean_real:.0f} real / {mean_padded:.0f} padded tokens)"
    ishape = f"MiniLM-L6 B64 movie-reviews ({n_batches} batches)"
    bf_ok, _ = bf16_support(device)
    precisions = [("float32", torch.float32)] + ([("bfloat16", torch.bfloat16)] if bf_ok else [])
    for dname, dtype in precisions:
        stock_name = "stock" if dtype == torch.float32 else "stock+bf16"
        for name, baseline in ((stock_name, True), ("turbotune", False)):
            rec = RECIPES[name]
            tok = load_tokenizer(rec.tokenizer, model_dir)
            model = build_model(model_dir, id2label, 0)
            trainer = Trainer(model, rec, collate=make_collate(tok, split, 128), forward=_forward_for(model),
                              dtype=dtype if name == "turbotune" else torch.float32, lr=5e-5, warmup_steps=0,
                              total_steps=10 ** 6, device=device)
            nxt = _cycle(train_batches)

            def step(trainer=trainer, nxt=nxt):
                b = nxt()
                loss, _, _ = trainer.step(b, len(b))
                return loss

            yield Case(op="text-classification", provider="stock" if baseline else "turbotune", mode="train-step",
                       shape=shape, dtype=dname, device=device.type, fn=step, baseline=baseline,
                       work={"items": 32, "unit": "samples"})

        for name, baseline in ((stock_name, True), ("turbotune", False)):
            rec = RECIPES[name]
            tok = load_tokenizer(rec.tokenizer, model_dir)
            from transformers import AutoModel

            from ...tasks.text import _quiet_transformers

            with _quiet_transformers():
                enc_model = AutoModel.from_pretrained(model_dir).eval().to(device)
            autocast = rec.autocast
            if rec.optimize:
                _, autocast, _ = apply_optimize(enc_model, dtype)
            nxt = _cycle(infer_batches)
            collate = make_collate(tok, split, 128)

            @torch.no_grad()
            def infer(model=enc_model, collate=collate, nxt=nxt, autocast=autocast):
                inputs, _, _ = collate(nxt())
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if autocast is not None:
                    with torch.autocast(device.type, dtype=autocast):
                        return model(**inputs).last_hidden_state
                return model(**inputs).last_hidden_state

            yield Case(op="text-classification", provider="stock" if baseline else "turbotune", mode="inference",
                       shape=ishape, dtype=dname, device=device.type, fn=infer, baseline=baseline,
                       work={"items": 64, "unit": "samples"})
