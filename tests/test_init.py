import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import LoraConfig, lora_init
from jlora.variables import value_of
from oracle import check_against_oracle, perturb
from quantized import INT8_DOTS, quantize

KEY = jax.random.key(0)


def base():
    return {
        "layers": [
            {"attn": {"q_proj": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)},
                      "v_proj": {"kernel": jnp.ones((16, 8))}},
             "norm": {"scale": jnp.ones(16)}}
            for _ in range(2)
        ],
        "embed": {"embedding": jnp.ones((50, 16))},
        "lm_head": {"kernel": jnp.ones((16, 50))},
        "step": jnp.array(3, jnp.int32),
    }


def adapted(tree):
    return {x.path: x for x in jax.tree.leaves(tree, is_leaf=jlora.weight.is_node) if isinstance(x, jlora.LoraWeight)}


def test_targets_select_kernels_of_matched_modules():
    p = lora_init(KEY, base(), LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert sorted(adapted(p)) == [f"layers/{i}/attn/{m}/kernel" for i in range(2) for m in ("q_proj", "v_proj")]
    lw = p["layers"][0]["attn"]["q_proj"]["kernel"]
    assert lw.a.shape == (16, 4) and lw.b.shape == (4, 16) and float(jnp.abs(lw.b).max()) == 0.0
    bound = 1 / np.sqrt(16)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(jnp.abs(lw.a).max()) <= bound and float(jnp.abs(lw.a).max()) > 0.5 * bound


def test_all_linear_skips_head_and_embeddings_and_embedding_needs_explicit_target():
    assert sorted(adapted(lora_init(KEY, base(), LoraConfig(targets="all-linear")))) == [
        f"layers/{i}/attn/{m}/kernel" for i in range(2) for m in ("q_proj", "v_proj")]
    # a kernel narrower than the rank is an output head by its size (NSP's 2 outputs, the classes):
    # all-linear leaves it out; named as a target, it is an error
    narrow = {**base(), "nsp": {"kernel": jnp.ones((16, 2))}}
    with pytest.warns(UserWarning, match=r"all-linear leaves out 1 kernel\(s\) narrower than rank 4, taken for "
                                         r"heads: \['nsp/kernel \(16x2\)'\]"):  # said: linen's layers_0 is no index
        assert "nsp/kernel" not in adapted(lora_init(KEY, narrow, LoraConfig(rank=4, targets="all-linear")))
    stack = {**base(), "layers": {"gate": {"kernel": jnp.ones((3, 16, 2))}}}  # nn.scan's stack: layers, not a head
    with pytest.raises(ValueError, match=r"rank 4 for 'layers/gate/kernel' exceeds min\(in=16, out=2\) of its "
                                         r"float32\[3,16,2\] kernel; targets='all-linear' took it for a hidden layer, "
                                         r"as it is a stack of layers \(a batch axis\)"):
        lora_init(KEY, stack, LoraConfig(rank=4, targets="all-linear", layouts={"gate": "bio"}))
    with pytest.raises(ValueError, match=r"rank 4 for 'nsp/kernel' exceeds min\(in=16, out=2\) of its float32\[16,2\] "
                                         r"kernel; lower the rank, or give this kernel one that fits "
                                         r"\(LoraConfig\(rank_pattern=\{'nsp': 2\}\)\)$"):
        lora_init(KEY, narrow, LoraConfig(rank=4, targets=["nsp"]))
    # nnx.Sequential's classifier: its output layer is one of the numbered layers; the hint says how out
    sequential = {"layers": {"0": {"kernel": jnp.ones((8, 16))}, "2": {"kernel": jnp.ones((16, 3))}}}
    with pytest.raises(ValueError, match=r"'layers/2/kernel' exceeds .* as it sits in a numbered list of layers; if it "
                                         r"is the output head, leave it out \(LoraConfig\(exclude=\['layers/2'\]\)\), else "
                                         r"give it a rank that fits \(LoraConfig\(rank_pattern=\{'layers/2': 3\}\)\)$"):
        lora_init(KEY, sequential, LoraConfig(rank=4))
    assert sorted(adapted(lora_init(KEY, sequential, LoraConfig(rank=4, exclude=["layers/2"])))) == ["layers/0/kernel"]
    assert sorted(adapted(lora_init(KEY, sequential, LoraConfig(rank=4, rank_pattern={"layers/2": 3})))) == [
        "layers/0/kernel", "layers/2/kernel"]
    with pytest.raises(ValueError, match=r"rank 64 for 'layers/0/attn/q_proj/kernel' exceeds"):  # inside the layers
        lora_init(KEY, base(), LoraConfig(rank=64, targets="all-linear"))
    with pytest.raises(ValueError, match="rank 64 exceeds min.in, out. of every kernel all-linear selects"):
        lora_init(KEY, {"dense": {"kernel": jnp.ones((16, 16))}}, LoraConfig(rank=64, targets="all-linear"))
    # in an LM head, the projection onto the vocabulary is left alone, a square transform is not
    lm = {**base(), "lm_head": {"Dense_0": {"kernel": jnp.ones((16, 50))}, "dense": {"kernel": jnp.ones((16, 16))}}}
    picked = adapted(lora_init(KEY, lm, LoraConfig(rank=4, targets="all-linear")))
    assert "lm_head/dense/kernel" in picked and "lm_head/Dense_0/kernel" not in picked
    # a classification head (BART's) is left whole, its square dense too
    cls = {**base(), "classification_head": {"dense": {"kernel": jnp.ones((16, 16))}, "out_proj": {"kernel": jnp.ones((16, 8))}}}
    assert not [p for p in adapted(lora_init(KEY, cls, LoraConfig(rank=4, targets="all-linear"))) if "classification" in p]
    # Keras's classifier layer, MaxText's output layer; a square transform under BERT's cls/predictions is adapted
    named = {**base(), "predictions": {"kernel": jnp.ones((16, 8))}, "decoder": {"logits_dense": {"kernel": jnp.ones((16, 50))}},
             "cls": {"predictions": {"transform": {"dense": {"kernel": jnp.ones((16, 16))}}}}}
    picked = adapted(lora_init(KEY, named, LoraConfig(rank=4, targets="all-linear")))
    assert "cls/predictions/transform/dense/kernel" in picked
    assert "predictions/kernel" not in picked and "decoder/logits_dense/kernel" not in picked
    # a model of convs only: all-linear takes none, and the message names the convs to take instead
    convs = nn.Sequential([nn.Conv(4, (3, 3)), nn.Conv(4, (1, 1))])
    x = jnp.ones((1, 8, 8, 3))
    conv_params = convs.init(KEY, x)
    with pytest.raises(ValueError, match=r"selects no kernel: .*name the kernels to adapt, e.g. targets=\['layers_0', "
                                         r"'layers_1'\]"):
        lora_init(KEY, conv_params, LoraConfig(rank=2, targets="all-linear"), infer_layout=lambda p: convs.apply(p, x))
    class Classifier(nn.Module):  # its only matmul the head
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="classifier")(nn.Conv(4, (3, 3))(x).mean((1, 2)))

    classifier = Classifier()
    with pytest.raises(ValueError, match=r"selects no kernel: it adapts dense kernels but for the output head, .* "
                                         r"saw no other kernel in a matmul \(in a conv, a lookup"):
        lora_init(KEY, classifier.init(KEY, x), LoraConfig(rank=2, targets="all-linear"),
                  infer_layout=lambda p: classifier.apply(p, x))
    p = lora_init(KEY, base(), LoraConfig(rank=4, targets=["embed"]))
    emb = adapted(p)["embed/embedding"]
    assert float(jnp.abs(emb.a).max()) == 0.0 and float(jnp.abs(emb.b).max()) > 0  # PEFT's embedding init
    # a matmul leaf whose name merely ends in "embedding" gets the matmul init
    unemb = adapted(lora_init(KEY, {"unembedding": jnp.ones((16, 50))}, LoraConfig(rank=4, targets=["unembedding"])))
    assert float(jnp.abs(unemb["unembedding"].a).max()) > 0 and float(jnp.abs(unemb["unembedding"].b).max()) == 0.0
    # a table of another name that infer_layout sees looked up only (Equinox's Embedding.weight) gets the
    # embedding init; one also multiplied (a tied head) the matmul init
    tables = {"tok": {"weight": jnp.ones((50, 16))}, "tied": {"weight": jnp.ones((50, 16))}}
    use = lambda p: p["tok"]["weight"][jnp.arange(3)].sum() + (p["tied"]["weight"][jnp.arange(3)] @ p["tied"]["weight"].T).sum()
    got = adapted(lora_init(KEY, tables, LoraConfig(rank=4, targets=["tok", "tied"]), infer_layout=use))
    assert float(jnp.abs(got["tok/weight"].a).max()) == 0.0 and float(jnp.abs(got["tok/weight"].b).max()) > 0
    assert float(jnp.abs(got["tied/weight"].a).max()) > 0 and float(jnp.abs(got["tied/weight"].b).max()) == 0.0
    # looked up one token at a time (Equinox's Embedding called per token, W[i]: a slice, not a gather): the same
    one = lambda p: p["tok"]["weight"][jnp.array(3)].sum() + p["tied"]["weight"][2].sum()
    got = adapted(lora_init(KEY, tables, LoraConfig(rank=4, targets=["tok", "tied"]), infer_layout=one))
    for path in ("tok/weight", "tied/weight"):
        assert str(got[path].layout) == "io" and float(jnp.abs(got[path].a).max()) == 0.0, path


def test_all_linear_adapts_the_weights_infer_layout_sees_in_a_matmul_as_equinox_names_them():
    """Equinox names every weight ``weight``, stored (out, in): its Linear's, its Embedding's table,
    its norms' scales. all-linear adapts those infer_layout sees in a matmul and never looked up."""
    tree = {"emb": {"weight": jnp.ones((50, 16))}, "ln": {"weight": jnp.ones(16)},
            "layers": [{"weight": jnp.ones((32, 16)), "bias": jnp.zeros(32)}, {"weight": jnp.ones((16, 32))}],
            "tied": {"weight": jnp.ones((50, 16))}, "head": {"weight": jnp.ones((16, 16))}}

    def run(p, ids=jnp.arange(3)):
        h = p["emb"]["weight"][ids] * p["ln"]["weight"] + p["tied"]["weight"][ids]
        for layer in p["layers"]:
            h = h @ layer["weight"].T
        return (h @ p["head"]["weight"].T) @ p["tied"]["weight"].T  # a tied output embedding: looked up too

    got = adapted(lora_init(KEY, tree, LoraConfig(rank=4, targets="all-linear"), infer_layout=run))
    assert sorted(got) == ["layers/0/weight", "layers/1/weight"]
    assert {str(lw.layout) for lw in got.values()} == {"oi"}
    # trainable takes those all-linear leaves out (a table, a norm) and a weight it names itself
    trained = lambda cfg: sorted(p for p, x in jlora.paths.leaves_with_paths(
        lora_init(KEY, tree, cfg, infer_layout=run), is_leaf=lambda x: isinstance(x, jlora.Trainable))
        if isinstance(x, jlora.Trainable))
    for named in (["emb"], ["emb/weight"]):
        assert trained(LoraConfig(rank=4, targets="all-linear", trainable=[*named, "ln"])) == ["emb/weight", "ln/weight"]
    chosen = lora_init(KEY, tree, LoraConfig(rank=4, targets="all-linear", trainable=["layers/1/weight", "layers"]),
                       infer_layout=run)
    assert sorted(adapted(chosen)) == ["layers/0/weight"] and isinstance(chosen["layers"][1]["weight"], jlora.Trainable)
    assert isinstance(chosen["layers"][0]["bias"], jlora.Trainable)  # a subtree: what it does not adapt
    # Haliax's NamedArray holds a Linear's array one level down, at weight/0: the same
    named = {"up": {"weight": [jnp.ones((32, 16))], "bias": [jnp.zeros(32)]}, "emb": {"weight": [jnp.ones((50, 16))]}}
    held = lambda p: (p["emb"]["weight"][0][jnp.arange(3)] @ p["up"]["weight"][0].T).sum()
    got = adapted(lora_init(KEY, named, LoraConfig(rank=4, targets="all-linear"), infer_layout=held))
    assert sorted(got) == ["up/weight/0"] and str(got["up/weight/0"].layout) == "oi"
    with pytest.raises(ValueError, match=r"selects no kernel; .*'all-linear' adapts dense kernels \(leaves named 'kernel' "
                                         r"or 'w'; 'weight' where infer_layout sees it in a matmul, as Equinox's Linear\): "
                                         r"name the modules or leaves to adapt in targets, or pass lora_init\(\.\.\., infer_layout="):
        lora_init(KEY, tree, LoraConfig(rank=4, targets="all-linear"))
    convs = {"conv": {"depthwise_kernel": jnp.ones((3, 3, 1, 4)), "pointwise_kernel": jnp.ones((1, 1, 4, 8))}}
    with pytest.raises(ValueError, match=r"name the modules or leaves to adapt in targets; no adaptable"):  # it was passed
        lora_init(KEY, convs, LoraConfig(rank=2, targets="all-linear"), infer_layout=lambda p: 0.0)


def test_all_linear_leaves_conv_kernels_alone_as_peft_does():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            return nn.Dense(3)(nn.Dense(8)(x.reshape(x.shape[0], -1)))

    x = jnp.ones((2, 5, 5, 2))
    params = CNN().init(KEY, x)["params"]
    run = lambda p: CNN().apply({"params": p}, x)
    assert sorted(adapted(lora_init(KEY, params, LoraConfig(rank=2), infer_layout=run))) == [
        "Dense_0/kernel", "Dense_1/kernel"]
    named = adapted(lora_init(KEY, params, LoraConfig(rank=2, targets=["Conv_0"]), infer_layout=run))
    assert str(named["Conv_0/kernel"].layout) == "iiio"
    # without infer_layout, all-linear cannot tell the conv window from a dense kernel: the error says how to
    with pytest.raises(ValueError, match=r"'Conv_0/kernel' \(3, 3, 2, 4\).* targets='all-linear' adapts dense kernels "
                                         r"only, as PEFT's, and tells a conv window from one by infer_layout: with it, "
                                         r"convs are left alone$"):
        lora_init(KEY, params, LoraConfig(rank=2, targets="all-linear"))


def test_a_broad_subtree_adapts_its_kernels_and_an_embedding_table_only_when_named():
    tree = {"enc": {"embed": {"embedding": jnp.ones((50, 16))}, "q": {"kernel": jnp.ones((16, 16))}}}
    assert sorted(adapted(lora_init(KEY, tree, LoraConfig(rank=2, targets=["enc"])))) == ["enc/q/kernel"]
    for named in (["embed"], ["enc/embed"], ["re:enc/emb.*"]):
        assert sorted(adapted(lora_init(KEY, tree, LoraConfig(rank=2, targets=named)))) == ["enc/embed/embedding"]
    tables_only = {"enc": {"embed": {"embedding": jnp.ones((50, 16))}}, "q": {"kernel": jnp.ones((16, 16))}}
    with pytest.raises(ValueError, match=r"'enc' matches no param it can use \(an embedding table is adapted only"):
        lora_init(KEY, tables_only, LoraConfig(rank=2, targets=["q", "enc"]))


def test_a_2d_weight_needs_its_layout_said_and_a_module_target_adapts_it():
    tree = {"lin": {"weight": jnp.ones((4, 8)), "bias": jnp.zeros(4)}}  # Equinox/PyTorch: (out, in)
    with pytest.raises(ValueError, match=r"'lin/weight' is a 2-D weight.*layouts=\{'lin/weight': 'oi'\}"):
        lora_init(KEY, tree, LoraConfig(rank=2, targets=["lin"]))
    lw = lora_init(KEY, tree, LoraConfig(rank=2, targets=["lin"], layouts={"weight": "oi"}))["lin"]["weight"]
    assert lw.a.shape == (8, 2) and lw.b.shape == (2, 4)
    inferred = lora_init(KEY, tree, LoraConfig(rank=2, targets=["lin"]),
                         infer_layout=lambda p: jnp.ones((3, 8)) @ p["lin"]["weight"].T)["lin"]["weight"]
    assert str(inferred.layout) == "oi"
    # a module above a stack of layers named: its norms' scales, (layers, features), are 2-D weights too, which a
    # scan's layer uses as vectors: left alone, as a 1-D norm's is (Equinox names both arrays 'weight')
    blocks = {"blocks": {"lin": {"weight": jnp.ones((2, 4, 8))}, "ln": {"weight": jnp.ones((2, 8))},
                         "gemma_ln": {"weight": jnp.ones((2, 8))}}}
    layer = lambda h, blk: blk["lin"]["weight"] @ (h * blk["ln"]["weight"] * (1 + blk["gemma_ln"]["weight"]))

    def scanned(p, x=jnp.ones(8)):
        return jax.lax.scan(lambda h, blk: (jnp.tile(layer(h, blk), 2), None), x, p["blocks"])[0]
    stacked = lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks"]), infer_layout=scanned)
    assert sorted(adapted(stacked)) == ["blocks/lin/weight"] and str(stacked["blocks"]["lin"]["weight"].layout) == "boi"
    assert stacked["blocks"]["ln"]["weight"] is blocks["blocks"]["ln"]["weight"]
    for trainable in (["ln"], ["blocks"]):  # trained whole where trainable names them, as a 1-D norm's scale
        tuned = lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks"], trainable=trainable), infer_layout=scanned)
        assert sorted(adapted(tuned)) == ["blocks/lin/weight"]
        kinds = {k: type(v["weight"]).__name__ for k, v in tuned["blocks"].items()}
        assert kinds == {"lin": "LoraWeight", "ln": "Trainable", "gemma_ln": "Trainable" if trainable == ["blocks"] else "ArrayImpl"}
    with pytest.raises(ValueError, match=r"^LoraConfig.targets: pattern 'ln' matches no kernel to adapt: "
                                         r"\['blocks/ln/weight'\] are vectors per layer of a stack \(a norm's scale\)"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["ln", "lin"]), infer_layout=scanned)
    with pytest.raises(ValueError, match=r"^lora_init: target matches 'blocks/ln/weight' \(float32\[2,8\]\), which each "
                                         r"layer of its stack uses as a vector \(a norm's scale\): only kernels of 2 or "
                                         r"more axes per layer can be adapted"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks/ln/weight"]), infer_layout=scanned)
    # Flax's names alike (a norm's scale and bias stacked by nnx.vmap or nn.scan), where 'io' was taken for them
    flax_blocks = {"blocks": {"q": {"kernel": jnp.ones((2, 8, 8))}, "norm": {"scale": jnp.ones((2, 8)), "bias": jnp.zeros((2, 8))}}}
    flax_layer = lambda h, blk: (h * blk["norm"]["scale"] + blk["norm"]["bias"]) @ blk["q"]["kernel"]
    flax_scan = lambda p: jax.lax.scan(lambda h, blk: (flax_layer(h, blk), None), jnp.ones(8), p["blocks"])[0]
    with pytest.raises(ValueError, match=r"^lora_init: target matches 'blocks/norm/scale' \(float32\[2,8\]\), which "
                                         r"each layer of its stack uses as a vector"):
        lora_init(KEY, flax_blocks, LoraConfig(rank=2, targets=["blocks/norm/scale"]), infer_layout=flax_scan)
    with pytest.raises(ValueError, match=r"pattern 'blocks/norm' matches no param it can use \(its leaves "
                                         r"\['blocks/norm/bias', 'blocks/norm/scale'\] are biases or a norm's scale: "
                                         r"they go in LoraConfig.trainable\)"):
        lora_init(KEY, flax_blocks, LoraConfig(rank=2, targets=["blocks/norm"]), infer_layout=flax_scan)
    # mapped by vmap (an ensemble), the trace keeps the stack whole: no layer is seen, so the error says how to
    # leave a norm out as well as how to declare a layout
    ensemble = lambda p: jax.vmap(layer, in_axes=(None, 0))(jnp.ones(8), p["blocks"])
    with pytest.raises(ValueError, match=r"'blocks/gemma_ln/weight' is a 2-D weight: .*\('io' for \(in, out\)\); if it "
                                         r"is no linear weight \(a norm's scale, stacked with its layers\), leave it "
                                         r"out: LoraConfig\(exclude=\['blocks/gemma_ln'\]\)$"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks"]), infer_layout=ensemble)
    with pytest.raises(ValueError, match=r"'blocks/ln/weight' is a 2-D weight: .*\('io' for \(in, out\)\)$"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks/ln/weight"]), infer_layout=ensemble)  # named: no hint
    # without infer_layout: the same hints, and infer_layout named as what tells a norm
    declared = {"layouts": {"lin": "boi"}}
    with pytest.raises(ValueError, match=r"'blocks/gemma_ln/weight' is a 2-D weight: .*pass lora_init\(\.\.\., "
                                         r"infer_layout=.*\) \(which also tells a norm's scale stacked with layers a scan "
                                         r"runs, and leaves it alone\) .*leave it out: LoraConfig\(exclude=\['blocks/gemma_ln'\]\)$"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["blocks/*"], **declared))
    with pytest.raises(ValueError, match=r"'blocks/ln/weight' is a 2-D weight: .*if it is no linear weight \(a norm's "
                                         r"scale, stacked with its layers\), take 'ln' out of targets \(norms go in "
                                         r"LoraConfig.trainable\)$"):
        lora_init(KEY, blocks, LoraConfig(rank=2, targets=["ln", "lin"], **declared))


def test_a_step_donating_the_trainable_half_leaves_the_base_params_whole():
    """A leaf trained whole is a copy (as PEFT's modules_to_save): donating it deletes none of the base's arrays."""
    base = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8) + 1}, "head": {"kernel": jnp.ones((8, 2)) + 0}}
    devices = jax.devices()
    base["head"]["kernel"] = jax.device_put(base["head"]["kernel"], devices[-1])  # committed, placed: stays there
    lora = lora_init(KEY, base, LoraConfig(rank=2, targets=["q"], trainable=["q/bias", "head"]))
    assert lora["head"]["kernel"].value.devices() == {devices[-1]} and lora["head"]["kernel"].value.committed
    trainable, frozen = jlora.split(lora)
    jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t), donate_argnums=0)(trainable)
    assert jlora.paths.deleted_path(base) is None
    np.testing.assert_array_equal(base["q"]["bias"], jnp.ones(8))
    jax.jit(lambda b: b * 2, donate_argnums=0)(base["q"]["bias"])  # the base's own given to a step: named
    with pytest.raises(ValueError, match=r"lora_init: 'q/bias' was deleted \(donated: .*\); pass live arrays$"):
        lora_init(KEY, base, LoraConfig(rank=2, targets=["q"], trainable=["q/bias"]))


def test_a_trainable_subtree_leaves_its_integer_leaves_frozen():
    tree = {"q": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2)), "count": jnp.array(0)}}
    p = lora_init(KEY, tree, LoraConfig(rank=2, targets=["q"], trainable=["head"]))
    assert isinstance(p["head"]["kernel"], jlora.Trainable) and not isinstance(p["head"]["count"], jlora.Trainable)


def test_exclude_rank_alpha_patterns_rslora_dtype_dropout_trainable():
    cfg = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], exclude=["layers/1/**"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True,
                     param_dtype=jnp.bfloat16, dropout=0.1, trainable=["norm", "q_proj/bias"])
    p = lora_init(KEY, base(), cfg)
    got = adapted(p)
    assert sorted(got) == ["layers/0/attn/q_proj/kernel", "layers/0/attn/v_proj/kernel"]
    v = got["layers/0/attn/v_proj/kernel"]
    assert v.rank == 2 and v.scale == pytest.approx(4 / np.sqrt(2)) and v.a.dtype == jnp.bfloat16
    assert v.dropout == 0.1
    assert isinstance(p["layers"][0]["norm"]["scale"], jlora.Trainable)
    assert isinstance(p["layers"][1]["norm"]["scale"], jlora.Trainable)
    assert isinstance(p["layers"][0]["attn"]["q_proj"]["bias"], jlora.Trainable)


def test_deterministic_per_key_and_independent_of_other_targets():
    one = lora_init(KEY, base(), LoraConfig(targets=["q_proj"]))
    two = lora_init(KEY, base(), LoraConfig(targets=["q_proj", "v_proj"]))
    a1 = adapted(one)["layers/0/attn/q_proj/kernel"].a
    assert bool((a1 == adapted(two)["layers/0/attn/q_proj/kernel"].a).all())
    other = adapted(lora_init(jax.random.key(1), base(), LoraConfig(targets=["q_proj"])))
    assert not bool((a1 == other["layers/0/attn/q_proj/kernel"].a).all())


def test_works_under_jit_on_frozendicts_and_custom_layouts():
    from flax.core import freeze

    cfg = LoraConfig(rank=2, targets=["c_attn"], layouts={"c_attn": "oi"})
    params = freeze({"c_attn": {"kernel": jnp.ones((12, 4))}})
    p = jax.jit(lambda k, p: lora_init(k, p, cfg))(KEY, params)
    lw = p["c_attn"]["kernel"]
    assert str(lw.layout) == "oi" and lw.a.shape == (4, 2) and lw.b.shape == (2, 12)


def test_infer_layout_for_scanned_dense_general():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.DenseGeneral((2, 4), name="qkv")(h).reshape(h.shape), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)[0]

    x = jnp.ones((2, 8))
    params = Model().init(KEY, x)["params"]
    p = lora_init(KEY, params, LoraConfig(rank=2, targets=["qkv"]),
                  infer_layout=lambda p: Model().apply({"params": p}, x))
    lw = adapted(p)["ScanBlock_0/qkv/kernel"]
    assert str(lw.layout) == "bioo" and lw.a.shape == (3, 8, 2) and lw.b.shape == (3, 2, 2, 4)


def test_a_quantized_kernel_is_adapted_whole_as_the_float_kernel_would_be():
    """QLoRA: lora_init on a base whose kernels are lazy (int8 with scales) takes each lazy kernel
    as one leaf; infer_layout reads its use as an array's. The oracle: lora_init on the float base."""
    x = jnp.linspace(-1, 1, 16).reshape(2, 8)
    fn = lambda p, x: jnp.einsum("bi,iho->bho", x @ p["q"]["kernel"] + p["q"]["bias"], p["heads"]["kernel"])
    floats = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)},
              "heads": {"kernel": jax.random.normal(jax.random.key(1), (8, 2, 4))}}
    quantized = {"q": {"kernel": quantize(floats["q"]["kernel"]), "bias": floats["q"]["bias"]},
                 "heads": {"kernel": quantize(floats["heads"]["kernel"])}}
    cfg = LoraConfig(rank=2, targets=["q", "heads"], trainable=["q/bias"])
    p = lora_init(KEY, quantized, cfg, infer_layout=lambda p: fn(p, x))
    want = lora_init(KEY, floats, cfg, infer_layout=lambda p: fn(p, x))
    for path in ("q", "heads"):
        got, ref = p[path]["kernel"], want[path]["kernel"]
        assert got.w is quantized[path]["kernel"] and got.layout == ref.layout and got.scale == ref.scale
        np.testing.assert_array_equal(got.a, ref.a)
        np.testing.assert_array_equal(got.b, ref.b)
    assert str(p["heads"]["kernel"].layout) == "ioo"
    INT8_DOTS.clear()
    check_against_oracle(fn, perturb(p, KEY), x)  # every MaterializeWarning an error
    assert len(INT8_DOTS) >= 2  # both base terms ran as int8 matmuls
    with pytest.raises(ValueError, match=r"'q/kernel' \(lazy Int8Weight float32\[8,8\]\): only float arrays"):
        lora_init(KEY, quantized, LoraConfig(rank=2, targets=["heads"], trainable=["q/kernel"]))
    with pytest.raises(ValueError, match=r"trainable: pattern 'q' matches no param it can use \(its leaves "
                                         r"\['q/kernel: lazy Int8Weight float32\[8,8\]'\] are lazy"):
        lora_init(KEY, {"q": {"kernel": quantized["q"]["kernel"]}, "heads": quantized["heads"]},
                  LoraConfig(rank=2, targets=["heads"], trainable=["q"]))


@pytest.mark.parametrize(
    "cfg, match",
    [
        (LoraConfig(targets=["q_prj"]), r"'q_prj' matches no param; nearest modules: \['layers/\*/attn/q_proj', .*\]; modules with weights to adapt: "),
        (LoraConfig(targets=["query"]), r"'query' matches no param; modules with weights to adapt: .*layers/\*/attn/q_proj"),
        # written as PEFT writes module names: '.'-joined, a regex without 're:'
        (LoraConfig(targets=["attn.q_proj"]), r"paths are joined with '/', not '.': 'attn/q_proj' matches"),
        (LoraConfig(targets=[r".*\.q_proj"]), r"needs the prefix 're:', over '/'-joined paths: 're:.\*/q_proj' matches"),
        (LoraConfig(targets=["q_proj|v_proj"]), r"needs the prefix 're:' and matches a whole '/'-joined path"),
        (LoraConfig(targets=["q_proj("]), r"'q_proj\(' matches no param; a regular expression needs the prefix 're:'"),
        (LoraConfig(targets=["norm/scale"]), r"'layers/0/norm/scale' \(float32\[16\]\): .*LoraConfig.trainable\)$"),
        (LoraConfig(targets=["q_proj/*"]), r"matches 'layers/0/attn/q_proj/bias' \(float32\[16\]\): .*; a pattern "
                                           r"naming the module \('q_proj'\) adapts its kernel"),
        (LoraConfig(targets=["step"]), r"matches 'step' \(int32\[\]\): only float arrays"),
        (LoraConfig(rank=9, targets=["v_proj"]), r"rank 9 for 'layers/0/attn/v_proj/kernel' exceeds min\(in=16, out=8\)"),
        (LoraConfig(targets=["attn"], rank_pattern={"q_proj": 2, "layers/0/attn/q_proj": 4}),
         "patterns .* all match 'layers/0/attn/q_proj/kernel' with different values \\[2, 4\\]; jlora does not pick one "
         r"\(PEFT takes the first\): narrow a pattern"),
        (LoraConfig(targets=["q_proj"], trainable=["q_proj/kernel"]), "both a LoRA target and LoraConfig.trainable"),
        (LoraConfig(targets=["q_proj"], trainable=["nothing_here"]), "trainable: pattern 'nothing_here' matches no"),
        (LoraConfig(targets=["q_proj"], trainable=["step"]), r"trainable 'step' matches 'step' \(int32\[\]\)"),
        (LoraConfig(targets=["q_proj"], rank_pattern={"q_prj": 2}), r"rank_pattern: pattern 'q_prj' matches no param; nearest"),
        (LoraConfig(targets=["q_proj"], alpha_pattern={"zzz": 2}), "alpha_pattern: pattern 'zzz' matches no param"),
        (LoraConfig(targets=["q_proj", "v_proj"], exclude=["v_prj"]), r"exclude: pattern 'v_prj' matches no param; nearest"),
    ],
)
def test_bad_input_names_the_path(cfg, match):
    with pytest.raises(ValueError, match=match):
        lora_init(KEY, base(), cfg)


def test_a_mistyped_target_over_a_flat_dict_names_its_leaves():
    """lorax's examples hold their weights at the root: a module list there named only '(the root)'."""
    flat = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4)), "bias": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"pattern 'wq' matches no param; nearest modules: \['w'\]; modules with "
                                         r"weights to adapt: v, w$"):
        lora_init(KEY, flat, LoraConfig(rank=2, targets=["wq"]))
    with pytest.raises(ValueError, match=r"pattern 'q' matches no param; .*modules with params: bias, v, w$"):
        lora_init(KEY, flat, LoraConfig(rank=2, targets=["w"], trainable=["q"]))


def test_a_target_matching_a_leaf_that_is_not_an_array_says_so():
    import equinox as eqx

    class Tied(eqx.Module):  # the head's weight is the embedding's, held once by eqx.nn.Shared
        shared: eqx.nn.Shared

        def __init__(self, key):
            embed, head = eqx.nn.Embedding(10, 4, key=key), eqx.nn.Linear(4, 10, use_bias=False, key=key)
            self.shared = eqx.nn.Shared((embed, head), lambda s: s[1].weight, lambda s: s[0].weight)

    with pytest.raises(ValueError, match=r"matches 'shared/pytree/1/weight' \(SharedNode\): only float arrays with 2 "
                                         r"or more axes can be adapted \(eqx.nn.Shared's placeholder for a weight it "
                                         r"holds at another path: target that path\)$"):
        lora_init(KEY, Tied(KEY), LoraConfig(rank=2, targets=["weight"]))
    lora_init(KEY, Tied(KEY), LoraConfig(rank=2, targets=["shared/pytree/0/weight"], layouts={"weight": "io"}))
    with pytest.raises(ValueError, match=r"matches 'act' \(Activation\): .* \(it is not an array\)$"):
        lora_init(KEY, {"act": type("Activation", (), {})(), "w": jnp.ones((4, 4))}, LoraConfig(rank=2, targets=["act"]))


def test_a_rank_or_alpha_pattern_naming_only_params_left_out_warns():
    """As in PEFT a rank_pattern entry for a module no target adapts sets nothing; PEFT says nothing."""
    for cfg in (LoraConfig(rank=2, targets=["q_proj"], rank_pattern={"v_proj": 4}),
                LoraConfig(rank=2, targets=["q_proj"], alpha_pattern={"v_proj": 4})):
        with pytest.warns(UserWarning, match=r"pattern 'v_proj' matches no kernel that targets adapt .*sets nothing; "
                                             r"adapted: layers/0/attn/q_proj/kernel"):
            lora_init(KEY, base(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_init(KEY, base(), LoraConfig(rank=2, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}))


def test_a_target_in_a_tree_without_kernel_or_weight_leaves_lists_the_leaves_it_can_name():
    """A Keras variable list, Haliax (``weight/0``), Penzai (``weights/value/data_array``)."""
    with pytest.raises(ValueError, match=r"'dense' matches no param; no adaptable \(float, 2-D or more\) leaf is named "
                                         r"kernel, weight, w or embedding; leaves a target can name: 0, 2$"):
        lora_init(KEY, [jnp.ones((16, 32)), jnp.zeros(32), jnp.ones((32, 4))], LoraConfig(rank=2, targets=["dense"]))
    with pytest.raises(ValueError, match=r"nearest leaves: \['l1/weights/value'\]; .* a target can name: l1/weights/value$"):
        lora_init(KEY, {"l1": {"weights": {"value": jnp.ones((16, 32))}}}, LoraConfig(rank=2, targets=["l1/weights/v"]))


def test_a_pattern_naming_a_layer_of_a_stack_is_told_the_stack_is_one_param():
    stacked = {"layers": {"up": {"kernel": jnp.ones((12, 16, 16))}}}  # nn.scan's: (layers, in, out)
    config = dict(rank=2, targets=["up"], layouts={"up": "bio"})
    for option in (dict(rank_pattern={"layers/3/up": 8}), dict(alpha_pattern={"layers/*/up": 4.0}),
                   dict(exclude=["layers/0/up"])):
        with pytest.raises(ValueError, match=r"matches no param; .*names layers, but they are stacked in one param "
                                             r"\(layers/up/kernel\), which takes one rank, alpha and adapter shape"):
            lora_init(KEY, stacked, LoraConfig(**config, **option))
    with pytest.raises(ValueError, match=r"'layers/3/down' matches no param; nearest modules: \['layers/up'\]; "
                                         r"modules with weights to adapt: layers/up$"):  # no stack it could mean
        lora_init(KEY, stacked, LoraConfig(**config, rank_pattern={"layers/3/down": 8}))
    # trainable: a norm stacked with its layers is one (layers, features) param
    with_norm = {"layers": {**stacked["layers"], "norm": {"scale": jnp.ones((12, 16))}}}
    with pytest.raises(ValueError, match=r"trainable: pattern 'layers/1/norm' matches no param; nearest paths: .*names "
                                         r"layers, but they are stacked in one param \(layers/norm/scale\), which is "
                                         r"trained whole for all of them"):
        lora_init(KEY, with_norm, LoraConfig(**config, trainable=["layers/1/norm"]))
    unstacked = {"layers": {"proj": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)}}}  # one layer's kernel
    with pytest.raises(ValueError, match=r"pattern 'layers/1/proj' matches no param; nearest paths: \[[^(]*\]$"):
        lora_init(KEY, unstacked, LoraConfig(rank=2, targets=["proj"], trainable=["layers/1/proj"]))
    # Equinox's stacked norms hold (layers, features) 'weight's too: not listed as weights to adapt
    norms = {"layers": {"up": {"weight": jnp.ones((12, 16, 16))}, "ln_1": {"weight": jnp.ones((12, 16))},
                        "RMSNorm": {"weight": jnp.ones((12, 16))}}}
    with pytest.raises(ValueError, match=r"'qq' matches no param; modules with weights to adapt: layers/up$"):
        lora_init(KEY, norms, LoraConfig(rank=2, targets=["qq"], layouts={"up": "boi"}))


def test_a_haiku_modules_w_and_embeddings_are_its_weight_and_table():
    """Haiku (and plain dicts) call a Linear's (in, out) weight ``w`` and an Embed's table ``embeddings``."""
    base = {"mlp/~/linear_0": {"w": jnp.ones((16, 32)), "b": jnp.zeros(32)},
            "mlp/~/linear_1": {"w": jnp.ones((32, 4)), "b": jnp.zeros(4)},
            "embed": {"embeddings": jnp.ones((50, 16))}}
    assert list(adapted(lora_init(KEY, base, LoraConfig(rank=2, targets=["linear_0"])))) == ["mlp/~/linear_0/w"]
    assert sorted(adapted(lora_init(KEY, base, LoraConfig(rank=2)))) == ["mlp/~/linear_0/w", "mlp/~/linear_1/w"]
    table = lora_init(KEY, base, LoraConfig(rank=2, targets=["embed"]))["embed"]["embeddings"]
    assert not table.a.any() and table.b.any()  # PEFT's init of an embedding: A zeros, B normal
    assert sorted(adapted(lora_init(KEY, base, LoraConfig(rank=2, targets=["mlp", "embed/embeddings"])))) == [
        "embed/embeddings", "mlp/~/linear_0/w", "mlp/~/linear_1/w"]


def test_a_tree_of_boxed_variables_is_told_to_unwrap_them():
    """Penzai's unfrozen model holds ``pz.Parameter`` objects, no arrays."""
    class Parameter:
        def __init__(self, value):
            self.value = value
    boxed = {"linear": {"weights": Parameter(jnp.ones((4, 4)))}}
    for targets in (["linear"], "all-linear"):
        with pytest.raises(ValueError, match=r"params hold no arrays \(got dict .*, whose leaves are test_init\..*Parameter "
                                             r"objects\): pass the base model's param tree .*Penzai's pz.freeze_params\(model\)"):
            lora_init(KEY, boxed, LoraConfig(rank=2, targets=targets))
    class Model:  # as Keras's: a dtype (its compute dtype), no shape
        dtype = "float32"
    # a model object, not its params (a Keras model, Haiku's transformed pair of functions)
    for model, kind in ((Parameter(3), r"test_init\..*Parameter"), ((lambda: 0, lambda: 1), r"tuple .*function"),
                        (Model(), r"test_init\..*Model")):
        with pytest.raises(ValueError, match=rf"params hold no arrays \(got {kind}.*\): pass the base model's param tree "
                                             r"\(a linen model's variables\['params'\], Haiku's transformed.init\(key, x\)"):
            lora_init(KEY, model, LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"selects no kernel; .*leaves a target can name: none$"):  # some are arrays
        lora_init(KEY, {"norm": {"scale": jnp.ones(3)}, "step": 5}, LoraConfig(rank=2))


def test_a_weight_held_one_level_down_is_its_modules_weight():
    """Haliax's NamedArray holds a Linear's array at ``q/weight/0``: a pattern naming the module adapts it."""
    base = {"q": {"weight": [jnp.ones((8, 4))], "bias": [jnp.zeros(4)]}, "gru": {"weight": [jnp.ones((4, 4))] * 2}}
    with pytest.raises(ValueError, match=r"'q/weight/0' is a 2-D weight: jlora does not guess"):  # (out, in) or (in, out)
        lora_init(KEY, base, LoraConfig(rank=2, targets=["q"]))
    lora = lora_init(KEY, base, LoraConfig(rank=2, targets=["q"]), infer_layout=lambda p: jnp.ones(4) @ p["q"]["weight"][0].T)
    assert list(adapted(lora)) == ["q/weight/0"] and str(lora["q"]["weight"][0].layout) == "oi"
    with pytest.raises(ValueError, match=r"'gru' matches no param it can use .*modules with weights to adapt: q$"):
        lora_init(KEY, base, LoraConfig(rank=2, targets=["gru"]))  # two arrays: not one module's weight


def test_a_trainable_pattern_matching_nothing_suggests_only_what_can_train():
    """An Equinox Dropout's rate and flag are leaves too, but never params to train."""
    base = {"drop": {"p": 0.1, "inference": False}, "lin": {"weight": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"pattern 'dropout' matches no param; no path is near it; modules with params: lin$"):
        lora_init(KEY, base, LoraConfig(rank=2, targets=["lin"], trainable=["dropout"]))
    with pytest.raises(ValueError, match=r"pattern 'lin/bais' matches no param; nearest paths: \['lin/bias'"):
        lora_init(KEY, base, LoraConfig(rank=2, targets=["lin"], trainable=["lin/bais"]))


def test_a_target_that_matches_only_what_it_cannot_use_says_why():
    params = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "k": {"kernel": jnp.ones((4, 4), jnp.int8)}}
    with pytest.raises(ValueError, match=r"'q' matches no param it can use \(LoraConfig.exclude leaves out"):
        lora_init(KEY, params, LoraConfig(rank=2, targets=["q"], exclude=["q"]))
    with pytest.raises(ValueError, match=r"'k' matches no param it can use \(its kernels are \['k/kernel: int8\[4,4\]'\]"):
        lora_init(KEY, params, LoraConfig(rank=2, targets=["q", "k"]))
    gru = {"cell": {"weight_ih": jnp.ones((12, 4)), "weight_hh": jnp.ones((12, 4)), "bias": jnp.ones(12)}}  # Equinox's GRUCell
    with pytest.raises(ValueError, match=r"'cell' matches no param it can use \(a module is adapted at its 'kernel', "
                                         r"'weight' or 'w'; its leaves \['cell/weight_hh', 'cell/weight_ih'\] are adapted by "
                                         r"patterns naming them, e.g. 'cell/weight_hh'\)"):
        lora_init(KEY, gru, LoraConfig(rank=2, targets=["cell"]))


def test_a_declared_layout_that_the_traced_use_contradicts_is_said():
    """Declared 'oi' for a kernel the function uses as x @ w ('io'): kept, as declared, but said
    (its adapter's axes, init and PEFT form follow the declaration; the use materialises)."""
    params = {"up": {"kernel": jnp.ones((8, 4))}}
    use = lambda p: jnp.ones((2, 8)) @ p["up"]["kernel"]
    with pytest.warns(UserWarning, match=r"LoraConfig.layouts declares 'oi' for 'up/kernel', but infer_layout saw it "
                                         r"used as 'io': the declared layout is kept"):
        p = lora_init(KEY, params, LoraConfig(rank=2, targets=["up"], layouts={"up": "oi"}), infer_layout=use)
    assert str(p["up"]["kernel"].layout) == "oi"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing: nothing to say
        lora_init(KEY, params, LoraConfig(rank=2, targets=["up"], layouts={"up": "io"}), infer_layout=use)
        # an ensemble applied to one input is seen as one wide output ('oio'); declared a stack, each
        # member gets its own adapter, and apply keeps it factored
        stack, x = {"w": jnp.ones((3, 8, 4))}, jnp.ones((2, 8))
        use = lambda p: jax.vmap(lambda w: x @ w)(p["w"])
        p = lora_init(KEY, stack, LoraConfig(rank=2, targets=["w"], layouts={"w": "bio"}), infer_layout=use)
        check_against_oracle(lambda p, x: jax.vmap(lambda w: x @ w)(p["w"]), perturb(p, KEY), x)


def test_nd_kernel_without_layout_is_a_clear_error():
    """Every undeclared kernel at once, and the layouts of the common kinds rather than one guess
    (an 'iio' for attention's (in, heads, head_dim) q would adapt the wrong axes)."""
    tree = {"q": {"kernel": jnp.ones((4, 2, 3))}, "conv": {"kernel": jnp.ones((3, 3, 4, 8))}}
    with pytest.raises(ValueError, match=r"of the kernel\(s\) 'conv/kernel' \(3, 3, 4, 8\), 'q/kernel' \(4, 2, 3\): "
                                         r"pass lora_init\(..., infer_layout=f\), .*an NNX or Equinox module: lambda m: m\(x\).*"
                                         r"'bio' for nn.scan-stacked Dense .*"
                                         r"'ioo' for DenseGeneral to heads .*'iiio' for a 2-D conv"):
        lora_init(KEY, tree, LoraConfig(rank=2, targets=["q", "conv"]))
    with pytest.raises(ValueError, match=r"'q/kernel' \(4, 2, 3\).* LoraConfig.layouts patterns \['qq'\] match no param$"):
        lora_init(KEY, tree, LoraConfig(rank=2, targets=["q"], layouts={"qq": "ioo"}))  # a typo
    with pytest.raises(ValueError, match=r"\(4, 2, 3\): infer_layout saw no matmul, lookup or conv of them"):
        lora_init(KEY, {"k": {"kernel": jnp.ones((4, 2, 3))}}, LoraConfig(rank=2, targets=["k"]),
                  infer_layout=lambda p: jnp.sin(p["k"]["kernel"]).sum())


def test_params_whose_paths_collide_are_refused_not_overwritten():
    tree = {"a/b": jnp.ones((4, 4)), "a": {"b": jnp.ones((4, 8))}}
    with pytest.raises(ValueError, match=r"several leaves at each of the paths \['a/b'\]"):
        lora_init(KEY, tree, LoraConfig(rank=2, targets=["re:a/b"]))


def test_a_config_that_is_not_a_lora_config_or_a_key_that_is_not_a_key_is_refused():
    with pytest.raises(ValueError, match="config must be a jlora.LoraConfig, got dict .jlora's is jlora.LoraConfig"):
        lora_init(KEY, base(), {"rank": 2})
    with pytest.raises(ValueError, match=r"PRNGKeyArray .*\)\) \(the arguments go lora_init\(key, params, config\)\)"):
        lora_init(base(), LoraConfig(targets=["q_proj"]), KEY)  # lorax's order
    with pytest.raises(ValueError, match=r"infer_layout must be a function of the params .*model.apply\(\{'params': p\}, x\).*, got int"):
        lora_init(KEY, base(), LoraConfig(targets=["q_proj"]), infer_layout=3)
    with pytest.raises(ValueError, match=r"lora_init: expected a PRNG key .* got 0"):
        lora_init(0, base(), LoraConfig(targets=["q_proj"]))
    for params, got in ((None, "NoneType"), ({"layer": {}}, r"dict \{'layer': \{\}\}")):
        with pytest.raises(ValueError, match=rf"lora_init: params hold no arrays \(got {got}\): pass the base model's"):
            lora_init(KEY, params, LoraConfig(targets=["q_proj"]))


def test_already_adapted_params_are_refused():
    p = lora_init(KEY, base(), LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"already hold .*\(a new adapter over this one: lora_init\(key, jlora.merge\(params\)"):
        lora_init(KEY, p, LoraConfig(targets=["q_proj"]))


def test_a_module_holding_an_nnx_variable_twice_is_refused_its_split_state_adapted():
    from flax import nnx

    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.b = self.a  # one layer used twice
            self.c = nnx.Linear(4, 4, rngs=nnx.Rngs(1))

    # flattened as a pytree, the module holds the shared layer twice: two adapters would each train,
    # and even untouched, the copies would be two variables (donated twice, no longer tied)
    for targets in (["a"], ["c"]):
        with pytest.raises(ValueError, match=r"lora_init: 'a/bias' and 'b/bias' are one NNX variable .*nnx.split.*"
                                             r"jlora.lora_init\(key, state, config\).*nnx.merge\(graphdef, lora\)"):
            lora_init(KEY, Tied(), LoraConfig(rank=2, targets=targets))
    graphdef, state = nnx.split(Tied())  # the split state holds it once
    lora = lora_init(KEY, state, LoraConfig(rank=2, targets=["a"]))
    assert list(adapted(lora)) == ["a/kernel"]
    model = nnx.merge(graphdef, lora)
    assert model.a is model.b and isinstance(value_of(model.b.kernel), jlora.LoraWeight)


def test_a_module_holding_an_nnx_rngs_twice_is_refused():
    from flax import nnx

    class Draw(nnx.Module):
        def __init__(self, rngs):
            self.rngs = rngs  # the one nnx.Rngs: each call advances its count

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 4, rngs=rngs)
            self.d1, self.d2 = Draw(rngs), Draw(rngs)

    with pytest.raises(ValueError, match=r"'d1/rngs/\w+/\w+' and 'd2/rngs/\w+/\w+' are one NNX variable"):
        lora_init(KEY, Net(nnx.Rngs(0, dropout=1)), LoraConfig(rank=2, targets=["l1"]))


def test_nnx_batch_statistics_are_state_not_trainable_params():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)

    for tree in (Net(nnx.Rngs(0)), nnx.split(Net(nnx.Rngs(0)))[1]):
        p = lora_init(KEY, tree, LoraConfig(rank=2, targets=["l1"], trainable=["bn"]))
        assert sorted(row[0] for row in jlora.summary(p).fully_trained) == ["bn/bias", "bn/scale"]
        with pytest.raises(ValueError, match=r"trainable: pattern 'bn/mean' matches no param it can use \(\['bn/mean'\]: "
                                             r"the forward pass updates them, not the optimizer; NNX variables other "
                                             r"than nnx.Param"):
            lora_init(KEY, tree, LoraConfig(rank=2, targets=["l1"], trainable=["bn/mean"]))


def test_nnx_state_variables_are_not_adapted_even_where_a_target_names_them():
    """NNX variables other than params (an ``nnx.Rngs``' key, a buffer of a ``Variable`` subclass)
    are updated by the forward pass, never by the optimizer: a target naming them passes over
    them (PEFT's ``key`` names a ``MultiHeadAttention``'s projection and its dropout's RNG key),
    and a target naming only them is refused, saying why."""
    from flax import nnx

    attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, dropout_rate=0.1, decode=False,
                                  rngs=nnx.Rngs(0, dropout=1))
    state = nnx.split(attn)[1]
    p = lora_init(KEY, state, LoraConfig(rank=2, targets=["query", "key", "value"], layouts={"kernel": "ioo"}))
    assert sorted(row[0] for row in jlora.summary(p).targets) == ["key/kernel", "query/kernel", "value/kernel"]
    p = lora_init(KEY, state, LoraConfig(rank=2, targets=["query"], trainable=["key"], layouts={"kernel": "ioo"}))
    assert sorted(row[0] for row in jlora.summary(p).fully_trained) == ["key/bias", "key/kernel"]

    class Buffer(nnx.Variable):
        pass

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)
            self.table = Buffer(jnp.ones((8, 8)))
            self.fixed = nnx.Module()
            self.fixed.kernel = Buffer(jnp.ones((8, 8)))  # a fixed projection, not trained

    state = nnx.split(Net(nnx.Rngs(0)))[1]
    p = lora_init(KEY, state, LoraConfig(rank=2))  # all-linear
    assert [row[0] for row in jlora.summary(p).targets] == ["lin/kernel"]
    with pytest.raises(ValueError, match=r"targets: pattern 'table' matches no param it can use \(\['table'\]: the "
                                         r"forward pass updates them"):
        lora_init(KEY, state, LoraConfig(rank=2, targets=["lin", "table"], layouts={"table": "io"}))


def test_linen_collections_beside_params_are_state_not_trainable_params():
    """A subtree pattern in ``trainable`` names a module's params, not its running statistics:
    an optimizer step (weight decay) would move them."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))

    variables = Net().init(KEY, jnp.ones((2, 4)))
    p = lora_init(KEY, variables, LoraConfig(rank=2, targets=["Dense_0"], trainable=["BatchNorm_0"]))
    assert sorted(row[0] for row in jlora.summary(p).fully_trained) == ["params/BatchNorm_0/bias",
                                                                         "params/BatchNorm_0/scale"]
    assert jlora.summary(p).total == 4 * 8 + 8 + 2 * 8 + 2 * (4 + 8)  # no batch statistics counted
    with pytest.raises(ValueError, match=r"\['batch_stats/BatchNorm_0/var'\]: the forward pass updates them, not the "
                                         r"optimizer; NNX variables other than nnx.Param and linen collections other "
                                         r"than 'params' are state"):
        lora_init(KEY, variables, LoraConfig(rank=2, targets=["Dense_0"], trainable=["batch_stats/BatchNorm_0/var"]))
    # a tree that merely holds a module named 'params' (an NNX module's state) is no linen variables dict
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.params = nnx.Linear(4, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    p = lora_init(KEY, nnx.state(Net(nnx.Rngs(0))), LoraConfig(rank=2, targets=["params"], trainable=["head"]))
    assert sorted(row[0] for row in jlora.summary(p).fully_trained) == ["head/bias", "head/kernel"]


def test_a_sown_nnx_intermediate_is_state_whatever_its_value_holds():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 4, rngs=rngs)
            self.feat = nnx.Intermediate((jnp.ones(3), jnp.ones(3)))  # a tuple, as sow leaves it

    model = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="trainable: pattern 'feat' matches no param it can use"):
        lora_init(KEY, model, LoraConfig(rank=2, targets=["l1"], trainable=["feat"]))
    p = lora_init(KEY, model, LoraConfig(rank=2, targets=["l1"], trainable=["l1/bias"]))
    assert jlora.summary(p).total == 4 * 4 + 4 + 2 * (4 + 4)


@pytest.mark.skipif(not hasattr(jax, "new_ref"), reason="jax.new_ref is JAX 0.7+")
def test_mutable_leaves_are_refused_by_path_with_the_way_to_arrays():
    cfg = LoraConfig(rank=2, targets=["kernel"])
    refs = {"dense": {"kernel": jax.new_ref(jnp.ones((4, 4)))}}
    with pytest.raises(ValueError, match=r"'dense/kernel' is a jax Ref \(mutable\), not an array.*"
                                         r"jax.tree.map\(lambda r: r\[...\], params\)"):
        lora_init(KEY, refs, cfg)
    lora_init(KEY, jax.tree.map(lambda r: r[...], refs), cfg)  # as the message says
    adapted = lora_init(KEY, {"k": jnp.ones((4, 4))}, LoraConfig(rank=2, targets=["k"]))
    held = jax.tree.map(jax.new_ref, adapted)  # tree_map builds the node without its checks
    for call in (lambda: jlora.apply(lambda p, x: x @ p["k"])(held, jnp.ones((2, 4))), lambda: jlora.merge(held)):
        with pytest.raises(ValueError, match="'k' holds a jax Ref as its w"):
            call()

    class Variable:  # as Keras's: an object holding an array, turned into one by __jax_array__
        def __init__(self, value):
            self.value, self.shape, self.dtype = value, value.shape, value.dtype

        def __jax_array__(self):
            return self.value

    held = {"dense": {"kernel": jnp.ones((4, 4)), "bias": Variable(jnp.zeros(4))}}
    with pytest.raises(ValueError, match=r"'dense/bias' is a tests?.*Variable, a variable holding an array, not an "
                                         r"array: jlora takes the arrays \(Keras: \{v.path: v.value for v in"):
        lora_init(KEY, held, cfg)  # apply could not take it, adapted or not
    nnx = pytest.importorskip("flax.nnx")
    if not hasattr(nnx, "var_defaults"):
        pytest.skip("NNX variable modes are Flax 0.12+")
    for mode, kind in (({"ref": True}, "a jax Ref"), ({"hijax": True}, "an NNX HijaxVariable")):
        with nnx.var_defaults(**mode):
            model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"'kernel' is {kind} .*nnx.with_vars\\(model, ref=False, hijax=False\\)"):
            lora_init(KEY, model, cfg)
        with pytest.raises(ValueError, match=f"'bias' is {kind} "):  # a leaf to train in full, likewise
            lora_init(KEY, model, LoraConfig(rank=2, targets=["kernel"], trainable=["bias"]))
        plain = lora_init(KEY, nnx.with_vars(model, ref=False, hijax=False), cfg)
        assert jlora.apply(lambda m, x: m(x))(plain, jnp.ones((2, 4))).shape == (2, 3)
