"""jlora.sharding and multi-device training (8 CPU devices: see conftest.py)."""

import importlib.util
import json
import pathlib
import re
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import sharding
from jlora.checkpoint import AdapterCheckpointer
from jlora.probe import infer_layouts
from oracle import normal, perturb

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")


def example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapters(params):
    """``{path/a: array, path/b: array}`` of every LoraWeight."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))[0]:
        if isinstance(x, jlora.LoraWeight):
            out[f"{x.path}/a"], out[f"{x.path}/b"] = np.asarray(x.a), np.asarray(x.b)
    return out


# --- specs and rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout, w_spec, a_spec, b_spec", [
    ("io", P("x", "y"), P("x", None), P(None, "y")),
    ("oi", P("x", "y"), P("y", None), P(None, "x")),
    ("oi", P("x"), P(None, None), P(None, "x")),
    ("bio", P("s", None, "m"), P("s", None, None), P("s", None, "m")),
    ("iio", P(None, "h", "m"), P(None, "h", None), P(None, "m")),
    ("ioo", P("f", ("h", "d"), None), P("f", None), P(None, ("h", "d"), None)),
])
def test_factor_specs_follow_the_kernel_axes(layout, w_spec, a_spec, b_spec):
    assert sharding.factor_specs(w_spec, layout) == (a_spec, b_spec)


def test_a_kernel_spec_with_more_entries_than_the_layout_has_axes_is_refused():
    with pytest.raises(ValueError, match=r"spec (P|PartitionSpec)\(None, 'fsdp', 'data'\) has 3 entries, but layout 'io' has 2 axes"):
        sharding.factor_specs(P(None, "fsdp", "data"), "io")  # 'data' would be dropped


def test_make_mesh_sizes():
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4}
    assert sharding.make_mesh({"data": 1}).size == 1
    with pytest.raises(ValueError, match="need 16 devices"):
        sharding.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(TypeError, match=r"axes must map axis names to sizes.*got \['data'\]"):
        sharding.make_mesh(["data"])
    with pytest.raises(ValueError, match=r"sizes must be integers \(at most one -1\), got \{'data': 2.7, 'fsdp': True\}"):
        sharding.make_mesh({"data": 2.7, "fsdp": True, "model": 1})  # not taken as 2 and 1
    assert sharding.make_mesh({"data": np.int64(2), "fsdp": -1}).size == 8


def test_fsdp_rule_shards_the_largest_divisible_axis_and_skips_small_leaves():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rule = sharding.fsdp(min_size=64)
    assert rule("k", (64, 256), mesh) == P(None, "fsdp")
    assert rule("k", (256, 6), mesh) == P("fsdp", None)
    assert rule("k", (6, 250), mesh) is None  # nothing divides by 4
    assert rule("bias", (32,), mesh) is None  # small
    with pytest.raises(ValueError, match=r"fsdp: mesh has no axis 'absent' \(axes: \('data', 'fsdp'\)\)"):
        sharding.fsdp("absent")("k", (64, 256), mesh)


def test_tensor_parallel_presets_split_columns_and_rows():
    llama = sharding.tensor_parallel("llama")
    spec = lambda rules, path, shape: next((s for r in rules if (s := r(path, shape, None)) is not None), None)
    assert spec(llama, "model/layers/0/self_attn/q_proj/kernel", (64, 64)) == P(None, "model")
    assert spec(llama, "model/layers/0/self_attn/o_proj/kernel", (64, 64)) == P("model", None)
    assert spec(llama, "model/layers/0/mlp/down_proj/kernel", (128, 64)) == P("model", None)
    assert spec(llama, "model/norm/weight", (64,)) is None
    gpt2 = sharding.tensor_parallel("gpt2")  # Conv1D kernels are stored (out, in)
    assert spec(gpt2, "transformer/h/0/attn/c_attn/kernel", (192, 64)) == P("model", None)
    assert spec(gpt2, "transformer/h/0/attn/c_attn/bias", (192,)) == P("model")
    assert spec(gpt2, "transformer/h/0/mlp/c_proj/kernel", (64, 256)) == P(None, "model")
    bert = sharding.tensor_parallel("bert")
    assert spec(bert, "encoder/layer/0/attention/output/dense/kernel", (64, 64)) == P("model", None)
    assert spec(bert, "encoder/layer/0/output/dense/kernel", (128, 64)) == P("model", None)
    assert spec(bert, "encoder/layer/0/intermediate/dense/kernel", (64, 128)) == P(None, "model")
    with pytest.raises(ValueError, match="no preset for model type 'mystery'"):
        sharding.tensor_parallel("mystery")


def test_bad_rules_name_the_param():
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    params = {"dense": {"kernel": np.ones((6, 8))}}
    with pytest.raises(ValueError, match=r"'dense/kernel'.*size 6.*'model',\) of size 4"):
        sharding.partition_specs(params, mesh, [("dense", P("model", None))])
    with pytest.raises(ValueError, match="'dense/kernel': mesh has no axis 'fsdp'"):
        sharding.partition_specs(params, mesh, [("dense", P(None, "fsdp"))])
    with pytest.raises(ValueError, match=r"mesh has no axis 'fsdp' .*; the rule: sharding.rule\('dense', "
                                         r"(P|PartitionSpec)\(None, 'fsdp'\)\)"):  # which of several rules it is
        sharding.partition_specs(params, mesh, [("other", P("model")), ("dense", P(None, "fsdp"))])

    def my_rule(path, shape, mesh):
        return P("absent")

    with pytest.raises(ValueError, match=r"the rule: test_bad_rules_name_the_param.<locals>.my_rule"):
        sharding.partition_specs(params, mesh, [my_rule])
    with pytest.raises(ValueError, match=r"'dense/kernel': mesh has no axis 'tensor' .*; the rule: "
                                         r"sharding.from_specs\(specs of 1 param\)$"):
        sharding.partition_specs(params, mesh, [sharding.from_specs({"dense": {"kernel": P("tensor", None)}})])
    with pytest.raises(ValueError, match="'dense/kernel': spec .* has 3 entries"):
        sharding.partition_specs(params, mesh, [("dense", P(None, None, "model"))])
    with pytest.raises(ValueError, match=r"'dense/kernel': spec .* splits two axes over mesh axis 'model'"):
        sharding.partition_specs(params, mesh, [("dense", P("model", "model"))])
    with pytest.raises(ValueError, match="a list of rules inside the rules .tensor_parallel.. returns one."):
        sharding.partition_specs(params, mesh, [sharding.tensor_parallel("llama")])
    # a pattern that matches nothing (a typo) shards nothing: said, naming the nearest paths
    with pytest.warns(UserWarning, match=r"the rule for 'dense/kernels' matches no param, so it shards nothing "
                                         r"\(nearest paths: \['dense/kernel'\]\)") as seen:
        sharding.partition_specs(params, mesh, [("dense/kernels", P(None, "model")), ("dense", P())])
    assert seen[0].filename == __file__
    trainable = jlora.split(jlora.lora_init(jax.random.key(0), {**params, "head": np.ones((8, 2))},
                                            jlora.LoraConfig(rank=2, targets=["dense"])))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.partition_specs(trainable, mesh, [("head", P("model"))])  # a leaf the half holds as None
        sharding.partition_specs(trainable, mesh, [sharding.from_specs({"head": P("model"), "dense": {"kernel": P()}})])
    # so does a tree of specs with a path the params lack
    with pytest.warns(UserWarning, match=r"from_specs holds specs at 1 paths no param has, so they shard nothing: "
                                         r"\['dnse/kernel'\] \(nearest paths to 'dnse/kernel': \['dense/kernel'\]\)"):
        sharding.partition_specs(params, mesh, [sharding.from_specs({"dnse": {"kernel": P(None, "model")}})])
    # an adapted tree put inside another ({"params": ...}) after lora_init: its kernel's spec found where it is now
    lora = jlora.lora_init(jax.random.key(0), {"dense": {"kernel": np.ones((6, 8)), "bias": np.ones(8)}},
                           jlora.LoraConfig(rank=2, targets=["dense"]))
    specs = {"params": {"dense": {"kernel": P(None, "model"), "bias": P("model")}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        placed = sharding.partition_specs({"params": lora}, mesh, [sharding.from_specs(specs)])["params"]["dense"]
    assert placed["kernel"].w == P(None, "model") and placed["bias"] == P("model")
    # the specs partition_specs gave a LoRA tree (a trained bias among them): each kernel's taken as its w's
    tuned = jlora.lora_init(jax.random.key(0), {"dense": {"kernel": np.ones((6, 8)), "bias": np.ones(8)}},
                            jlora.LoraConfig(rank=2, targets=["dense"], trainable=["bias"]))
    own = sharding.partition_specs(tuned, mesh, [("dense/kernel", P(None, "model")), ("bias", P("model"))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sharding.partition_specs(tuned, mesh, [sharding.from_specs(own)])
    specs_of = lambda t: jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(x, P))[0]
    assert specs_of(again) == specs_of(own) and again["dense"]["kernel"].b == P(None, "model")
    half = sharding.partition_specs(jlora.split(tuned)[0], mesh, [("dense/kernel", P(None, "model"))])
    with pytest.raises(ValueError, match=r"from_specs: the specs at 'dense/kernel' hold no kernel spec \(a trainable "
                                         r"half's, whose w is None\): give the specs of the base params"):
        sharding.from_specs(half)
    with pytest.raises(ValueError, match="a rule is a function .* or a .pattern, spec. pair; got 3"):
        sharding.partition_specs(params, mesh, [3])


def test_rules_over_an_axis_the_mesh_lacks_and_misplaced_arguments_are_errors():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    params = {"w": np.ones((64, 128))}
    with pytest.raises(ValueError, match=r"fsdp: mesh has no axis 'model' \(axes: \('data', 'fsdp'\)\)"):
        sharding.place(params, mesh, [sharding.fsdp("model", min_size=1)])
    with pytest.raises(ValueError, match="tensor_parallel: mesh has no axis 'model'"):
        sharding.place(params, mesh, sharding.tensor_parallel("llama", "model"))  # even where no path matches
    with pytest.raises(TypeError, match=r"rules must be a list of rules, e.g. \[sharding.fsdp"):
        sharding.place(params, mesh, sharding.fsdp("fsdp"))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh .* got NoneType"):
        sharding.place(params, None, [])


def test_batch_sharding_takes_one_axis_name_or_several_of_the_mesh():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(mesh, "data").spec == P("data")
    assert sharding.batch_sharding(mesh, ("fsdp",)).spec == P("fsdp")
    assert sharding.batch_sharding(sharding.make_mesh({"data": 2, "model": 4})).spec == P("data")
    with pytest.raises(ValueError, match=r"batch_sharding: mesh has no axis 'model' \(axes: \('data', 'fsdp'\)\)"):
        sharding.batch_sharding(mesh, ("data", "model"))


# --- lora_init on sharded params ------------------------------------------------------------------

def _base(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "up": {"kernel": normal(k[0], (32, 64), dtype), "bias": jnp.zeros(64, dtype)},
        "down": {"kernel": normal(k[1], (64, 32), dtype)},
        "stack": {"kernel": normal(k[2], (4, 32, 64), dtype)},
    }


RULES = [("up/kernel", P(None, "model")), ("down/kernel", P("model", None)), ("stack/kernel", P(None, "fsdp", "model"))]
CONFIG = jlora.LoraConfig(rank=4, targets=["up", "down", "stack"], layouts={"stack": "bio"}, trainable=["bias"])


def test_lora_init_creates_factors_in_the_derived_shardings_on_the_devices():
    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    placed = sharding.place(_base(), mesh, RULES)
    key = jax.random.key(1)
    with jax.transfer_guard_device_to_host("disallow"):
        params = jlora.lora_init(key, placed, CONFIG)
    expected = {"up": (P(None, None), P(None, "model")), "down": (P("model", None), P(None, None)),
                "stack": (P(None, "fsdp", None), P(None, None, "model"))}
    for name, (a_spec, b_spec) in expected.items():
        lw = params[name]["kernel"]
        assert lw.w.sharding == placed[name]["kernel"].sharding
        assert lw.a.sharding.is_equivalent_to(NamedSharding(mesh, a_spec), lw.a.ndim), name
        assert lw.b.sharding.is_equivalent_to(NamedSharding(mesh, b_spec), lw.b.ndim), name
    # the same values as on one device
    single = jlora.lora_init(key, _base(), CONFIG)
    for path, value in adapters(single).items():
        np.testing.assert_array_equal(adapters(params)[path], value)
    on_3 = jlora.lora_init(key, jax.device_put(_base(), jax.devices()[3]), CONFIG)  # a kernel put on one device
    assert {d.id for lw in (on_3["up"]["kernel"], on_3["stack"]["kernel"]) for x in (lw.a, lw.b) for d in x.devices()} == {3}


def test_lora_init_under_jit_with_derived_out_shardings():
    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    init = lambda p: jlora.lora_init(jax.random.key(1), p, CONFIG)
    out = sharding.shardings(jax.eval_shape(init, _base()), mesh, RULES)
    params = jax.jit(init, out_shardings=out)(_base())
    assert params["up"]["kernel"].b.sharding.spec == P(None, "model")
    assert params["stack"]["kernel"].a.sharding.spec == P(None, "fsdp", None)
    assert params["up"]["bias"].value.sharding.spec == P()


def test_an_ensembles_factors_shard_by_the_member_axis_and_the_kernels_own():
    """``jax.vmap(lora_init)``'s ensemble keeps the layout of one member ('io') over arrays with a
    leading member axis: its factors' specs come from the layout fitted to them ('bio')."""
    members = 8
    base = {"up": {"kernel": jnp.ones((members, 32, 64))}}
    ensemble = jax.vmap(lambda k, p: jlora.lora_init(k, p, jlora.LoraConfig(rank=4, targets=["up"])))(
        jax.random.split(jax.random.key(1), members), base)
    assert str(ensemble["up"]["kernel"].layout) == "io"
    mesh = sharding.make_mesh({"model": 8})
    for w_spec, a_spec, b_spec in [(P("model", None, None), P("model", None, None), P("model", None, None)),
                                   (P(None, None, "model"), P(None, None, None), P(None, None, "model")),
                                   (P(None, "model", None), P(None, "model", None), P(None, None, None))]:
        specs = sharding.partition_specs(ensemble, mesh, [("up/kernel", w_spec)])["up"]["kernel"]
        assert (tuple(specs.a), tuple(specs.b)) == (tuple(a_spec), tuple(b_spec)), w_spec
        # the trainable half (no w) is seen as the same kernel: rules get its shape, specs agree
        half = sharding.partition_specs(jlora.split(ensemble)[0], mesh, [("up/kernel", w_spec)])["up"]["kernel"]
        assert (tuple(half.a), tuple(half.b)) == (tuple(a_spec), tuple(b_spec)), w_spec
        placed = sharding.place(ensemble, mesh, [("up/kernel", w_spec)])["up"]["kernel"]  # the rank axis unsplit
        np.testing.assert_array_equal(placed.b, ensemble["up"]["kernel"].b)


def test_an_equinox_modules_functions_are_left_where_they_are():
    import equinox as eqx

    model = eqx.nn.MLP(16, 8, 32, 2, key=jax.random.key(0))  # holds activation functions as leaves
    mesh = sharding.make_mesh({"model": 8})
    rules = [("layers/0/weight", P("model", None))]
    assert sharding.shardings(model, mesh, rules).activation is None
    placed = sharding.place(model, mesh, rules)
    assert placed.activation is model.activation and tuple(placed.layers[0].weight.sharding.spec) == ("model", None)
    params = jlora.lora_init(jax.random.key(1), placed, jlora.LoraConfig(rank=2, targets=["layers"],
                                                                          layouts={"weight": "oi"}))
    tx = jlora.optimizer(optax.adam(1e-3), params)
    state = sharding.init_state(tx, params, mesh, rules)
    mu = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    b = next(x for x in mu if isinstance(x, jlora.LoraWeight) and x.path == "layers/0/weight").b
    assert tuple(b.sharding.spec) == (None, "model")  # 'oi': b holds the output axis the rule splits
    jax.tree.map(np.testing.assert_array_equal, state, tx.init(params))


def test_an_adapter_loaded_onto_a_sharded_base_is_sharded_as_lora_init_shards_it(tmp_path):
    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    base = sharding.place(_base(), mesh, RULES)
    fresh = jlora.lora_init(jax.random.key(1), base, CONFIG)
    path = jlora.adapter.save_adapter(tmp_path / "adapter", perturb(fresh, jax.random.key(2)))
    loaded = jlora.adapter.load_adapter(path, base)
    is_node = lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable))
    placement = lambda tree: [(x.a.sharding, x.b.sharding) if isinstance(x, jlora.LoraWeight) else x.value.sharding
                              for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]
    assert placement(loaded) == placement(fresh)
    assert any(any(s.spec) for pair in placement(loaded) if isinstance(pair, tuple) for s in pair)  # some are split


def test_flax_logical_partitioning_becomes_rules_whose_factors_take_derived_specs():
    """MaxText's way: kernels boxed with logical axis names, a scanned stack of layers, n-D attention kernels."""
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            init = lambda names: nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
            q = nn.DenseGeneral((4, 8), kernel_init=init(("embed", "heads", "kv")), use_bias=False, name="query")(h)
            h = h + nn.DenseGeneral(32, axis=(-2, -1), kernel_init=init(("heads", "kv", "embed")), use_bias=False,
                                    name="out")(q)
            return h + nn.Dense(32, kernel_init=init(("embed", "mlp")), use_bias=False, name="wi")(h), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                           metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(h, None)[0]

    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    logical = (("embed", "fsdp"), ("heads", "model"), ("mlp", "model"), ("layers", None), ("kv", None))
    x = jnp.ones((2, 32))
    boxed = Model().init(jax.random.key(0), x)["params"]
    rules = [sharding.from_specs(nn.logical_to_mesh(nn.get_partition_spec(boxed), logical))]
    base = sharding.place(nn.unbox(boxed), mesh, rules)
    cfg = jlora.LoraConfig(rank=2, targets=["query", "out", "wi"])
    init = lambda p: jlora.lora_init(jax.random.key(1), p, cfg, infer_layout=lambda q: Model().apply({"params": q}, x))
    lora = jax.jit(init, out_shardings=sharding.shardings(jax.eval_shape(init, base), mesh, rules))(base)
    got = {name: tuple(tuple(getattr(lora["layers"][name]["kernel"], f).sharding.spec) for f in "wab")
           for name in ("query", "out", "wi")}
    assert got == {"query": ((None, "fsdp", "model", None), (None, "fsdp", None), (None, None, "model", None)),
                   "out": ((None, "model", None, "fsdp"), (None, "model", None, None), (None, None, "fsdp")),
                   "wi": ((None, "fsdp", "model"), (None, "fsdp", None), (None, None, "model"))}
    with pytest.raises(ValueError, match=r"from_specs: specs must be a tree of PartitionSpec .*found ArrayImpl \(the params "
                                         r"themselves\? give their specs"):
        sharding.from_specs(boxed)


def test_optimizer_state_of_an_nnx_model_shards_like_the_adapters():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 32, rngs=rngs)

    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    rules = [("up/kernel", P(None, "model"))]
    state = sharding.place(nnx.state(Model(nnx.Rngs(0))), mesh, rules)
    trainable, _ = jlora.split(jlora.lora_init(jax.random.key(1), state, jlora.LoraConfig(rank=4, targets=["up"])))
    tx = jlora.optimizer(optax.adam(1e-3), trainable, b_lr_ratio=2.0)  # its state holds no NNX variables
    opt_state = sharding.init_state(tx, trainable, mesh, rules)
    mu = opt_state.inner_states["adapter"].inner_state[0][0].mu
    assert mu["up"]["kernel"].b.sharding.spec == P(None, "model") and mu["up"]["kernel"].a.sharding.is_fully_replicated
    jax.tree.map(np.testing.assert_array_equal, opt_state, tx.init(trainable))
    # a plain optax optimizer keeps the variables in its state: its shardings keep them too
    plain = optax.adam(1e-3)
    assert sharding.init_state(plain, state, mesh, rules)[0].mu["up"]["kernel"].sharding.spec == P(None, "model")


def test_optimizer_state_shards_like_the_adapters():
    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    params = jlora.lora_init(jax.random.key(1), sharding.place(_base(), mesh, RULES), CONFIG)
    trainable, _ = jlora.split(params)
    tx = jlora.optimizer(optax.adamw(1e-3), trainable, b_lr_ratio=4.0)
    for tree in (trainable, params):  # the trainable half or the whole tree
        state = sharding.init_state(tx, tree, mesh, RULES)
        mu = state.inner_states["adapter"].inner_state[0][0].mu
        assert mu["up"]["kernel"].b.sharding.spec == P(None, "model")
        assert mu["stack"]["kernel"].a.sharding.spec == P(None, "fsdp", None)
        assert state.inner_states["adapter"].inner_state[0][0].count.sharding.spec == P()
    # a plain optax optimizer keeps moments for every leaf, w included: they shard like their params
    state = sharding.init_state(optax.adam(1e-3), params, mesh, RULES)
    assert state[0].mu["down"]["kernel"].w.sharding.spec == P("model", None)
    assert state[0].mu["down"]["kernel"].a.sharding.spec == P("model", None)
    # Adafactor's moments are per param but of other shapes (factored rows and columns, (1,)
    # placeholders): replicated where the param's sharding cannot lay them out
    for factored in (True, False):
        tx = jlora.optimizer(optax.adafactor(1e-2, factored=factored, min_dim_size_to_factor=4), trainable)
        state = sharding.init_state(tx, trainable, mesh, RULES)
        jax.tree.map(lambda x: x.sharding.shard_shape(x.shape), state)  # each laid out as its sharding says
        want = jax.eval_shape(tx.init, trainable)
        assert [np.shape(x) for x in jax.tree.leaves(state)] == [np.shape(x) for x in jax.tree.leaves(want)]
    # SM3 keeps a list of accumulators per param (one per axis, replicated) beside moments of its shape
    sm3_tx = jlora.optimizer(optax.sm3(1e-2), trainable)
    state = sharding.init_state(sm3_tx, trainable, mesh, RULES)
    sm3 = state.inner_states["adapter"].inner_state[0]
    assert sm3.nu["up"]["kernel"].b.sharding.spec == P(None, "model")
    assert [x.sharding.spec for x in sm3.mu["up"]["kernel"].b] == [P(), P()]
    jax.tree.map(np.testing.assert_array_equal, state, sm3_tx.init(trainable))
    shardings = sharding.state_shardings(sm3_tx, state, sharding.shardings(trainable, mesh, RULES), mesh)
    assert [s.spec for s in shardings.inner_states["adapter"].inner_state[0].mu["up"]["kernel"].b] == [P(), P()]
    # a list of the params' own (layers) is no param's several arrays: another model's shardings are refused
    layers = lambda n: jlora.split(jlora.lora_init(jax.random.key(0), {"layers": [_base()["up"]] * n},
                                                   jlora.LoraConfig(rank=2, targets=["layers"])))[0]
    with pytest.raises(ValueError, match="the state holds a list of 2 where param_shardings has a list of 1"):
        sharding.state_shardings(optax.adam(1e-3), optax.adam(1e-3).init(layers(2)),
                                 sharding.shardings(layers(1), mesh, []), mesh)
    other = jlora.split(jlora.lora_init(jax.random.key(1), _base(), jlora.LoraConfig(rank=2, targets=["down"])))[0]
    with pytest.raises(ValueError, match="state_shardings: the state holds a LoraWeight where param_shardings has "
                                         "none: give the shardings of the params the state was made from"):
        sharding.state_shardings(tx, tx.init(trainable), sharding.shardings(other, mesh, RULES), mesh)
    frozen = jlora.split(params)[1]  # the other half's: no factors' shardings, which jax.jit took as "unspecified"
    with pytest.raises(ValueError, match=r"the state holds an array for the a of '\w+/kernel', but param_shardings has none "
                                         r"\(the shardings of the frozen half of jlora.split\?\)") as refused:
        sharding.state_shardings(tx, tx.init(trainable), sharding.shardings(frozen, mesh, RULES), mesh)
    assert refused.type is ValueError  # not the module's private subclass
    # optax.lookahead around the optimizer (as the README has it) takes LookaheadParams: its state mirrors the fast ones
    lookahead = optax.lookahead(jlora.optimizer(optax.adam(1e-2), trainable, b_lr_ratio=4.0), sync_period=2,
                                slow_step_size=0.5)
    both = optax.LookaheadParams.init_synced(trainable)
    state = sharding.init_state(lookahead, both, mesh, RULES)
    mu = state.fast_state.inner_states["adapter"].inner_state[0][0].mu
    assert mu["up"]["kernel"].b.sharding.spec == P(None, "model")
    jax.tree.map(np.testing.assert_array_equal, state, lookahead.init(both))
    with pytest.raises(ValueError, match=r"state_shardings: the state's per-param leaves are not shaped like the tree "
                                         r"of param_shardings: .*shardings\(params.fast, mesh, rules\)"):
        sharding.state_shardings(lookahead, lookahead.init(both), sharding.shardings(both, mesh, RULES), mesh)
    flat = jlora.optimizer(optax.flatten(optax.adam(1e-2)), trainable)  # one vector of moments: one device only
    with pytest.raises(ValueError, match=r"a tx that keeps no state per param \(optax.flatten's one vector of all "
                                         r"params\) cannot be laid out like them"):
        sharding.init_state(flat, trainable, mesh, RULES)


# --- sharded training == single-device training ----------------------------------------------------

@pytest.mark.parametrize("mesh_axes, parallel", [({"data": 2, "fsdp": 4}, "fsdp"), ({"data": 2, "model": 4}, "tp")])
def test_sharded_training_equals_single_device(mesh_axes, parallel):
    train = example("train_fsdp").train
    with pytest.raises(SystemExit, match=r"--batch 6 does not split over the mesh's data and fsdp axes \(8 ways\)"):
        train({"data": 2, "fsdp": 4}, "fsdp", batch=6, log=False)  # before the model is built
    # Adam turns round-off in near-zero gradients into lr-sized steps: a small lr keeps them small
    single = train({"data": 1}, "dp", steps=3, lr=1e-3, log=False)
    sharded = train(mesh_axes, parallel, steps=3, lr=1e-3, log=False)
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
    got, want = adapters(sharded["params"]), adapters(single["params"])
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path)
    # the frozen kernels kept their shardings; the factors have the derived ones
    rules = example("train_fsdp").rules_for(parallel)
    mesh = sharded["mesh"]
    want_specs = sharding.partition_specs(sharded["params"], mesh, rules)
    leaves = jax.tree.leaves(sharded["params"])
    specs = jax.tree.leaves(want_specs, is_leaf=lambda x: isinstance(x, P))
    assert len(leaves) == len(specs)
    for leaf, spec in zip(leaves, specs):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)


COLLECTIVES = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("


def _hlo_shapes(hlo: str, op: str) -> set:
    """Result shapes (dims tuples) of the HLO instructions whose opcode matches ``op``."""
    shapes = set()
    for line in hlo.splitlines():
        if "=" not in line:
            continue
        rhs = line.split("=", 1)[1]
        m = re.search(op, rhs)
        if m:
            for dims in re.findall(r"\w+\[([\d,]*)\]", rhs[: m.start()]):
                shapes.add(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def _compiled_step(mesh_axes, parallel, merged=False):
    # 10 tokens a sequence, rank 4: no activation or factor has the shape of a kernel (64, 32, 96 wide)
    # or of its block on a device
    run = example("train_fsdp").setup(mesh_axes, parallel, seq=10, rank=4, merged=merged)
    tokens = example("train_fsdp").global_batch(0, 8, run["seq"], 128, run["data_sharding"])
    hlo = run["step"].lower(run["trainable"], run["frozen"], run["opt_state"], tokens).compile().as_text()
    # a kernel's full shape and the shape of its block on one device
    kernels = set()
    for x in jax.tree.leaves(run["frozen"], is_leaf=lambda x: isinstance(x, jlora.LoraWeight)):
        if isinstance(x, jlora.LoraWeight):
            kernels |= {tuple(x.shape), tuple(x.w.sharding.shard_shape(x.shape))}
    return hlo, kernels


@pytest.mark.parametrize("mesh_axes, parallel", [({"data": 8}, "dp"), ({"data": 2, "model": 4}, "tp"),
                                                 ({"data": 2, "fsdp": 4}, "fsdp")])
def test_the_train_step_never_forms_or_moves_a_full_size_delta_w(mesh_axes, parallel):
    hlo, kernels = _compiled_step(mesh_axes, parallel)
    assert kernels
    # no dot forms a full-size product (ΔW = a@b, or a weight gradient), whole or a device's block
    # of it; no gradient of a full-size weight is reduced: only the adapters' gradients cross devices
    assert not kernels & _hlo_shapes(hlo, r"\bdot\("), "a full-size product is formed"
    assert not kernels & _hlo_shapes(hlo, r"(all-reduce|reduce-scatter)(-start)?\(")
    if parallel in ("dp", "tp"):  # weights replicated or split Megatron-style: no weight ever moves
        assert not kernels & _hlo_shapes(hlo, COLLECTIVES)
    # the check can fail: the step on merged weights forms ΔW
    merged, _ = _compiled_step(mesh_axes, parallel, merged=True)
    assert kernels & _hlo_shapes(merged, r"\bdot\(")


# --- pmap and shard_map -------------------------------------------------------------------------------

def test_pmap_data_parallel_equals_one_device():
    train = example("train_pmap").train
    eight = train(steps=4, per_device=2, n_devices=8, log=False)
    one = train(steps=4, per_device=16, n_devices=1, log=False)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    assert eight["losses"][-1] < eight["losses"][0]
    for path, value in adapters(one["params"]).items():
        np.testing.assert_allclose(adapters(eight["params"])[path], value, rtol=1e-5, atol=1e-5, err_msg=path)


def test_one_wrapper_under_pmaps_of_different_axis_names():
    """The trace cache keys on the mesh a call runs under: a jaxpr traced in pmap 'a' holds avals of
    that mesh and cannot bind in pmap 'b' (an eval pmap and a train pmap share a forward)."""
    params = _mlp_params()
    n = jax.local_device_count()
    rep = jax.tree.map(lambda x: jnp.stack([x] * n), params)
    x = normal(jax.random.key(3), (n, 4, 16))
    forward = jlora.apply(lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) + jnp.ones((1, 32)))
    want = jnp.tanh(x @ jlora.merge(params)["l1"]["kernel"]) + 1.0
    for axis in ("a", "b", None):
        got = jax.pmap(lambda p, x: forward(p, x), axis_name=axis)(rep, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _mlp_params():
    base = {"l1": {"kernel": normal(jax.random.key(0), (16, 32))},
            "l2": {"kernel": normal(jax.random.key(1), (32, 8))}}
    params = jlora.lora_init(jax.random.key(2), base, jlora.LoraConfig(rank=2, targets=["l1", "l2"]))
    return jax.tree.map(lambda x: x + 0.1, params)  # b != 0: every factor matters


def _mlp_loss(p, x):
    return jnp.mean((jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]) ** 2)


def _assert_grads_close(got, want):
    for g, w in zip(jax.tree.leaves(jlora.split(got)[0]), jax.tree.leaves(jlora.split(want)[0])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_apply_runs_inside_shard_map():
    mesh = sharding.make_mesh({"data": 8})
    params, x = _mlp_params(), normal(jax.random.key(3), (64, 16))

    def per_device(grad_of):
        body = lambda p, x: jax.lax.pmean(jax.grad(grad_of)(p, x), "data")
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(params, x)

    lazy = per_device(jlora.apply(_mlp_loss))
    oracle = per_device(lambda p, x: _mlp_loss(jlora.merge(p), x))
    _assert_grads_close(lazy, oracle)


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_an_adapter_per_device_over_a_replicated_base_inside_shard_map(kind):
    """Factors split over the mesh axis, ``w`` and ``x`` replicated: the weight varies as its factors
    do (a quantized one, each of its arrays), so the model's replicated bias meets a varying matmul
    (JAX refused the add: 'varying manual axes to match'). Outputs and the factors' gradients equal
    the merged weights'."""
    from quantized import quantize

    mesh = sharding.make_mesh({"d": 8})
    kernel = normal(jax.random.key(0), (16, 32))
    base = {"l1": {"kernel": kernel if kind == "float" else quantize(kernel), "bias": jnp.ones(32)}}
    trainable, frozen = jlora.split(jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=4, targets=["l1"])))
    stacked = jlora.stack([perturb(trainable, jax.random.key(i)) for i in range(8)])
    x = normal(jax.random.key(9), (4, 16))
    model = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) * jnp.sum(x)

    def per_device(forward):
        def body(t, frozen, x):
            def loss(t):
                y = forward(jlora.combine(jax.tree.map(lambda l: l[0], t), frozen), x)
                return jnp.sum(y ** 2), y[None]
            (_, y), g = jax.value_and_grad(loss, has_aux=True)(t)
            return y, g
        specs = (jax.tree.map(lambda _: P("d"), stacked), jax.tree.map(lambda _: P(), frozen), P())
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P("d"), specs[0])))(stacked, frozen, x)

    (y, g), (y_want, g_want) = per_device(jlora.apply(model)), per_device(lambda p, x: model(jlora.merge(p), x))
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    tolerance = 1e-4 if kind == "float" else 1e-3  # the int8 matmul rounds otherwise than the merged weight's
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_want)):  # gradients up to ~150: float32 sums
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, np.abs(want).max() / 10))


def _megatron_loss(p, x):
    """``_mlp_loss`` as a Megatron MLP written with shard_map: l1 split by columns, l2 by rows, one psum."""
    def block(p, x):
        return jax.lax.psum(jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"], "model")

    mesh = sharding.make_mesh({"model": 8})
    specs = {"l1": {"kernel": P(None, "model")}, "l2": {"kernel": P("model", None)}}
    y = jax.shard_map(block, mesh=mesh, in_specs=(specs, P()), out_specs=P())(p, x)
    return jnp.mean(y ** 2)


def test_shard_map_inside_the_function_keeps_sharded_factors():
    params, x = _mlp_params(), normal(jax.random.key(3), (64, 16))
    loss = _megatron_loss
    lazy = jax.jit(jax.grad(jlora.apply(loss)))(params, x)
    oracle = jax.grad(lambda p, x: _mlp_loss(jlora.merge(p), x))(params, x)
    _assert_grads_close(lazy, oracle)
    # the body works on the factors' blocks: no product of a kernel's (or a block's) shape is formed
    jaxpr = str(jax.make_jaxpr(jax.grad(jlora.apply(loss)))(params, x))
    for shape in ("16,32", "32,8", "16,4", "4,8"):
        assert not re.search(rf"f32\[{shape}\] = dot_general", jaxpr), shape
    assert "shard_map" in jaxpr


def _gathered_loss(split_by, tiled):
    """``_mlp_loss`` with FSDP written by hand: each kernel split by ``split_by`` ("rows" or
    "columns") and gathered whole before its use, the batch split too. Untiled, the gather stacks
    the blocks along a new axis ((8, in/8, out) or (in, 8, out/8)), reshaped whole."""
    axis = {"rows": 0, "columns": 1}[split_by]

    def whole(w):
        if tiled:
            return jax.lax.all_gather(w, "fsdp", axis=axis, tiled=True)
        return jax.lax.all_gather(w, "fsdp", axis=axis).reshape(w.shape[0] * (8 if axis == 0 else 1), -1)

    def block(p, x):
        y = jnp.tanh(x @ whole(p["l1"]["kernel"])) @ whole(p["l2"]["kernel"])
        return jax.lax.pmean(jnp.mean(y ** 2), "fsdp")

    spec = P("fsdp", None) if axis == 0 else P(None, "fsdp")
    specs = {"l1": {"kernel": spec}, "l2": {"kernel": spec}}
    mesh = sharding.make_mesh({"fsdp": 8})
    return lambda p, x: jax.shard_map(block, mesh=mesh, in_specs=(specs, P("fsdp")), out_specs=P())(p, x)


@pytest.mark.parametrize("split_by, tiled", [("rows", True), ("rows", False), ("columns", False)])
def test_kernels_gathered_inside_shard_map_gather_the_factors_that_differ(split_by, tiled):
    """Tiled, the factor split like the kernel is gathered (rows: a; b is whole already); untiled,
    the factors that vary over the mesh axis are, the new axis an input or output axis."""
    params, x = _mlp_params(), normal(jax.random.key(3), (64, 16))
    loss = _gathered_loss(split_by, tiled)
    lazy = jax.jit(jax.grad(jlora.apply(loss)))(params, x)  # no MaterializeWarning (an error here)
    oracle = jax.grad(lambda p, x: _mlp_loss(jlora.merge(p), x))(params, x)
    _assert_grads_close(lazy, oracle)
    jaxpr = str(jax.make_jaxpr(jax.grad(jlora.apply(loss)))(params, x))
    for shape in ("16,32", "32,8"):  # no ΔW is formed
        assert not re.search(rf"f32\[{shape}\] = dot_general", jaxpr), shape
    want = {"l1/kernel": "io", "l2/kernel": "io"}
    got = infer_layouts(lambda p: loss(p, x), jlora.merge(params), list(want))
    assert {k: str(v) for k, v in got.items()} == want


def test_a_stack_split_by_layers_and_gathered_untiled_stays_factored():
    stack = normal(jax.random.key(0), (8, 16, 16)) / 4  # unit-variance activations: float32 well conditioned
    cfg = jlora.LoraConfig(rank=2, targets=["layers"], layouts={"layers": "bio"})
    params = perturb(jlora.lora_init(jax.random.key(1), {"layers": stack}, cfg), jax.random.key(2))
    x = normal(jax.random.key(3), (4, 16))

    def run(layers, x):
        for w in layers:
            x = jnp.tanh(x @ w)
        return jnp.mean(x ** 2)

    def block(p, x):  # each device holds one layer; all of them gathered (8, 1, 16, 16) and reshaped
        return jax.lax.pmean(run(jax.lax.all_gather(p["layers"], "layers").reshape(8, 16, 16), x), "layers")

    mesh = sharding.make_mesh({"layers": 8})
    loss = jax.shard_map(block, mesh=mesh, in_specs=({"layers": P("layers")}, P()), out_specs=P())
    lazy = jax.jit(jax.grad(jlora.apply(loss)))(params, x)  # no MaterializeWarning (an error here)
    oracle = jax.grad(lambda p, x: run(jlora.merge(p)["layers"], x))(params, x)
    _assert_grads_close(lazy, oracle)


def test_an_untiled_gather_without_shard_maps_types_is_materialised_and_says_so():
    params, x = {"l1": _mlp_params()["l1"]}, normal(jax.random.key(3), (64, 16))

    def block(p, x):
        return jax.lax.all_gather(p["l1"]["kernel"], "fsdp", axis=0).reshape(16, 32)[:2, :2]

    fn = jax.shard_map(block, mesh=sharding.make_mesh({"fsdp": 8}), in_specs=({"l1": {"kernel": P("fsdp", None)}}, P()),
                       out_specs=P(), check_vma=False)
    with pytest.warns(jlora.MaterializeWarning, match="all_gather"):
        got = jax.jit(jlora.apply(fn))(params, x)
    np.testing.assert_allclose(got, jlora.merge(params)["l1"]["kernel"][:2, :2], rtol=1e-6)


def test_shard_map_inside_the_function_splits_a_quantized_base_by_its_kinds_part_specs():
    """The same Megatron MLP over int8 kernels, one adapted and one not: each enters the body as
    its parts' blocks."""
    from quantized import INT8_DOTS, quantize

    float_params, x = _mlp_params(), normal(jax.random.key(3), (64, 16))
    l1 = float_params["l1"]["kernel"]
    params = {"l1": {"kernel": l1.replace(w=quantize(l1.w))}, "l2": {"kernel": quantize(float_params["l2"]["kernel"].w)}}

    trainable, frozen = jlora.split(params)
    INT8_DOTS.clear()
    lazy = jax.jit(jax.grad(lambda t, x: jlora.apply(_megatron_loss)(jlora.combine(t, frozen), x)))(trainable, x)
    assert len(INT8_DOTS) >= 2  # the int8 rule ran on both kernels' blocks: nothing was dequantized whole
    oracle = jax.grad(lambda t, x: _mlp_loss(jlora.merge(jlora.combine(t, frozen)), x))(trainable, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), lazy, oracle)


def test_shard_map_materialises_a_lazy_kind_without_part_specs_and_says_so():
    from quantized import Int8Weight, quantize

    @jax.tree_util.register_pytree_node_class
    class NoPartSpecs(Int8Weight):
        part_specs = None

    mesh = sharding.make_mesh({"model": 8})
    kernel = NoPartSpecs(*jax.tree.leaves(quantize(normal(jax.random.key(0), (16, 32)))))
    x = normal(jax.random.key(1), (4, 16))
    fn = jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P(None, "model"))
    with pytest.warns(jlora.MaterializeWarning, match=r"shard_map'( in .*)?: NoPartSpecs defines no part_specs\(spec\) to "
                                                      r"split its parts by \(None, 'model'\)"):
        got = jax.jit(jlora.apply(fn))(kernel, x)
    np.testing.assert_allclose(got, x @ kernel.materialize(), rtol=1e-5, atol=1e-5)
    # under an adapter: the base alone is materialised, the adapter enters as its factors' blocks
    lw = perturb(jlora.lora_init(jax.random.key(2), {"k": kernel}, jlora.LoraConfig(rank=2, targets=["k"])), jax.random.key(3))
    jlora.lazy.reset_warnings()
    with pytest.warns(jlora.MaterializeWarning) as seen:
        got = jax.jit(jlora.apply(lambda p, x: fn(p["k"], x)))(lw, x)
    assert [str(w.message).split(" materialised")[0] for w in seen] == ["jlora: NoPartSpecs (the base of 'k')"]
    np.testing.assert_allclose(got, x @ jlora.merge(lw)["k"], rtol=1e-5, atol=1e-5)


def test_shard_map_in_specs_written_for_the_plain_kernel_are_refused_with_the_specs_to_use():
    mesh = sharding.make_mesh({"model": 8})
    base = {"l1": {"kernel": normal(jax.random.key(0), (16, 32))}}
    params = perturb(jlora.lora_init(jax.random.key(2), base, jlora.LoraConfig(rank=8, targets=["l1"])), jax.random.key(4))
    x = normal(jax.random.key(3), (8, 16))
    fn = jlora.apply(lambda p, x: x @ p["l1"]["kernel"])
    plain = {"l1": {"kernel": P(None, "model")}}  # as for the unmodified model: splits a's rank axis too
    with pytest.raises(ValueError, match=r"jlora.apply: LoraWeight 'l1/kernel': .* \(one device's blocks inside "
                                         r"shard_map: .*jlora.sharding.partition_specs\(params, mesh, rules\)"):
        jax.shard_map(fn, mesh=mesh, in_specs=(plain, P()), out_specs=P(None, "model"))(params, x)
    specs = sharding.partition_specs(params, mesh, [("l1/kernel", P(None, "model"))])
    got = jax.shard_map(fn, mesh=mesh, in_specs=(specs, P()), out_specs=P(None, "model"))(params, x)
    np.testing.assert_allclose(got, x @ jlora.merge(params)["l1"]["kernel"], rtol=1e-5, atol=1e-5)


def test_the_same_wrapped_function_inside_and_outside_shard_map():
    """The trace cache tells a replicated value from one that varies over manual axes."""
    mesh = sharding.make_mesh({"data": 8})
    params, x = _mlp_params(), normal(jax.random.key(3), (64, 16))
    forward = jlora.apply(lambda p, x: x @ p["l1"]["kernel"])
    outside = jax.jit(forward)(params, x[:8])
    inside = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")))(params, x)
    np.testing.assert_allclose(inside[:8], outside, rtol=1e-5, atol=1e-6)


def test_each_device_draws_only_its_block_of_the_dropout_mask():
    mesh = sharding.make_mesh({"data": 8})
    x = jax.device_put(normal(jax.random.key(1), (64, 32, 128)), NamedSharding(mesh, P("data")))
    params = jlora.lora_init(jax.random.key(3), {"l": {"kernel": normal(jax.random.key(2), (128, 96))}},
                             jlora.LoraConfig(rank=4, targets=["l"], dropout=0.1))
    trainable, frozen = jlora.split(params)
    lazy = jlora.apply(lambda p, x: x @ p["l"]["kernel"])
    loss = lambda t, x: jnp.sum(lazy(jlora.combine(t, frozen), x, lora_rng=jax.random.key(7)) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(trainable, x).compile().as_text()
    random_bits = {tuple(map(int, s.split(","))) for s in re.findall(r"u32\[([\d,]+)\]", hlo)}
    assert (8, 32, 128) in random_bits  # a device's block of x: the mask is drawn
    assert not {b for b in random_bits if np.prod(b) > 8 * 32 * 128}, random_bits


def test_dropout_inside_shard_map_draws_a_mask_per_block_of_the_input():
    """Data blocks get masks of their own (not one block's mask repeated); devices that hold the
    same block (the input replicated over 'model') draw the same mask. The mask is read directly:
    w = 0, a = b = I, x = 1, so the output is keep / (1 - p)."""
    mesh = sharding.make_mesh({"data": 4, "model": 2})
    r = 8
    lw = jlora.lora_init(jax.random.key(0), {"k": jnp.zeros((r, r))}, jlora.LoraConfig(rank=r, targets=["k"], dropout=0.5))["k"]
    params, x = {"k": lw.replace(a=jnp.eye(r), b=jnp.eye(r))}, jnp.ones((32, r))
    per_device = lambda p, x: x @ p["k"]
    fn = lambda p, x: jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data", "model"))(p, x)
    keep = np.asarray(jax.jit(jlora.apply(fn))(params, x, lora_rng=jax.random.key(7))) > 0  # (32, 2 * r)
    blocks = keep.reshape(4, 8, 2, r)  # data block, its rows, model index, features
    assert all(np.array_equal(blocks[i, :, 0], blocks[i, :, 1]) for i in range(4))  # one block: one mask
    assert len({blocks[i, :, 0].tobytes() for i in range(4)}) == 4  # each data block its own
    assert 0.3 < keep.mean() < 0.7


def test_sharding_constraint_on_a_kernel_constrains_its_factors():
    mesh = sharding.make_mesh({"model": 8})
    params, x = _mlp_params(), jnp.ones((4, 16))

    def fn(p, x):
        return x @ jax.lax.with_sharding_constraint(p["l1"]["kernel"], NamedSharding(mesh, P(None, "model")))

    out = jax.jit(jlora.apply(fn))(params, x)
    np.testing.assert_allclose(out, x @ jlora.merge(params)["l1"]["kernel"], rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(jlora.apply(fn))(params, x))
    assert jaxpr.count("sharding_constraint") == 3  # on w, a (replicated) and b (split like w's columns)


def test_sharding_constraint_on_a_quantized_kernel_constrains_its_parts():
    """A lazy kind with part_specs (int8 and scales) stays lazy under a constraint, each part
    constrained to its share, so the int8 matmul runs rather than the whole float kernel's."""
    from quantized import INT8_DOTS, quantize

    mesh = sharding.make_mesh({"model": 8})
    params, x = _mlp_params(), jnp.ones((4, 16))
    params["l1"]["kernel"] = params["l1"]["kernel"].replace(w=quantize(params["l1"]["kernel"].w))

    def fn(p, x):
        return x @ jax.lax.with_sharding_constraint(p["l1"]["kernel"], NamedSharding(mesh, P(None, "model")))

    INT8_DOTS.clear()
    out = jax.jit(jlora.apply(fn))(params, x)  # a MaterializeWarning is an error here
    assert INT8_DOTS
    np.testing.assert_allclose(out, x @ jlora.merge(params)["l1"]["kernel"], rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(jlora.apply(fn))(params, x))
    assert jaxpr.count("sharding_constraint") == 4  # on q, its scales, a and b


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_a_jit_inside_the_function_keeps_its_shardings(axis_type):
    """``jax.jit(..., in_shardings=..., out_shardings=...)`` called inside: its plain inputs and
    outputs are placed as the plain function places them (on an Explicit mesh, by reshard)."""
    if axis_type == "Explicit" and jax.__version_info__ < (0, 7):
        pytest.skip("JAX 0.6 cannot multiply a single-device param into an Explicit mesh's array, plain or not")
    mesh = jax.make_mesh((8,), ("model",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    rows, cols = NamedSharding(mesh, P("model")), NamedSharding(mesh, P(None, "model"))
    params, x = _mlp_params(), jax.device_put(jnp.ones((8, 16)), rows)
    inner = jax.jit(lambda p, x: (x @ p["l1"]["kernel"], x * 2), out_shardings=(cols, rows))
    fn = lambda p, x: inner(p, x)
    want = fn(jlora.merge(params), x)
    for got in (jlora.apply(fn)(params, x), jax.jit(jlora.apply(fn))(params, x)):
        assert all(o.sharding.is_equivalent_to(s, 2) and w.sharding.is_equivalent_to(s, 2)
                   for o, w, s in zip(got, want, (cols, rows)))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    pinned = jax.jit(lambda p, x: x @ p["l1"]["kernel"], in_shardings=(None, cols))  # x moved to its columns
    jaxpr = str(jax.make_jaxpr(jlora.apply(lambda p, x: pinned(p, x)))(params, x))
    assert ("sharding_constraint" if axis_type == "Auto" else "reshard") in jaxpr


def test_device_put_of_a_kernel_puts_its_factors_and_a_device_target_falls_back():
    mesh = sharding.make_mesh({"model": 8})
    params, x = _mlp_params(), jnp.ones((4, 16))
    to_columns = lambda p, x: x @ jax.device_put(p["l1"]["kernel"], NamedSharding(mesh, P(None, "model")))
    out = jax.jit(jlora.apply(to_columns))(params, x)
    np.testing.assert_allclose(out, to_columns(jlora.merge(params), x), rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(jlora.apply(to_columns))(params, x)
    put = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "device_put"]
    assert [tuple(e.params["devices"][0].spec) for e in put] == [(None, "model"), (None, None), (None, "model")]
    to_a_device = lambda p, x: x @ jax.device_put(p["l1"]["kernel"], jax.devices()[0])
    with pytest.warns(jlora.MaterializeWarning, match="materialised at 'device_put'"):
        out = jax.jit(jlora.apply(to_a_device))(params, x)
    np.testing.assert_allclose(out, to_a_device(jlora.merge(params), x), rtol=1e-5, atol=1e-5)


# --- checkpoints and several processes --------------------------------------------------------------

def test_checkpoint_restores_onto_another_mesh(tmp_path):
    fsdp = sharding.make_mesh({"fsdp": 2, "model": 4})
    params = jlora.lora_init(jax.random.key(1), sharding.place(_base(), fsdp, RULES), CONFIG)
    params = jax.tree.map(lambda x: x + 1.0, params)
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params)
    other = sharding.make_mesh({"model": 2, "fsdp": 4})
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        sharding.place(_base(), other, RULES))
    restored, _, step = ckpt.restore(base)
    lw = restored["down"]["kernel"]
    assert lw.a.sharding.is_equivalent_to(NamedSharding(other, P("model", None)), 2)
    assert restored["stack"]["kernel"].a.sharding.is_equivalent_to(NamedSharding(other, P(None, "fsdp", None)), 3)
    for path, value in adapters(params).items():
        np.testing.assert_array_equal(adapters(restored)[path], value)
    np.testing.assert_array_equal(restored["up"]["bias"].value, params["up"]["bias"].value)


RESTORE_ON_ONE_DEVICE = """
import sys, jax, numpy as np, optax, jlora
from jlora.checkpoint import AdapterCheckpointer
base = {k: {n: np.load(sys.argv[2])[f"{k}/{n}"] for n in ("kernel", "bias") if f"{k}/{n}" in np.load(sys.argv[2])}
        for k in ("up", "down", "stack")}
ckpt = AdapterCheckpointer(sys.argv[1])
params, _, _ = ckpt.restore(base)  # numpy base: the factors on this process's device
trainable = jlora.split(params)[0]
_, state, _ = ckpt.restore(base, opt_state_like=jax.eval_shape(jlora.optimizer(optax.adam(1e-3)).init, trainable))
np.savez(sys.argv[3], **{p: np.asarray(x) for p, x in jlora.adapter.saved_arrays("test", params)[0].items()},
         **{f"state/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
"""


def test_checkpoint_of_a_sharded_run_restores_on_one_device_and_on_another_device(tmp_path, cpu_env):
    """Trained on 8 devices, evaluated on 1 (another process), from plain base arrays and an
    optimizer state from jax.eval_shape; a base on device 3 gets its adapters on device 3."""
    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    params = jax.tree.map(lambda x: x + 1.0, jlora.lora_init(jax.random.key(1), sharding.place(_base(), mesh, RULES), CONFIG))
    trainable = jlora.split(params)[0]
    tx = jlora.optimizer(optax.adam(1e-3))
    state = jax.tree.map(lambda x: x + jnp.asarray(1, x.dtype), sharding.init_state(tx, trainable, mesh, RULES))
    AdapterCheckpointer(tmp_path / "ckpt", async_save=False).save(1, params, opt_state=state)
    np.savez(tmp_path / "base.npz", **{p: np.asarray(x) for p, x in jlora.paths.leaves_with_paths(_base())})
    env = cpu_env(1)
    done = subprocess.run([sys.executable, "-c", RESTORE_ON_ONE_DEVICE, str(tmp_path / "ckpt"), str(tmp_path / "base.npz"),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for p, x in jlora.adapter.saved_arrays("test", params)[0].items():
        np.testing.assert_array_equal(got[p], x)
    for i, x in enumerate(jax.tree.leaves(state)):
        np.testing.assert_array_equal(got[f"state/{i}"], x)

    # on the mesh it was saved from, the state from jax.eval_shape (no placement, or an abstract mesh's)
    restored, back, _ = AdapterCheckpointer(tmp_path / "ckpt").restore(
        sharding.place(_base(), mesh, RULES), opt_state_like=jax.eval_shape(tx.init, trainable))
    jax.tree.map(np.testing.assert_array_equal, back, state)
    # the moments placed as their adapters are, not replicated on every device
    mu_of = lambda s: s.inner_states["adapter"].inner_state[0].mu
    for path, (got, want) in zip(["up", "down", "stack"], [(mu_of(back)[k]["kernel"], mu_of(state)[k]["kernel"])
                                                           for k in ("up", "down", "stack")]):
        for x, y in ((got.a, want.a), (got.b, want.b)):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), path
    restored_trainable = jlora.split(restored)[0]
    jax.jit(lambda t, s: tx.update(jax.tree.map(jnp.ones_like, t), s, t))(restored_trainable, back)  # one mesh

    on_3 = jax.device_put(_base(), jax.devices()[3])
    restored, _, _ = AdapterCheckpointer(tmp_path / "ckpt").restore(on_3)
    assert {d.id for lw in (restored["up"]["kernel"], restored["stack"]["kernel"]) for x in (lw.w, lw.a, lw.b)
            for d in x.devices()} == {3}
    jax.jit(jlora.apply(lambda p, x: x @ p["up"]["kernel"]))(restored, jnp.ones((2, 32)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_losses(tmp_path, cpu_env):
    script = str(ROOT / "examples" / "train_fsdp.py")
    port, ckpt_dir = _free_port(), tmp_path / "ckpt"
    env = cpu_env(4)
    procs = [subprocess.Popen(
        [sys.executable, script, "--mesh", "data=2,fsdp=4", "--steps", "3", "--lr", "1e-3", "--json", "--num-processes", "2",
         "--process-id", str(i), "--coordinator", f"localhost:{port}", "--checkpoint-dir", str(ckpt_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    losses = json.loads([l for l in outs[0].splitlines() if l.startswith("{")][-1])["losses"]

    train_fsdp = example("train_fsdp")
    single = train_fsdp.train({"data": 2, "fsdp": 4}, "fsdp", steps=3, lr=1e-3, log=False)
    np.testing.assert_allclose(losses, single["losses"], rtol=1e-5)
    # the checkpoint every process wrote restores in this one process, on another mesh
    run = train_fsdp.setup({"data": 2, "model": 4}, "tp")
    base = jax.tree.map(lambda x: x.w if isinstance(x, jlora.LoraWeight) else x, run["frozen"],
                        is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    restored, _, step = AdapterCheckpointer(ckpt_dir).restore(base)
    assert step == 3
    for path, value in adapters(single["params"]).items():
        np.testing.assert_allclose(adapters(restored)[path], value, rtol=1e-5, atol=1e-5, err_msg=path)


DISAGREEING_SAVES = r"""
import sys, jax, jax.numpy as jnp, numpy as np, jlora
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jlora.checkpoint import AdapterCheckpointer
me = jax.process_index()
cfg = jlora.LoraConfig(rank=2, targets=["k"])
params = jlora.lora_init(jax.random.key(0), {"k": np.ones((8, 8), np.float32)}, cfg)
ckpt = AdapterCheckpointer(sys.argv[3], async_save=False, lora_config=cfg, best_metric="loss")
ckpt.save(1, params, metrics={"loss": 1.0})
# one process refuses; the steps differ; each process's own loss (process 0's ranks the steps on all)
for step, loss in ((2, float("nan") if me == 1 else 0.5), (2 + me, 0.5), (4, 0.5 - 0.25 * me), (5, 0.25 + 0.5 * me)):
    try:
        ckpt.save(step, params, metrics={"loss": loss})
        print(me, "saved", step)
    except ValueError as err:
        print(me, "refused", step, str(err)[:200])
print(me, "best", ckpt.best_step())
if me == 0:
    print(me, "config", ckpt.saved_config() == cfg, ckpt.all_steps())  # on one process alone: no collective
jax.distributed.shutdown()
"""


def test_a_save_that_one_process_refuses_is_refused_by_all_of_them(tmp_path, cpu_env):
    """orbax's save is collective: a process going ahead alone would wait for the others forever."""
    port = _free_port()
    env = cpu_env(1)
    procs = [subprocess.Popen([sys.executable, "-c", DISAGREEING_SAVES, f"localhost:{port}", str(i), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()  # a hang (a process waiting in the collective save) ends with the test
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    said = [[line for line in out.splitlines() if line[:2] in ("0 ", "1 ")] for out in outs]
    assert said[1][0].startswith("1 refused 2 AdapterCheckpointer.save: step 2 not written: metrics['loss'] is nan")
    assert said[0][0].startswith("0 refused 2 AdapterCheckpointer.save: step 2 not written: process 1 refused it "
                                 "(ValueError: AdapterCheckpointer.save: step 2 not written: metrics['loss'] is nan")
    for me in (0, 1):
        assert said[me][1].startswith(f"{me} refused {2 + me} AdapterCheckpointer.save: step {2 + me} not written: "
                                      "process 1 differs from process 0 in the step")
        assert said[me][2:5] == [f"{me} saved 4", f"{me} saved 5", f"{me} best 5"]  # process 0's losses: 5 is best
    assert said[0][5] == "0 config True [1, 4, 5]"


def test_a_quantized_base_shards_by_its_kinds_part_specs_and_trains_as_on_one_device():
    """QLoRA under FSDP and TP: a lazy kernel (int8 and scales) is placed by its kind's part_specs;
    the factors get the kernel's derived shardings; a sharded gradient equals the one-device one."""
    from quantized import Int8Weight, quantize

    mesh = sharding.make_mesh({"fsdp": 2, "model": 4})
    quantized = {name: {**leaves, "kernel": quantize(leaves["kernel"])} for name, leaves in _base().items()}
    placed = sharding.place(quantized, mesh, RULES)
    assert placed["up"]["kernel"].q.sharding.spec == P(None, "model")
    assert placed["up"]["kernel"].column_scale.sharding.spec == P("model")
    assert placed["stack"]["kernel"].q.sharding.spec == P(None, "fsdp", "model")
    params = jlora.lora_init(jax.random.key(1), placed, CONFIG)
    assert params["up"]["kernel"].b.sharding.spec == P(None, "model")
    assert params["stack"]["kernel"].a.sharding.spec == P(None, "fsdp", None)
    for path, value in adapters(jlora.lora_init(jax.random.key(1), quantized, CONFIG)).items():
        np.testing.assert_array_equal(adapters(params)[path], value)

    fn = jlora.apply(lambda p, x: jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"]) @ p["down"]["kernel"])
    loss = lambda t, f, x: (fn(jlora.combine(t, f), x) ** 2).mean()
    x = normal(jax.random.key(2), (8, 32))
    trainable, frozen = jlora.split(params)
    in_shardings = (sharding.shardings(trainable, mesh, RULES), sharding.shardings(frozen, mesh, RULES), None)
    got = jax.jit(jax.grad(loss), in_shardings=in_shardings)(trainable, frozen, x)
    want = jax.grad(loss)(*jlora.split(jlora.lora_init(jax.random.key(1), quantized, CONFIG)), x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)

    @jax.tree_util.register_pytree_node_class
    class NoPartSpecs(Int8Weight):
        part_specs = None

    @jax.tree_util.register_pytree_node_class
    class NoSharding(Int8Weight):
        sharding = None

    unsaid_kernel = NoSharding(*jax.tree.leaves(quantized["up"]["kernel"]))
    unsaid = sharding.place({**quantized, "up": {**quantized["up"], "kernel": unsaid_kernel}}, mesh, RULES)
    with pytest.warns(UserWarning, match=r"lora_init: 'up/kernel' is a lazy NoSharding whose arrays are split over 8 devices, "
                                         r"but NoSharding has no sharding property .* made on one device"):
        jlora.lora_init(jax.random.key(1), unsaid, CONFIG)

    unknown = {**quantized, "up": {**quantized["up"], "kernel": NoPartSpecs(*jax.tree.leaves(quantized["up"]["kernel"]))}}
    with pytest.raises(ValueError, match="'up/kernel' is a lazy NoPartSpecs, and the rules shard the array it stands "
                                         r"for as \(None, 'model'\): give NoPartSpecs a method part_specs"):
        sharding.place(unknown, mesh, RULES)
    assert sharding.place(unknown, mesh, [])["up"]["kernel"].q.sharding.spec == P()  # replicated: nothing to say


def test_a_lazy_kinds_part_specs_are_checked_against_its_parts():
    """A kind's parts may have other shapes than the array it stands for (int4 packed two to a
    byte): a spec that divides the array but not a part is refused naming the param, as is a
    part_specs of another pytree, where JAX failed later naming neither."""
    from quantized import Int8Weight

    @jax.tree_util.register_pytree_node_class
    class Packed(Int8Weight):  # two int4 values a byte along the first axis
        shape = property(lambda self: (2 * self.q.shape[0], *self.q.shape[1:]))

        def materialize(self):
            return jnp.repeat(self.q, 2, axis=0).astype(self.column_scale.dtype) * self.column_scale

    mesh, fsdp = sharding.make_mesh({"fsdp": 8}), [sharding.fsdp("fsdp", min_size=16)]
    base = {"mlp": {"kernel": Packed(jnp.zeros((36, 40), jnp.int8), jnp.ones(40))}}
    divides_array_not_part = (r"'mlp/kernel': axis 0 of shape \(36, 40\) has size 36, which does not divide over mesh "
                              r"axes \('fsdp',\) of size 8 .*: array 0 of the lazy Packed there, sharded as its part_specs"
                              r"\(P(artitionSpec)?\('fsdp', None\)\) says; the rule saw the array it stands for, of shape \(72, 40\)")
    with pytest.raises(ValueError, match=divides_array_not_part):
        sharding.place(base, mesh, fsdp)
    with pytest.raises(ValueError, match=divides_array_not_part):  # under its adapter
        sharding.shardings(jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["mlp"])), mesh, fsdp)
    assert sharding.place(base, mesh, [("mlp", P(None, "fsdp"))])["mlp"]["kernel"].q.sharding.spec == P(None, "fsdp")
    # constrained inside the function as the array it stands for: its parts cannot be, so it is materialised
    fn = lambda p, x: x @ jax.lax.with_sharding_constraint(p["mlp"]["kernel"], NamedSharding(mesh, P("fsdp", None)))
    with pytest.warns(jlora.MaterializeWarning, match="Packed .* materialised at 'sharding_constraint'"):
        out = jax.jit(jlora.apply(fn))(base, jnp.ones((2, 72)))
    np.testing.assert_allclose(out, jnp.ones((2, 72)) @ base["mlp"]["kernel"].materialize())

    @jax.tree_util.register_pytree_node_class
    class ParentsSpecs(Int8Weight):
        def part_specs(self, spec):  # an Int8Weight, not this kind
            return Int8Weight(*jax.tree.leaves(super().part_specs(spec), is_leaf=lambda s: isinstance(s, P)))

    other = {"mlp": {"kernel": ParentsSpecs(jnp.zeros((16, 40), jnp.int8), jnp.ones(40))}}
    with pytest.raises(ValueError, match=r"'mlp/kernel' is a lazy ParentsSpecs, whose part_specs\(P(artitionSpec)?\(None, "
                                         r"'fsdp'\)\) gave a Int8Weight: it returns the pytree of a ParentsSpecs \(the "
                                         r"same structure\) with a PartitionSpec \(or None\) for each of its 2 parts"):
        sharding.shardings(other, mesh, [("mlp", P(None, "fsdp"))])

    @jax.tree_util.register_pytree_node_class
    class OneSpec(Int8Weight):
        def part_specs(self, spec):  # one for both parts: a prefix, as shard_map's in_specs take
            return P(None, spec[1]) if len(spec) > 1 else P()

    prefix = sharding.place({"mlp": {"kernel": OneSpec(jnp.zeros((16, 40), jnp.int8), jnp.ones((1, 40)))}}, mesh,
                            [("mlp", P(None, "fsdp"))])["mlp"]["kernel"]
    assert prefix.q.sharding.spec == prefix.column_scale.sharding.spec == P(None, "fsdp")


def test_an_adapter_stacked_on_an_adapter_shards_both_pairs_of_factors():
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    inner = jlora.LoraWeight(jnp.ones((8, 16)), jnp.ones((8, 2)), jnp.ones((2, 16)), scale=0.5, path="w")
    outer = {"w": jlora.LoraWeight(inner, jnp.ones((8, 1)), jnp.ones((1, 16)), scale=1.0, path="w")}
    specs = sharding.partition_specs(outer, mesh, [("w", P(None, "model"))])
    assert specs["w"].w.w == P(None, "model") and specs["w"].w.b == P(None, "model") and specs["w"].b == P(None, "model")
    placed = sharding.place(outer, mesh, [("w", P(None, "model"))])
    fn = jax.jit(jlora.apply(lambda p, x: x @ p["w"]))
    np.testing.assert_allclose(fn(placed, jnp.ones((2, 8))), jnp.ones((2, 8)) @ jlora.merge(outer)["w"], rtol=1e-6)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the note: Python 3.11+")
def test_params_on_different_devices_are_named_by_path():
    """JAX's error names the arguments of jlora's compiled evaluation (values[k]); a note names the params."""
    d = jax.devices()
    base = {"dense": {"kernel": jax.device_put(jnp.ones((8, 4)), d[1]), "bias": jax.device_put(jnp.zeros(4), d[2])}}
    p = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["dense"]))
    with pytest.raises(ValueError, match="incompatible devices") as err:
        jlora.apply(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"])(p, jnp.ones((2, 8)))
    assert "jlora.apply: values[0] is argument 0 at 'dense/bias'; values[1] is argument 0 at 'dense/kernel'" in \
        err.value.__notes__
