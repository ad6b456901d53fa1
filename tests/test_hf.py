"""HF Flax models: presets for every listed model type, lazy == merged, training, generate,
gradient checkpointing."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tf

import jlora
from jlora import hf
from oracle import normal, perturb

pytestmark = pytest.mark.filterwarnings("ignore:.*(TensorFlow and JAX classes|attention mask and the pad token).*")

TINY = {
    "gpt2": lambda: tf.FlaxGPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)),
    "llama": lambda: tf.FlaxLlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32)),
    "mistral": lambda: tf.FlaxMistralForCausalLM(tf.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, sliding_window=16)),
    "gemma": lambda: tf.FlaxGemmaForCausalLM(tf.GemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, vocab_size=64, max_position_embeddings=32)),
    "bert": lambda: tf.FlaxBertForSequenceClassification(tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64, num_labels=3)),
    "roberta": lambda: tf.FlaxRobertaModel(tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=40)),
    "bart": lambda: tf.FlaxBartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=32)),
    "opt": lambda: tf.FlaxOPTForCausalLM(tf.OPTConfig(
        hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=32, word_embed_proj_dim=32)),
    "gpt_neo": lambda: tf.FlaxGPTNeoForCausalLM(tf.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]], vocab_size=64,
        max_position_embeddings=32, window_size=8)),
    "gptj": lambda: tf.FlaxGPTJForCausalLM(tf.GPTJConfig(
        n_embd=32, n_layer=1, n_head=2, rotary_dim=8, vocab_size=64, n_positions=32)),
    "bloom": lambda: tf.FlaxBloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64)),
    "vit": lambda: tf.FlaxViTModel(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)),
    "electra": lambda: tf.FlaxElectraForMaskedLM(tf.ElectraConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64)),
    "xlm-roberta": lambda: tf.FlaxXLMRobertaModel(tf.XLMRobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
        max_position_embeddings=40)),
}
# Models whose __call__ takes more than token ids, or other inputs: example_inputs must build them.
OTHER_INPUTS = {
    "whisper": (lambda: tf.FlaxWhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=32, begin_suppress_tokens=None, suppress_tokens=None)), "all-linear"),
    "clip": (lambda: tf.FlaxCLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=16)), "all-linear"),
    "wav2vec2": (lambda: tf.FlaxWav2Vec2Model(tf.Wav2Vec2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer")), "all-linear"),
    "big_bird": (lambda: tf.FlaxBigBirdModel(tf.BigBirdConfig(  # block-sparse attention needs 12 blocks of tokens
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, attention_type="block_sparse", block_size=4, num_random_blocks=2)), "all-linear"),
    "bert-multiple-choice": (lambda: tf.FlaxBertForMultipleChoice(tf.BertConfig(  # ids (batch, choices, tokens)
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)), None),
    "speech-encoder-decoder": (lambda: tf.FlaxSpeechEncoderDecoderModel(  # its __call__ takes `inputs`
        tf.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
            tf.Wav2Vec2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                              feat_extract_norm="layer"),
            tf.BartConfig(vocab_size=64, d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                          max_position_embeddings=128, is_decoder=True, add_cross_attention=True))),
        "all-linear"),
    "resnet": (lambda: tf.FlaxResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
                                          input_shape=(1, 32, 32, 3)),  # no image_size in its config
               ["convolution"]),
}
IDS = jnp.array([[3, 5, 7, 9, 11, 2, 4, 6]])


def first_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("targets", ["preset", "all-linear"])
def test_every_model_type_lazy_equals_merged(model_type, targets):
    model = TINY[model_type]()
    assert model.config.model_type == model_type
    cfg = jlora.LoraConfig(rank=2, targets=None if targets == "preset" else "all-linear")
    lm = hf.LoraModel(model, cfg, jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    adapted = {x.path for x in jax.tree.leaves(lm.params, is_leaf=jlora.weight.is_node) if isinstance(x, jlora.LoraWeight)}
    if targets == "preset":
        assert adapted and all(any(t in p for t in hf.TARGET_PRESETS[model_type]) for p in adapted)
    inputs = hf.example_inputs(model)
    lazy = jax.jit(lambda p: first_output(lm(**inputs, params=p)))(lm.params)
    merged = first_output(model(**inputs, params=lm.merge()))
    np.testing.assert_allclose(lazy, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_merged_weights_written_for_pytorch_give_the_lazy_output(model_type, tmp_path):
    """save_torch's directory, loaded by the PyTorch class's from_pretrained, computes what the
    lazy adapters do (GPT-2's Conv1D kernels are stored (in, out) in PyTorch, the others (out, in))."""
    torch = pytest.importorskip("torch")
    model = TINY[model_type]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    inputs = hf.example_inputs(model)
    lazy = first_output(lm(**inputs))
    in_torch = getattr(tf, type(model).__name__.removeprefix("Flax")).from_pretrained(
        hf.save_torch(model, lm.merge(), tmp_path)).eval()
    with torch.no_grad():
        got = first_output(in_torch(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()})).numpy()
    np.testing.assert_allclose(got, lazy, rtol=1e-4, atol=1e-4)


TWO_PROCESS_SAVE_TORCH = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import numpy as np, transformers as tf
from unittest import mock
from jlora import hf, sharding
out = sys.argv[3]
model = tf.FlaxBertModel(tf.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                       vocab_size=16), seed=0)
mesh = sharding.make_mesh({"fsdp": 2, "data": -1})  # fsdp over the two processes
split = sharding.place(model.params, mesh, [sharding.fsdp(min_size=16)])
try:
    hf.save_torch(model, split, out + "/split")
except ValueError as err:
    print("refused:", err)
with mock.patch.object(tf.BertModel, "save_pretrained", autospec=True, side_effect=tf.BertModel.save_pretrained) as save:
    hf.save_torch(model, sharding.place(split, mesh, []), out + "/replicated")
print("wrote", save.call_count)
jax.distributed.shutdown()
"""


def test_two_processes_write_pytorch_weights_from_process_0(tmp_path, cpu_env):
    """Every process calls save_torch; process 0 alone writes weights held whole by each, and a
    split weight is refused on every process, naming it (p198: a deep JAX error, then every
    process writing one directory)."""
    pytest.importorskip("torch")
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SAVE_TORCH, str(port), str(i), str(tmp_path)],
                              env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    for i, out in enumerate(outs):
        assert re.search(r"refused: save_torch: '[^']+' is split across the devices of several processes \(this one "
                         r"holds part of it\); replicate it .*params = jlora.sharding.place\(params, mesh, \[\]\)", out), out
        assert f"wrote {1 - i}" in out
    assert not (tmp_path / "split").exists()
    model = tf.FlaxBertModel(tf.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                           vocab_size=16), seed=0)
    torch_model = tf.BertModel.from_pretrained(tmp_path / "replicated")
    np.testing.assert_array_equal(torch_model.pooler.dense.bias.detach().numpy(),
                                  np.asarray(model.params["pooler"]["dense"]["bias"]))


def test_a_model_whose_pytorch_class_computes_its_positions_is_written_for_pytorch(tmp_path):
    """Marian's PyTorch class holds a frozen sinusoidal position table that Flax computes on the
    fly: the converter leaves it as the class made it, and save_torch keeps it."""
    torch = pytest.importorskip("torch")
    model = tf.FlaxMarianMTModel(tf.MarianConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=63, decoder_start_token_id=63))
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"]), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    ids = np.arange(3, 11)[None]
    lazy = lm(ids, decoder_input_ids=ids).logits
    in_torch = tf.MarianMTModel.from_pretrained(hf.save_torch(model, lm.merge(), tmp_path)).eval()
    with torch.no_grad():
        got = in_torch(torch.tensor(ids), decoder_input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, lazy, rtol=1e-4, atol=1e-4)


def test_save_torch_needs_plain_params_and_a_pytorch_class(tmp_path):
    import logging

    model = TINY["gpt2"]()
    model.config.architectures = None  # a model built from a config: save_pretrained would set them on it
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2), jax.random.key(0))
    notes, handler = [], logging.Handler()
    handler.emit = notes.append
    logging.getLogger("transformers.modeling_flax_pytorch_utils").addHandler(handler)
    try:
        hf.save_torch(model, lm.merge(), tmp_path / "gpt2")  # its head, tied to the embedding, is filled with it
    finally:
        logging.getLogger("transformers.modeling_flax_pytorch_utils").removeHandler(handler)
    assert not [n.getMessage() for n in notes if "newly initialized" in n.getMessage()]  # as transformers logs it
    assert model.config.architectures is None  # the model's own config untouched (PEFT's task type reads it)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm.merge())  # kept in bf16, not widened to float32
    hf.save_torch(model, half, tmp_path / "bf16")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
        wte = f.get_tensor("transformer.wte.weight").float().numpy()
    np.testing.assert_array_equal(wte, np.asarray(half["transformer"]["wte"]["embedding"], np.float32))
    with pytest.raises(ValueError, match=r"save_torch: params hold jlora nodes or lazy values \(at \['transformer/h/0/attn"):
        hf.save_torch(model, lm.params, tmp_path)
    merged = lm.merge()
    without_head = {"transformer": {k: v for k, v in merged["transformer"].items() if k != "ln_f"}}
    with pytest.raises(ValueError, match=r"do not fit FlaxGPT2LMHeadModel \(another model.s\?\): missing \['transformer/ln_f/bias'"):
        hf.save_torch(model, without_head, tmp_path)
    with pytest.raises(ValueError, match=r"do not fit FlaxGPT2LMHeadModel \(another model.s\?\): \[.head/kernel.\] are no params of the model"):
        hf.save_torch(model, {**merged, "head": {"kernel": jnp.ones((2, 2))}}, tmp_path)  # it would be left out
    as_int8 = jax.tree_util.tree_map_with_path(lambda p, x: x.astype(jnp.int8) if "c_fc" in str(p) else x, merged)
    with pytest.raises(ValueError, match=r"'transformer/h/0/mlp/c_fc/bias' is int8 here but float32 in the model"):
        hf.save_torch(model, as_int8, tmp_path)  # would be written as zeros
    diverged = jax.tree_util.tree_map_with_path(lambda p, x: x * jnp.nan if "c_proj" in str(p) else x, merged)
    with pytest.raises(ValueError, match=r"params hold NaN or inf at \['transformer/h/0/attn/c_proj/bias', .*diverged"):
        hf.save_torch(model, diverged, tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file exists and is not a directory"):  # transformers only logs it
        hf.save_torch(model, merged, tmp_path / "a_file")

    class FlaxNoSuchModel:
        config = None
        params_shape_tree = {}

    with pytest.raises(ValueError, match="FlaxNoSuchModel has no PyTorch class NoSuchModel"):
        hf.save_torch(FlaxNoSuchModel(), {}, tmp_path)
    # HF's Flax ResNet of basic layers names their convs layer/layer_0, PyTorch layer.0: transformers'
    # converter only logs the weights it leaves at their random init
    resnet = tf.FlaxResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                depths=[1, 1], layer_type="basic"))
    with pytest.raises(ValueError, match=r"converter fills no value into \['encoder.stages.0.layers.0.layer.0."
                                         r"convolution.weight', .* and \d+ more of ResNetModel"):
        hf.save_torch(resnet, resnet.params, tmp_path / "resnet")
    assert not (tmp_path / "resnet").exists()


def test_gpt2_conv1d_layout_is_declared_out_in():
    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2, targets="all-linear"))
    c_attn = lm.params["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert str(c_attn.layout) == "oi" and c_attn.a.shape == (32, 2) and c_attn.b.shape == (2, 96)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral"])
def test_causal_lm_train_steps_lower_the_loss_and_generate_agrees(model_type):
    model = TINY[model_type]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=4, alpha=8, targets="all-linear"), jax.random.key(0))
    trainable, frozen = jlora.split(lm.params)
    tx = jlora.optimizer(optax.adam(1e-2), trainable, b_lr_ratio=4.0)
    state = tx.init(trainable)
    seq = jnp.tile(jnp.arange(2, 18)[None], (4, 1))

    def loss_fn(t):
        logits = lm(seq[:, :-1], params=jlora.combine(t, frozen)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    first = None
    for _ in range(30):
        trainable, state, loss = step(trainable, state)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.9 * first
    lm.params = jlora.combine(trainable, frozen)
    prompt = jnp.array([[2, 3, 4, 5]])
    unmerged = lm.generate(prompt, max_new_tokens=6, do_sample=False).sequences
    merged = lm.generate(prompt, max_new_tokens=6, do_sample=False, merged=True).sequences
    np.testing.assert_array_equal(unmerged, merged)
    assert unmerged.shape == (1, 10)
    mask = np.ones((1, 4), np.int32)  # what a tokenizer gives with return_tensors="np"
    with_mask = lm.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False).sequences
    np.testing.assert_array_equal(with_mask, unmerged)
    if model_type != "gpt2":
        return  # generate's options below take the same path for every decoder: checked once
    banned = [int(t) for t in unmerged[0, 4:6]]  # a list argument, as HF takes it (suppress_tokens)
    suppressed = lm.generate(prompt, max_new_tokens=6, do_sample=False, suppress_tokens=banned).sequences
    np.testing.assert_array_equal(suppressed, lm.generate(prompt, max_new_tokens=6, do_sample=False,
                                                          suppress_tokens=banned, merged=True).sequences)
    assert not set(banned) & set(np.asarray(suppressed[0, 4:]).tolist())
    mine = [int(t) for t in unmerged[0, 6:8]]
    lm.generate(prompt, max_new_tokens=6, do_sample=False, suppress_tokens=mine)
    want = lm.generate(prompt[:, :3], max_new_tokens=6, do_sample=False, suppress_tokens=list(mine), merged=True)
    again = list(mine)
    mine.clear()  # the caller's list changed after its call: a later trace (a new prompt length) must not see it
    np.testing.assert_array_equal(lm.generate(prompt[:, :3], max_new_tokens=6, do_sample=False,
                                              suppress_tokens=again).sequences, want.sequences)
    # the model's config changed after a first call: traced anew, as the model itself reads it
    stop = int(unmerged[0, 5])
    lm.model.generation_config.eos_token_id = stop
    np.testing.assert_array_equal(lm.generate(prompt, max_new_tokens=6, do_sample=False).sequences,
                                  lm.generate(prompt, max_new_tokens=6, do_sample=False, merged=True).sequences)
    lm.model.config.output_hidden_states = True
    assert lm(prompt).hidden_states is not None
    lm.model.config.output_hidden_states = False


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_a_kv_cache_comes_back_from_the_adapted_model_and_decodes_as_the_merged_one(model_type):
    """Llama and OPT (as Mistral, Gemma, ...) set ``past_key_values`` on an output class without that field: the
    key must come back all the same, and decoding one token at a time with it must give the full
    sequence's logits."""
    model = TINY[model_type]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    ids, length = IDS[:, :4], 8
    mask = jnp.zeros((1, length), jnp.int32).at[:, :4].set(1)
    full = model(ids, params=lm.merge()).logits
    step_logits, cache = [], model.init_cache(1, length)
    for i in range(4):
        out = lm(ids[:, i:i + 1], attention_mask=mask, past_key_values=cache, position_ids=jnp.array([[i]]))
        assert "past_key_values" in out.keys()
        step_logits.append(out.logits)
        cache = out.past_key_values
    np.testing.assert_allclose(jnp.concatenate(step_logits, axis=1), full, rtol=1e-4, atol=1e-4)


def test_bert_classifier_trains_with_a_fully_trained_head():
    model = TINY["bert"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=4, targets=["query", "value"], trainable=["classifier"]))
    assert isinstance(lm.params["classifier"]["kernel"], jlora.Trainable)
    ids = jax.random.randint(jax.random.key(0), (8, 8), 0, 64)
    labels = jnp.arange(8) % 3
    trainable, frozen = jlora.split(lm.params)
    tx = jlora.optimizer(optax.adam(3e-2), trainable)
    state = tx.init(trainable)

    def loss_fn(t):
        logits = lm(ids, params=jlora.combine(t, frozen)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    losses = []
    for _ in range(30):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])  # HF implements it for these, not Llama or GPT-2
def test_gradient_checkpointing_gives_the_same_grads(model_type):
    model = TINY[model_type]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    params = perturb(lm.params, jax.random.key(1))
    remat = TINY[model_type]()
    remat.enable_gradient_checkpointing()
    lm_remat = hf.LoraModel(remat, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    trainable, frozen = jlora.split(params)

    def grads(handle):
        loss = lambda t: jnp.mean(first_output(handle(IDS, params=jlora.combine(t, frozen))) ** 2)
        return jax.jit(jax.grad(loss))(trainable)

    jaxpr = str(jax.make_jaxpr(lambda t: first_output(lm_remat(IDS, params=jlora.combine(t, frozen))))(trainable))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(lm), grads(lm_remat))


@pytest.mark.parametrize("name", sorted(OTHER_INPUTS))
def test_models_taking_other_inputs_are_traced_on_their_own_dummy_inputs(name):
    make, targets = OTHER_INPUTS[name]
    model = make()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=targets), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    inputs = {k: jnp.asarray(normal(jax.random.key(2), v.shape)) if v.dtype == jnp.float32 else v
              for k, v in hf.example_inputs(model).items()}
    out = lambda o: o.logits_per_image if hasattr(o, "logits_per_image") else first_output(o)
    lazy = jax.jit(lambda p: out(lm(**inputs, params=p)))(lm.params)
    plain = jax.jit(lambda p: out(model(**inputs, params=p)))  # one compile, not one per op
    merged = plain(lm.merge())
    np.testing.assert_allclose(lazy, merged, rtol=1e-5, atol=1e-5)
    assert float(np.abs(np.asarray(merged) - plain(model.params)).max()) > 1e-4  # the adapters matter


def test_a_layer_as_wide_as_the_vocabulary_is_no_output_embedding():
    """CTC over 32 characters with a hidden size of 32: the feature projection (16 -> 32) is as wide as
    the vocabulary, and all-linear adapts it, as PEFT does (it was left out as an output embedding:
    one is a kernel (d, V) beside an input table (V, d), which an audio model has none of)."""
    config = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                               feat_extract_norm="layer")
    model = tf.FlaxWav2Vec2ForCTC(config)
    assert hf.output_embeddings(model.params, config) == []
    params = hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2, targets="all-linear"))
    adapted = {x.path for x in jax.tree.leaves(params, is_leaf=jlora.weight.is_node) if isinstance(x, jlora.LoraWeight)}
    assert "wav2vec2/feature_projection/projection/kernel" in adapted


def test_an_output_embedding_beside_a_quantized_input_table_is_one():
    """A quantized input table is one leaf (an int8 array and its scales): its shape still tells the
    untied LM head beside it for the output embedding all-linear leaves alone."""
    from quantized import quantize

    params = {"embed_tokens": {"embedding": quantize(jnp.ones((50, 32)))},
              "decoder_head": {"kernel": jnp.ones((32, 50))}, "layers": {"0": {"up": {"kernel": jnp.ones((32, 50))}}}}
    assert hf.output_embeddings(params, tf.LlamaConfig(vocab_size=50)) == ["decoder_head/kernel"]


def test_generate_takes_the_inputs_as_the_models_generate_does():
    """Whisper's generate is called with input_features=, as HF's examples call it."""
    model = tf.FlaxWhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=32, begin_suppress_tokens=None, suppress_tokens=None, decoder_start_token_id=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), jax.random.key(0))
    lm.params = perturb(lm.params, jax.random.key(1))
    features = normal(jax.random.key(2), (1, 8, 32))
    by_keyword = lm.generate(input_features=features, max_new_tokens=3).sequences
    np.testing.assert_array_equal(by_keyword, lm.generate(features, max_new_tokens=3).sequences)
    np.testing.assert_array_equal(by_keyword, lm.generate(input_features=features, max_new_tokens=3,
                                                          merged=True).sequences)
    # an option given as a 0-d numpy array (read from a config file) is its value, as HF takes it
    np.testing.assert_array_equal(by_keyword, lm.generate(features, max_new_tokens=np.array(3)).sequences)
    np.testing.assert_array_equal(by_keyword, lm.generate(features, max_new_tokens=jnp.array(3)).sequences)


def test_a_saved_adapter_runs_in_a_lora_model_as_it_was_trained(tmp_path):
    model = TINY["gpt2"]()
    trained = perturb(hf.LoraModel(model, jlora.LoraConfig(rank=2)).params, jax.random.key(1))
    jlora.adapter.save_adapter(tmp_path / "ad", trained)
    lm = hf.LoraModel(model, params=jlora.adapter.load_adapter(tmp_path / "ad", model.params))
    jax.tree.map(np.testing.assert_array_equal, lm.params, trained)
    ids = jnp.array([[3, 5, 7, 9]])
    np.testing.assert_allclose(lm(ids).logits, model(ids, params=jlora.merge(trained)).logits, rtol=1e-5, atol=1e-5)
    # the adapter's config is not the model type's preset: lm.config is None, or the config given
    assert lm.config is None
    made_with = jlora.LoraConfig(rank=2, targets=["c_attn"])
    assert hf.LoraModel(model, made_with, params=lm.params).config is made_with
    # saved with its config, the README's round trip keeps it for the next save
    first = hf.LoraModel(model, jlora.LoraConfig(rank=2))
    jlora.adapter.save_adapter(tmp_path / "with", first.params, lora_config=first.config)
    assert jlora.adapter.load_config(tmp_path / "ad") is None  # saved without one
    again = hf.LoraModel(model, jlora.adapter.load_config(tmp_path / "with"),
                         params=jlora.adapter.load_adapter(tmp_path / "with", model.params))
    assert again.config == first.config
    # LoRA dropout only starts a step: the config's, where it differs (loaded for inference without it)
    other_rate = hf.LoraModel(model, first.config.replace(dropout=0.2), params=first.params)
    rates = {x.dropout for x in jax.tree.leaves(other_rate.params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
             if isinstance(x, jlora.LoraWeight)}
    assert rates == {0.2}
    for save in (lambda: jlora.adapter.save_adapter(tmp_path / "model", first),
                 lambda: jlora.peft.save_adapter(tmp_path / "model", first, model.config)):
        with pytest.raises(ValueError, match=r"hold no LoraWeight.* \(that is a LoraModel: pass its .params\)"):
            save()
    with pytest.raises(ValueError, match=r"jlora.hf.LoraModel: lora_config makes '.*' rank 4, scale 2; the adapter "
                                         r"there has rank 2, scale 4:"):  # not the dropout it set to the config's
        hf.LoraModel(model, jlora.LoraConfig(rank=4, dropout=0.1), params=lm.params)
    with pytest.raises(TypeError, match="config must be a jlora.LoraConfig"):
        hf.LoraModel(model, {"rank": 2}, params=lm.params)
    with pytest.raises(ValueError, match=r"save_adapter: lora_config makes '.*c_attn/kernel' rank 8, scale 1; the "
                                         r"adapter there has rank 2, scale 4"):
        jlora.adapter.save_adapter(tmp_path / "again", lm.params, lora_config=jlora.LoraConfig(rank=8, targets=["c_attn"]))
    other = TINY["llama"]()  # another model's adapters: said here, not by Flax at the first call
    with pytest.raises(ValueError, match=r"jlora.hf.LoraModel: params do not fit FlaxLlamaForCausalLM \(another model's\?\): "
                                         r"\['transformer/h/0/attn/c_attn/bias', .*\] are no params of the model"):
        hf.LoraModel(other, params=lm.params)
    served = hf.LoraModel(other)  # ... and per request: a call's params=, or lm.params assigned
    for call in (lambda: served(ids, params=lm.params), lambda: served.generate(ids, params=lm.params, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"^LoraModel(.generate)?: params do not fit FlaxLlamaForCausalLM "
                                             r"\(another model's\?\): \['transformer/h/0/attn/c_attn/bias'"):
            call()
    served.params = lm.params
    with pytest.raises(ValueError, match=r"^LoraModel: params do not fit FlaxLlamaForCausalLM"):
        served(ids)
    # a model type without a preset: loaded adapters need none
    xglm = tf.FlaxXGLMForCausalLM(tf.XGLMConfig(vocab_size=64, d_model=32, num_layers=1, attention_heads=2, ffn_dim=64,
                                                 max_position_embeddings=32))
    adapted = jlora.lora_init(jax.random.key(0), xglm.params, jlora.LoraConfig(rank=2, targets=["q_proj"]))
    assert hf.LoraModel(xglm, params=adapted).params is adapted


def test_a_lora_model_refuses_a_half_or_a_stack_of_adapters_when_built_and_serves_a_stack_under_vmap():
    model = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn"]))
    trainable, frozen = jlora.split(perturb(lm.params, jax.random.key(1)))
    stacked = jlora.stack([trainable, jax.tree.map(lambda x: 2 * x, trainable)])
    with pytest.raises(ValueError, match=r"jlora.hf.LoraModel: '.*c_attn/kernel' comes from the trainable half"):
        hf.LoraModel(model, params=trainable)
    with pytest.raises(ValueError, match=r"jlora.hf.LoraModel: '.*c_attn/kernel' has a \(2, 32, 2\) .* 1 leading axis\(es\) "
                                         r"that w \(96, 32\) lacks: .* build it on one adapter's params, then jax.vmap"):
        hf.LoraModel(model, params=jlora.combine(stacked, frozen))
    ids = jnp.array([[3, 5, 7, 9]])
    served = jax.vmap(lambda t, x: lm(x, params=jlora.combine(t, frozen)).logits, in_axes=(0, None))(stacked, ids)
    for i, t in enumerate([trainable, jax.tree.map(lambda x: 2 * x, trainable)]):
        want = model(ids, params=jlora.merge(jlora.combine(t, frozen))).logits
        np.testing.assert_allclose(served[i], want, rtol=1e-5, atol=1e-5)
    # adapters that train whole leaves (ln_f): the README's zero adapter keeps the base's values there
    config = jlora.LoraConfig(rank=2, targets=["c_attn"], trainable=["ln_f"])
    trained = jlora.split(perturb(hf.lora_init(jax.random.key(0), model, config), jax.random.key(2)))[0]
    zero, frozen_with = jlora.split(hf.lora_init(jax.random.key(3), model, config))
    served = jax.vmap(lambda t, x: lm(x, params=jlora.combine(t, frozen_with)).logits, in_axes=(0, None))(
        jlora.stack([trained, zero]), ids)
    np.testing.assert_allclose(served[1], jax.jit(model.__call__)(ids).logits, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(served[0] - served[1]).max()) > 1e-3


def test_rows_generate_each_with_its_own_adapter_under_vmap():
    """PEFT's mixed-adapter batches (``generate(adapter_names=...)``): a stack of trainable halves,
    ``jax.vmap`` over ``LoraModel.generate``; each row decodes as its adapter alone does."""
    model = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets=["c_attn"]))
    trainable, frozen = jlora.split(lm.params)
    halves = [perturb(lm.params, jax.random.key(i), scale=0.5) for i in range(2)]
    halves = [jlora.split(h)[0] for h in halves] + [jax.tree.map(jnp.zeros_like, trainable)]  # the last: the base
    ids = jnp.array([[3, 5, 7], [9, 11, 2], [4, 6, 8]])
    generate = lambda t, row: lm.generate(row[None], params=jlora.combine(t, frozen), max_new_tokens=4,
                                          pad_token_id=0).sequences[0]
    rows = jax.jit(jax.vmap(generate))(jlora.stack(halves), ids)
    for i, half in enumerate(halves):
        alone = model.generate(ids[i:i + 1], params=jlora.merge(jlora.combine(half, frozen)), max_new_tokens=4,
                               pad_token_id=0).sequences[0]
        np.testing.assert_array_equal(rows[i], alone)
    # sampling with a key per row and a mask per row; beams
    keys, mask = jax.random.split(jax.random.key(7), 3), jnp.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    for option in (dict(do_sample=True), dict(num_beams=2)):
        run = lambda t, row, key, m: lm.generate(row[None], attention_mask=m[None], params=jlora.combine(t, frozen),
                                                 max_new_tokens=3, pad_token_id=0, prng_key=key, **option).sequences[0]
        rows = jax.jit(jax.vmap(run))(jlora.stack(halves), ids, keys, mask)
        for i, half in enumerate(halves):
            alone = lm.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], params=jlora.combine(half, frozen),
                                max_new_tokens=3, pad_token_id=0, prng_key=keys[i], **option).sequences[0]
            np.testing.assert_array_equal(rows[i], alone)


def test_lora_init_refuses_params_that_are_not_the_models_own():
    model = TINY["gpt2"]()
    with_head = {"lm": model.params, "v_head": {"kernel": jnp.ones((32, 1))}}  # PPO's value head beside the model
    with pytest.raises(ValueError, match=r"jlora.hf.lora_init: params do not fit FlaxGPT2LMHeadModel .*; params beyond "
                                         r"the model's .*: jlora.lora_init\(key, params, config, infer_layout=f\)"):
        hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2), params=with_head)
    bigger = jax.tree.map(lambda x: jnp.ones((2, *x.shape)), model.params)
    with pytest.raises(ValueError, match=r"params do not fit .* is \(2, .*\) here but"):
        hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2), params=bigger)
    partial = {"transformer": {k: v for k, v in model.params["transformer"].items() if k != "ln_f"}}
    with pytest.raises(ValueError, match=r"params do not fit .*: missing \['transformer/ln_f/bias'.*; .*initialise "
                                         r"the missing ones first, model.init_weights\("):
        hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2), params=partial)
    own = jax.tree.map(lambda x: x + 1, model.params)  # the model's own tree, other values: taken
    assert jax.tree.leaves(hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=2), params=own))


def test_generate_says_what_it_cannot_do():
    model = TINY["gpt2"]()
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2))
    ids = jnp.array([[3, 5, 7, 9]])
    with pytest.raises(ValueError, match=r"trace=False runs HF's decoding loop in Python .* generate with merged=True"):
        lm.generate(ids, max_new_tokens=2, trace=False)
    assert lm.generate(ids, max_new_tokens=2, trace=False, merged=True).sequences.shape == (1, 6)
    with pytest.raises(ValueError, match=r"generate runs the adapters without LoRA dropout.* lm\(\.\.\., lora_rng=key\)"):
        lm.generate(ids, max_new_tokens=2, lora_rng=jax.random.key(0))
    trainable, frozen = jlora.split(lm.params)
    with pytest.raises(ValueError, match=r"frozen half of jlora.split.* \(it is keyword argument 'params' at '.*': the "
                                         r"frozen half holds no adapters\)"):
        lm.generate(ids, max_new_tokens=2, params=frozen)
    with pytest.raises(ValueError, match=r"trainable half of jlora.split.* \(it is keyword argument 'params' at '.*': a "
                                         r"trainable half, an optimizer state or gradients hold no base weight\)"):
        lm.generate(ids, max_new_tokens=2, params=trainable)


def test_generate_keeps_its_compiled_calls_used_last_and_says_when_calls_cycle_through_more():
    """A server whose requests cycle through more sets of options than generate keeps compiles each
    anew: told once, at the user's call, with the setting to raise."""
    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2), generate_cache_size=2)
    ids = jnp.array([[3, 5, 7, 9]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (1, 2, 1, 3):  # 1 used again before 3 comes: 2 goes
            lm.generate(ids, max_new_tokens=n, pad_token_id=0)
    assert [dict(key[1])["max_new_tokens"] for key in lm._generate] == [1, 3]
    with pytest.warns(UserWarning, match=r"compiled again: calls cycle through more than 2 sets of options.*"
                                         r"LoraModel\(\.\.\., generate_cache_size=N\)") as record:
        for n in (2, 1, 3, 2):  # 2 was dropped: compiled again
            lm.generate(ids, max_new_tokens=n, pad_token_id=0)
    assert [w.filename for w in record if "generate_cache_size" in str(w.message)] == [__file__]
    with pytest.raises(ValueError, match="generate_cache_size must be a positive int, got 0"):
        hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2), generate_cache_size=0)


def test_a_lora_model_keeps_cache_size_signatures_and_says_when_calls_cycle_through_more():
    """Eager serving of more prompt lengths than a LoraModel keeps: each call traced and compiled
    anew. Told, at the user's call, with the setting to raise; none with it raised."""
    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2), cache_size=2)
    lengths = (1, 2, 3, 1)
    with pytest.warns(UserWarning, match=r"calls cycle through more than cache_size=2 signatures.*"
                                         r"jlora.hf.LoraModel\(\.\.\., cache_size=N\)") as record:
        for n in lengths:
            lm(jnp.ones((1, n), jnp.int32))
    assert [w.filename for w in record if "traced again" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="cache_size=2 signatures") as record:  # generate's calls likewise
        for n in lengths:
            lm.generate(jnp.ones((1, n), jnp.int32), max_new_tokens=1, pad_token_id=0)
    assert [w.filename for w in record if "traced again" in str(w.message)] == [__file__]
    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2), cache_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in lengths:
            lm(jnp.ones((1, n), jnp.int32))


def test_a_lora_model_dropped_after_generate_goes_at_once():
    """Its compiled calls hold the model, not the LoraModel (and its params): dropped, it goes at
    once, not at the next collection of reference cycles."""
    import gc
    import weakref

    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2))
    lm.generate(jnp.array([[3, 5, 7, 9]]), max_new_tokens=1, pad_token_id=0)
    alive = weakref.ref(lm)
    gc.disable()
    try:
        del lm
        assert alive() is None
    finally:
        gc.enable()


def test_generate_follows_an_option_whose_state_changed_between_calls():
    """A logits processor compares by identity: a cached trace would keep the state it had first."""
    from transformers.generation.flax_logits_process import FlaxLogitsProcessor, FlaxLogitsProcessorList

    class Ban(FlaxLogitsProcessor):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, cur_len):
            return scores.at[:, self.token].set(-jnp.inf)

    lm = hf.LoraModel(TINY["gpt2"](), jlora.LoraConfig(rank=2))
    lm.params = perturb(lm.params, jax.random.key(1))
    ids, ban = jnp.array([[3, 5, 7, 9]]), Ban(0)
    processors = FlaxLogitsProcessorList([ban])
    first = lm.generate(ids, max_new_tokens=3, pad_token_id=0, logits_processor=processors).sequences
    ban.token = int(first[0, 4])  # the first token it generated, banned now
    got = lm.generate(ids, max_new_tokens=3, pad_token_id=0, logits_processor=processors).sequences
    want = lm.model.generate(ids, max_new_tokens=3, pad_token_id=0, logits_processor=processors,
                             params=lm.merge()).sequences
    assert int(got[0, 4]) != int(first[0, 4]) and np.array_equal(got, want)


def test_example_inputs_can_be_given():
    class FlaxTokensGPT2(tf.FlaxGPT2LMHeadModel):  # a __call__ whose inputs example_inputs does not know
        def __call__(self, tokens, params=None, **kwargs):
            return super().__call__(tokens, params=params, **kwargs)

    model = FlaxTokensGPT2(tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"no example inputs for FlaxTokensGPT2 \(its __call__ takes tokens, params"):
        hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"))
    with pytest.raises(ValueError, match=r"inputs= takes the keyword arguments of one small call of the model, a dict "
                                         r"such as \{'input_ids': ids\}; got jax.*Array"):
        hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), inputs=IDS)
    lm = hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), inputs=tf.BatchEncoding({"tokens": IDS}))
    assert str(lm.params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"].layout) == "oi"
    assert jax.jit(lambda p: lm(IDS, params=p).logits)(lm.params).shape == (1, 8, 64)
    if hasattr(Exception, "add_note"):  # Python 3.11+: inputs the model cannot take say where they came from
        with pytest.raises(Exception) as caught:
            hf.LoraModel(model, jlora.LoraConfig(rank=2, targets="all-linear"), inputs={"tokens": IDS[0, 0]})
        assert "the call traced to infer layouts, FlaxTokensGPT2(**{'tokens': ()}), failed; pass inputs=" in "".join(
            caught.value.__notes__)


def test_t5_preset_adapts_q_and_v():
    try:
        model = tf.FlaxT5ForConditionalGeneration(tf.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0))
    except TypeError as e:  # HF's Flax T5 calls jnp.clip(a_max=...), which JAX 0.10 removed
        pytest.skip(f"FlaxT5 does not run on this JAX: {e}")
    lm = hf.LoraModel(model, None, jax.random.key(0))
    adapted = sorted(x.path for x in jax.tree.leaves(lm.params, is_leaf=jlora.weight.is_node)
                     if isinstance(x, jlora.LoraWeight))
    assert len(adapted) == 2 * 3 and all(p.split("/")[-2] in ("q", "v") for p in adapted)  # enc self, dec self, cross
    inputs = hf.example_inputs(model)
    lm.params = perturb(lm.params, jax.random.key(1))
    np.testing.assert_allclose(lm(**inputs).logits, model(**inputs, params=lm.merge()).logits, rtol=1e-5, atol=1e-5)


def test_model_type_without_preset_needs_targets():
    with pytest.raises(ValueError, match="no target preset for model type 'mystery'"):
        hf.preset_config("mystery")
    assert hf.preset_config("mystery", jlora.LoraConfig(targets=["dense"])).targets == ("dense",)


def test_what_is_not_a_model_instance_or_a_jlora_config_is_refused_by_name():
    model = TINY["gpt2"]()
    with pytest.raises(TypeError, match=r"pass a model instance, e.g. FlaxGPT2LMHeadModel\(config\) or "
                                        r"FlaxGPT2LMHeadModel.from_pretrained\(...\), not the class"):
        hf.LoraModel(tf.FlaxGPT2LMHeadModel)
    with pytest.raises(TypeError, match=r"lora_init: takes a HF Flax model .* got dict; pass the model, and params "
                                        "of your own as params="):
        hf.lora_init(jax.random.key(0), model.params)
    with pytest.raises(TypeError, match=r"example_inputs: takes a HF Flax model .* got object"):
        hf.example_inputs(object())
    with pytest.raises(ValueError, match=r"jlora.hf.LoraModel: expected a PRNG key \(jax.random.key\(seed\)\), got 0"):
        hf.LoraModel(model, None, 0)

    class LoraConfig:  # PEFT's, say: another class of the same name
        target_modules = ["c_attn"]

    with pytest.raises(TypeError, match=r"config must be a jlora.LoraConfig, e.g. jlora.LoraConfig\(rank=8, alpha=16, "
                                        r"targets=\[...\]\), got test_hf.test_what_.*<locals>.LoraConfig"):
        hf.LoraModel(model, LoraConfig())
