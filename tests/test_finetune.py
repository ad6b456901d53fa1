import collections
import json

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
    with pytest.raises(ValueError, match="m.csv:3: missing label"):
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


def test_data_files_as_users_write_them(tmp_path):
    def read(name, content, encoding="utf-8"):
        file = tmp_path / name
        file.write_bytes(content.encode(encoding))
        return finetune.read_labelled(str(file))

    # Excel's UTF-8 BOM, an upper-case extension, U+2028 inside a text, integer labels
    assert read("bom.csv", "\ufefftext,label\nhi,x\nyo,y\n") == (["hi", "yo"], ["x", "y"])
    texts, labels = read("u.JSONL", '{"text": "a\u2028b", "label": 10}\n{"text": "c\u0085d", "label": 2}\n')
    assert texts == ["a\u2028b", "c\u0085d"] and labels == ["10", "2"]
    assert finetune.class_order(["10", "2", "0"]) == ["0", "2", "10"]
    assert read("f.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n')[1] == ["1", "0"]  # pandas' 1.0
    assert read("t.csv", "text,label\nhi,x,\nyo,y\n") == (["hi", "yo"], ["x", "y"])  # a trailing empty field
    for row, what in (('{"text": null, "label": "x"}', "missing text"), ('{"text": "a", "label": null}', "missing label"),
                      ('{"text": "a", "label": NaN}', "the label must be"), ('{"text": "a", "label": 1.5}', "the label must be"),
                      ('{"text": "  ", "label": "x"}', "missing text"), ('{"text": "a", "label": true}', "the label must be"),
                      ('{"text": 3, "label": "x"}', "the text must be a string")):
        with pytest.raises(ValueError, match=f"n.jsonl:2: {what}"):
            read("n.jsonl", '{"text": "ok", "label": "y"}\n' + row + "\n")
    with pytest.raises(ValueError, match=r"c.csv:4: 3 fields for 2 columns \(quote a text that holds a comma\)"):
        read("c.csv", 'text,label\n"two\nlines",x\ngood, very good film,pos\n')
    with pytest.raises(ValueError, match=r"h.csv:1: the header must name 'text' and 'label' columns, found \['text', ' label'\]"):
        read("h.csv", "text, label\na,x\n")
    for name, content in (("e.jsonl", ""), ("e.csv", "text,label\n")):
        with pytest.raises(ValueError, match=f"{name}: no rows"):
            read(name, content)
    with pytest.raises(ValueError, match="l.csv: not UTF-8 text"):
        read("l.csv", "text,label\ncaf\u00e9,x\n", encoding="latin-1")
    with pytest.raises(ValueError, match="built-in sets: bbc-news, tweet-sentiment"):
        finetune.read_labelled(str(tmp_path / "tweet_sentiment"))


def test_a_diverging_loss_stops_training_before_it_is_saved():
    import jax.numpy as jnp
    import optax

    saved = []
    loss = lambda t, f, batch: jnp.sum(t["w"] ** 2) * batch
    with pytest.raises(finetune.Diverged, match=r"LoRA: the loss is inf at step 3 \(last finite loss: 2.0\); try a lower --lr"):
        finetune.train(loss, {"w": jnp.ones(2)}, None, optax.sgd(0.0), iter([1.0, 1.0, float("inf")]), 3, "LoRA",
                       on_save=lambda t, step: saved.append(step), save_every=1)
    assert saved == [1, 2]
    saved.clear()  # a finite loss whose gradient is not: the updated weights are caught before they are saved
    with pytest.raises(finetune.Diverged, match="LoRA: the weights are not finite at step 1"):
        finetune.train(lambda t, f, b: jnp.sqrt(t["w"]).sum(), {"w": jnp.zeros(2)}, None, optax.sgd(1.0),
                       iter([0.0]), 1, "LoRA", on_save=lambda t, step: saved.append(step), save_every=1)
    assert saved == []


def test_max_length_counts_the_positions_a_model_can_use():
    from types import SimpleNamespace

    roberta = SimpleNamespace(config=SimpleNamespace(model_type="roberta", max_position_embeddings=514, pad_token_id=1))
    finetune.check_length(roberta, 512)
    with pytest.raises(ValueError, match="--max-length 513: the model has 512 positions"):
        finetune.check_length(roberta, 513)


@pytest.mark.parametrize("n, batch", [(28, 8), (5, 5), (7, 3), (1, 1)])
def test_every_row_is_shown_once_an_epoch(n, batch):
    rows = finetune._batches(n, batch, np.random.default_rng(1))
    drawn = [next(rows) for _ in range(n)]  # n batches: exactly `batch` epochs
    assert all(b.shape == (batch,) for b in drawn)
    epochs = np.concatenate(drawn).reshape(batch, n)
    assert (np.sort(epochs, axis=1) == np.arange(n)).all()
    assert n == 1 or not (epochs == epochs[0]).all()  # each epoch is shuffled anew


@pytest.mark.parametrize("options, match", [
    ({"targets": ["q_proj"]},
     r"^--targets: pattern 'q_proj' matches no param; modules with weights to adapt: .*encoder/layer/\*/attention/self/query"),
    ({"targets": ["all-linear", "query"]}, r"^--targets: 'all-linear' is not a pattern, it stands alone: --targets all-linear \(got"),
    ({"rank": 40}, r"^rank 40 for 'encoder/layer/0/attention/self/query/kernel' exceeds min\(in=32, out=32\)"),
])
def test_bad_lora_options_fail_before_any_training_in_the_flags_words(bert_dir, data_file, tmp_path, monkeypatch,
                                                                   options, match):
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trained before checking the LoRA options"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        finetune.classify(finetune.Options(model=str(bert_dir), data=str(data_file), max_length=8, out=str(out),
                                           **options))
    assert not out.exists()


def test_classify_leaves_out_the_pooler_it_never_uses(bert_dir, data_file, tmp_path):
    out = tmp_path / "run"
    results = finetune.classify(finetune.Options(model=str(bert_dir), data=str(data_file), targets="all-linear",
                                                 rank=2, steps=2, batch_size=8, max_length=8, out=str(out),
                                                 baseline=False, plot=False))
    adapted = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not any("pooler" in json.dumps(v) for v in adapted.values())
    # 2 layers x (q, k, v, attention/output, intermediate, output) of a 32-wide BERT (intermediate 64), r=2, + head
    per_layer = 4 * 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32)
    assert results["lora"]["trainable_params"] == 2 * per_layer + 32 * 2 + 2


@pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")
def test_causal_lm_refuses_a_model_that_sees_later_tokens(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trained a model that sees the next token"))
    (tmp_path / "corpus.txt").write_text(" ".join(["the film was very good"] * 20))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^--model .*bert: FlaxBertForCausalLM is not causal \(its logits change with "
                                         r"a later token\); --task causal-lm needs a decoder \(causal\) model"):
        finetune.causal_lm(finetune.Options(task="causal-lm", model=str(bert_dir), data=str(tmp_path / "corpus.txt"),
                                            max_length=8, out=str(out)))
    assert not out.exists()
    bert = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=17)
    for causal in (tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=17)),
                   tf.FlaxLlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=17)),
                   tf.FlaxBertForCausalLM(tf.BertConfig(**bert, is_decoder=True))):  # a BERT made a decoder is causal
        finetune.check_causal(causal, "lm")
