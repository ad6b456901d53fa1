import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax import export

import jlora
from oracle import perturb

KEY = jax.random.key(0)


def params_of(rank: int = 2, key: jax.Array = KEY):
    base = {"dense": {"kernel": jnp.arange(48.0).reshape(6, 8) / 48, "bias": jnp.zeros(8)},
            "out": {"kernel": jnp.ones((8, 4), jnp.bfloat16)}}
    cfg = jlora.LoraConfig(rank=rank, targets=["dense", "out"], trainable=["dense/bias"])
    params = jlora.lora_init(key, base, cfg)
    # b starts at zero: give it values, so that a restore that drops it cannot pass
    return jax.tree.map(lambda x: x + 0.25, params, is_leaf=lambda x: isinstance(x, jax.Array))


def loss(params, x):
    return jnp.sum(jlora.apply(lambda p, x: (x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"])(params, x) ** 2)


def assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_train_state_of_adapters_round_trips_through_bytes_and_trains_on_alike():
    trainable, frozen = jlora.split(params_of())
    tx = jlora.optimizer(optax.adamw(1e-2), trainable, b_lr_ratio=4.0)
    x = jnp.ones((5, 6))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda t: loss(jlora.combine(t, frozen), x))(state.params)
        return state.apply_gradients(grads=grads)

    state = step(step(train_state.TrainState.create(apply_fn=None, params=trainable, tx=tx)))
    data = flax.serialization.to_bytes(state)
    fresh = train_state.TrainState.create(apply_fn=None, params=jlora.split(params_of(key=jax.random.key(1)))[0], tx=tx)
    restored = flax.serialization.from_bytes(fresh, data)
    assert_same(restored.params, state.params)
    assert_same(restored.opt_state, state.opt_state)
    assert restored.params["dense"]["kernel"].scale == state.params["dense"]["kernel"].scale
    assert_same(step(restored).params, step(state).params)  # the restored state trains on exactly alike


def test_the_full_tree_round_trips_and_the_state_dict_names_the_factors():
    params = params_of()
    state = flax.serialization.to_state_dict(params)
    assert set(state["dense"]["kernel"]) == {"w", "a", "b"}
    assert isinstance(state["dense"]["bias"], jax.Array)  # a Trainable is stored as its array
    restored = flax.serialization.from_bytes(params_of(key=jax.random.key(1)), flax.serialization.to_bytes(params))
    assert_same(restored, params)
    assert isinstance(restored["dense"]["bias"], jlora.Trainable)
    np.testing.assert_array_equal(jlora.merge(restored)["out"]["kernel"], jlora.merge(params)["out"]["kernel"])


def test_a_state_of_another_rank_is_refused_naming_the_path_and_shapes():
    data = flax.serialization.to_bytes(params_of(rank=4))
    with pytest.raises(ValueError, match=re.escape("LoraWeight 'dense/kernel'") + r".*a has shape \(6, 4\) in the state "
                       r"but \(6, 2\) in the target"):
        flax.serialization.from_bytes(params_of(rank=2), data)


def test_a_trained_leaf_of_another_shape_is_refused_naming_the_path():
    params = params_of()
    state = flax.serialization.to_state_dict(params)
    state["dense"]["bias"] = np.ones(1, np.float32)  # another model's: it would broadcast in the forward
    with pytest.raises(ValueError, match=r"Trainable '\./dense/bias' has shape \(1,\) in the state but \(8,\)"):
        flax.serialization.from_state_dict(params, state)


def test_a_state_of_the_other_half_is_refused():
    params = params_of()
    trainable, _ = jlora.split(params)
    with pytest.raises(ValueError, match="the target has w and the state has none"):
        flax.serialization.from_bytes(params, flax.serialization.to_bytes(trainable))
    with pytest.raises(ValueError, match="the state has w and the target has none"):
        flax.serialization.from_bytes(trainable, flax.serialization.to_bytes(params))


def test_a_state_that_is_not_a_lora_weight_is_refused():
    params = params_of()
    state = flax.serialization.to_state_dict(params)
    state["dense"]["kernel"] = {"w": state["dense"]["kernel"]["w"]}
    with pytest.raises(ValueError, match=re.escape("keys ['w', 'a', 'b'], got ['w']")):
        flax.serialization.from_state_dict(params, state)


def test_an_exported_function_of_a_lora_tree_serializes_and_runs_as_saved():
    base = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (6, 5)), "bias": jnp.zeros(5)}}
    config = jlora.LoraConfig(rank=2, targets=["dense"], trainable=["bias"], dropout=0.1)
    params = perturb(jlora.lora_init(jax.random.key(0), base, config), jax.random.key(2))
    fn = lambda p, x: jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    x = jnp.ones((3, 6))
    exported = export.export(jax.jit(jlora.apply(fn)))(params, x)
    restored = export.deserialize(exported.serialize())
    assert restored.in_tree == exported.in_tree  # scale, layout, path and dropout rate kept
    np.testing.assert_allclose(restored.call(params, x), fn(jlora.merge(params), x), rtol=1e-6)
    # a layout whose input axes go into a in another order than w's (its string does not say so)
    layout = jlora.Layout((("o", 0), ("i", 1), ("i", 0)))
    lw = jlora.LoraWeight(jnp.ones((5, 3, 4)), jnp.ones((4, 3, 2)), jnp.ones((2, 5)), scale=0.5, layout=layout, path="k")
    fn = lambda w, x: jnp.einsum("jk,ojk->o", x, w)
    exported = export.deserialize(export.export(jax.jit(jlora.apply(fn)))(lw, x[:, :4]).serialize())
    np.testing.assert_allclose(exported.call(lw, x[:, :4]), fn(jlora.merge(lw), x[:, :4]), rtol=1e-6)


def test_one_export_serves_adapters_of_every_rank():
    """The rank as a symbolic size: the scale is in the tree's structure, so adapters whose alpha
    grows with their rank (one scale) all run through one exported function."""
    base = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (6, 5))}}
    make = lambda r: perturb(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=r, alpha=2 * r, targets=["dense"])),
                             jax.random.key(r))
    fn = lambda p, x: jnp.tanh(x @ p["dense"]["kernel"])
    trainable, frozen = jlora.split(make(2))
    batch, rank = export.symbolic_shape("batch, rank")
    symbolic = jax.tree.map(lambda lw: lw.replace(a=jax.ShapeDtypeStruct((6, rank), jnp.float32),
                                                  b=jax.ShapeDtypeStruct((rank, 5), jnp.float32)),
                            trainable, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    step = jax.jit(lambda t, f, x: jlora.apply(fn)(jlora.combine(t, f), x))
    exported = export.deserialize(export.export(step)(symbolic, frozen, jax.ShapeDtypeStruct((batch, 6), jnp.float32))
                                  .serialize())
    for r, n in ((2, 3), (4, 1), (5, 7)):
        trainable, frozen = jlora.split(make(r))
        x = jax.random.normal(jax.random.key(n), (n, 6))
        np.testing.assert_allclose(exported.call(trainable, frozen, x), fn(jlora.merge(make(r)), x), rtol=1e-5, atol=1e-6)
