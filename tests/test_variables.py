import jax
from flax import nnx

from jlora.variables import nnx_variables, shared_paths, state_paths


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
