"""The jlora command end to end on tiny models and data files (the default job on the real model is
the README's first command, not a unit test)."""

import importlib.util
import json
import re
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jlora
import jlora.adapter
from jlora import data, finetune, interrupts
from jlora.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "very", "food", "service"]


def _tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS))
    return tf.BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture
def bert_dir(tmp_path):
    model = tf.FlaxBertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, vocab_size=len(WORDS) + 5))
    model.save_pretrained(tmp_path / "bert")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = i % 2
        words = rng.choice(WORDS[:3] if label else WORDS[3:6], 3).tolist() + ["the", "film"]
        rows.append(json.dumps({"text": " ".join(rng.permutation(words)), "label": ["neg", "pos"][label]}))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows))
    return path


def test_finetune_info_and_merge(bert_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "12", "--batch-size", "8",
                 "--max-length", "8", "--lr", "1e-2", "--out", str(out), "--save-every", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "baseline (frozen encoder + head)" in printed and "LoRA (r=8) + head" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["neg", "pos"] and len(metrics["losses"]["lora"]) == 12
    assert (out / "loss_curve.png").stat().st_size > 1000

    # the classifier back from Python gives the job's own test accuracy on the same split
    texts, names = data.read_labelled(str(data_file))
    test_idx = data.split_indices(len(texts))[2]
    predict = finetune.load_classifier(out / "adapter")
    predicted = predict([texts[i] for i in test_idx])
    assert predict([]) == []
    with pytest.raises(TypeError, match=r"predict takes a list of texts; got one str \(wrap it"):
        predict("good film")
    assert set(predicted) <= {"neg", "pos"}
    accuracy = np.mean([p == names[i] for p, i in zip(predicted, test_idx)])
    assert accuracy == pytest.approx(metrics["lora"]["test_accuracy"])
    base = tf.FlaxBertModel.from_pretrained(bert_dir)
    with pytest.raises(ValueError, match=r"saved by jlora finetune, with the model's params under 'encoder' and head "
                                         r"beside them: load it with jlora.finetune.load_job"):
        jlora.adapter.load_adapter(out / "adapter", base.params)

    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["lora_config"]
    assert saved["targets"] == list(jlora.hf.TARGET_PRESETS["bert"])  # the preset applied, not None
    assert main(["info", str(out)]) == 2  # the run's directory, not its adapter's
    assert f"it is a jlora finetune run: its adapter is {out / 'adapter'}" in capsys.readouterr().err
    assert main(["info", str(out / "adapter")]) == 0
    info = capsys.readouterr().out
    assert "encoder/encoder/layer/0/attention/self/query/kernel" in info and "head/kernel" in info

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(out / "adapter"), "--model", str(bert_dir), "--out", str(merged_dir), "--torch"]) == 0
    printed = capsys.readouterr().out
    assert "(Flax and PyTorch weights)" in printed and "note: head/bias, head/kernel (trained beside the model" in printed
    merged = tf.FlaxBertModel.from_pretrained(merged_dir)
    # the job trains without the pooler; the merged model keeps the base's (not a random one)
    from flax.serialization import msgpack_restore

    saved = msgpack_restore((merged_dir / "flax_model.msgpack").read_bytes())
    np.testing.assert_array_equal(saved["pooler"]["dense"]["kernel"], base.params["pooler"]["dense"]["kernel"])
    lora = jlora.adapter.load_adapter(out / "adapter", {"encoder": base.params, "head": {
        "kernel": np.zeros((32, 2), np.float32), "bias": np.zeros(2, np.float32)}})
    ids = jnp.array([[2, 5, 12, 3]])
    lazy = jlora.apply(base.__call__)(ids, params=lora["encoder"]).last_hidden_state
    np.testing.assert_allclose(merged(ids).last_hidden_state, lazy, rtol=1e-5, atol=1e-5)
    # PyTorch's from_pretrained loads the same directory (its model.safetensors)
    torch = pytest.importorskip("torch")
    in_torch = tf.BertModel.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        hidden = in_torch(torch.tensor(np.asarray(ids))).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, lazy, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer_config.json").is_file()

    # a base directory without a tokenizer merges too (a merge needs the weights), and says so
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in bert_dir.iterdir():
        if f.name in ("config.json", "flax_model.msgpack"):
            (weights_only / f.name).write_bytes(f.read_bytes())
    assert main(["merge", str(out / "adapter"), "--model", str(weights_only), "--out", str(tmp_path / "m2")]) == 0
    assert f"note: {weights_only} has no tokenizer, so the merged model has none" in capsys.readouterr().out
    np.testing.assert_allclose(tf.FlaxBertModel.from_pretrained(tmp_path / "m2")(ids).last_hidden_state, lazy,
                               rtol=1e-5, atol=1e-5)
    (weights_only / "tokenizer.json").write_text("{broken")  # one that does not load is an error, not "none"
    assert main(["merge", str(out / "adapter"), "--model", str(weights_only), "--out", str(tmp_path / "m3")]) == 2
    assert "cannot load its tokenizer" in capsys.readouterr().err


def test_causal_lm_on_a_text_file(tmp_path, capsys):
    model = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(WORDS) + 5,
                                                 n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "gpt2")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(["the film was very good"] * 60))
    code = main(["finetune", "--task", "causal-lm", "--model", str(tmp_path / "gpt2"), "--data", str(text),
                 "--steps", "15", "--batch-size", "4", "--max-length", "16", "--lr", "2e-2", "--out",
                 str(tmp_path / "lm"), "--no-plot"])
    assert code == 0
    metrics = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    assert metrics["last_loss"] < metrics["first_loss"]
    assert json.loads((tmp_path / "lm" / "adapter" / "adapter_config.json").read_text())["targets"]
    lm, _, params, meta = finetune.load_job(tmp_path / "lm" / "adapter")  # the LM back from Python, lazy adapters
    assert meta["task"] == "causal-lm" and any(isinstance(v, jlora.LoraWeight) for v in jax.tree.leaves(
        params, is_leaf=lambda v: isinstance(v, jlora.LoraWeight)))
    assert jlora.apply(lm.__call__)(jnp.array([[5, 6]]), params=params).logits.shape == (1, 2, len(WORDS) + 5)
    with pytest.raises(ValueError, match=r"not a classifier of jlora finetune \(task 'causal-lm'\)"):
        finetune.load_classifier(tmp_path / "lm" / "adapter")
    # an adapter saved from Python, with no job's metadata: merged over the class config.json names
    lora = jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2, targets=["c_attn"]))
    jlora.adapter.save_adapter(tmp_path / "from_python", lora)
    assert main(["merge", str(tmp_path / "from_python"), "--model", str(tmp_path / "gpt2"), "--torch",
                 "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    weights = tmp_path / "merged" / "model.safetensors"
    assert weights.stat().st_mode & 0o044 == (tmp_path / "merged" / "config.json").stat().st_mode & 0o044


def test_merge_takes_a_peft_adapter_as_peft_merges_it(tmp_path, capsys):
    """A PEFT LoRA adapter (made by PEFT on PyTorch) merged by ``jlora merge`` over the base its config
    names: the merged model gives the logits of PEFT's own ``merge_and_unload``."""
    peft, torch = pytest.importorskip("peft"), pytest.importorskip("torch")
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(WORDS) + 5, n_positions=64)
    model = tf.FlaxGPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "gpt2")
    torch.manual_seed(0)
    torch_model = load_flax_weights_in_pytorch_model(tf.GPT2LMHeadModel(config), model.params).eval()
    torch_model.name_or_path = str(tmp_path / "gpt2")  # what PEFT records as base_model_name_or_path
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"],
                                                                  init_lora_weights=False, fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = np.array([[3, 5, 7, 9]])
    with torch.no_grad():
        want = peft_model.merge_and_unload()(torch.tensor(ids)).logits.numpy()
    assert float(np.abs(want - model(ids).logits).max()) > 1e-3  # the adapter matters
    assert main(["merge", str(tmp_path / "peft"), "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    assert "has no tokenizer" in capsys.readouterr().out
    merged = tf.FlaxGPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(merged(ids).logits, want, rtol=1e-4, atol=1e-5)

    config_file = tmp_path / "peft" / "adapter_config.json"  # a base named by its model hub's name
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "openai-community/gpt2"}))
    assert main(["merge", str(tmp_path / "peft"), "--out", str(tmp_path / "m2")]) == 2
    assert "its base model openai-community/gpt2 (recorded at training) is not a directory here or beside the adapter " \
           "(a model hub's name, or a path from the directory PEFT ran in: jlora reads local models only); pass --model " \
           "DIR" in capsys.readouterr().err
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "gpt2"}))
    assert main(["merge", str(tmp_path / "peft"), "--out", str(tmp_path / "beside")]) == 0  # PEFT ran in tmp_path
    assert f"base model: {tmp_path / 'gpt2'} (the adapter's gpt2, found beside it)" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "peft"), "--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "m2")]) == 0
    bare = tmp_path / "no_architectures"  # config.json naming no class: the bare model is loaded, the head's names miss
    shutil.copytree(tmp_path / "gpt2", bare)
    (bare / "config.json").write_text(json.dumps({**json.loads((bare / "config.json").read_text()), "architectures": None}))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "peft"), "--model", str(bare), "--out", str(tmp_path / "m3")]) == 2
    assert ("no_architectures's config.json names no architectures, so the bare model class was loaded "
            '(FlaxGPT2Model): name the class the adapter was trained on there, e.g. "architectures"') in capsys.readouterr().err


def test_errors_are_one_clear_line(bert_dir, data_file, tmp_path, capsys):
    assert main(["finetune", "--model", "/no/such/dir", "--data", str(data_file)]) == 2
    assert "error: --model /no/such/dir: not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["finetune", "--model", str(tmp_path / "empty"), "--data", str(data_file)]) == 2
    assert "has no config.json and no weights (flax_model.msgpack" in capsys.readouterr().err
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    assert main(["finetune", "--model", str(tmp_path / "config_only"), "--data", str(data_file)]) == 2
    assert "config_only has no weights" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": "pos"}\n{"text": "no label"}\n')
    assert main(["finetune", "--model", str(bert_dir), "--data", str(bad), "--steps", "1"]) == 2
    assert "bad.jsonl:2: expected a JSON object with 'text' and 'label'" in capsys.readouterr().err
    few = tmp_path / "few.jsonl"
    few.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    assert main(["finetune", "--model", str(bert_dir), "--data", str(few), "--steps", "1", "--no-plot"]) == 2
    assert "2 examples are too few for the fixed 70/15/15 split" in capsys.readouterr().err
    for option, value in (("--batch-size", "-1"), ("--batch-size", "0"), ("--steps", "-3"), ("--epochs", "0"),
                          ("--max-length", "0"), ("--save-every", "-1"), ("--rank", "0"), ("--alpha", "0")):
        assert main(["finetune", "--model", str(bert_dir), "--data", str(data_file), option, value]) == 2
        assert f"error: {option} must be" in capsys.readouterr().err
    assert main(["finetune", "--task", "causal-lm", "--model", str(bert_dir), "--data", str(data_file)]) == 2
    assert "--task causal-lm needs a plain text file" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "not a jlora adapter directory" in capsys.readouterr().err

    distil = tf.FlaxDistilBertModel(tf.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                        vocab_size=len(WORDS) + 5))
    distil.save_pretrained(tmp_path / "distil")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "distil")
    assert main(["finetune", "--model", str(tmp_path / "distil"), "--data", str(data_file), "--steps", "1"]) == 2
    assert "no target preset for model type 'distilbert'" in capsys.readouterr().err


def test_merge_refuses_to_write_over_the_base_model_or_the_adapter(bert_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "8",
                 "--max-length", "8", "--out", str(out), "--no-baseline", "--no-plot"]) == 0
    before = sorted(p.name for p in bert_dir.iterdir())
    capsys.readouterr()
    for target, what in ((bert_dir, "the base model"), (out / "adapter", "the adapter")):
        assert main(["merge", str(out / "adapter"), "--model", str(bert_dir), "--out", str(target)]) == 2
        assert f"is {what}'s directory; write the merged model to another one" in capsys.readouterr().err
    assert sorted(p.name for p in bert_dir.iterdir()) == before
    (tmp_path / "a_file").write_text("")  # an --out that cannot be made fails before the model loads
    assert main(["merge", str(out / "adapter"), "--model", str(bert_dir), "--out", str(tmp_path / "a_file" / "m")]) == 2
    assert f"{tmp_path / 'a_file'} is a file, not a directory" in capsys.readouterr().err


def test_merge_refuses_an_adapter_for_another_base(bert_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "8",
          "--max-length", "8", "--out", str(out), "--no-plot", "--no-baseline"])
    other = tf.FlaxBertModel(tf.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, vocab_size=len(WORDS) + 5))
    other.save_pretrained(tmp_path / "other")
    _tokenizer(tmp_path).save_pretrained(tmp_path / "other")
    assert main(["merge", str(out / "adapter"), "--model", str(tmp_path / "other"), "--out", str(tmp_path / "m")]) == 2
    assert "adapter for another base model" in capsys.readouterr().err
    roberta = tf.FlaxRobertaModel(tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=len(WORDS) + 5))
    roberta.save_pretrained(tmp_path / "roberta")  # params of the same names and shapes as BERT's
    assert main(["merge", str(out / "adapter"), "--model", str(tmp_path / "roberta"), "--out", str(tmp_path / "m")]) == 2
    assert re.search(r"an adapter for a bert model \(.*bert\), and .*roberta holds a roberta model; give the base it "
                     "was trained over", capsys.readouterr().err)


def _ctrl_c_at_batch(monkeypatch, at):
    """Ctrl-C while the training loops draw their batch number ``at`` (counted per loop)."""
    from jlora import finetune

    real = finetune._batches

    def interrupted(n, batch, rng):
        for i, rows in enumerate(real(n, batch, rng)):
            if i == at:
                raise KeyboardInterrupt
            yield rows

    monkeypatch.setattr(finetune, "_batches", interrupted)


def test_ctrl_c_stops_cleanly_and_keeps_a_loadable_adapter(bert_dir, data_file, tmp_path, monkeypatch, capsys):
    _ctrl_c_at_batch(monkeypatch, 7)
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "50", "--batch-size", "8",
                 "--max-length", "8", "--out", str(out), "--save-every", "5", "--no-baseline", "--no-plot"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["metadata"]["step"] == 7
    base = tf.FlaxBertModel.from_pretrained(bert_dir)
    jlora.adapter.load_adapter(out / "adapter", {"encoder": base.params, "head": {
        "kernel": np.zeros((32, 2), np.float32), "bias": np.zeros(2, np.float32)}})


def test_a_ctrl_c_swallowed_where_it_came_stops_the_job_at_the_next_step(
        bert_dir, data_file, tmp_path, monkeypatch, capsys):
    """A SIGINT that comes inside a callback Python cannot raise from (JAX's garbage-collection
    callback) is only printed there; remembered, it stops the loop at its next step, as one raised does."""
    from jlora import finetune

    real = finetune._batches
    handlers = []

    def swallowed(n, batch, rng):
        for i, rows in enumerate(real(n, batch, rng)):
            if i == 7:
                handlers.append(signal.getsignal(signal.SIGINT))
                interrupts._INTERRUPTED.set()  # what the handler does before its KeyboardInterrupt is lost
            yield rows

    monkeypatch.setattr(finetune, "_batches", swallowed)
    default = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "50", "--batch-size", "8",
                 "--max-length", "8", "--out", str(out), "--no-baseline", "--no-plot"])
    assert code == 130 and "interrupted" in capsys.readouterr().out
    # lost while step 8 drew its batch: step 8 runs, and the loop stops before step 9
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["metadata"]["step"] == 8
    assert signal.getsignal(signal.SIGINT) is default and not interrupts.remembered()
    if default is signal.default_int_handler:  # installed while the job ran
        assert handlers[0] is not default


def test_an_earlier_run_is_kept_unless_overwrite_is_given(bert_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "8",
            "--max-length", "8", "--out", str(out), "--no-baseline"]
    assert main(args) == 0 and (out / "loss_curve.png").exists()
    before = (out / "adapter" / "adapter.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args + ["--seed", "1"]) == 2
    assert "holds an earlier run (adapter, metrics.json, loss_curve.png); pass --overwrite" in capsys.readouterr().err
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == before
    assert main(args + ["--seed", "1", "--overwrite", "--no-plot"]) == 0
    assert (out / "adapter" / "adapter.safetensors").read_bytes() != before
    assert not (out / "loss_curve.png").exists()  # the earlier run's plot does not stay beside new metrics


def test_overwrite_keeps_the_earlier_run_until_the_new_one_saves_and_never_takes_foreign_files(
        bert_dir, data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "2", "--batch-size", "8",
            "--max-length", "8", "--out", str(out)]
    assert main(args + ["--no-baseline", "--no-plot"]) == 0
    earlier = {p.name: p.read_bytes() for p in [out / "metrics.json", *(out / "adapter").iterdir()]}
    _ctrl_c_at_batch(monkeypatch, 1)  # the new run stops in its baseline, before any save
    assert main(args + ["--overwrite", "--seed", "1"]) == 130
    assert {p.name: p.read_bytes() for p in [out / "metrics.json", *(out / "adapter").iterdir()]} == earlier
    _ctrl_c_at_batch(monkeypatch, 0)  # ... or in its first LoRA step (its compile): no step done, nothing saved
    assert main(args + ["--overwrite", "--seed", "1", "--no-baseline"]) == 130
    assert {p.name: p.read_bytes() for p in [out / "metrics.json", *(out / "adapter").iterdir()]} == earlier
    project = tmp_path / "project"
    (project / "adapter").mkdir(parents=True)
    (project / "adapter" / "__init__.py").write_text("# the user's own code")
    capsys.readouterr()
    assert main(args[:-1] + [str(project), "--overwrite"]) == 2
    assert "adapter is not a jlora adapter directory" in capsys.readouterr().err
    assert (project / "adapter" / "__init__.py").read_text() == "# the user's own code"
    killed = tmp_path / "killed"  # a run killed in its first save, before its files were in place
    (killed / "adapter" / ".jlora-write-x1").mkdir(parents=True)
    finetune.Options(model=str(bert_dir), data=str(data_file), out=str(killed), overwrite=True)  # taken as a run's
    finetune.Options(model=str(bert_dir), data=str(data_file), out=str(killed))  # and no earlier run: no --overwrite


def test_merge_finds_its_base_from_anywhere_and_writes_only_into_an_empty_directory(
        bert_dir, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--model", "bert", "--data", str(data_file), "--steps", "2", "--batch-size", "8",
                 "--max-length", "8", "--out", "run", "--no-baseline", "--no-plot"]) == 0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["metadata"]["base_model"] == str(bert_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative "bert" here would be another model, or none
    assert main(["merge", str(tmp_path / "run" / "adapter"), "--out", "merged"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "run" / "adapter"), "--out", "merged"]) == 2
    assert "--out merged: exists and is not empty" in capsys.readouterr().err
    (tmp_path / "bert").rename(tmp_path / "moved")
    assert main(["merge", str(tmp_path / "run" / "adapter"), "--out", "m1"]) == 2
    assert "bert (recorded at training) is not a directory; pass --model DIR" in capsys.readouterr().err
    (tmp_path / "moved").rename(tmp_path / "bert")
    jlora.adapter.save_adapter(tmp_path / "plain", jlora.lora_init(
        jax.random.key(0), tf.FlaxBertModel.from_pretrained(bert_dir).params, jlora.LoraConfig(targets=["query"])))
    assert main(["merge", str(tmp_path / "plain"), "--out", "m2"]) == 2
    assert "the adapter names no base model (it was saved without metadata); pass --model DIR" in capsys.readouterr().err


def test_ctrl_c_in_the_baseline_ends_the_job(bert_dir, data_file, tmp_path, monkeypatch, capsys):
    _ctrl_c_at_batch(monkeypatch, 2)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--steps", "50", "--batch-size", "8",
                 "--max-length", "8", "--out", str(out), "--no-plot"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "adapter").exists()


def test_model_directories_that_cannot_be_used(bert_dir, data_file, tmp_path, capsys):
    args = ["--data", str(data_file), "--steps", "1", "--batch-size", "8", "--no-plot", "--no-baseline"]
    assert main(["finetune", "--model", str(bert_dir), "--max-length", "600", "--out", str(tmp_path / "a")] + args) == 2
    assert "error: --max-length 600: the model has 512 positions" in capsys.readouterr().err
    assert main(["finetune", "--model", str(bert_dir), "--max-length", "2", "--out", str(tmp_path / "a")] + args) == 2
    assert "error: --max-length 2: must be at least 3 (the tokenizer adds 2 special tokens" in capsys.readouterr().err
    for flag in ("-1", str(2**32)):  # jax.random.key keeps 32 bits: 2**32 started as seed 0 did
        assert main(["finetune", "--model", str(bert_dir), "--seed", flag] + args) == 2
        assert "error: --seed must be an integer in [0, 2**32)" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no_tokenizer"
    tf.FlaxBertModel.from_pretrained(bert_dir).save_pretrained(no_tokenizer)
    assert main(["finetune", "--model", str(no_tokenizer), "--out", str(tmp_path / "b")] + args) == 2
    assert "no_tokenizer: cannot load its tokenizer" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in bert_dir.iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes()[:100] if file.name == "flax_model.msgpack" else file.read_bytes())
    assert main(["finetune", "--model", str(corrupt), "--out", str(tmp_path / "c")] + args) == 2
    assert "corrupt: cannot load its Flax weights" in capsys.readouterr().err
    if jax.__version_info__ >= (0, 10) and importlib.util.find_spec("torch"):  # HF's Flax T5 on a JAX it cannot run on
        tf.T5Model(tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=len(WORDS) + 5)
                   ).save_pretrained(tmp_path / "t5")
        assert main(["finetune", "--model", str(tmp_path / "t5"), "--out", str(tmp_path / "d")] + args) == 2
        assert ("t5: HF's Flax code for t5 calls jnp.clip(a_min=/a_max=), which JAX "
                f"{jax.__version__} no longer takes") in capsys.readouterr().err


def test_a_model_without_a_pad_token_classifies(data_file, tmp_path):
    model = tf.FlaxGPT2Model(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(WORDS) + 5, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer = _tokenizer(tmp_path)
    tokenizer.pad_token = None  # as GPT-2's and Llama's tokenizers ship
    tokenizer.save_pretrained(tmp_path / "gpt2")
    assert main(["finetune", "--model", str(tmp_path / "gpt2"), "--data", str(data_file), "--steps", "2",
                 "--batch-size", "8", "--max-length", "8", "--out", str(tmp_path / "run"), "--no-plot",
                 "--no-baseline"]) == 0


def test_an_out_that_cannot_be_created_fails_before_the_model_loads(bert_dir, data_file, tmp_path, monkeypatch,
                                                                    capsys):
    from jlora import finetune

    monkeypatch.setattr(finetune, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    (tmp_path / "a_file").write_text("")
    under_a_file = tmp_path / "a_file" / "run"
    cases = {str(under_a_file): f"error: --out {under_a_file}: {tmp_path / 'a_file'} is a file, not a directory"}
    if sys.platform == "linux":  # /proc takes no new directory, not even root's
        cases["/proc/jlora-run"] = "error: --out /proc/jlora-run: cannot create a directory in /proc"
    for out, error in cases.items():
        assert main(["finetune", "--model", str(bert_dir), "--data", str(data_file), "--out", out]) == 2
        assert error in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """``jlora info ADAPTER | head``: the closed pipe ends the command as it ends others (status
    141, 128 + SIGPIPE), with no error line."""
    import subprocess
    import sys

    lw = lambda i: jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path=f"k{i}")
    jlora.adapter.save_adapter(tmp_path / "ad", {f"k{i}": lw(i) for i in range(5000)})  # more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "info", str(tmp_path / "ad")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"adapter: ")
    proc.stdout.close()  # as head does after its lines
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
