"""Parity with the real PEFT on PyTorch: adapters exported by jlora give the same logits in PEFT,
and adapters made by PEFT give the same logits in jlora."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

import jlora
import jlora.adapter
import jlora.peft
from jlora import hf
from oracle import normal, perturb
from quantized import quantize
from test_hf import TINY

pytestmark = pytest.mark.filterwarnings("ignore")  # torch / transformers / peft chatter
IDS = np.array([[3, 5, 7, 9, 11, 2, 4, 6], [1, 2, 3, 4, 5, 6, 7, 8]])
KEY = jax.random.key(0)
TORCH = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertForSequenceClassification}
# PEFT 0.22 takes a modules_to_save entry as a module's name or its ``.``-suffix, earlier PEFT as any string suffix
PEFT_DOTTED = tuple(int(x) for x in peft.__version__.split(".")[:2]) >= (0, 22)


def pair(model_type, tmp_path):
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    model = TINY[model_type]()
    torch.manual_seed(0)
    torch_model = load_flax_weights_in_pytorch_model(TORCH[model_type](model.config), model.params).eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(model(IDS).logits, want, rtol=1e-4, atol=1e-5)  # same base weights
    return model, torch_model


@pytest.mark.parametrize("model_type", sorted(TORCH))
def test_jlora_adapter_runs_the_same_in_peft(model_type, tmp_path):
    model, torch_model = pair(model_type, tmp_path)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets="all-linear", rank_pattern={"layers/1/**": 2} if model_type == "llama" else None,
                           use_rslora=model_type == "bert")
    got = _same_in_peft(model, torch_model, cfg, tmp_path / "adapter")
    assert float(np.abs(got - model(IDS).logits).max()) > 1e-3  # the adapter matters


def test_jlora_reads_back_the_base_fingerprint_it_writes_beside_peft_s_weights(tmp_path):
    """The fingerprints ride in the weights' header, which PEFT does not read (it loads the file,
    _same_in_peft): read back over a random init of the same shapes, jlora says so."""
    model, torch_model = pair("llama", tmp_path)
    cfg = jlora.LoraConfig(rank=4, targets=["q_proj", "v_proj"])
    _same_in_peft(model, torch_model, cfg, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    other = type(model)(model.config, seed=7).params
    with pytest.warns(UserWarning, match=r"adapter: the base differs from the one the adapter was saved over at 4 of 4 "
                                         r"adapted kernels \(\['model/layers/0/self_attn/q_proj/kernel'"):
        jlora.peft.load_adapter(tmp_path / "adapter", other, model.config)


def _same_in_peft(model, torch_model, cfg, directory):
    """jlora adapters (``cfg``, perturbed) saved in PEFT's format: PEFT's logits equal jlora's."""
    lm = hf.LoraModel(model, cfg, jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(directory, lm.params, model.config)
    peft_model = peft.PeftModel.from_pretrained(torch_model, directory).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, lm(IDS).logits, rtol=1e-4, atol=1e-5)
    return got


@pytest.mark.parametrize("model_type", sorted(TORCH))
def test_peft_adapter_runs_the_same_in_jlora(model_type, tmp_path):
    model, torch_model = pair(model_type, tmp_path)
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[model_type], init_lora_weights=False,
                          use_rslora=True, rank_pattern={targets[model_type][-1]: 2},
                          alpha_pattern={targets[model_type][0]: 16}, fan_in_fan_out=model_type == "gpt2")
    peft_model = peft.get_peft_model(torch_model, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    got = jlora.apply(model.__call__)(IDS, params=params).logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # onto a quantized base (QLoRA): the targets' kernels int8; the oracle is the float base they stand for
    is_target = lambda path: path[-1].key == "kernel" and any(t in str(path) for t in targets[model_type])
    quantized = jax.tree_util.tree_map_with_path(lambda path, x: quantize(x) if is_target(path) else x, model.params)
    on_int8 = jlora.peft.load_adapter(tmp_path / "adapter", quantized, model.config)
    dequantized = jax.tree.map(lambda x: x.materialize() if isinstance(x, jlora.Lazy) else x, quantized,
                               is_leaf=lambda x: isinstance(x, jlora.Lazy))
    on_float = jlora.peft.load_adapter(tmp_path / "adapter", dequantized, model.config)
    lazy_bases = [lw.w for lw in jax.tree.leaves(on_int8, is_leaf=jlora.weight.is_node) if isinstance(lw, jlora.LoraWeight)]
    assert lazy_bases and all(isinstance(w, jlora.Lazy) for w in lazy_bases)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=on_int8).logits,
                               jlora.apply(model.__call__)(IDS, params=on_float).logits, rtol=1e-4, atol=1e-5)


def test_embedding_and_lm_head_adapters_cross_both_ways(tmp_path):
    """PEFT's Embedding LoRA (lora_embedding_A/B) and an adapted LM head, whose base weights PEFT
    saves beside the adapter (save_embedding_layers): checked against the base, not loaded."""
    targets = ["q_proj", "embed_tokens", "lm_head"]
    model, torch_model = pair("llama", tmp_path)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                  init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "from_peft")
    with torch.no_grad():
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)
    assert str(params["model"]["embed_tokens"]["embedding"].layout) == "io"
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)
    assert float(np.abs(want - model(IDS).logits).max()) > 1e-3  # the adapter matters
    resized = {**model.params, "lm_head": {"kernel": model.params["lm_head"]["kernel"] + 0.5}}
    with pytest.raises(ValueError, match="carries a copy of lm_head's base weight .* not base_params' 'lm_head/kernel'"):
        jlora.peft.load_adapter(tmp_path / "from_peft", resized, model.config)

    model, torch_model = pair("llama", tmp_path)
    _same_in_peft(model, torch_model, jlora.LoraConfig(rank=2, targets=targets), tmp_path / "from_jlora")

    # GPT-2 ties wte to its head: PEFT's adapter on it, without ensure_weight_tying, changes only the lookup
    model, torch_model = pair("gpt2", tmp_path)
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["wte"])).save_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match="'transformer/wte/embedding' is tied to the LM head.*ensure_weight_tying=True"):
        jlora.peft.load_adapter(tmp_path / "tied", model.params, model.config)
    # trained whole, the same: PEFT's copy (modules_to_save) changes the lookup only
    peft.get_peft_model(_torch_twin(model, tf.GPT2LMHeadModel), peft.LoraConfig(
        r=2, target_modules=["c_attn"], modules_to_save=["wte"])).save_pretrained(tmp_path / "tied_whole")
    with pytest.raises(ValueError, match="'transformer/wte/embedding' is tied to the LM head"):
        jlora.peft.load_adapter(tmp_path / "tied_whole", model.params, model.config)


TINY_GEMMA = lambda: tf.FlaxGemmaForCausalLM(tf.GemmaConfig(  # ties its LM head to embed_tokens, in Flax too
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, vocab_size=64, max_position_embeddings=32))


@pytest.mark.parametrize("whole", [False, True])
def test_a_tied_embedding_crosses_both_ways_with_ensure_weight_tying(whole, tmp_path):
    """PEFT's ensure_weight_tying ties the LM head to embed_tokens' adapter (its factors transposed,
    at its scale) or trained copy: what Flax computes, whose head is the embedding. Both were refused."""
    model = TINY_GEMMA()
    assert "lm_head" not in model.params
    placed = dict(modules_to_save=["embed_tokens"]) if whole else dict(target_modules=["q_proj", "embed_tokens"])
    peft_model = peft.get_peft_model(_torch_twin(model, tf.GemmaForCausalLM), peft.LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, ensure_weight_tying=True, **{"target_modules": ["q_proj"], **placed}))
    _perturb_saved_modules(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "from_peft")
    want = _torch_out(peft_model, input_ids=IDS)
    params = jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-4)
    assert "ensure_weight_tying: PEFT ties the LM head" in jlora.peft.describe(tmp_path / "from_peft")

    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["q_proj"] if whole else ["q_proj", "embed_tokens"],
                                              trainable=["embed_tokens"] if whole else None), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "from_jlora", lm.params, model.config)
    assert json.loads((tmp_path / "from_jlora" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    want = np.asarray(jlora.apply(model.__call__)(IDS, params=lm.params).logits)
    assert float(np.abs(want - model(IDS).logits).max()) > 1e-3  # the change matters
    got = _torch_out(peft.PeftModel.from_pretrained(_torch_twin(model, tf.GemmaForCausalLM), tmp_path / "from_jlora"),
                     input_ids=IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    # the head's copy must be the embedding's: the Flax model cannot hold another
    tensors = load_file(tmp_path / "from_peft" / "adapter_model.safetensors")
    key = "base_model.model.lm_head." + ("weight" if whole else "lora_A.weight")
    tensors[key] = tensors[key] + 0.5
    from safetensors.numpy import save_file
    save_file(tensors, tmp_path / "from_peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key[len('base_model.model.'):]} is PEFT's copy of model.embed_tokens's .* differs"):
        jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)


def test_a_tied_wte_round_trips_where_the_position_table_has_as_many_rows(tmp_path):
    """n_positions == vocab_size (a character model): wpe has a vocabulary's rows too, and was taken
    for the table the head is tied to, refusing jlora's own file; the word embedding is wte."""
    model = tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=64))
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn", "wte"]), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "ad", lm.params, model.config)
    loaded = jlora.peft.load_adapter(tmp_path / "ad", model.params, model.config)
    jax.tree.map(np.testing.assert_array_equal, jlora.split(loaded)[0], jlora.split(lm.params)[0])


def test_gpt2s_tied_wte_crosses_as_peft_reloads_it(tmp_path):
    """PEFT ties GPT-2's head to wte only where its config names lm_head (ensure_weight_tying looks
    for embed_tokens or lm_head): jlora writes that, and PEFT runs its outputs; a file PEFT saved
    with only 'transformer.wte' there PEFT reloads untied, and jlora refuses it, saying why."""
    model, torch_model = pair("gpt2", tmp_path)
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn", "wte"]), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "from_jlora", lm.params, model.config)
    assert "lm_head" in json.loads((tmp_path / "from_jlora" / "adapter_config.json").read_text())["target_modules"]
    want = np.asarray(jlora.apply(model.__call__)(IDS, params=lm.params).logits)
    got = _torch_out(peft.PeftModel.from_pretrained(torch_model, tmp_path / "from_jlora"), input_ids=IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jlora.apply(model.__call__)(
        IDS, params=jlora.peft.load_adapter(tmp_path / "from_jlora", model.params, model.config)).logits, want, rtol=1e-5, atol=1e-6)

    peft.get_peft_model(_torch_twin(model, tf.GPT2LMHeadModel), peft.LoraConfig(
        r=2, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True)).save_pretrained(tmp_path / "from_peft")
    with pytest.raises(ValueError, match="names neither embed_tokens nor lm_head .* PEFT reloads it untied"):
        jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)
    # wte itself in modules_to_save: PEFT ties nothing (it warns), and trains the lookup's copy alone
    peft.get_peft_model(_torch_twin(model, tf.GPT2LMHeadModel), peft.LoraConfig(
        r=2, target_modules=["c_attn"], modules_to_save=["wte"], ensure_weight_tying=True)).save_pretrained(tmp_path / "mts")
    with pytest.raises(ValueError, match="PEFT tied nothing to an embedding it names otherwise than embed_tokens in "
                                         "modules_to_save: it trained that copy for the lookup alone"):
        jlora.peft.load_adapter(tmp_path / "mts", model.params, model.config)
    # trained whole, the same config names 'transformer.wte' alone too, but PEFT saves the head's weight (the trained
    # copy) beside it, which its reload loads into the head, the base wte's weight: tied, as jlora reads it
    params, peft_model = _read_as_peft_runs_it(model, tf.GPT2LMHeadModel, tmp_path / "whole", target_modules=["c_attn"],
                                               modules_to_save=["lm_head"], ensure_weight_tying=True)
    assert json.loads((tmp_path / "whole" / "adapter_config.json").read_text())["modules_to_save"] == ["transformer.wte"]
    reloaded = _torch_out(peft.PeftModel.from_pretrained(_torch_twin(model, tf.GPT2LMHeadModel), tmp_path / "whole"),
                          input_ids=IDS)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, reloaded, rtol=1e-4, atol=1e-5)
    assert float(np.abs(reloaded - model(IDS).logits).max()) > 1e-2  # the head's change matters


@pytest.mark.parametrize("architectures", [None, ["RobertaForMaskedLM"]])
def test_a_classifiers_embedding_is_no_tied_one_whatever_architectures_says(architectures, tmp_path):
    """A classifier has no LM head, whatever tie_word_embeddings (on by default) says; its config's
    architectures may be unset or name the checkpoint's pre-training class (roberta-base's). Its
    adapted embedding was refused as tied, both ways."""
    model = _tiny_roberta_classifier()
    model.config.architectures = architectures
    _read_as_peft_runs_it(model, tf.RobertaForSequenceClassification, tmp_path / "from_peft",
                          target_modules=["query", "word_embeddings"], task_type="SEQ_CLS")
    cfg = jlora.LoraConfig(rank=2, targets=["query", "word_embeddings"], trainable=["classifier"])
    _same_in_peft(model, _torch_twin(model, tf.RobertaForSequenceClassification), cfg, tmp_path / "from_jlora")
    saved = json.loads((tmp_path / "from_jlora" / "adapter_config.json").read_text())
    assert "lm_head" not in str(saved["target_modules"]) and not saved.get("ensure_weight_tying")


def test_an_embedding_of_a_model_type_without_lm_heads_is_no_tied_one(tmp_path):
    """No CLIP class has an LM head: its text tower's token embedding was refused as tied."""
    model = tf.FlaxCLIPTextModel(tf.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=64, max_position_embeddings=16))
    peft_model = peft.get_peft_model(_torch_twin(model, tf.CLIPTextModel), peft.LoraConfig(
        r=2, target_modules=["q_proj", "token_embedding"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "from_peft")
    params = jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)
    got = jlora.apply(model.__call__)(IDS, params=params).last_hidden_state
    np.testing.assert_allclose(got, _torch_out(peft_model, input_ids=IDS), rtol=1e-4, atol=1e-5)
    jlora.peft.save_adapter(tmp_path / "from_jlora", params, model.config)
    np.testing.assert_allclose(_torch_out(peft.PeftModel.from_pretrained(_torch_twin(model, tf.CLIPTextModel),
                                                                         tmp_path / "from_jlora"), input_ids=IDS),
                               got, rtol=1e-4, atol=1e-5)
    # a type transformers does not know (remote code, or newer) is taken at its tie_word_embeddings' word
    remote = type("RemoteConfig", (tf.PretrainedConfig,), {"model_type": "remote-lm"})(vocab_size=64)
    with pytest.raises(ValueError, match=r"^'wte/embedding' is tied to the LM head"):
        jlora.peft._check_untied("'wte/embedding'", "wte/embedding", remote, {"wte/embedding": (64, 32)})


def test_adapters_of_several_dropout_rates_are_saved_at_the_highest_with_a_warning(tmp_path):
    model = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn", "c_fc"], dropout=0.1), jax.random.key(0))
    params = jax.tree.map(lambda x: x.replace(dropout=0.3) if getattr(x, "path", "").endswith("c_attn/kernel") else x, lm.params,
                          is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.warns(UserWarning, match=r"one lora_dropout: saved 0.3, the highest, though adapters here have 0.1 too"):
        jlora.peft.save_adapter(tmp_path / "a", params, model.config)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.peft.save_adapter(tmp_path / "b", lm.params, model.config)


def test_info_counts_trained_biases_as_peft_does_beside_a_classifier_head(tmp_path):
    """bias="all" with a classifier trained whole: PEFT saves the head's frozen original too
    (``original_module``), a copy, not a trained bias."""
    model = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                           intermediate_size=64, vocab_size=50, num_labels=3))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                                                            bias="all"))
    peft_model.save_pretrained(tmp_path / "adapter")
    counts = re.search(r"parameters: ([\d,]+) LoRA \+ ([\d,]+) fully trained", jlora.peft.describe(tmp_path / "adapter"))
    assert sum(int(n.replace(",", "")) for n in counts.groups()) == peft_model.get_nb_trainable_parameters()[0]


def test_a_tied_head_read_onto_a_flax_model_with_its_own_lm_head_is_warned_of(tmp_path):
    """HF's Flax Llama keeps an lm_head of its own whatever tie_word_embeddings says: PEFT's tied
    adapters on embed_tokens and lm_head load as two, equal (PEFT's logits), which training moves apart."""
    model = tf.FlaxLlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                                   max_position_embeddings=32, tie_word_embeddings=True))
    embedding = model.params["model"]["embed_tokens"]["embedding"]
    model.params = {**model.params, "lm_head": {"kernel": embedding.T}}  # tied, as PyTorch's is
    peft_model = peft.get_peft_model(_torch_twin(model, tf.LlamaForCausalLM), peft.LoraConfig(
        r=2, target_modules=["q_proj", "embed_tokens", "lm_head"], init_lora_weights=False, ensure_weight_tying=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match=r"PEFT ties the LM head's adapter to the input embedding's .*, but this Flax "
                                         r"model keeps an LM head of its own \('lm_head/kernel'\): read as two values"):
        params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits,
                               _torch_out(peft_model.eval(), input_ids=IDS), rtol=1e-4, atol=1e-5)


def test_info_names_the_named_adapters_beside_the_default_one(tmp_path):
    """PEFT saves adapters other than "default" in subdirectories named after them: jlora info on the
    directory describes the default one, and says the others are there."""
    model = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn"]), jax.random.key(0))
    path = jlora.peft.save_adapter(tmp_path / "adapters", lm.params, model.config)
    assert "named adapters" not in jlora.peft.describe(path)
    jlora.peft.save_adapter(path / "other", lm.params, model.config)
    assert jlora.peft.describe(path).endswith(f"named adapters beside it: other (jlora info {path / 'other'})")


def test_another_models_config_is_refused(tmp_path):
    """The config decides how factors are read (GPT-2's Conv1D is stored transposed): a Llama
    config over GPT-2's params loaded a square c_proj's adapter transposed, silently."""
    model, torch_model = pair("gpt2", tmp_path)
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["c_proj"], init_lora_weights=False)
                        ).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"hf_config \(llama, vocab_size 32000\) is not base_params' config: their "
                                         r"embedding tables have \[.*\] rows"):
        jlora.peft.load_adapter(tmp_path / "a", model.params, tf.LlamaConfig())
    vocab = model.config.vocab_size  # the same vocabulary: told by the tables' width, or by no model type at all
    with pytest.raises(ValueError, match=r"hf_config \(llama, hidden_size 4096\) is not base_params' config: their "
                                         r"embedding tables have \[32\] columns"):
        jlora.peft.load_adapter(tmp_path / "a", model.params, tf.LlamaConfig(vocab_size=vocab))
    with pytest.raises(ValueError, match=r"hf_config names no model_type \(a bare PretrainedConfig\)"):
        jlora.peft.load_adapter(tmp_path / "a", model.params, tf.PretrainedConfig(vocab_size=vocab))
    # saving with another size's config wrote a file that no load onto these params takes
    params = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_proj"]), jax.random.key(0)).params
    wider = tf.GPT2Config(n_embd=48, n_layer=1, n_head=2, vocab_size=vocab)
    with pytest.raises(ValueError, match=r"save_adapter: hf_config \(gpt2, hidden_size 48\) is not params' config: "
                                         r"their embedding tables have \[32\] columns"):
        jlora.peft.save_adapter(tmp_path / "b", params, wider)
    assert not (tmp_path / "b").exists()


def test_a_head_tied_to_the_input_embedding_is_named_as_tied(tmp_path):
    """GPT-2's Flax model has no lm_head of its own: a PEFT adapter that trains it whole
    (modules_to_save) was refused as for 'another base model'."""
    model, torch_model = pair("gpt2", tmp_path)
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
                        ).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="holds tensors for lm_head, which the Flax model ties to its input embedding"):
        jlora.peft.load_adapter(tmp_path / "head", model.params, model.config)


def test_the_base_copy_of_a_biased_head_is_checked_not_refused(tmp_path):
    """GPT-J's LM head has a bias: adapted, PEFT saves its base weight and bias beside the adapter
    (save_embedding_layers="auto"); the bias's copy was refused as an unexpected tensor."""
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    model = TINY["gptj"]()
    torch.manual_seed(0)
    torch_model = load_flax_weights_in_pytorch_model(tf.GPTJForCausalLM(model.config), model.params).eval()
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                                  init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "head")
    assert any(k.endswith("lm_head.base_layer.bias") for k in load_file(tmp_path / "head" / "adapter_model.safetensors"))
    with torch.no_grad():
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "head", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-4)
    shifted = {**model.params, "lm_head": {**model.params["lm_head"], "bias": model.params["lm_head"]["bias"] + 0.5}}
    with pytest.raises(ValueError, match="carries a copy of lm_head's base bias .* not base_params' 'lm_head/bias'"):
        jlora.peft.load_adapter(tmp_path / "head", shifted, model.config)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_base_copies_of_embeddings_and_heads_it_did_not_adapt_are_checked_not_refused(model_type, tmp_path):
    """save_embedding_layers=True also writes the base weights of an embedding and a head that are
    no target, under their plain names (GPT-2's head, tied to wte, too)."""
    model, torch_model = pair(model_type, tmp_path)
    target = {"llama": "q_proj", "gpt2": "c_attn"}[model_type]
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=[target], init_lora_weights=False))
    peft_model.eval().save_pretrained(tmp_path / "copies", save_embedding_layers=True)
    assert any(k.endswith("lm_head.weight") for k in load_file(tmp_path / "copies" / "adapter_model.safetensors"))
    with torch.no_grad():
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "copies", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)
    table = {"llama": ("model", "embed_tokens"), "gpt2": ("transformer", "wte")}[model_type]
    resized = jax.tree.map(lambda x: x, model.params)
    resized[table[0]][table[1]]["embedding"] = resized[table[0]][table[1]]["embedding"] + 0.5
    with pytest.raises(ValueError, match=f"carries a copy of {'.'.join(table)}'s base weight .* not base_params'"):
        jlora.peft.load_adapter(tmp_path / "copies", resized, model.config)


@pytest.mark.parametrize("case", ["llama-tied-config", "bert-model", "bert-classifier"])
def test_an_embedding_nothing_ties_crosses_both_ways_whatever_the_config_says(case, tmp_path):
    """Flax's Llama keeps its own lm_head whatever tie_word_embeddings says; a bare BertModel or a
    classifier (by its architectures) has no LM head: their embeddings' adapters cross (they were
    refused as tied)."""
    bert = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    model, torch_class, embedding = {
        "llama-tied-config": (lambda: tf.FlaxLlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64, max_position_embeddings=32, tie_word_embeddings=True)), tf.LlamaForCausalLM, "embed_tokens"),
        "bert-model": (lambda: tf.FlaxBertModel(tf.BertConfig(architectures=["BertModel"], **bert)),
                       tf.BertModel, "word_embeddings"),
        "bert-classifier": (lambda: tf.FlaxBertForSequenceClassification(tf.BertConfig(
            architectures=["BertForSequenceClassification"], num_labels=3, **bert)),
            tf.BertForSequenceClassification, "word_embeddings"),
    }[case]
    model = model()
    if case == "llama-tied-config":  # PyTorch's head is the embedding; Flax's its own kernel, as loaded from PyTorch
        model.params = {**model.params, "lm_head": {"kernel": model.params["model"]["embed_tokens"]["embedding"].T}}
    torch_model = _torch_twin(model, torch_class)
    np.testing.assert_allclose(_torch_out(torch_model, input_ids=IDS), model(IDS)[0], rtol=1e-4, atol=1e-5)
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=[embedding]), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "from_jlora", lm.params, model.config, task_type=None)
    want = np.asarray(jlora.apply(model.__call__)(IDS, params=lm.params)[0])
    got = _torch_out(peft.PeftModel.from_pretrained(_torch_twin(model, torch_class), tmp_path / "from_jlora").eval(),
                     input_ids=IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=[embedding], init_lora_weights=False)
                        ).save_pretrained(tmp_path / "from_peft")
    params = jlora.peft.load_adapter(tmp_path / "from_peft", model.params, model.config)
    assert isinstance(jax.tree.leaves(params, is_leaf=jlora.weight.is_node)[0], (jlora.LoraWeight, jax.Array))
    assert any(isinstance(x, jlora.LoraWeight) and x.path.endswith(f"{embedding}/embedding")
               for x in jax.tree.leaves(params, is_leaf=jlora.weight.is_node))


def test_unsupported_and_broken_adapters_are_refused(tmp_path):
    model, torch_model = pair("llama", tmp_path)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(torch_model, cfg).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        jlora.peft.load_adapter(tmp_path / "dora", model.params, model.config)
    other = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2), jax.random.key(0))
    jlora.peft.save_adapter(tmp_path / "ok", lm.params, model.config)
    with pytest.raises(ValueError, match="another base model"):
        jlora.peft.load_adapter(tmp_path / "ok", other.params, other.config)
    # the same model a level down or up: PEFT on the bare LlamaModel, read onto the causal LM and back
    with pytest.raises(ValueError, match=r"no Flax param 'model/layers/0/self_attn/q_proj/kernel' .*; the base has "
                                         r"'layers/0/self_attn/q_proj/kernel': the adapter was saved from a model "
                                         r"with a head around this one \(its names start 'model.'\)"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params["model"], model.config)
    peft.get_peft_model(tf.LlamaModel(model.config), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "bare")
    with pytest.raises(ValueError, match=r"no Flax param 'layers/0/self_attn/q_proj/kernel' .*; the base has it under "
                                         r"'model': the adapter was saved from the model without its head"):
        jlora.peft.load_adapter(tmp_path / "bare", model.params, model.config)
    plain = jlora.lora_init(jax.random.key(0), other.params, jlora.LoraConfig(rank=2, targets=["c_attn"]))
    with pytest.raises(ValueError, match=r"layout 'io' does not match gpt2's PyTorch layout: its Flax kernel is "
                                         r"\(out, in\), layout 'oi'; make the adapters with jlora.hf.lora_init, .* "
                                         r"LoraConfig\(layouts=\{'c_attn': 'oi'\}\)"):
        jlora.peft.save_adapter(tmp_path / "gpt2", plain, other.config)
    # options jlora cannot represent, from a newer PEFT or edited in, are refused, never dropped
    _, torch_model = pair("llama", tmp_path)
    alora = peft.LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=[9, 10], task_type="CAUSAL_LM")
    peft.get_peft_model(torch_model, alora).save_pretrained(tmp_path / "alora")
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[9, 10\] is not supported"):
        jlora.peft.load_adapter(tmp_path / "alora", model.params, model.config)
    config_file = tmp_path / "ok" / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for change, match in (({"use_something_new": True}, "use_something_new=True is not supported"),
                          ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changes the base"),
                          ({"init_lora_weights": "lora_ga", "lora_ga_config": {"direction": "ArB2r"}},
                           "init_lora_weights='lora_ga' changes the base .*path_initial_model_for_weight_conversion"),
                          ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
                           "'loftq' changes the base .*PEFT cannot convert LoftQ's adapter"),
                          ({"r": None}, "'r' must be a number > 0, got None"),
                          ({"lora_dropout": 1.5}, r"'lora_dropout' must be in \[0, 1\), got 1.5"),
                          ({"alpha_pattern": {"q_proj": -4}}, "'alpha_pattern' must map patterns to numbers > 0"),
                          ({"rank_pattern": {"q_proj": "2"}}, "'rank_pattern' must map patterns to numbers > 0"),
                          ({"rank_pattern": ["q_proj"]}, "'rank_pattern' must map patterns to numbers > 0"),
                          ({"use_rslora": "yes"}, "'use_rslora' must be true or false, got 'yes'")):
        config_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    for init in ("orthogonal", "mica", "gaussian", False):  # these only set A and B: read as they are
        config_file.write_text(json.dumps({**good, "init_lora_weights": init}))
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    for made_by in ("lora_ga_config", "corda_config"):  # left by PEFT's conversion of such an adapter to plain LoRA
        config_file.write_text(json.dumps({**good, "init_lora_weights": True, made_by: {"some": "record"}}))
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    config_file.write_text(json.dumps({**good, "lora_dropout": None}))  # PEFT's own reading: no dropout
    loaded = jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    assert {x.dropout for x in jax.tree.leaves(loaded, is_leaf=jlora.weight.is_node) if isinstance(x, jlora.LoraWeight)} == {0.0}
    config_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    config_file.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="base_params holds jlora nodes"):  # onto adapters: they would apply twice
        jlora.peft.load_adapter(tmp_path / "ok", lm.params, model.config)
    with pytest.raises(ValueError, match="jlora.peft.save_adapter: '.*' comes from the frozen half of jlora.split"):
        jlora.peft.save_adapter(tmp_path / "frozen", jlora.split(lm.params)[1], model.config)
    jlora.adapter.save_adapter(tmp_path / "jlora_format", lm.params)
    with pytest.raises(ValueError, match="holds a jlora adapter .adapter.safetensors., whose adapter_config.json"):
        jlora.peft.save_adapter(tmp_path / "jlora_format", lm.params, model.config)
    with pytest.raises(ValueError, match="a jlora adapter, not a PEFT one: read it with jlora.adapter.load_adapter"):
        jlora.peft.load_adapter(tmp_path / "jlora_format", model.params, model.config)
    for not_a_config in (model, type(model.config), model.config.to_dict()):
        with pytest.raises(ValueError, match="hf_config must be the model's transformers config, e.g. model.config"):
            jlora.peft.save_adapter(tmp_path / "cfg", lm.params, not_a_config)
        with pytest.raises(ValueError, match="hf_config must be the model's transformers config, e.g. model.config"):
            jlora.peft.load_adapter(tmp_path / "ok", model.params, not_a_config)
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "ok" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(weights))
    with pytest.raises(ValueError, match="unexpected tensor .* .PEFT's keys start with 'base_model.model.'"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    weights.rename(tmp_path / "ok" / "adapter_model.bin")  # what PEFT writes with safe_serialization=False
    with pytest.raises(ValueError, match="holds adapter_model.bin .PyTorch pickle.; jlora reads adapter_model.safetensors"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    (tmp_path / "ok" / "adapter_model.bin").unlink()
    save_file({k: np.full_like(v, np.nan) if "lora_A" in k else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: NaN or inf in \['base_model.model.*lora_A.weight', "
                                         r".*\(a diverged run, or a damaged file\); nothing is loaded"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    diverged = jax.tree.map(lambda x: x.replace(a=x.a * jnp.inf) if isinstance(x, jlora.LoraWeight) else x, lm.params,
                            is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.raises(ValueError, match=r"jlora.peft.save_adapter: NaN or inf in .*; no adapter is written"):
        jlora.peft.save_adapter(tmp_path / "diverged", diverged, model.config)
    assert not (tmp_path / "diverged").exists()
    save_file({k: v.astype(np.int32) if "lora_A" in k else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(ValueError, match="is int32; LoRA factors are floating point"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    save_file({k: v[..., None] if "lora_A" in k else v for k, v in tensors.items()}, str(weights))  # Conv1d's
    with pytest.raises(ValueError, match=r"lora_A \(2, 64, 1\) is a 1-D conv's; jlora reads PEFT's Linear, Embedding"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    # one whose Flax kernel has another name (wav2vec2's weight-normed conv): still a 1-D conv's
    save_file({k.replace("q_proj", "pos_conv"): v[..., None] if "lora_A" in k else v for k, v in tensors.items()},
              str(weights))
    with pytest.raises(ValueError, match=r"pos_conv'?: lora_A \(2, 64, 1\) is a 1-D conv's"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)
    (tmp_path / "named").mkdir()
    (tmp_path / "dora").rename(tmp_path / "named" / "mine")  # PEFT saves an adapter not named "default" so
    with pytest.raises(ValueError, match=r"no adapter_config.json: .*it holds named adapters .*: load one of \['mine'\]"):
        jlora.peft.load_adapter(tmp_path / "named", model.params, model.config)
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(ValueError, match="cannot read adapter weights"):
        jlora.peft.load_adapter(tmp_path / "ok", model.params, model.config)


def test_trained_biases_cross_both_ways(tmp_path):
    model, torch_model = pair("gpt2", tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, bias="all",
                          fan_in_fan_out=True)
    peft_model = peft.get_peft_model(torch_model, cfg).eval()
    with torch.no_grad():
        for layer in peft_model.base_model.model.transformer.h:
            layer.mlp.c_fc.bias.add_(0.1)   # a bias of a module without LoRA
            layer.attn.c_attn.bias.add_(-0.2)
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    peft_model.save_pretrained(tmp_path / "adapter")
    counts = re.search(r"parameters: ([\d,]+) LoRA \+ ([\d,]+) fully trained;", jlora.peft.describe(tmp_path / "adapter"))
    assert sum(int(n.replace(",", "")) for n in counts.groups()) == peft_model.get_nb_trainable_parameters()[0]
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    assert isinstance(params["transformer"]["h"]["0"]["mlp"]["c_fc"]["bias"], jlora.Trainable)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)

    jlora.peft.save_adapter(tmp_path / "back", params, model.config)
    assert '"bias": "all"' in (tmp_path / "back" / "adapter_config.json").read_text()
    _, fresh = pair("gpt2", tmp_path)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(IDS)).logits.numpy(), want, rtol=1e-4, atol=1e-5)


def test_an_adapter_on_some_layers_only_runs_the_same_in_jlora(tmp_path):
    """layers_to_transform picked the layers when PEFT made the adapter; the file's keys say which."""
    model, torch_model = pair("llama", tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          layers_to_transform=[1], layers_pattern="layers")
    peft_model = peft.get_peft_model(torch_model, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    adapted = [lw.path for lw in jax.tree.leaves(params, is_leaf=jlora.weight.is_node) if isinstance(lw, jlora.LoraWeight)]
    assert adapted == ["model/layers/1/self_attn/q_proj/kernel", "model/layers/1/self_attn/v_proj/kernel"]
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)


def test_bf16_adapters_cross_both_ways(tmp_path):
    """A PEFT model cast to bf16 saves bf16 factors (numpy does not count bfloat16 as a float
    dtype); jlora reads them, and writes its own bf16 factors for PEFT. The oracle: PEFT with the
    same bf16 factors held in an f32 model."""
    model, torch_model = pair("llama", tmp_path)
    # with the embedding: PEFT saves its base weight beside the adapter, in bf16 too
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    peft.get_peft_model(torch_model, cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, fresh = pair("llama", tmp_path)
    on_f32 = peft.PeftModel.from_pretrained(fresh, tmp_path / "bf16").eval()  # bf16 values in f32 layers
    with torch.no_grad():
        want = on_f32(torch.tensor(IDS)).logits.numpy()
    params = jlora.peft.load_adapter(tmp_path / "bf16", model.params, model.config)
    lw = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert (lw.a.dtype, lw.b.dtype) == (jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)
    jlora.peft.save_adapter(tmp_path / "back", params, model.config)
    from safetensors.numpy import load_file
    assert {str(t.dtype) for t in load_file(tmp_path / "back" / "adapter_model.safetensors").values()} == {"bfloat16"}
    _, fresh = pair("llama", tmp_path)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.tensor(IDS)).logits.numpy(), want, rtol=1e-4, atol=1e-5)


def test_modules_to_save_cross_both_ways(tmp_path):
    """A task head PEFT trains whole (modules_to_save) is a Trainable module in jlora."""
    model, torch_model = pair("bert", tmp_path)
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=4, targets=["query", "value"], trainable=["classifier"]),
                      jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    head = params["classifier"]
    params["classifier"] = {"kernel": jlora.Trainable(head["kernel"].value + 0.3), "bias": jlora.Trainable(head["bias"].value - 0.2)}
    jlora.peft.save_adapter(tmp_path / "out", params, model.config)
    assert '"classifier"' in (tmp_path / "out" / "adapter_config.json").read_text()
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "out").eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, lm(IDS, params=params).logits, rtol=1e-4, atol=1e-5)

    for bias in ("none", "all"):  # with "all", PEFT also writes the head's biases under its wrapper's names
        _, fresh = pair("bert", tmp_path)
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False,
                              modules_to_save=["classifier"], bias=bias)
        peft_model = peft.get_peft_model(fresh, cfg).eval()
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
            peft_model.base_model.model.classifier.modules_to_save["default"].bias.add_(-0.3)
            if bias == "all":  # a trained bias outside the LoRA targets, saved by bias="all"
                peft_model.base_model.model.bert.encoder.layer[0].intermediate.dense.bias.add_(0.2)
            want = peft_model(torch.tensor(IDS)).logits.numpy()
        peft_model.save_pretrained(tmp_path / bias)
        loaded = jlora.peft.load_adapter(tmp_path / bias, model.params, model.config)
        assert isinstance(loaded["classifier"]["kernel"], jlora.Trainable)
        got = jlora.apply(model.__call__)(IDS, params=loaded).logits
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainable", [["classifier", "key/bias"], ["classifier", "query/bias"], ["classifier/kernel"],
                                       ["classifier", "attention/output/LayerNorm/scale"], ["classifier", "bias"]])
def test_leaves_peft_would_train_beyond_the_adapters_are_warned_of(trainable, tmp_path):
    """PEFT's modes are coarser than LoraConfig(trainable=...): bias="all" or "lora_only", whole modules.
    Counted against PEFT itself: the tensors it trains beyond those jlora trained."""
    model, torch_model = pair("bert", tmp_path)
    params = hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=4, targets=["query", "value"], trainable=trainable))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        jlora.peft.save_adapter(tmp_path / "out", params, model.config)
    wider = [str(w.message) for w in seen if "these adapters kept frozen" in str(w.message)]
    assert all(w.filename == __file__ for w in seen if "these adapters kept frozen" in str(w.message))  # the caller's line
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "out", is_trainable=True)
    in_peft = sum(p.requires_grad for p in peft_model.parameters())
    in_jlora = len(jax.tree.leaves(jlora.split(params)[0]))
    if in_peft > in_jlora:
        assert len(wider) == 1 and f"PEFT trains {in_peft - in_jlora} leaves these adapters kept frozen" in wider[0]
    else:
        assert in_peft == in_jlora and not wider


MORE_TORCH = {"mistral": tf.MistralForCausalLM, "gemma": tf.GemmaForCausalLM, "opt": tf.OPTForCausalLM,
              "gpt_neo": tf.GPTNeoForCausalLM, "gptj": tf.GPTJForCausalLM, "bloom": tf.BloomForCausalLM,
              "roberta": tf.RobertaModel, "bart": tf.BartForConditionalGeneration, "vit": tf.ViTModel}


@pytest.mark.parametrize("model_type", sorted(MORE_TORCH))
def test_every_preset_model_type_maps_its_names_to_peft(model_type, tmp_path):
    """Flax param paths and PyTorch module names agree for every preset: the exported adapter
    gives the same outputs in PEFT."""
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
    from test_hf import first_output

    model = TINY[model_type]()
    torch.manual_seed(0)
    torch_model = load_flax_weights_in_pytorch_model(MORE_TORCH[model_type](model.config), model.params).eval()
    inputs = hf.example_inputs(model)
    if "input_ids" in inputs:
        inputs = {"input_ids": IDS}
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, alpha=4, targets="all-linear"), jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "adapter", params, model.config)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = first_output(peft_model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()}))
    want = first_output(lm(**inputs, params=params))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert float(np.abs(np.asarray(want) - first_output(model(**inputs))).max()) > 1e-3  # the adapter matters


def test_peft_conv2d_adapter_runs_the_same_in_jlora(tmp_path):
    """PEFT's Conv2d LoRA (ViT's patch projection): lora_A a conv, lora_B a 1x1 conv."""
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    model = TINY["vit"]()
    torch_model = load_flax_weights_in_pytorch_model(tf.ViTModel(model.config), model.params).eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["projection", "query"], init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, cfg).eval()
    pixels = np.asarray(jax.random.normal(jax.random.key(0), hf.example_inputs(model)["pixel_values"].shape))
    with torch.no_grad():
        want = peft_model(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    peft_model.save_pretrained(tmp_path / "adapter")
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    assert str(params["embeddings"]["patch_embeddings"]["projection"]["kernel"].layout) == "iiio"
    got = jlora.apply(model.__call__)(pixel_values=pixels, params=params).last_hidden_state
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _untied(config_class, **kw):
    return config_class(vocab_size=64, tie_word_embeddings=False, **kw)


BERTLIKE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
ALL_LINEAR_CASES = {  # Flax class, PyTorch class, config; untied output embeddings where the model has them
    "bert-mlm": (tf.FlaxBertForMaskedLM, tf.BertForMaskedLM, lambda: _untied(tf.BertConfig, **BERTLIKE)),
    "bert-pretraining": (tf.FlaxBertForPreTraining, tf.BertForPreTraining, lambda: _untied(tf.BertConfig, **BERTLIKE)),
    "roberta-mlm": (tf.FlaxRobertaForMaskedLM, tf.RobertaForMaskedLM, lambda: _untied(tf.RobertaConfig, **BERTLIKE)),
    "electra-mlm": (tf.FlaxElectraForMaskedLM, tf.ElectraForMaskedLM,
                    lambda: _untied(tf.ElectraConfig, embedding_size=32, **BERTLIKE)),
    "llama": (tf.FlaxLlamaForCausalLM, tf.LlamaForCausalLM, lambda: _untied(
        tf.LlamaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)),
    "gpt2": (tf.FlaxGPT2LMHeadModel, tf.GPT2LMHeadModel, lambda: tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)),
    "roberta-classifier": (tf.FlaxRobertaForSequenceClassification, tf.RobertaForSequenceClassification,
                           lambda: tf.RobertaConfig(vocab_size=64, num_labels=3, **BERTLIKE)),
    "vit-classifier": (tf.FlaxViTForImageClassification, tf.ViTForImageClassification, lambda: tf.ViTConfig(
        image_size=16, patch_size=8, num_labels=3, **BERTLIKE)),
    # an encoder-decoder's config has no vocab_size of its own: its decoder's MLM decoder is still the
    # output embedding
    "vit-bert-encoder-decoder": (tf.FlaxVisionEncoderDecoderModel, tf.VisionEncoderDecoderModel, lambda: (
        tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            tf.ViTConfig(image_size=16, patch_size=8, **BERTLIKE),
            _untied(tf.BertConfig, is_decoder=True, add_cross_attention=True, **BERTLIKE)))),
}


@pytest.mark.parametrize("case", sorted(ALL_LINEAR_CASES))
def test_all_linear_adapts_what_peft_adapts(case):
    """The modules jlora.hf's all-linear adapts are those PEFT's all-linear adapts on the PyTorch twin:
    the output embeddings are left alone under any name (an MLM decoder), a dense inside an LM head
    is adapted, and a classification head is left alone whole (PEFT's SEQ_CLS task)."""
    flax_class, torch_class, make_config = ALL_LINEAR_CASES[case]
    config = make_config()
    params = hf.lora_init(jax.random.key(0), flax_class(config), jlora.LoraConfig(rank=2, targets="all-linear"))
    ours = {jlora.peft.module_name(x.path) for x in jax.tree.leaves(params, is_leaf=jlora.weight.is_node)
            if isinstance(x, jlora.LoraWeight)}
    task = "SEQ_CLS" if case.endswith("classifier") else None
    theirs = peft.get_peft_model(torch_class(config), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task))
    assert ours == set(theirs.targeted_module_names)


def _torch_twin(model, torch_class):
    """The PyTorch model with ``model``'s (Flax) base weights."""
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    torch.manual_seed(0)
    return load_flax_weights_in_pytorch_model(torch_class(model.config), model.params).eval()


def _torch_out(torch_model, **inputs):
    """The model's logits (or last hidden state) for numpy ``inputs``."""
    with torch.no_grad():
        out = torch_model(**{k: torch.tensor(np.asarray(v)) for k, v in inputs.items()})
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).numpy()


def _perturb_saved_modules(peft_model, amount=0.3):
    """Train PEFT's whole-module copies (modules_to_save), as a fine-tune would."""
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(amount * torch.randn_like(param))


def _read_as_peft_runs_it(model, torch_class, directory, **peft_options):
    """A PEFT adapter (``peft_options``; the modules it trains whole perturbed) read by jlora:
    its logits equal PEFT's. Returns ``(jlora params, PEFT model)``."""
    peft_model = peft.get_peft_model(_torch_twin(model, torch_class),
                                     peft.LoraConfig(r=4, init_lora_weights=False, **peft_options)).eval()
    _perturb_saved_modules(peft_model)
    peft_model.save_pretrained(directory)
    params = jlora.peft.load_adapter(directory, model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits,
                               _torch_out(peft_model, input_ids=IDS), rtol=1e-4, atol=1e-5)
    return params, peft_model


def _tiny_roberta_classifier():
    return tf.FlaxRobertaForSequenceClassification(tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=40, num_labels=3, architectures=["RobertaForSequenceClassification"]))


def test_a_task_head_of_several_modules_crosses_both_ways(tmp_path):
    """RoBERTa's classifier is two Linears (dense, out_proj). PEFT's SEQ_CLS model trains the
    whole ``classifier`` and saves its parts; jlora reads them as its Trainable leaves, and saves
    a head trained in jlora as that one module (its parts as modules, PEFT could not load)."""
    model = _tiny_roberta_classifier()
    params, _ = _read_as_peft_runs_it(model, tf.RobertaForSequenceClassification, tmp_path / "from_peft",
                                      task_type="SEQ_CLS", target_modules=["query", "value"])
    assert isinstance(params["classifier"]["dense"]["kernel"], jlora.Trainable)
    # with bias="all" PEFT saves the head's biases again under its wrapper, keeping the adapter's name
    # (classifier.modules_to_save.default.dense.bias): read as the head's own, and counted once
    _read_as_peft_runs_it(model, tf.RobertaForSequenceClassification, tmp_path / "biases", task_type="SEQ_CLS",
                          target_modules=["query", "value"], bias="all")
    assert any(".modules_to_save.default." in k for k in load_file(tmp_path / "biases" / "adapter_model.safetensors"))
    described = jlora.peft.describe(tmp_path / "biases")
    assert "default" not in described and described.count("  classifier.dense.bias  32  fully trained") == 1
    whole = sum(v.size for k, v in load_file(tmp_path / "biases" / "adapter_model.safetensors").items()
                if "lora_" not in k and ".original_module." not in k and ".modules_to_save." not in k)
    assert f"LoRA + {whole:,} fully trained" in described

    lm = hf.LoraModel(model, jlora.LoraConfig(rank=4, targets=["query", "value"], trainable=["classifier/out_proj"]),
                      jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    params["classifier"]["out_proj"]["kernel"] = jlora.Trainable(params["classifier"]["out_proj"]["kernel"].value + 0.3)
    jlora.peft.save_adapter(tmp_path / "from_jlora", params, model.config)
    assert json.loads((tmp_path / "from_jlora" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    peft_model = peft.PeftModel.from_pretrained(_torch_twin(model, tf.RobertaForSequenceClassification),
                                                tmp_path / "from_jlora").eval()
    np.testing.assert_allclose(_torch_out(peft_model, input_ids=IDS), lm(IDS, params=params).logits,
                               rtol=1e-4, atol=1e-5)


def test_a_module_trained_whole_inside_another_is_refused_by_name(tmp_path):
    """PEFT's QUESTION_ANS adds ``qa_outputs``, which BigBird has inside ``qa_classifier``: PEFT
    writes the file but cannot load it back; jlora says so instead of blaming the base model."""
    config = tf.BigBirdConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=64, attention_type="original_full")
    torch_model = tf.BigBirdForQuestionAnswering(config)
    peft.get_peft_model(torch_model, peft.LoraConfig(task_type="QUESTION_ANS", r=2, target_modules=["query"],
                                                     modules_to_save=["qa_classifier"])).save_pretrained(tmp_path)
    with pytest.raises(KeyError):  # PEFT's own round trip
        peft.PeftModel.from_pretrained(tf.BigBirdForQuestionAnswering(config), tmp_path)
    model = tf.FlaxBigBirdForQuestionAnswering(config)
    with pytest.raises(ValueError, match=r"PEFT trained 'qa_classifier.qa_outputs' whole inside 'qa_classifier'.*"
                                         r"naming the outer module only$"):
        jlora.peft.load_adapter(tmp_path, model.params, model.config)
    # as jlora wrote a head of several modules before 3c1037a: the modules inside it named, the task adding it
    roberta = TINY["roberta"]()
    roberta.config.architectures = ["RobertaForSequenceClassification"]
    config = tf.RobertaConfig(**{**roberta.config.to_dict(), "num_labels": 2})
    head = tf.FlaxRobertaForSequenceClassification(config)
    old = hf.lora_init(jax.random.key(0), head, jlora.LoraConfig(rank=2, targets=["query"], trainable=["classifier"]))
    jlora.peft.save_adapter(tmp_path / "old", old, head.config)
    written = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier"] and written["task_type"] == "SEQ_CLS"
    (tmp_path / "old" / "adapter_config.json").write_text(
        json.dumps({**written, "modules_to_save": ["classifier.dense", "classifier.out_proj"]}))
    with pytest.raises(ValueError, match=r"\(a file jlora wrote so, before 3c1037a, loads once its adapter_config.json "
                                         r"names 'classifier' there in place of the modules inside it\)"):
        jlora.peft.load_adapter(tmp_path / "old", head.params, head.config)
    # "embeddings" named BERT's embeddings and each table in it before PEFT 0.22: PEFT 0.21 writes
    # the tables of the inner copies (which its forward pass does not use) under plain names
    model = TINY["bert"]()
    if PEFT_DOTTED:  # the embeddings module alone
        params, _ = _read_as_peft_runs_it(model, tf.BertForSequenceClassification, tmp_path / "embeddings",
                                          target_modules=["query"], modules_to_save=["embeddings"])
        assert isinstance(params["bert"]["embeddings"]["word_embeddings"]["embedding"], jlora.Trainable)
        config_file = tmp_path / "embeddings" / "adapter_config.json"  # as PEFT 0.21 would have read that file
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "peft_version": "0.21.2"}))
        with pytest.raises(ValueError, match=r"PEFT trained 'bert.embeddings.\w+' whole inside 'bert.embeddings'"):
            jlora.peft.load_adapter(tmp_path / "embeddings", model.params, model.config)
        return
    made = peft.get_peft_model(_torch_twin(model, tf.BertForSequenceClassification),
                               peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["embeddings"]))
    made.save_pretrained(tmp_path / "embeddings")
    assert not any(".modules_to_save." in k for k in load_file(tmp_path / "embeddings" / "adapter_model.safetensors"))
    with pytest.raises(KeyError):  # PEFT's own round trip
        peft.PeftModel.from_pretrained(_torch_twin(model, tf.BertForSequenceClassification), tmp_path / "embeddings")
    with pytest.raises(ValueError, match=r"PEFT trained 'bert.embeddings.\w+' whole inside 'bert.embeddings'"):
        jlora.peft.load_adapter(tmp_path / "embeddings", model.params, model.config)


def test_modules_to_save_are_matched_as_peft_matches_them(tmp_path):
    """A norm trained whole: Llama's RMSNorm (Flax leaf ``weight``) both ways; PEFT's entries match
    the end of a module's name after a dot from PEFT 0.22, as a string before it (``layer_norm``
    took BART's ``self_attn_layer_norm``): read by the rule of the PEFT that wrote the file."""
    model = TINY["llama"]()
    params, peft_model = _read_as_peft_runs_it(model, tf.LlamaForCausalLM, tmp_path / "norm", target_modules=["q_proj"],
                                               modules_to_save=["model.norm"])
    assert isinstance(params["model"]["norm"]["weight"], jlora.Trainable)
    jlora.peft.save_adapter(tmp_path / "norm_back", params, model.config)
    reloaded = peft.PeftModel.from_pretrained(_torch_twin(model, tf.LlamaForCausalLM), tmp_path / "norm_back").eval()
    np.testing.assert_allclose(_torch_out(reloaded, input_ids=IDS), _torch_out(peft_model, input_ids=IDS),
                               rtol=1e-4, atol=1e-5)

    model = TINY["bart"]()
    params, _ = _read_as_peft_runs_it(model, tf.BartForConditionalGeneration, tmp_path / "suffix",
                                      target_modules=["q_proj"], modules_to_save=["layer_norm"])
    norm = lambda tree: tree["model"]["encoder"]["layers"]["0"]["self_attn_layer_norm"]
    assert isinstance(norm(params)["scale"], jlora.Trainable) != PEFT_DOTTED
    # the other PEFT's file, by hand: the norm's trained copy under its plain names (or none)
    config = json.loads((tmp_path / "suffix" / "adapter_config.json").read_text())
    factors = {k: v for k, v in load_file(tmp_path / "suffix" / "adapter_model.safetensors").items() if ".lora_" in k}
    key = "base_model.model.model.encoder.layers.0.self_attn_layer_norm."
    trained = {key + "weight": np.full(32, 1.5, np.float32), key + "bias": np.full(32, 0.25, np.float32)}
    for version, extra in (("0.21.2", trained), ("0.22.0", {})):
        other = tmp_path / f"suffix-{version}"
        other.mkdir()
        (other / "adapter_config.json").write_text(json.dumps({**config, "peft_version": version}))
        save_file(factors | extra, other / "adapter_model.safetensors")
        read = norm(jlora.peft.load_adapter(other, model.params, model.config))
        assert isinstance(read["scale"], jlora.Trainable) == bool(extra)
        if extra:
            np.testing.assert_array_equal(read["scale"].value, trained[key + "weight"])
            np.testing.assert_array_equal(read["bias"].value, trained[key + "bias"])
    save_file(factors | trained, tmp_path / "suffix-0.22.0" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor .*self_attn_layer_norm.*says PEFT 0.22.0 wrote the file, "
                                         r"which trains whole only the modules modules_to_save \[.layer_norm.\] names"
                                         r".*if an earlier PEFT wrote the file, set its peft_version there\)$"):
        jlora.peft.load_adapter(tmp_path / "suffix-0.22.0", model.params, model.config)

    # so a head trained whole takes a LoRA-adapted module whose name ends like it: PEFT cannot load that
    model = tf.FlaxDistilBertForSequenceClassification(tf.DistilBertConfig(
        dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=64, num_labels=3,
        architectures=["DistilBertForSequenceClassification"]))
    config = jlora.LoraConfig(rank=4, targets="all-linear", trainable=["classifier"])
    with pytest.raises(ValueError, match=r"'pre_classifier/kernel' has a LoRA adapter, and PEFT before 0.22 would "
                                         r"train its module 'pre_classifier' whole too \(it takes any module whose name "
                                         r"ends with an entry of modules_to_save=\['classifier'\], .*exclude=\['pre_classifier'\]"):
        jlora.peft.save_adapter(tmp_path / "ends", jlora.hf.lora_init(jax.random.key(0), model, config), model.config)
    params = perturb(jlora.hf.lora_init(jax.random.key(0), model, config.replace(exclude=("pre_classifier",))), KEY)
    jlora.peft.save_adapter(tmp_path / "ends", params, model.config)  # pre_classifier saved whole, as PEFT reads it
    loaded = peft.PeftModel.from_pretrained(_torch_twin(model, tf.DistilBertForSequenceClassification), tmp_path / "ends")
    np.testing.assert_allclose(_torch_out(loaded.eval(), input_ids=IDS),
                               jlora.apply(model.__call__)(IDS, params=params).logits, rtol=1e-4, atol=1e-5)
    # pre_classifier trained alone is no classifier head: no task type, which would have PEFT load the head
    params = perturb(jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(
        rank=4, targets=["q_lin"], trainable=["pre_classifier"])), KEY)
    jlora.peft.save_adapter(tmp_path / "pre", params, model.config)
    assert json.loads((tmp_path / "pre" / "adapter_config.json").read_text())["task_type"] is None
    loaded = peft.PeftModel.from_pretrained(_torch_twin(model, tf.DistilBertForSequenceClassification), tmp_path / "pre")
    np.testing.assert_allclose(_torch_out(loaded.eval(), input_ids=IDS),
                               jlora.apply(model.__call__)(IDS, params=params).logits, rtol=1e-4, atol=1e-5)


def test_bias_all_on_a_masked_lm_reads_the_tied_decoder_bias_once(tmp_path):
    """PyTorch's BERT ties ``cls.predictions.decoder.bias`` to ``cls.predictions.bias``; with
    bias="all" PEFT saves both names, and Flax has the one."""
    model = tf.FlaxBertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=64))
    peft_model = peft.get_peft_model(_torch_twin(model, tf.BertForMaskedLM), peft.LoraConfig(
        r=4, target_modules=["query", "value"], init_lora_weights=False, bias="all")).eval()
    with torch.no_grad():
        peft_model.base_model.model.cls.predictions.bias.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    assert isinstance(params["cls"]["predictions"]["bias"], jlora.Trainable)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits,
                               _torch_out(peft_model, input_ids=IDS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("peft_options", [{"target_modules": ["query", "decoder"]},
                                          {"target_modules": ["query"], "modules_to_save": ["decoder"]}])
def test_a_masked_lms_tied_decoder_adapted_or_trained_is_refused_saying_why(peft_options, tmp_path):
    """PEFT changes BERT's decoder apart from the word embedding Flax ties it to: refused, naming
    that embedding, where the errors said the base had none, or was another model."""
    model = tf.FlaxBertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=64))
    peft.get_peft_model(_torch_twin(model, tf.BertForMaskedLM), peft.LoraConfig(r=4, **peft_options)
                        ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"for cls.predictions.decoder, which the Flax model ties to its input embedding "
                                         r"\(tie_word_embeddings\), 'bert/embeddings/word_embeddings/embedding': jlora "
                                         r"reads a tied head's tensors only beside its embedding"):
        jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_fan_in_fan_out_is_the_module_type_as_in_peft(model_type, tmp_path):
    """PEFT sets fan_in_fan_out by the module's type (GPT-2's Conv1D: on), whatever the config
    says; an adapter whose config says otherwise runs as PEFT runs it."""
    model = TINY[model_type]()
    torch_class, target = {"llama": (tf.LlamaForCausalLM, "q_proj"), "gpt2": (tf.GPT2LMHeadModel, "c_proj")}[model_type]
    made = peft.get_peft_model(_torch_twin(model, torch_class), peft.LoraConfig(
        r=4, target_modules=[target], init_lora_weights=False, fan_in_fan_out=model_type == "gpt2")).eval()
    made.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fan_in_fan_out": model_type != "gpt2"}))
    peft_model = peft.PeftModel.from_pretrained(_torch_twin(model, torch_class), tmp_path / "adapter").eval()
    want = _torch_out(peft_model, input_ids=IDS)
    np.testing.assert_allclose(want, _torch_out(made, input_ids=IDS), rtol=1e-5, atol=1e-6)
    params = jlora.peft.load_adapter(tmp_path / "adapter", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(IDS, params=params).logits, want, rtol=1e-4, atol=1e-5)


def test_an_adapter_on_an_encoder_decoders_shared_embedding_is_refused_both_ways(tmp_path):
    """Flax's BART looks every token up in ``model/shared``; PyTorch's encoder and decoder call
    their own ``embed_tokens``, so PEFT never runs an adapter on ``model.shared``."""
    model = tf.FlaxBartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False))
    message = "'model/shared/embedding': an encoder-decoder's shared embedding, adapted or trained, changes every"
    for cfg in (jlora.LoraConfig(rank=4, targets=["shared", "q_proj"]),
                jlora.LoraConfig(rank=4, targets=["q_proj"], trainable=["shared"])):
        lm = hf.LoraModel(model, cfg, jax.random.key(0))
        with pytest.raises(ValueError, match=message):
            jlora.peft.save_adapter(tmp_path / "from_jlora", lm.params, model.config)
    for cfg in (peft.LoraConfig(r=4, target_modules=["shared", "q_proj"], init_lora_weights=False),
                peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["shared"])):
        directory = tmp_path / str(len(cfg.target_modules))
        peft.get_peft_model(_torch_twin(model, tf.BartForConditionalGeneration), cfg).save_pretrained(directory)
        with pytest.raises(ValueError, match=message):
            jlora.peft.load_adapter(directory, model.params, model.config)


def test_learned_positions_and_an_encoder_decoders_embed_tokens_are_refused_with_the_reason(tmp_path):
    """PEFT's Embedding LoRA on BART's ``embed_positions`` looks its factors up by the token ids
    (the module takes them), so PEFT computes other outputs (than its own merged model, too);
    PEFT's ``embed_tokens`` are lookups over ``shared``, which Flax reads directly."""
    model = tf.FlaxBartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False))
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=4, targets=["q_proj", "embed_positions"]), jax.random.key(0))
    message = "'model/decoder/embed_positions/embedding': an adapter on a learned position embedding"
    with pytest.raises(ValueError, match=message):
        jlora.peft.save_adapter(tmp_path / "from_jlora", lm.params, model.config)
    twin = _torch_twin(model, tf.BartForConditionalGeneration)
    peft.get_peft_model(twin, peft.LoraConfig(r=4, target_modules=["q_proj", "embed_positions"])
                        ).save_pretrained(tmp_path / "positions")
    with pytest.raises(ValueError, match=message.replace("decoder", "(en|de)coder")):
        jlora.peft.load_adapter(tmp_path / "positions", model.params, model.config)
    twin = _torch_twin(model, tf.BartForConditionalGeneration)
    peft.get_peft_model(twin, peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])
                        ).save_pretrained(tmp_path / "tokens")
    with pytest.raises(ValueError, match="'model.(en|de)coder.embed_tokens' is PyTorch's own lookup module over the "
                                         "shared embedding"):
        jlora.peft.load_adapter(tmp_path / "tokens", model.params, model.config)
    with pytest.raises(ValueError, match="adapter_model.safetensors: a file, not a PEFT adapter directory: pass"):
        jlora.peft.load_adapter(tmp_path / "tokens" / "adapter_model.safetensors", model.params, model.config)


def test_a_gpt2_decoder_inside_a_vision_encoder_decoder_keeps_its_conv1d_layout(tmp_path):
    """The composite model's type is vision-encoder-decoder; its decoder's is gpt2, whose Conv1D
    kernels are (out, in): a square one read as (in, out) gave other outputs without an error."""
    vit = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                       patch_size=8)
    gpt2 = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = tf.FlaxVisionEncoderDecoderModel(tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2))
    torch_model = _torch_twin(model, tf.VisionEncoderDecoderModel)
    inputs = {"pixel_values": np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 16, 16))),
              "decoder_input_ids": IDS[:1, :5]}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "q_attn"], init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    want = _torch_out(peft_model, **inputs)
    params = jlora.peft.load_adapter(tmp_path / "peft", model.params, model.config)
    assert str(params["decoder"]["transformer"]["h"]["0"]["attn"]["c_proj"]["kernel"].layout) == "oi"
    np.testing.assert_allclose(jlora.apply(model.__call__)(**inputs, params=params).logits, want, rtol=1e-4, atol=1e-5)
    jlora.peft.save_adapter(tmp_path / "back", params, model.config)  # and back: PEFT gives the same outputs
    again = peft.PeftModel.from_pretrained(_torch_twin(model, tf.VisionEncoderDecoderModel), tmp_path / "back").eval()
    np.testing.assert_allclose(_torch_out(again, **inputs), want, rtol=1e-4, atol=1e-5)
    model.config.architectures = ["VisionEncoderDecoderModel"]  # the decoder ties its LM head to wte, as GPT-2 does
    on_wte = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["wte"]), jax.random.key(0)).params
    with pytest.raises(ValueError, match="'decoder/transformer/wte/embedding' is tied to the LM head"):
        jlora.peft.save_adapter(tmp_path / "wte", on_wte, model.config)


def test_a_conv_kernel_trained_whole_crosses_both_ways(tmp_path):
    """ViT's patch projection in modules_to_save: Flax's HWIO kernel is PyTorch's OIHW weight
    (transposed whole it was WHIO, which a square window hid from the shape check)."""
    model = TINY["vit"]()
    pixels = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 16, 16)))
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query"], trainable=["projection"]), jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    projection = params["embeddings"]["patch_embeddings"]["projection"]
    projection["kernel"] = jlora.Trainable(projection["kernel"].value + 0.1 * jax.random.normal(
        jax.random.key(2), projection["kernel"].value.shape))
    jlora.peft.save_adapter(tmp_path / "out", params, model.config)
    theirs = peft.PeftModel.from_pretrained(_torch_twin(model, tf.ViTModel), tmp_path / "out").eval()
    got = jlora.apply(model.__call__)(pixels, params=params).last_hidden_state
    np.testing.assert_allclose(_torch_out(theirs, pixel_values=pixels), got, rtol=1e-4, atol=1e-4)
    cfg = peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["projection"], init_lora_weights=False)
    made = peft.get_peft_model(_torch_twin(model, tf.ViTModel), cfg).eval()
    with torch.no_grad():
        weight = made.base_model.model.embeddings.patch_embeddings.projection.modules_to_save.default.weight
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    made.save_pretrained(tmp_path / "peft")
    loaded = jlora.peft.load_adapter(tmp_path / "peft", model.params, model.config)
    np.testing.assert_allclose(jlora.apply(model.__call__)(pixels, params=loaded).last_hidden_state,
                               _torch_out(made, pixel_values=pixels), rtol=1e-4, atol=1e-4)


def _resnet_twin(model):
    """The PyTorch ResNet with ``model``'s base weights, copied by hand: transformers' converter
    misses the basic layers' convs, which Flax names ``layer/layer_0`` and PyTorch ``layer.0``."""
    import re
    from jlora.paths import leaves_with_paths

    torch_model = tf.ResNetModel(model.config).eval()
    state = torch_model.state_dict()
    torch_name = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    for collection in ("params", "batch_stats"):
        for p, x in leaves_with_paths(model.params[collection]):
            module, leaf = re.sub(r"layer/layer_(\d+)", r"layer/\1", p).rsplit("/", 1)
            x = np.asarray(x)
            state[f"{module.replace('/', '.')}.{torch_name.get(leaf, leaf)}"] = torch.tensor(
                x.transpose(3, 2, 0, 1) if x.ndim == 4 else x)
    assert torch_model.load_state_dict(state, strict=True)
    return torch_model


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_a_model_with_batch_statistics_crosses_both_ways(layer_type, tmp_path):
    """ResNet's Flax params are {"params", "batch_stats"}: PyTorch's module names start inside
    "params" (saved with the prefix, PEFT matched no module). Its basic layers' convs are
    layer/layer_0 in Flax, layer.0 in PyTorch (saved under Flax's names, PEFT adapted the others only)."""
    model = tf.FlaxResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                               layer_type=layer_type), input_shape=(1, 32, 32, 3))
    pixels = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 32, 32)))
    np.testing.assert_allclose(_torch_out(_resnet_twin(model), pixel_values=pixels),
                               model(pixels).last_hidden_state, rtol=1e-4, atol=1e-4)  # the twin is the same model
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["convolution"], init_lora_weights=False)
    made = peft.get_peft_model(_resnet_twin(model), cfg).eval()
    made.save_pretrained(tmp_path / "peft")
    params = jlora.peft.load_adapter(tmp_path / "peft", model.params, model.config)
    assert set(params) == {"params", "batch_stats"}
    adapted = [row[0] for row in jlora.summary(params).targets]
    assert len(adapted) == sum(".lora_A." in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    got = jlora.apply(model.__call__)(pixels, params=params).last_hidden_state
    np.testing.assert_allclose(got, _torch_out(made, pixel_values=pixels), rtol=1e-4, atol=1e-4)
    jlora.peft.save_adapter(tmp_path / "back", params, model.config)
    theirs = peft.PeftModel.from_pretrained(_resnet_twin(model), tmp_path / "back").eval()
    np.testing.assert_allclose(_torch_out(theirs, pixel_values=pixels), got, rtol=1e-4, atol=1e-4)
    if layer_type == "basic":  # the file as jlora wrote it before 96e5538, under Flax's names: the way out said
        import re
        from safetensors.numpy import save_file

        flax_named = lambda k: re.sub(r"\.layer\.(\d+)\.", r".layer.layer_\1.", k)
        (tmp_path / "old").mkdir()
        tensors = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
        save_file({flax_named(k): v for k, v in tensors.items()}, str(tmp_path / "old" / "adapter_model.safetensors"))
        config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
        (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"the base has '.*/layer/0/convolution/kernel': the file names modules as "
                                             r"Flax does \('layer_0'\), as jlora wrote ResNet adapters before 96e5538"):
            jlora.peft.load_adapter(tmp_path / "old", model.params, model.config)
    # a batch norm trained whole: PEFT would load it with running statistics the adapter does not hold
    norm = "embedder/embedder/normalization"
    normed = hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2, targets=["convolution"], trainable=[norm]))
    for given in (normed, normed["params"]):  # the inner params alone too: told by the model type's norm names
        with pytest.raises(ValueError, match=f"jlora.peft.save_adapter: '{norm}' keeps running statistics .* leave the norm out"):
            jlora.peft.save_adapter(tmp_path / "normed", given, model.config)


def test_the_task_type_is_one_peft_can_load_the_adapter_with(tmp_path):
    """Inferred from the architecture only where PEFT's model for it loads the adapter (a classifier
    task's head trained whole: PEFT loads it from the file); given, a ValueError otherwise."""
    model, torch_model = pair("bert", tmp_path)
    model.config.architectures = ["BertForSequenceClassification"]
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query"]), jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    jlora.peft.save_adapter(tmp_path / "frozen_head", params, model.config)
    assert json.loads((tmp_path / "frozen_head" / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(torch_model, tmp_path / "frozen_head").eval()
    np.testing.assert_allclose(_torch_out(theirs, input_ids=IDS), lm(IDS, params=params).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLS': the task head \(classifier or score\) is not trained, "
                                         r"but PEFT's model for SEQ_CLS loads it from the adapter; pass task_type=None"):
        jlora.peft.save_adapter(tmp_path / "given", params, model.config, task_type="SEQ_CLS")
    on_head = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query", "classifier"]), jax.random.key(0)).params
    with pytest.raises(ValueError, match=r"'classifier/kernel' has a LoRA adapter inside the task head, which PEFT's "
                                         r"model for SEQ_CLS trains whole: leave it out of the targets "
                                         r"\(LoraConfig\(exclude=\['classifier'\]\)\), or pass task_type=None"):
        jlora.peft.save_adapter(tmp_path / "given", on_head, model.config, task_type="SEQ_CLS")
    trained = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query"], trainable=["classifier"]),
                           jax.random.key(0)).params
    jlora.peft.save_adapter(tmp_path / "trained_head", trained, model.config)
    assert json.loads((tmp_path / "trained_head" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    jlora.peft.save_adapter(tmp_path / "none", trained, model.config, task_type=None)
    assert json.loads((tmp_path / "none" / "adapter_config.json").read_text())["task_type"] is None
    from transformers import MarianConfig  # a translation model of no "For..." class name
    assert jlora.peft._task_type("infer", MarianConfig(architectures=["MarianMTModel"]), ["q_proj/kernel"], []) \
        == "SEQ_2_SEQ_LM"


def test_what_peft_cannot_hold_is_refused_on_save(tmp_path):
    model = TINY["bert"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["query"], trainable=["classifier/kernel"]),
                      jax.random.key(0))
    trainable = jlora.split(lm.params)[0]  # the head's bias is in the frozen half: PEFT loads the module whole
    with pytest.raises(ValueError, match="'classifier/bias' is in the frozen half of jlora.split, but its module is "
                                         "saved whole"):
        jlora.peft.save_adapter(tmp_path / "half", trainable, model.config)
    jlora.peft.save_adapter(tmp_path / "whole", lm.params, model.config)
    with pytest.raises(ValueError, match="'logit_scale' is a param of the model itself, not of a module"):
        jlora.peft.save_adapter(tmp_path / "top", {**lm.params, "logit_scale": jlora.Trainable(jnp.ones(()))},
                                model.config)
    for task_type in ("causal_lm", "FOO"):  # PEFT would write it, then refuse to load it
        with pytest.raises(ValueError, match=rf"task_type='{task_type}' is none of PEFT's task types \['SEQ_CLS'"):
            jlora.peft.save_adapter(tmp_path / "task", lm.params, model.config, task_type=task_type)
    with pytest.raises(ValueError, match="base_model_name_or_path must be a hub name or a directory, got int"):
        jlora.peft.save_adapter(tmp_path / "task", lm.params, model.config, base_model_name_or_path=3)
    assert not (tmp_path / "task").exists()
    jlora.peft.save_adapter(tmp_path / "named", lm.params, model.config, base_model_name_or_path=tmp_path / "base")
    saved = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")


def test_an_empty_partial_grouped_or_untied_head_adapter_is_refused_or_warned(tmp_path):
    from safetensors.numpy import load_file, save_file

    model, torch_model = pair("llama", tmp_path)
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, str(weights))  # a layer lost
    with pytest.warns(UserWarning, match=r"targets 1 module\(s\) the adapter holds no factors for.*layers.1.self_attn"):
        jlora.peft.load_adapter(tmp_path / "a", model.params, model.config)
    save_file({}, str(weights))
    with pytest.raises(ValueError, match="holds no LoRA factors"):
        jlora.peft.load_adapter(tmp_path / "a", model.params, model.config)
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_something_new": 0}))
    with pytest.raises(ValueError, match="use_something_new=0 is not supported"):  # 0 == False, but set
        jlora.peft.load_adapter(tmp_path / "a", model.params, model.config)

    gpt2, gpt2_torch = pair("gpt2", tmp_path)  # Flax ties GPT-2's head to wte: nothing to load it onto
    peft.get_peft_model(gpt2_torch, peft.LoraConfig(r=2, target_modules=["lm_head"])).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="tensors for lm_head, which the Flax model ties to its input embedding"):
        jlora.peft.load_adapter(tmp_path / "head", gpt2.params, gpt2.config)

    regnet = tf.FlaxRegNetModel(tf.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8),
                                input_shape=(1, 32, 32, 3))
    cfg = peft.LoraConfig(r=2, target_modules=["convolution"])
    peft.get_peft_model(_torch_twin(regnet, tf.RegNetModel), cfg).save_pretrained(tmp_path / "grouped")
    with pytest.raises(ValueError, match="or a grouped conv's, which jlora cannot represent"):
        jlora.peft.load_adapter(tmp_path / "grouped", regnet.params, regnet.config)
    ours = hf.lora_init(jax.random.key(0), regnet, jlora.LoraConfig(rank=2, targets=["convolution"]))
    with pytest.raises(ValueError, match=r"'.*stages/1/layers/0/layer/1/convolution/kernel' is a grouped conv \(2 groups\)"):
        jlora.peft.save_adapter(tmp_path / "ours", ours, regnet.config)  # stage 0's conv: 8 // 8, one group


# The Flax names of the modules PEFT's LoRA+ leaves undecayed beside biases (PyTorch's nn.LayerNorm;
# Llama's RMSNorm is decayed), as the README's recipe takes them
LAYER_NORMS = {"bert": ("LayerNorm",), "gpt2": ("ln_",), "llama": ()}


def peft_loraplus_groups(norms):
    """The README's label function: the groups of PEFT's ``create_loraplus_optimizer``, word for word."""
    def peft_groups(t):
        def group(path, label, x):
            name = jax.tree_util.keystr(path)
            if label in ("lora_a", "lora_b") and "['embedding']" in name:
                return "embedding"  # an embedding adapter: loraplus_lr_embedding
            if label == "trainable" and x.ndim == 1:  # lr·ratio; biases and LayerNorms not decayed
                return "ratio, no decay" if "['bias']" in name or any(n in name for n in norms) else "ratio"
            return "ratio" if label == "lora_b" else "lr"
        return jax.tree_util.tree_map_with_path(group, jlora.labels(t), t)
    return peft_groups


@pytest.mark.parametrize("model_type, how", [("gpt2", "b_lr_ratio"), ("llama", "b_lr_ratio"),
                                             ("bert", "groups"), ("gpt2", "groups"), ("llama", "groups")])
def test_adapters_trained_with_adamw_and_loraplus_follow_peft(model_type, how, tmp_path):
    """The same adapter trained 3 steps in jlora and in PEFT (AdamW with weight decay; LoRA+ as
    jlora's b_lr_ratio and PEFT's create_loraplus_optimizer): the same losses, the same adapters.
    With leaves trained whole (a head, norms, biases) or an embedding adapter, PEFT's LoRA+ groups
    them apart, and the README's label function (``groups``) does as PEFT does."""
    from peft.optimizers import create_loraplus_optimizer

    model, torch_model = pair(model_type, tmp_path)
    classify = model_type == "bert"
    model.config.architectures = ["BertForSequenceClassification"] if classify else model.config.architectures
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}[model_type]
    trainable = ()
    if how == "groups":  # leaves PEFT's LoRA+ groups apart: a head, norms (decayed or not), biases, an embedding
        targets += ["embed_tokens"] if model_type == "llama" else []
        # BERT's biases: bias="lora_only" (GPT-2's c_attn bias holds the keys', which no gradient moves but noise)
        trainable = {"gpt2": ["ln_f"], "llama": ["model/norm"],
                     "bert": ["classifier", "attention/output/LayerNorm", "query/bias", "value/bias"]}[model_type]
    cfg = jlora.LoraConfig(rank=4, alpha=6, use_rslora=model_type == "llama", targets=targets,
                           rank_pattern={"layers/1/**": 2} if model_type == "llama" else None, trainable=trainable)
    params = perturb(hf.LoraModel(model, cfg, jax.random.key(0)).params, jax.random.key(1))  # b != 0: a learns
    jlora.peft.save_adapter(tmp_path / "start", params, model.config)
    theirs = peft.PeftModel.from_pretrained(torch_model, tmp_path / "start", is_trainable=True).eval()
    ratio, lr, wd = 16.0, 1e-3, 0.5
    no_bias_decay = lambda t: jax.tree.map(lambda x: np.ndim(x) > 1, t)  # PEFT's LoRA+ decays no bias
    tx = jlora.optimizer(optax.adamw(lr, weight_decay=wd, mask=no_bias_decay), params, b_lr_ratio=ratio)
    if how == "groups":
        tx = jlora.optimizer(optax.multi_transform({
            "lr": optax.adamw(lr, weight_decay=wd), "ratio": optax.adamw(lr * ratio, weight_decay=wd),
            "ratio, no decay": optax.adamw(lr * ratio, weight_decay=0.0), "embedding": optax.adamw(1e-6, weight_decay=wd),
        }, peft_loraplus_groups(LAYER_NORMS[model_type])))
    torch_tx = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=wd)  # weight_decay= would be ignored
    labels = np.array([0, 2])
    forward = jlora.apply(model.__call__)

    def loss_fn(trainable, frozen, ids):
        logits = forward(ids, params=jlora.combine(trainable, frozen)).logits
        if classify:
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def torch_loss(ids):
        logits = theirs(input_ids=torch.tensor(ids)).logits
        if classify:
            return torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), torch.tensor(ids[:, 1:]).flatten())

    @jax.jit
    def step(trainable, frozen, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    trainable, frozen = jlora.split(params)
    state = tx.init(trainable)
    for ids in (IDS, IDS[::-1].copy(), (IDS * 5) % 64):
        trainable, state, loss = step(trainable, frozen, state, ids)
        torch_tx.zero_grad()
        want = torch_loss(ids)
        want.backward()
        torch_tx.step()
        np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    jlora.peft.save_adapter(tmp_path / "jlora", jlora.combine(trainable, frozen), model.config)
    theirs.save_pretrained(tmp_path / "peft")
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("jlora", "peft"))
    want = {k.replace(".modules_to_save.", "."): v for k, v in want.items()}
    assert sorted(got) == sorted(want)
    start = load_file(str(tmp_path / "start" / "adapter_model.safetensors"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
        assert np.abs(want[k] - start[k]).max() > (1e-7 if "lora_embedding" in k else 1e-3), k  # every tensor trained


def test_alpha_pattern_keys_that_disagree_on_a_module_are_warned_of(tmp_path):
    """PEFT trains with the first matching key in its config's order, but saved the keys sorted before 0.22."""
    model = TINY["llama"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["q_proj"]), jax.random.key(0))
    jlora.peft.save_adapter(tmp_path / "a", lm.params, model.config)
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "alpha_pattern": {"layers.0.self_attn.q_proj": 32, "q_proj": 2}}))
    with pytest.warns(UserWarning, match=r"alpha_pattern keys \['layers.0.self_attn.q_proj', 'q_proj'\] all match "
                                         r"'model.layers.0.self_attn.q_proj', with values \[32, 2\]: jlora takes the first"):
        loaded = jlora.peft.load_adapter(tmp_path / "a", model.params, model.config)
    assert loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].scale == 16  # 32 / rank 2, as PEFT reloads
    for unwarned in ({"alpha_pattern": {"layers.0.self_attn.q_proj": 2, "q_proj": 2}},
                     {"alpha_pattern": {"layers.0.self_attn.q_proj": 32, "q_proj": 2}, "peft_version": "0.22.0"}):
        config_file.write_text(json.dumps({**config, **unwarned}))  # PEFT 0.22 keeps the keys in their order
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = jlora.peft.load_adapter(tmp_path / "a", model.params, model.config)
        assert loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].scale == (16 if "peft_version" in unwarned else 1)
    if PEFT_DOTTED:  # PEFT's own such file: read as PEFT runs it, unwarned
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _read_as_peft_runs_it(model, tf.LlamaForCausalLM, tmp_path / "peft", target_modules=["q_proj"],
                                  alpha_pattern={"layers.0.self_attn.q_proj": 32, "q_proj": 2})
        assert not [w for w in caught if "alpha_pattern keys" in str(w.message)]


def test_jlora_info_describes_a_peft_adapter_from_its_header(tmp_path, capsys):
    from jlora.cli import main

    model = TINY["llama"]()
    made = peft.get_peft_model(_torch_twin(model, tf.LlamaForCausalLM), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, modules_to_save=["norm"]))
    made.save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert main(["info", str(tmp_path / "peft")]) == 0
    info = capsys.readouterr().out
    assert info.startswith(f"PEFT LoRA adapter: {tmp_path / 'peft'}\n")
    assert "targets: 4 modules, rank 2, 4" in info
    assert "  model.layers.0.self_attn.q_proj  64 -> 64  r=4  scale=2\n" in info
    assert "  model.layers.0.self_attn.v_proj  64 -> 32  r=2  scale=4\n" in info  # 2 KV heads of 16
    assert "  model.norm.weight  64  fully trained" in info
    # PEFT takes the first rank_pattern key that matches, but saves the keys sorted: the file's
    # tensors, not its config, say what each module's rank is
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "rank_pattern": {
        "v_proj": 2, "layers.0.self_attn.q_proj": 6}}))
    assert main(["info", str(tmp_path / "peft")]) == 0
    assert ("  model.layers.0.self_attn.q_proj  64 -> 64  r=4  scale=2  (adapter_config.json says r=6: neither PEFT "
            "nor jlora loads it)\n") in capsys.readouterr().out
    n_lora = sum(v.size for k, v in tensors.items() if "lora_" in k)
    n_whole = sum(v.size for k, v in tensors.items() if "lora_" not in k)
    assert f"parameters: {n_lora:,} LoRA + {n_whole:,} fully trained;" in info
    # the base weights PEFT saves beside an adapted embedding or head are no trained leaves
    made = peft.get_peft_model(_torch_twin(model, tf.LlamaForCausalLM), peft.LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"]))
    made.save_pretrained(tmp_path / "head")
    assert main(["info", str(tmp_path / "head")]) == 0
    info = capsys.readouterr().out
    assert "  lm_head.base_layer.weight  64x64  the base's, saved beside the adapter (checked, not loaded)" in info
    assert "fully trained\n" not in info and "LoRA + 0 fully trained (+ 4,096 in copies of base weights);" in info


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS in conftest.py)")
def test_a_peft_adapter_loaded_onto_a_sharded_base_is_sharded_as_lora_init_shards_it(tmp_path):
    from jax.sharding import PartitionSpec as P

    model = TINY["llama"]()
    mesh = jlora.sharding.make_mesh({"model": 4})
    base = jlora.sharding.place(model.params, mesh, jlora.sharding.tensor_parallel("llama"))
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "o_proj"], trainable=["input_layernorm"])
    fresh = jlora.lora_init(KEY, base, cfg)
    jlora.peft.save_adapter(tmp_path / "adapter", perturb(fresh, KEY), model.config)
    loaded = jlora.peft.load_adapter(tmp_path / "adapter", base, model.config)
    is_node = lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable))
    placement = lambda tree: [(x.a.sharding, x.b.sharding) if isinstance(x, jlora.LoraWeight) else x.value.sharding
                              for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]
    assert placement(loaded) == placement(fresh)
    assert P(None, "model") in [b.spec for pair in placement(loaded) if isinstance(pair, tuple) for b in pair]
    # an abstract base whose sharding does not divide a kernel: refused naming it, not inside JAX
    from jax.sharding import NamedSharding

    three = jlora.sharding.make_mesh({"model": 3}, devices=jax.devices()[:3])
    uneven = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(three, P("model"))),
                          model.params)
    with pytest.raises(ValueError, match=r"adapter: the base's sharding for 'model/layers/0/.*/kernel': axis 0 of shape .* which "
                                         r"does not divide over mesh axes \('model',\) of size 3"):
        jlora.peft.load_adapter(tmp_path / "adapter", uneven, model.config)


def test_a_decoder_only_reward_model_crosses_to_peft_as_the_readme_builds_it(tmp_path):
    """transformers 4 has no Flax LlamaForSequenceClassification: the body's params and a head of
    one's own, {"model": body, "score": ...}, saved with the PyTorch class in architectures, load
    in PEFT's class with the head as modules_to_save and score the same."""
    model = TINY["llama"]()
    body = tf.FlaxLlamaModel(model.config, seed=0)
    tree = {"model": model.params["model"], "score": {"kernel": normal(jax.random.key(7), (model.config.hidden_size, 1))}}
    params = perturb(jlora.lora_init(KEY, tree, jlora.LoraConfig(rank=4, targets=["q_proj", "v_proj"], trainable=["score"])),
                     jax.random.key(1))

    def score(p, ids):  # the last token's score, as PyTorch's class pools without padding
        return (body(ids, params=p["model"]).last_hidden_state @ p["score"]["kernel"])[:, -1, 0]

    config = tf.LlamaConfig(**{**model.config.to_dict(), "architectures": ["LlamaForSequenceClassification"],
                               "num_labels": 1, "pad_token_id": 0})
    out = jlora.peft.save_adapter(tmp_path / "adapter", params, config)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]
    hf.save_torch(model, model.params, tmp_path / "base")
    torch_model = tf.LlamaForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1, pad_token_id=0)
    peft_model = peft.PeftModel.from_pretrained(torch_model, out).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(IDS)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, jlora.apply(score)(params, IDS), rtol=1e-4, atol=1e-5)
