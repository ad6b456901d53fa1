import jax
from flax import nnx

from jlora.variables import nnx_variables, shared_paths, state_paths, value_of


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(2, 3, rngs=rngs)
        self.l2 = self.l1  # used twice
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)


def test_a_module_and_its_split_state_hold_the_same_variables_the_state_once():
    model = Net(nnx.Rngs(0))
    direct = {(p, is_param) for p, _, is_param in nnx_variables(model)}
    split = {(p, is_param) for p, _, is_param in nnx_variables(nnx.split(model)[1])}
    assert split == {x for x in direct if not x[0].startswith("l2/")}
    assert {p for p, is_param in direct if is_param} == {"l1/kernel", "l1/bias", "l2/kernel", "l2/bias", "bn/scale", "bn/bias"}
    assert shared_paths(model) == [["l1/bias", "l2/bias"], ["l1/kernel", "l2/kernel"]]
    assert shared_paths(nnx.split(model)[1]) == []


def test_state_is_every_variable_but_params():
    model = Net(nnx.Rngs(0))
    state = state_paths(model)
    assert {"bn/mean", "bn/var"} <= state and not state & {"l1/kernel", "bn/scale"}
    assert any(p.startswith("drop/") for p in state)  # the dropout's RNG key and count


def test_a_tree_without_variables_has_none():
    assert nnx_variables({"w": jax.numpy.ones(2)}) == [] and state_paths([]) == frozenset()


def test_created_variables_go_into_the_module_at_their_path_and_nowhere_else():
    import jax.numpy as jnp

    from jlora.variables import add_created

    model = nnx.Sequential(Net(nnx.Rngs(0)))
    h = nnx.Intermediate((jnp.ones(3),))
    tree = {"args": (model, {"not": "a module"}), "kwargs": {}}
    missed = add_created(tree, {"args/0/layers/0/h": h, "args/0/layers/0/l1": nnx.Intermediate(()),
                                "args/1/not/g": nnx.Intermediate(()), "args/2/x": nnx.Intermediate(())})
    assert model.layers[0].h is h
    assert missed == ["args/0/layers/0/l1", "args/1/not/g", "args/2/x"]  # taken, not a module, no such place
    assert isinstance(model.layers[0].l1, nnx.Linear)


def test_a_cache_made_in_the_wrapped_call_fills_its_placeholders_and_decodes_as_flax_does():
    """``init_cache`` and the first token in one call (a prefill): nnx.MultiHeadAttention holds
    ``None`` in its cache attributes until then (Flax 0.12), which the call fills; the next step
    decodes from that cache, as the plain module on merged params does (the cache was dropped)."""
    import warnings

    import jax.numpy as jnp

    import jlora

    batch, length, d = 2, 3, 8
    x = jax.random.normal(jax.random.key(3), (batch, length, d))
    make = lambda: nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=d, decode=False, rngs=nnx.Rngs(0))
    cfg = jlora.LoraConfig(rank=2, targets=["query", "value"], layouts={"query": "ioo", "value": "ioo"})
    lora = jlora.lora_init(jax.random.key(1), make(), cfg)
    is_lora = lambda x: isinstance(x, jlora.LoraWeight)  # non-zero b: the adapters change the keys and values cached
    nnx.update(lora, jax.tree.map(lambda x: x.replace(b=x.b + 0.5) if is_lora(x) else x, nnx.state(lora), is_leaf=is_lora))
    plain = make()
    nnx.update(plain, nnx.state(jlora.merge(lora), nnx.Param))

    def prefill(m, token):
        m.init_cache((batch, length, d))
        return m(token, decode=True)

    decode = lambda m, token: m(token, decode=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [jlora.apply(prefill)(lora, x[:, :1])] + [jlora.apply(decode)(lora, x[:, i:i + 1]) for i in (1, 2)]
    want = [prefill(plain, x[:, :1])] + [decode(plain, x[:, i:i + 1]) for i in (1, 2)]
    for g, w in zip(got, want):
        assert jnp.allclose(g, w, rtol=1e-5, atol=1e-6)
    assert int(value_of(lora.cache_index)) == int(value_of(plain.cache_index)) == 3
