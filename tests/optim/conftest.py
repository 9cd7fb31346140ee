"""Fixtures of the optimizer tests: a small real model (MiniLM, 2 of its 6 layers)."""
import pytest


@pytest.fixture(scope="module")
def minilm():
    """The packaged all-MiniLM-L6-v2 checkpoint cut to 2 layers (real weights), fp32, plus a real batch."""
    transformers = pytest.importorskip("transformers")
    from turbotune.data import packaged_model_dir

    path = packaged_model_dir()
    config = transformers.AutoConfig.from_pretrained(path)
    config.num_hidden_layers = 2
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    transformers.logging.set_verbosity_error()
    model = transformers.BertModel.from_pretrained(path, config=config)
    model.train()
    # keep the test fast: the 11.7M-entry word embedding stays frozen (3.6M trainable params remain)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = [
        "The movie was a delight from start to finish.",
        "I would not recommend this product to anyone.",
        "An average day with nothing special happening.",
        "Brilliant acting, but the plot dragged in the middle.",
    ]
    batch = tok(texts, padding=True, return_tensors="pt")
    return model, dict(batch)
