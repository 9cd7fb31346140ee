"""``attn_implementation="turbotune"`` on the packaged MiniLM (a real 6-layer BERT).

The Triton kernels run under the interpreter (``triton_backend`` fixture). The
key check is the transformers v5 masking trap: on a PADDED batch the result must
match ``"eager"`` on the real tokens -- and we show that ignoring the mask would
change those tokens, so the comparison can fail.
"""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import turbotune  # noqa: E402
from turbotune.data import packaged_model_dir  # noqa: E402
from turbotune.testing import assert_close  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_kernel_config(monkeypatch):
    """One fixed block config per kernel variant instead of autotuning each one: on a GPU this
    keeps compilation time of the many variants tested here small (on the interpreter both are
    one config). test_autotuned_launchers covers the autotuned path."""
    monkeypatch.setenv("TURBOTUNE_AUTOTUNE", "0")

# Module-scoped fixtures cannot use the function-scoped `device` fixture: same rule here.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TEXTS = [
    "turbotune fuses attention",
    "a much longer sentence, with quite a few more word pieces in it than the others have",
    "ok",
]


@pytest.fixture(scope="module")
def model_dir():
    try:
        return packaged_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def batch(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc.to(DEVICE)


@pytest.fixture(scope="module")
def models(model_dir):
    turbotune.models.register_hf_attention()
    eager = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").to(DEVICE)
    tt = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="turbotune").to(DEVICE)
    assert tt.config._attn_implementation == "turbotune"
    return eager, tt


def test_import_has_no_side_effects_until_register():
    code = (
        "import turbotune, turbotune.models as m\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'turbotune' not in AttentionInterface._global_mapping\n"
        "assert 'turbotune' not in AttentionMaskInterface._global_mapping\n"
        "assert not m.hf_attention_registered()\n"
        "m.register_hf_attention()\n"
        "assert 'turbotune' in AttentionInterface._global_mapping\n"
        "assert 'turbotune' in AttentionMaskInterface._global_mapping\n"
        "assert m.hf_attention_registered()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_eval_padded_batch_matches_eager(models, batch, triton_backend):
    eager, tt = models
    eager.eval()
    tt.eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = eager(**batch).last_hidden_state
        out = tt(**batch).last_hidden_state
        # Ignoring the mask (the v5 trap) changes the real tokens: the check below can fail.
        unmasked = eager(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).last_hidden_state
    assert (unmasked - ref)[real].abs().max() > 0.05
    assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4, name="real tokens")
    # A sequence alone (no padding) gives the same vectors as inside the padded batch.
    n = int(real[2].sum())
    with torch.no_grad():
        alone = tt(input_ids=batch["input_ids"][2:, :n], attention_mask=batch["attention_mask"][2:, :n]).last_hidden_state
    assert_close(out[2, :n], alone[0], atol=1e-4, rtol=1e-4, name="unpadded sequence")


def test_train_step_with_dropout(model_dir, batch, triton_backend):
    # The first two layers of the real checkpoint keep the interpreter run short.
    turbotune.models.register_hf_attention()
    eager = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager", num_hidden_layers=2).to(DEVICE)
    tt = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="turbotune", num_hidden_layers=2).to(DEVICE)
    tt.train()
    assert tt.config.attention_probs_dropout_prob == pytest.approx(0.1)
    real = batch["attention_mask"].bool()

    def step(model, seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        h = model(**batch).last_hidden_state
        loss = (h[real] ** 2).mean()
        loss.backward()
        w = model.encoder.layer[0].attention.self.query.weight.grad.clone()
        return loss.detach(), w

    l1, g1 = step(tt, 0)
    l2, g2 = step(tt, 0)
    l3, g3 = step(tt, 1)
    assert torch.isfinite(l1) and torch.isfinite(g1).all() and g1.abs().sum() > 0
    assert torch.equal(l1, l2) and torch.equal(g1, g2), "same seed must give the same step"
    assert not torch.equal(l1, l3), "dropout must change the result with the seed"

    # With dropout off, a training step matches eager's gradients exactly in math.
    def no_dropout_grads(model):
        old = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        try:
            return step(model, 0)
        finally:
            for m, p in zip([m for m in model.modules() if isinstance(m, torch.nn.Dropout)], old):
                m.p = p

    eager.train()
    le, ge = no_dropout_grads(eager)
    lt, gt = no_dropout_grads(tt)
    assert_close(lt, le, atol=1e-5, rtol=1e-4, name="loss")
    assert_close(gt, ge, atol=1e-5, rtol=1e-3, name="query.weight.grad")
    # Attention dropout really is active in the turbotune step: with every other
    # dropout switched off, the loss still differs from the no-dropout loss.
    hidden_dropouts = [m for name, m in tt.named_modules()
                       if isinstance(m, torch.nn.Dropout) and not name.endswith("attention.self.dropout")]
    saved = [m.p for m in hidden_dropouts]
    for m in hidden_dropouts:
        m.p = 0.0
    try:
        la, _ = step(tt, 3)
    finally:
        for m, p in zip(hidden_dropouts, saved):
            m.p = p
    assert not torch.allclose(la, lt), "attention dropout had no effect in train mode"
