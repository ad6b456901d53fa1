import json
import logging.handlers

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf
from test_cli import WORDS, _tokenizer, bert_dir, data_file  # noqa: F401 (fixtures)
from test_examples import baked_in, compiled_ir  # noqa: F401 (fixture)

import jlora
import jlora.adapter
from jlora import finetune





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


def test_a_run_that_fails_leaves_no_empty_out_directory(bert_dir, data_file, tmp_path, monkeypatch):
    """A diverged run saves nothing, and takes away the --out it made (parents too); a directory
    that was there before stays."""
    def diverges(*args, **kwargs):
        raise finetune.Diverged("LoRA: the loss is nan at step 1")

    monkeypatch.setattr(finetune, "train", diverges)
    opts = dict(model=str(bert_dir), data=str(data_file), steps=2, batch_size=8, max_length=8, plot=False,
                baseline=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(finetune.Diverged):
        finetune.classify(finetune.Options(out=str(runs / "new" / "run"), **opts))
    assert list(runs.iterdir()) == []
    (runs / "mine").mkdir()
    with pytest.raises(finetune.Diverged):
        finetune.classify(finetune.Options(out=str(runs / "mine"), **opts))
    assert (runs / "mine").is_dir()


def test_ctrl_c_while_a_step_runs_keeps_the_last_whole_step(monkeypatch):
    """Ctrl-C lands while the loop waits for a step's result: what ``train`` returns (and a job
    saves as its last step) is the step its losses end at, not the half-taken next one."""
    import itertools

    import jax
    import jax.numpy as jnp
    import optax

    class CtrlC:  # step 4's result, waited for when the user presses Ctrl-C
        def __bool__(self):
            raise KeyboardInterrupt

    real_jit, calls = jax.jit, []

    def jit(fn):
        jitted = real_jit(fn)

        def step(*args):
            out = jitted(*args)
            calls.append(1)
            return (*out[:3], CtrlC()) if len(calls) == 4 else out
        return step

    monkeypatch.setattr(jax, "jit", jit)
    t, run = finetune.train(lambda t, f, b: -t["w"].sum(), {"w": jnp.zeros(1)}, None, optax.sgd(1.0),
                            itertools.repeat(0.0), 10, "LoRA")  # each step adds 1 to w
    monkeypatch.undo()
    assert run.interrupted and len(run.losses) == 3 and float(t["w"][0]) == 3.0


def test_epochs_count_the_rows_a_batch_can_hold(tmp_path):
    """A batch larger than the data holds all of it: ``--epochs 10`` is then 10 steps, not 6."""
    opts = lambda **kw: finetune.Options(out=str(tmp_path / "out"), **kw)
    assert finetune._schedule(opts(batch_size=32, epochs=10), 19) == (19, 10)
    assert finetune._schedule(opts(batch_size=8, epochs=2), 20) == (8, 5)
    assert finetune._schedule(opts(batch_size=8, steps=3), 20) == (8, 3)


@pytest.mark.parametrize("n_tokens, max_length", [(65, 8), (64, 8), (17, 8), (100, 7)])
def test_causal_lm_windows_are_every_whole_one(n_tokens, max_length):
    starts = finetune.window_starts(n_tokens, max_length)
    whole = [s for s in range(0, n_tokens, max_length) if s + max_length + 1 <= n_tokens]  # inputs + next tokens
    assert starts.tolist() == whole


def test_held_out_texts_repeated_in_training_are_reported():
    texts = ["good", "bad", "good", "fine", "bad"]
    with pytest.warns(UserWarning, match="d.csv: 2 of the 3 validation and test texts are also in the training split"):
        finetune.check_held_out(texts, np.array([0, 1]), np.array([2, 3, 4]), "d.csv")


def test_a_text_given_two_labels_is_reported():
    with pytest.warns(UserWarning, match=r"d.csv: 1 text\(s\) appear with different labels \(e.g. 'good' as "
                                         r"\['neg', 'pos'\]\)"):
        finetune.check_held_out(["good", "bad", "good", "fine"], np.array([0, 1]), np.array([2, 3]), "d.csv",
                                ["pos", "neg", "neg", "pos"])


def test_a_label_without_training_rows_is_reported():
    with pytest.warns(UserWarning, match=r"d.csv: label\(s\) \['rare'\] have no training rows"):
        finetune.check_held_out(["a", "b", "c", "d"], np.array([0, 1]), np.array([2, 3]), "d.csv",
                                ["pos", "neg", "pos", "rare"])


def test_data_is_checked_before_any_model_loads(tmp_path):
    for data, task, match in ((tmp_path / "missing.jsonl", "classify", "no such file .built-in sets: bbc-news"),
                              (tmp_path, "classify", "a directory; give a .csv or .jsonl file in it"),
                              (tmp_path, "causal-lm", "a directory; give a text file in it"),
                              (tmp_path / "rows.csv", "causal-lm", "--task causal-lm needs a plain text file"),
                              (tmp_path / "corpus.txt", "classify", "use a .csv or .jsonl file"),
                              ("tweet-sentiment", "causal-lm", "--task causal-lm needs a plain text file")):
        if getattr(data, "name", "") in ("rows.csv", "corpus.txt"):
            data.write_text("text,label\n")
        with pytest.raises(ValueError, match=f"--data {data}: {match}"):
            finetune.Options(data=str(data), task=task, out=str(tmp_path / "out"))


def test_an_adapter_saved_from_python_loads_over_the_class_that_holds_it(bert_dir, tmp_path):
    """Without a job's metadata: the bare model first, then the class config.json names (a hub
    BERT names BertForMaskedLM, whose params sit under 'bert')."""
    config = json.loads((bert_dir / "config.json").read_text())
    (bert_dir / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    bare = tf.FlaxBertModel.from_pretrained(bert_dir)
    lora = jlora.lora_init(jax.random.key(0), bare.params, jlora.LoraConfig(rank=2, targets=["query"]))
    jlora.adapter.save_adapter(tmp_path / "adapter", lora)
    model, _, params, meta = finetune.load_job(tmp_path / "adapter", str(bert_dir))
    assert type(model).__name__ == "FlaxBertModel" and meta == {}
    assert isinstance(params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"], jlora.LoraWeight)


def test_an_adapter_of_a_type_with_no_bare_auto_class_loads_over_its_class(tmp_path):
    """A vision encoder-decoder has no FlaxAutoModel entry: the bare-model try failed the load."""
    vit = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    gpt2 = tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    model = tf.FlaxVisionEncoderDecoderModel(tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2))
    model.save_pretrained(tmp_path / "base")
    lora = jlora.hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query"])).params
    jlora.adapter.save_adapter(tmp_path / "adapter", lora)
    loaded, _, params, _ = finetune.load_job(tmp_path / "adapter", str(tmp_path / "base"), need_tokenizer=False)
    assert type(loaded).__name__ == "FlaxVisionEncoderDecoderModel"
    assert isinstance(params["encoder"]["encoder"]["layer"]["0"]["attention"]["attention"]["query"]["kernel"],
                      jlora.LoraWeight)


def test_load_job_gives_the_metadata_and_weights_of_one_save(bert_dir, tmp_path, monkeypatch):
    """A server reloading a --save-every job's adapter: a save landing while the model loads gave
    the earlier save's metadata (its step, its classes) beside the later save's weights."""
    bare = tf.FlaxBertModel.from_pretrained(bert_dir)
    lora = jlora.lora_init(jax.random.key(0), bare.params, jlora.LoraConfig(rank=2, targets=["query"]))
    save = lambda step: jlora.adapter.save_adapter(  # step s: every b holds s
        tmp_path / "adapter", jax.tree.map(lambda x: x.replace(b=jnp.full_like(x.b, step)) if isinstance(
            x, jlora.LoraWeight) else x, lora, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)),
        metadata={"base_model": str(bert_dir), "step": step})
    save(1)
    load_model = finetune.load_model

    def saved_meanwhile(*args, **kwargs):
        save(2)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(finetune, "load_model", saved_meanwhile)
    _, _, params, meta = finetune.load_job(tmp_path / "adapter")
    b = params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"].b
    assert meta["step"] == 1 and float(b[0, 0]) == 1.0


def test_a_local_directory_named_as_the_default_model_is_the_one_loaded(bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bert_dir.rename(tmp_path / finetune.DEFAULT_MODEL)
    assert finetune.load_model(finetune.DEFAULT_MODEL, "classify")[2] == (tmp_path / finetune.DEFAULT_MODEL).resolve()


def test_a_model_type_without_a_preset_is_told_in_flags():
    assert finetune.as_flags("jlora.hf: no target preset for model type 'distilbert' (presets: bert); pass "
                             "LoraConfig(targets=[...]) or targets='all-linear'").endswith(
        "pass --targets PATTERN ... or --targets all-linear")


def test_a_bias_named_in_targets_is_told_without_options_the_command_lacks():
    params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError) as raised:
        jlora.lora_init(jax.random.key(0), params, jlora.LoraConfig(rank=1, targets=["bias"]))
    told = finetune.as_flags(str(raised.value))
    assert "LoraConfig" not in told and "(jlora finetune trains no bias or norm)" in told


def test_options_of_the_wrong_type_name_their_flag(tmp_path):
    for kw, flag in (({"lr": "1e-3"}, "--lr"), ({"epochs": True}, "--epochs")):
        with pytest.raises(ValueError, match=f"{flag} must be a number > 0"):
            finetune.Options(out=str(tmp_path / "out"), **kw)


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
    ({"rank": 40}, r"^--rank 40 is too large for 'encoder/layer/0/attention/self/query/kernel': it exceeds "
                    r"min\(in=32, out=32\) of its float32\[32,32\] kernel$"),  # no LoraConfig hint: no flag for it
])
def test_bad_lora_options_fail_before_any_training_in_the_flags_words(bert_dir, data_file, tmp_path, monkeypatch,
                                                                   options, match):
    monkeypatch.setattr(finetune, "train", lambda *a, **k: pytest.fail("trained before checking the LoRA options"))
    monkeypatch.setattr(finetune, "read_labelled", lambda *a: pytest.fail("read the data before checking them"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        finetune.classify(finetune.Options(model=str(bert_dir), data=str(data_file), max_length=8, out=str(out),
                                           **options))
    assert not out.exists()
    corpus = tmp_path / "corpus.txt"  # a causal LM's corpus, tokenized whole: minutes for a large one
    corpus.write_text("a text " * 50)
    lm = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(WORDS) + 5, n_positions=64))
    lm.save_pretrained(tmp_path / "lm")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "lm")
    monkeypatch.setattr(finetune, "token_ids", lambda *a: pytest.fail("tokenized the corpus before the checks"))
    with pytest.raises(ValueError, match=r"^--(targets|rank)"):
        finetune.causal_lm(finetune.Options(task="causal-lm", model=str(tmp_path / "lm"), data=str(corpus),
                                            max_length=8, out=str(out), **options))
    with pytest.raises(ValueError, match="not causal"):  # a model that cannot do the task, likewise
        finetune.causal_lm(finetune.Options(task="causal-lm", model=str(bert_dir), data=str(corpus), max_length=8,
                                            out=str(out)))


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


@pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")
def test_classify_sizes_the_head_by_the_encoders_output(data_file, tmp_path):
    """OPT-350m's outputs are word_embed_proj_dim wide (512), not hidden_size (1024)."""
    model = tf.FlaxOPTModel(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                         word_embed_proj_dim=16, vocab_size=len(WORDS) + 5))
    model.save_pretrained(tmp_path / "opt")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "opt")
    finetune.classify(finetune.Options(model=str(tmp_path / "opt"), data=str(data_file), steps=2, batch_size=8,
                                       max_length=8, out=str(tmp_path / "run"), baseline=False, plot=False))
    _, _, params, _ = finetune.load_job(tmp_path / "run" / "adapter", str(tmp_path / "opt"))
    assert params["head"]["kernel"].value.shape[0] == 16


@pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")
def test_pytorch_weights_in_sharded_safetensors_load_as_in_one_file(tmp_path):
    """Large checkpoints ship as model-0000k-of-0000n.safetensors, which HF's Flax loader refuses."""
    import jax
    import torch

    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(WORDS) + 5, n_positions=32))
    lm.generation_config.eos_token_id, lm.generation_config.do_sample = [2, 3], True  # Llama-3-like end tokens
    classifier = tf.BertForSequenceClassification(tf.BertConfig(  # loaded as a bare encoder: head and pooler dropped
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=len(WORDS) + 5))
    notes = logging.handlers.BufferingHandler(capacity=1000)
    logging.getLogger("transformers").addHandler(notes)
    for model, task in ((lm, "causal-lm"), (classifier, "classify")):
        for name, shard in (("one", "1GB"), ("sharded", "20KB")):
            model.save_pretrained(tmp_path / task / name, max_shard_size=shard)
            _tokenizer(tmp_path).save_pretrained(tmp_path / task / name)
        assert len(list((tmp_path / task / "sharded").glob("model-*-of-*.safetensors"))) > 2
        one, _, _ = finetune.load_model(str(tmp_path / task / "one"), task, pooler=False)
        sharded, _, _ = finetune.load_model(str(tmp_path / task / "sharded"), task, pooler=False)
        assert jax.tree.structure(one.params) == jax.tree.structure(sharded.params), task
        jax.tree.map(np.testing.assert_array_equal, sharded.params, one.params)
        if task == "causal-lm":
            assert sharded.generation_config.to_dict() == one.generation_config.to_dict()
    logging.getLogger("transformers").removeHandler(notes)
    assert not [r for r in notes.buffer if "were not used" in r.getMessage()]  # head, pooler left out on purpose
