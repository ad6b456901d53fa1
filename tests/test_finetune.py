import collections

import numpy as np
import pytest
import transformers as tf
from test_cli import WORDS, _tokenizer, bert_dir, data_file  # noqa: F401 (fixtures)
from test_examples import baked_in, compiled_ir  # noqa: F401 (fixture)

from jlora import finetune


def test_builtin_data_sets():
    texts, labels = finetune.tweet_sentiment()
    assert len(texts) == 6000 and len(set(texts)) == 6000
    assert collections.Counter(labels) == {"negative": 2982, "neutral": 2262, "positive": 756}
    texts, labels = finetune.bbc_news()
    assert len(texts) == 2225 and sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]


def test_split_is_fixed_and_disjoint():
    a = finetune.split_indices(1000)
    b = finetune.split_indices(1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [700, 150, 150]
    assert len(set(np.concatenate(a))) == 1000


def test_csv_data_and_its_errors(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text('text,label\n"a, quoted text",x\nplain,y\n')
    assert finetune.read_labelled(str(good)) == (["a, quoted text", "plain"], ["x", "y"])
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,x\n")
    with pytest.raises(ValueError, match="bad.csv:1: the header must name 'text' and 'label'"):
        finetune.read_labelled(str(bad))
    missing = tmp_path / "m.csv"
    missing.write_text("text,label\nhello,x\nworld,\n")
    with pytest.raises(ValueError, match="m.csv:3: missing text or label"):
        finetune.read_labelled(str(missing))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(ValueError, match="need at least 2 distinct labels"):
        finetune.read_labelled(str(one))


@pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")
def test_no_weights_compiled_in_as_constants(bert_dir, data_file, tmp_path, compiled_ir):
    """Frozen weights reach every jitted function (baseline features, train steps, evaluation) as
    arguments: closed over, a 1B model's became HLO constants and compiled 7x slower."""
    finetune.classify(finetune.Options(model=str(bert_dir), data=str(data_file), steps=2, batch_size=8,
                                       max_length=8, out=str(tmp_path / "cls"), plot=False))
    lm = tf.FlaxOPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                            word_embed_proj_dim=32, vocab_size=len(WORDS) + 5))
    lm.save_pretrained(tmp_path / "lm")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "lm")
    (tmp_path / "corpus.txt").write_text(" ".join(["the film was very good"] * 20))
    finetune.causal_lm(finetune.Options(task="causal-lm", model=str(tmp_path / "lm"), steps=2, batch_size=4,
                                        data=str(tmp_path / "corpus.txt"), max_length=8, out=str(tmp_path / "lm-run"),
                                        plot=False))
    assert baked_in(compiled_ir) == {}
    compiled = " ".join(f.name for f in compiled_ir.iterdir())
    assert all(f"jit_{name}_compile" in compiled for name in ("pooled", "step", "logits_of"))
