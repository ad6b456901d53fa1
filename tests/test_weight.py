import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from oracle import oracle_merge, random_lora


def test_array_like_and_repr_shows_shapes_not_values():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    assert (lw.shape, lw.dtype, lw.ndim, lw.size, lw.rank) == ((4, 6), jnp.float32, 2, 24, 2)
    assert repr(lw) == "LoraWeight(w=float32[4,6], a=float32[4,2], b=float32[2,6], scale=0.7, layout='io', path='w')"
    # a tree mapped to other values shows them (inspecting a tree: jax.tree.map(jnp.shape, p))
    assert repr(jax.tree.map(jnp.shape, lw)) == "LoraWeight(w=(4, 6), a=(4, 2), b=(2, 6), scale=0.7, layout='io', path='w')"
    assert "w=<class" in repr(jax.tree.map(type, lw)) and "Trainable(dtype('float32'))" == repr(
        jax.tree.map(lambda x: x.dtype, jlora.Trainable(jnp.ones(2))))
    # a quantized base and a subclass say their kinds
    from quantized import quantize

    on_int8 = lw.replace(w=quantize(lw.w))
    assert repr(on_int8).startswith("LoraWeight(w=Int8Weight(float32[4,6]), a=float32[4,2]")

    @jax.tree_util.register_pytree_with_keys_class
    class DoraLike(jlora.LoraWeight):
        pass

    assert repr(DoraLike(lw.w, lw.a, lw.b, scale=0.7)).startswith("DoraLike(w=float32[4,6]")
    # a layer sliced from a stack, and an ensemble, show the layout their arrays have
    stack = random_lora(jax.random.key(0), (3, 4, 6), "bio", 2)
    assert repr(jax.tree.map(lambda x: x[0], stack)).endswith("scale=0.7, layout='io', path='w')")
    assert "layout='bio'" in repr(jax.tree.map(lambda x: jnp.stack([x] * 3), lw))  # as jax.vmap(lora_init) makes


@pytest.mark.parametrize("shape, layout", [((4, 6), "io"), ((6, 4), "oi"), ((3, 4, 5), "bio"), ((2, 3, 5), "iio"),
                                           ((5, 2, 3), "ioo"), ((3, 3, 2, 4), "iiio")])
def test_materialize_matches_the_einsum_oracle(shape, layout):
    lw = random_lora(jax.random.key(1), shape, layout, 2)
    np.testing.assert_allclose(lw.materialize(), oracle_merge({"w": lw})["w"], rtol=1e-6, atol=1e-6)


def test_materialize_keeps_w_dtype():
    lw = random_lora(jax.random.key(1), (4, 6), "io", 2)
    lw = lw.replace(w=lw.w.astype(jnp.bfloat16))
    assert lw.materialize().dtype == jnp.bfloat16


def test_a_node_is_not_changed_in_place_and_copies_whole():
    """lw.b = ... went through unchecked, and an eager jlora.apply, which reuses what it made of a
    node, kept computing with the old b: a node is changed by making a new one (replace)."""
    import copy
    import pickle

    lw = random_lora(jax.random.key(1), (4, 6), "io", 2).replace(path="m/kernel", dropout=0.1)
    for name in ("b", "scale", "layout"):
        with pytest.raises(AttributeError, match=rf"'m/kernel': a node is not changed in place .* lw.replace\({name}="):
            setattr(lw, name, None)
    with pytest.raises(AttributeError, match=r"make a new one: jlora.Trainable\(new_value\)"):
        jlora.Trainable(jnp.ones(2)).value = jnp.zeros(2)

    class Tagged(jlora.LoraWeight):  # a subclass's own attributes stay its own
        pass

    tagged = Tagged(lw.w, lw.a, lw.b, scale=0.7, path="t")
    tagged.note = "mine"
    for clone in (copy.copy, copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
        back = clone(lw)
        assert (back.path, back.dropout, back.scale, str(back.layout)) == ("m/kernel", 0.1, lw.scale, "io")
        np.testing.assert_array_equal(back.b, lw.b)
        np.testing.assert_array_equal(clone(jlora.Trainable(lw.a)).value, lw.a)
    assert copy.copy(tagged).note == copy.deepcopy(tagged).note == "mine"


def test_pytree_round_trip_and_key_paths():
    lw = random_lora(jax.random.key(1), (4, 6), "io", 2).replace(path="m/kernel", dropout=0.1)
    leaves, treedef = jax.tree_util.tree_flatten(lw)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert len(leaves) == 3 and all(x is y for x, y in zip((back.w, back.a, back.b), leaves))
    assert back.metadata() == lw.metadata() == {"scale": lw.scale, "layout": lw.layout, "path": "m/kernel", "dropout": 0.1}
    with_paths, keyed_treedef = jax.tree_util.tree_flatten_with_path(lw)
    assert [jax.tree_util.keystr(p) for p, _ in with_paths] == [".w", ".a", ".b"]
    assert keyed_treedef == treedef and [x for _, x in with_paths] == leaves  # the fast and the key-aware flatten agree
    value = jnp.zeros(3)
    leaves, treedef = jax.tree_util.tree_flatten(jlora.Trainable(value))
    assert jax.tree_util.tree_unflatten(treedef, leaves).value is value
    assert jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(jlora.Trainable(value))[0][0][0]) == ".value"


def test_kernel_shape_of_a_trainable_half_counts_an_ensembles_leading_axes():
    lw = random_lora(jax.random.key(0), (8, 4), "io", 2)
    ensemble = jax.vmap(lambda _: lw)(jnp.arange(3))  # layout 'io' over (3, 8, 4) arrays
    assert jlora.split({"k": ensemble})[0]["k"].kernel_shape == ensemble.kernel_shape == (3, 8, 4)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"a must be \(4, 2\) and b \(2, 6\)"):
        jlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((6, 2)), jnp.ones((2, 6)), scale=1.0, path="x")
    with pytest.raises(ValueError, match=r"got a \(2, 6\), b \(4, 2\) \(lorax's orientation, .*LoraWeight\(w, a=lx.b, "
                                         r"b=lx.a, scale=lx.alpha / r\)\)"):  # lorax's a (r, out), b (in, r)
        jlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((2, 6)), jnp.zeros((4, 2)), scale=1.0, path="x")
    with pytest.raises(ValueError, match=r"a must be \(4, 2\) and b \(2, 6\); got a \(4, 2\), b \(\)$"):
        jlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((4, 2)), jnp.float32(0), scale=1.0, path="x")  # a 0-d b
    with pytest.raises(ValueError, match=r"LoraWeight 'x': w must be a float array, got int32\[4,6\]"):
        jlora.LoraWeight(jnp.ones((4, 6), jnp.int32), jnp.ones((4, 2)), jnp.ones((2, 6)), scale=1.0, path="x")
    # merged into a real w, a complex product loses its imaginary part: apply and merge would differ
    with pytest.raises(ValueError, match=r"LoraWeight 'x': a is complex but w is float32\[4,6\]: a real weight"):
        jlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((4, 2), jnp.complex64), jnp.ones((2, 6), jnp.complex64), scale=1.0,
                         path="x")
    jlora.LoraWeight(jnp.ones((4, 6), jnp.complex64), jnp.ones((4, 2)), jnp.ones((2, 6)), scale=1.0)  # the other way: fine


def test_bad_scale_or_dropout_is_refused_naming_the_param():
    w, a, b = jnp.ones((4, 6)), jnp.ones((4, 2)), jnp.ones((2, 6))
    for dropout in (1.0, 2.0, -0.1, float("nan")):  # 1 or more would drop the adapter's every input
        with pytest.raises(ValueError, match=r"LoraWeight 'x': dropout must be"):
            jlora.LoraWeight(w, a, b, scale=1.0, dropout=dropout, path="x")
    for scale in (None, "2", float("inf")):
        with pytest.raises(ValueError, match=f"LoraWeight 'x': scale must be a finite number, got {scale!r}"):
            jlora.LoraWeight(w, a, b, scale=scale, path="x")
    # replace checks them as the constructor does (a bad scale broke repr, merge and apply later)
    lw = jlora.LoraWeight(w, a, b, scale=1.0, path="x")
    with pytest.raises(ValueError, match=r"LoraWeight 'x': scale must be a finite number, got '2'"):
        lw.replace(scale="2")
    with pytest.raises(ValueError, match=r"LoraWeight 'x': dropout must be in \[0, 1\), got 1.5"):
        lw.replace(dropout=1.5)
    for field in ("w", "a", "b"):  # a list or a string would fail later, deep in JAX
        with pytest.raises(ValueError, match=f"LoraWeight 'x': {field} must be an array .*, got list"):
            jlora.LoraWeight(**{"w": w, "a": a, "b": b, field: [[1.0]]}, scale=1.0, path="x")


def test_a_lazy_value_cannot_be_trained_in_full():
    from quantized import quantize

    with pytest.raises(ValueError, match="Trainable: a lazy Int8Weight .* cannot be trained in full"):
        jlora.Trainable(quantize(jnp.ones((4, 4))))


def test_replace_refuses_unknown_fields():
    lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0)
    with pytest.raises(ValueError, match=r"LoraWeight.replace: unknown field\(s\) \['rank'\]; fields are w, a, b, scale"):
        lw.replace(rank=3)


def test_a_lora_weight_used_as_an_array_outside_apply_says_so():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    uses = [lambda: jnp.ones((1, 4)) @ lw, lambda: lw @ jnp.ones((6,)), lambda: lw[0], lambda: jnp.asarray(lw),
            lambda: np.asarray(lw), lambda: 2 * lw, lambda: lw + 1, lambda: jax.jit(lambda w: w @ jnp.ones(6))(lw),
            lambda: lw < 0, lambda: abs(lw), lambda: float(lw), lambda: lw.sum(), lambda: jnp.sum(lw),
            lambda: lw.transpose(), lambda: lw.squeeze(), lambda: lw.max(),  # HF's Conv1D: kernel.transpose()
            lambda: lw == 0, lambda: lw != 0, lambda: 0 == lw, lambda: jnp.sum(lw != 0)]  # not a silent False
    for use in uses:  # a model called on the LoRA tree without jlora.apply
        with pytest.raises(TypeError, match="LoraWeight at 'w' was used as an array outside jlora.apply: .*jlora.merge"):
            use()
    for use in (lambda: jnp.ones((1, 6)) @ lw.T, lambda: lw.mT):  # a tied head's x @ w.T
        with pytest.raises(AttributeError, match="LoraWeight at 'w' was used as an array outside jlora.apply"):
            use()
    assert not hasattr(lw, "T")
    assert lw == lw and lw != random_lora(jax.random.key(0), (4, 6), "io", 2) and lw in [lw] and {lw: 1}[lw] == 1
    trainable, frozen = jlora.split({"w": lw})
    for half, which, lacks in ((trainable, "trainable", "base weight"), (frozen, "frozen", "adapter")):
        with pytest.raises(ValueError, match=f"'w' comes from the {which} half of jlora.split, which holds no {lacks}"):
            half["w"].materialize()
    from flax import nnx
    layer = jlora.lora_init(jax.random.key(0), nnx.Linear(4, 6, rngs=nnx.Rngs(0)), jlora.LoraConfig(rank=2))
    # an optimizer given the LoRA tree as it is (Flax 0.11's nnx.Optimizer reads each leaf so); how
    # this Flax reads a variable's value
    read = "variable.get_value()" if hasattr(nnx.Variable, "get_value") else "variable.value"
    with pytest.raises(TypeError, match=rf"jlora.optimizer\(tx, params\). To look at it, .*{re.escape(read)}, not "
                                        r"variable\[...\]"):
        layer.kernel[...]  # Flax 0.12's accessor of a variable's array
    assert isinstance(layer.kernel.get_value() if hasattr(layer.kernel, "get_value") else layer.kernel.value,
                      jlora.LoraWeight)


def test_a_lora_weight_closed_over_inside_apply_says_to_pass_it():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    with pytest.raises(TypeError, match="used as an array inside jlora.apply, but it is not in the wrapped function's "
                                        "arguments"):
        jlora.apply(lambda x: x @ lw)(jnp.ones((1, 4)))
    with pytest.raises(TypeError, match="used as an array outside jlora.apply"):  # the trace is over
        jnp.ones((1, 4)) @ lw


def test_a_model_called_on_the_lora_tree_without_apply_says_so():
    import flax.linen as nn

    class PreNorm(nn.Module):  # the trainable norm is met first
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.LayerNorm()(x))

    model, x = PreNorm(), jnp.ones((2, 4))
    base = model.init(jax.random.key(0), x)["params"]
    lora = jlora.lora_init(jax.random.key(1), base, jlora.LoraConfig(rank=2, targets=["Dense_0"], trainable=["LayerNorm_0"]))
    with pytest.raises(TypeError, match=r"Trainable\(float32\[4\]\) was used as an array outside jlora.apply: .* To "
                                        r"look at it, print it or read its array, .value \(an NNX variable"):
        model.apply({"params": lora}, x)
    with pytest.raises(TypeError, match="LoraWeight at 'Dense_0/kernel' was used as an array outside jlora.apply: .* To "
                                        "look at it, print it or read its fields"):
        model.apply({"params": jlora.merge(lora) | {"Dense_0": lora["Dense_0"]}}, x)
    np.testing.assert_allclose(jlora.apply(model.apply)({"params": lora}, x), model.apply({"params": jlora.merge(lora)}, x),
                               rtol=1e-6, atol=1e-6)
    from flax import nnx

    class NnxPreNorm(nnx.Module):
        def __init__(self, rngs):
            self.norm, self.dense = nnx.LayerNorm(4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.norm(x))

    module = jlora.lora_init(jax.random.key(1), NnxPreNorm(nnx.Rngs(0)),
                             jlora.LoraConfig(rank=2, targets=["dense"], trainable=["norm"]))
    with pytest.raises(TypeError, match="was used as an array outside jlora.apply"):
        module(x)
    assert bool(lora["Dense_0"]["kernel"]) and bool(lora["LayerNorm_0"]["scale"])  # truthy as objects, not by len


def test_a_trainable_half_node_has_no_shape_and_says_why():
    """``hasattr(x, "shape")`` answers (generic tree tools ask it); reading it says why there is none."""
    trainable = jlora.split(jlora.lora_init(jax.random.key(0), {"d": jnp.ones((8, 8))},
                                            jlora.LoraConfig(rank=2, targets=["d"])))[0]["d"]
    assert not hasattr(trainable, "shape") and getattr(trainable, "dtype", None) is None
    with pytest.raises(ValueError, match=r"LoraWeight 'd' has no base weight \(the trainable half of jlora.split\)"):
        trainable.shape


class _HalfOf(jlora.Lazy):
    """Stands for 0.5 * x, but says neither its shape nor its dtype."""

    def __init__(self, x):
        self.x = x

    def materialize(self):
        return 0.5 * self.x

    def tree_flatten(self):
        return (self.x,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


class _Unregistered(_HalfOf):
    shape = property(lambda self: self.x.shape)
    dtype = property(lambda self: self.x.dtype)


_NoShape = jax.tree_util.register_pytree_node_class(type("_NoShape", (_HalfOf,), {}))
_NoMaterialize = jax.tree_util.register_pytree_node_class(
    type("_NoMaterialize", (_Unregistered,), {"materialize": jlora.Lazy.materialize}))


def _uses():
    sin = lambda p, x: jnp.sin(p["k"]) + x  # no rule for sin: the kind is materialised
    return {"apply under jit": lambda p: jax.jit(jlora.apply(sin))(p, 1.0), "apply": lambda p: jlora.apply(sin)(p, 1.0),
            "merge": jlora.merge,
            "lora_init": lambda p: jlora.lora_init(jax.random.key(0), p, jlora.LoraConfig(rank=1, targets=["k"]))}


@pytest.mark.parametrize("use", ["apply", "merge", "lora_init"])
def test_a_kind_not_registered_as_a_pytree_node_is_named(use):
    with pytest.raises(TypeError, match=r"'k': _Unregistered, a jlora.Lazy kind, is not a pytree node: register it"):
        _uses()[use]({"k": _Unregistered(jnp.ones((2, 2)))})


def test_a_kind_not_registered_as_a_pytree_node_is_named_under_jit():
    # jax.jit takes the value for an array before jlora sees it; JAX's error comes from jlora's
    with pytest.raises(TypeError) as caught:
        _uses()["apply under jit"]({"k": _Unregistered(jnp.ones((2, 2)))})
    assert "_Unregistered, a jlora.Lazy kind, is not a pytree node" in str(caught.value.__context__)


@pytest.mark.filterwarnings("ignore::jlora.MaterializeWarning")  # sin has no rule: the kind is materialised
@pytest.mark.parametrize("use", ["apply under jit", "apply", "merge"])
def test_a_kind_without_shape_or_materialize_is_named(use):
    with pytest.raises(AttributeError, match=r"_NoShape, a jlora.Lazy kind, defines no shape: a kind says the shape"):
        _uses()[use]({"k": _NoShape(jnp.ones((2, 2)))})
    with pytest.raises(NotImplementedError, match=r"_NoMaterialize, a jlora.Lazy kind, defines no materialize\(\)"):
        _uses()[use]({"k": _NoMaterialize(jnp.ones((2, 2)))})
    assert not hasattr(_NoShape(jnp.ones(2)), "dtype")  # an AttributeError: hasattr answers


@pytest.mark.skipif(not hasattr(jax, "set_mesh"), reason="jax.set_mesh: JAX 0.7+")
def test_nnx_eval_shape_under_a_mesh_keeps_the_adapters():
    """Flax's abstract model for a sharded restore: it gives a variable's value without a
    ``sharding`` an array's place, which dropped every adapter."""
    from flax import nnx
    create = lambda: jlora.lora_init(jax.random.key(1), nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
                                     jlora.LoraConfig(rank=2, trainable=["bias"]))
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):  # jlora.sharding.make_mesh's Auto
        with jax.set_mesh(jax.make_mesh((1,), ("data",), axis_types=(axis_type,))):
            abstract = nnx.eval_shape(create)
        lw = abstract.kernel.get_value()
        assert isinstance(lw, jlora.LoraWeight) and lw.a.shape == (8, 2) and lw.b.shape == (2, 4), axis_type
        assert isinstance(abstract.bias.get_value(), jlora.Trainable), axis_type
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    assert lw.sharding == lw.w.sharding and jlora.split({"w": lw})[0]["w"].sharding is None
    with jax.set_mesh(jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        seen = []  # a tracer's type has its sharding: nothing made up for it
        jax.jit(lambda lw: seen.append(lw.sharding) or lw.w)(lw)
    assert seen == [None]


@jax.tree_util.register_pytree_with_keys_class
class Magnitude(jlora.LoraWeight):
    """A DoRA-like kind: a LoraWeight holding one more array, ``m``, scaling each output column."""

    def __init__(self, w, a, b, m, **kw):
        super().__init__(w, a, b, **kw)
        object.__setattr__(self, "m", m)

    def tree_flatten_with_keys(self):
        children, aux = super().tree_flatten_with_keys()
        return (*children, (jax.tree_util.GetAttrKey("m"), self.m)), aux

    def tree_flatten(self):
        children, aux = super().tree_flatten()
        return (*children, self.m), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = super().tree_unflatten(aux, children[:3])
        object.__setattr__(obj, "m", children[3])
        return obj

    def replace(self, **changes):
        m = changes.pop("m", self.m)
        obj = super().replace(**changes)
        object.__setattr__(obj, "m", m)
        return obj

    def materialize(self):
        return (self.w + self.delta(self.w.dtype)) * self.m


def test_a_subclass_holding_its_own_array_is_used_eagerly_and_sliced_by_scan_exactly():
    """Eagerly, its node was rebuilt from w, a and b alone (IndexError); under lax.scan each layer
    kept the whole stack of m (wrong numbers where the batch matched the layer count)."""
    key = jax.random.split(jax.random.key(3), 4)
    stack = Magnitude(jax.random.normal(key[0], (3, 4, 4)), jax.random.normal(key[1], (3, 4, 2)),
                      jax.random.normal(key[2], (3, 2, 4)), jax.random.uniform(key[3], (3, 1, 4)) + 0.5,
                      scale=0.5, layout="bio", path="layers")
    x = jnp.ones((3, 4))  # a batch as long as the stack: m's (3, 1, 4) broadcast without an error

    def layers(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]

    want = layers({"layers": stack.materialize()}, x)
    with pytest.warns(jlora.MaterializeWarning, match="Magnitude at 'layers' materialised"):  # its own kind named
        np.testing.assert_allclose(jax.jit(jlora.apply(layers))({"layers": stack}, x), want, rtol=1e-5, atol=1e-6)
    layer = jax.tree.map(lambda z: z[0], stack).replace(layout="io", path="layer")
    with pytest.warns(jlora.MaterializeWarning):  # its own materialize: no rule of LoraWeight's applies
        got = jlora.apply(lambda p, x: x @ p["k"])({"k": layer}, x)
    np.testing.assert_allclose(got, x @ layer.materialize(), rtol=1e-5, atol=1e-6)


@jax.tree_util.register_pytree_with_keys_class
class SlicedMagnitude(Magnitude):
    """One that says how its magnitude slices: the scan keeps w, a and b factored per layer."""

    def unstack(self):
        children, rebuild = super().unstack()
        return (*children, self.m), lambda ch: rebuild(ch[:-1]).replace(m=ch[-1])


def test_a_subclass_keeps_its_own_array_under_jit_and_slices_it_by_its_own_unstack():
    key = jax.random.split(jax.random.key(4), 4)
    stack = SlicedMagnitude(jax.random.normal(key[0], (3, 4, 4)), jax.random.normal(key[1], (3, 4, 2)),
                            jax.random.normal(key[2], (3, 2, 4)), jax.random.uniform(key[3], (3, 1, 4)) + 0.5,
                            scale=0.5, layout="bio", path="layers")
    x = jnp.ones((3, 4))

    def layers(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]

    with pytest.warns(jlora.MaterializeWarning) as warned:  # a layer: its own materialize, the stack sliced
        got = jax.jit(jlora.apply(layers))({"layers": stack}, x)
    assert {"dot_general"} == {re.search(r"materialised at '(\w+)'", str(w.message)).group(1) for w in warned}
    np.testing.assert_allclose(got, layers({"layers": stack.materialize()}, x), rtol=1e-5, atol=1e-6)

    @jax.tree_util.register_pytree_with_keys_class
    class Unreplaced(Magnitude):  # LoraWeight's replace, which knows nothing of m: jit's rebuild kept it anyway
        replace = jlora.LoraWeight.replace

    layer = Unreplaced(stack.w[0], stack.a[0], stack.b[0], stack.m[0], scale=0.5, path="layer")
    with pytest.warns(jlora.MaterializeWarning):
        got = jax.jit(jlora.apply(lambda p, x: x @ p["k"]))({"k": layer}, x)
    np.testing.assert_allclose(got, x @ layer.materialize(), rtol=1e-5, atol=1e-6)
