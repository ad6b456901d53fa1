"""``jlora.mix``: adapters mixed into one, checked against the weighted sum of their materialised
updates (and numpy's SVD of it, for a lower rank)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from oracle import normal, oracle_merge, perturb, random_lora
from quantized import quantize

KEY = jax.random.key(0)


def delta(lw: jlora.LoraWeight) -> np.ndarray:
    """The update an adapter adds, through the oracle: merged minus base."""
    return np.asarray(oracle_merge({"k": lw})["k"] - lw.w, np.float64)


def adapters(shape, layout, ranks):
    return [random_lora(jax.random.fold_in(KEY, i), shape, layout, r).replace(scale=0.5 * (i + 1))
            for i, r in enumerate(ranks)]


@pytest.mark.parametrize("shape, layout", [((6, 5), "io"), ((5, 6), "oi"), ((3, 6, 5), "bio"),
                                           ((3, 3, 4, 5), "iiio"), ((6, 2, 3), "ioo")])
def test_mixed_adapters_add_their_weighted_updates_exactly(shape, layout):
    parts = adapters(shape, layout, (2, 3))
    mixed = jlora.mix([{"k": p} for p in parts], [0.7, -0.4])["k"]
    assert mixed.rank == 5 and mixed.scale == parts[0].scale and mixed.w is parts[0].w
    np.testing.assert_allclose(delta(mixed), 0.7 * delta(parts[0]) - 0.4 * delta(parts[1]), rtol=1e-5, atol=1e-6)
    if layout == "io":  # and the mixed adapter runs as any adapter does
        x = normal(KEY, (2, shape[0]))
        np.testing.assert_allclose(jlora.apply(lambda p, x: x @ p["k"])({"k": mixed}, x),
                                   x @ (parts[0].w + 0.7 * delta(parts[0]) - 0.4 * delta(parts[1])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, layout", [((8, 6), "io"), ((2, 8, 6), "bio"), ((8, 2, 3), "ioo")])
def test_a_lower_rank_is_the_closest_by_an_svd_and_the_full_one_exact(shape, layout):
    parts = adapters(shape, layout, (2, 3))
    want = 1.5 * delta(parts[0]) + 0.5 * delta(parts[1])
    full = jlora.mix([{"k": p} for p in parts], [1.5, 0.5], rank=5)["k"]
    np.testing.assert_allclose(delta(full), want, rtol=1e-5, atol=1e-5)
    if layout == "io":  # the SVD's factors, as PEFT's "svd": a's columns orthogonal, in decreasing order
        gram = np.asarray(full.a).T @ np.asarray(full.a)
        np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-5)
        assert np.all(np.diff(np.diag(gram)) <= 1e-6)
    low = jlora.mix([{"k": p} for p in parts], [1.5, 0.5], rank=2)["k"]
    assert low.rank == 2
    nb = layout.count("b")
    flat = want.reshape(*want.shape[:nb], -1, want.shape[-1]) if layout != "ioo" else want.reshape(shape[0], -1)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    best = (u[..., :2] * s[..., None, :2]) @ vt[..., :2, :]
    np.testing.assert_allclose(delta(low).reshape(best.shape), best, rtol=1e-4, atol=1e-5)


def test_trainable_halves_mix_and_combine_with_the_frozen_half():
    base = {"q": {"kernel": normal(KEY, (8, 8))}, "head": {"kernel": jnp.ones((8, 2))}}
    made = [jlora.lora_init(jax.random.key(i), base, jlora.LoraConfig(rank=r, alpha=8, targets=["q"]))
            for i, r in enumerate((2, 4))]
    made = [jax.tree.map(lambda x: x.replace(b=normal(KEY, x.b.shape)) if isinstance(x, jlora.LoraWeight) else x, p,
                         is_leaf=lambda x: isinstance(x, jlora.LoraWeight)) for p in made]
    halves = [jlora.split(p)[0] for p in made]
    frozen = jlora.split(made[0])[1]
    mixed = jlora.combine(jlora.mix(halves, jnp.array([0.5, 0.5])), frozen)
    x = normal(KEY, (3, 8))
    fn = lambda p, x: x @ p["q"]["kernel"] @ p["head"]["kernel"]
    want = 0.5 * fn(jlora.merge(made[0]), x) + 0.5 * fn(jlora.merge(made[1]), x)
    np.testing.assert_allclose(jlora.apply(fn)(mixed, x), want, rtol=1e-5, atol=1e-5)
    traced = jax.jit(lambda w: jlora.mix(halves, w))(jnp.array([0.5, 0.5]))  # weights traced
    np.testing.assert_allclose(traced["q"]["kernel"].a, jlora.mix(halves, [0.5, 0.5])["q"]["kernel"].a, rtol=1e-6)


def test_stacked_adapters_mix_member_by_member_and_keep_their_layout():
    """A stack to serve (``jlora.stack``): each member mixed with its own, the node's layout kept,
    so the mix still combines with the frozen half under ``vmap``."""
    lws = adapters((6, 5), "io", (2, 2, 2))
    trainable = [jlora.split({"k": lw.replace(scale=0.5)})[0] for lw in lws]
    frozen = jlora.split({"k": lws[0].replace(scale=0.5)})[1]
    stacked = jlora.stack(trainable)
    mixed = jlora.mix([stacked, stacked], [0.25, 0.5])
    assert mixed["k"].layout == stacked["k"].layout and mixed["k"].a.shape == (3, 6, 4)
    x = normal(KEY, (3, 2, 6))
    run = jax.vmap(lambda t, x: jlora.apply(lambda p, x: x @ p["k"])(jlora.combine(t, frozen), x))
    want = jnp.stack([x[i] @ (frozen["k"].w + 0.75 * delta(lw.replace(scale=0.5))) for i, lw in enumerate(lws)])
    np.testing.assert_allclose(run(mixed, x), want, rtol=1e-5, atol=1e-5)


def test_what_does_not_mix_is_refused_by_name():
    one, other = adapters((6, 5), "io", (2, 2))
    with pytest.raises(ValueError, match="non-empty list"):
        jlora.mix([], [])
    with pytest.raises(ValueError, match=r"one real number per adapter \(2\), got 1"):
        jlora.mix([{"k": one}, {"k": other}], [1.0])
    for weights, got in ((["a", "b"], r"weights\[0\] is 'a' \(str\)"), ([None, 1.0], r"weights\[0\] is None"),
                         ([1.0, 1j], r"weights\[1\] is 1j"), ([True, 1.0], r"weights\[0\] is True"),
                         ([1.0, np.ones(2)], r"weights\[1\] is float64\[2\]"),
                         (jnp.ones((2, 2)), r"an array of shape \(2,\), got shape \(2, 2\)"),
                         (np.ones(2, complex), r"weights\[0\] is complex128\[\]"), (0.5, "got float")):
        with pytest.raises(ValueError, match=got):
            jlora.mix([{"k": one}, {"k": other}], weights)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        jlora.mix([{"k": one}], [1.0], rank=0)
    with pytest.raises(ValueError, match="adapter 1 has another structure than adapter 0, at 'j'"):
        jlora.mix([{"k": one}, {"j": other}], [1.0, 1.0])
    for trees in ([{"k": one, "j": other}, {"k": jnp.ones((5, 6)), "j": other}],
                  [{"k": jnp.ones((5, 6)), "j": other}, {"k": one, "j": other}]):  # either order
        with pytest.raises(ValueError, match=r"at 'k' adapter \d has a kernel \(5, 6\), adapter \d an adapter of a "
                                             r"kernel \(6, 5\): the adapters are not of one base"):
            jlora.mix(trees, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"at 'k' adapter 1's kernel is not the base under adapter 0's adapter there "
                                         r"\(a merged model\?\)"):
        jlora.mix([{"k": one, "j": other}, {"k": jlora.merge({"k": one})["k"], "j": other}], [1.0, 1.0])
    for bare in ({"k": one.w}, jlora.merge({"k": one})):  # the base, a merged model: nothing to mix
        with pytest.raises(ValueError, match=r"adapter 1 holds no adapter \(LoraWeight\) at any param: the base "
                                             r"params, or a merged model\?"):
            jlora.mix([{"k": one}, bare], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"another structure than adapter 0, at 'k'.*halves of other targets mix as "
                                         r"whole trees \(jlora.combine\(half, frozen\)\)"):
        jlora.mix([jlora.split({"k": one})[0], {"k": None}], [1.0, 1.0])
    with pytest.raises(ValueError, match="another structure .* or a half of jlora.split beside a whole tree"):
        jlora.mix([{"k": one, "bias": jnp.ones(5)}, jlora.split({"k": other, "bias": jnp.ones(5)})[0]], [1.0, 1.0])
    wide = random_lora(KEY, (6, 7), "io", 2)
    with pytest.raises(ValueError, match=r"at 'k' adapter 1 adapts a kernel \(6, 7\) with layout 'io', adapter 0 a "
                                         r"kernel \(6, 5\)"):
        jlora.mix([{"k": one}, {"k": wide}], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"adapter 1 has no factors at 'k' \(the frozen half of jlora.split\?\)"):
        jlora.mix([{"k": one}, {"k": jlora.split({"k": other})[1]["k"]}], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"'b' is trained whole \(Trainable\), not an adapter"):
        jlora.mix([{"k": one, "b": jlora.Trainable(jnp.ones(5))}] * 2, [1.0, 1.0])


def test_whole_trees_of_other_targets_mix_at_each_param_the_adapters_it_has():
    """As PEFT's ``add_weighted_adapter``: q from the first and second, v from the first, k from the second."""
    q, v, k = (adapters(shape, "io", (2, 3)) for shape in ((6, 5), (6, 4), (6, 3)))
    first = {"q": q[0], "v": v[0], "k": k[1].w}
    second = {"q": q[1], "v": v[0].w, "k": k[1]}
    mixed = jlora.mix([first, second], [0.5, 2.0])
    np.testing.assert_allclose(delta(mixed["q"]), 0.5 * delta(q[0]) + 2.0 * delta(q[1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta(mixed["v"]), 0.5 * delta(v[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta(mixed["k"]), 2.0 * delta(k[1]), rtol=1e-5, atol=1e-6)
    assert (mixed["q"].rank, mixed["v"].rank, mixed["k"].rank) == (5, 2, 3)
    assert mixed["k"].scale == k[1].scale and mixed["k"].w is k[1].w  # the first that has one: its scale and base
    fitted = jlora.mix([first, second], [0.5, 2.0], rank=3)
    assert all(fitted[n].rank == 3 for n in "qvk")
    np.testing.assert_allclose(delta(fitted["v"]), 0.5 * delta(v[0]), rtol=1e-5, atol=1e-6)  # exact, padded
    # over a quantized base, whose kernels not adapted are one lazy leaf each
    base = {"q": quantize(normal(KEY, (6, 5))), "v": quantize(normal(KEY, (6, 4)))}
    made = [perturb(jlora.lora_init(jax.random.key(i), base, jlora.LoraConfig(rank=2, targets=[t])), KEY)
            for i, t in enumerate("qv")]
    mixed = jlora.mix(made, [0.5, 2.0])
    np.testing.assert_allclose(mixed["q"].delta(), 0.5 * made[0]["q"].delta(), rtol=1e-6)
    np.testing.assert_allclose(mixed["v"].delta(), 2.0 * made[1]["v"].delta(), rtol=1e-6)


def test_a_rank_past_what_a_param_sums_keeps_its_sum_exactly_padded_with_zeros():
    """As PEFT's ``"svd"`` with a larger ``svd_rank``: one ``rank`` for every param, whose sums may
    have fewer directions (rank patterns), the ranks summed or the kernel's size."""
    small, big = adapters((6, 5), "io", (1, 1)), adapters((6, 5), "io", (3, 4))  # sums of rank 2 and 7 (> 5)
    trees = [{"small": s, "big": b} for s, b in zip(small, big)]
    mixed = jlora.mix(trees, [0.5, -1.0], rank=4)
    for name, parts in (("small", small), ("big", big)):
        got = mixed[name]
        assert got.rank == 4 and got.a.shape == (6, 4) and got.b.shape == (4, 5)
        want = 0.5 * delta(parts[0]) - 1.0 * delta(parts[1])
        if name == "small":  # exact, and its padding zero
            np.testing.assert_allclose(delta(got), want, rtol=1e-5, atol=1e-6)
            assert not np.any(got.a[:, 2:]) and not np.any(got.b[2:])
        else:  # the best of rank 4 (the sum has rank 5: the kernel's out size)
            u, s, vt = np.linalg.svd(want)
            np.testing.assert_allclose(delta(got), (u[:, :4] * s[:4]) @ vt[:4], rtol=1e-4, atol=1e-5)
    past = jlora.mix([{"k": b} for b in big], [0.5, -1.0], rank=6)["k"]  # past the kernel's 5: all of it, padded
    assert past.rank == 6 and not np.any(past.a[:, 5:]) and not np.any(past.b[5:])
    np.testing.assert_allclose(delta(past), 0.5 * delta(big[0]) - delta(big[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")
@pytest.mark.parametrize("rank", [None, 3])
def test_mixed_factors_keep_the_shardings_their_kernel_gives_them(rank):
    """Tensor-parallel adapters mix into factors placed as lora_init places them (an SVD's results
    follow no input's sharding: they came back replicated)."""
    from jax.sharding import PartitionSpec as P

    from jlora import sharding

    mesh = sharding.make_mesh({"data": 4, "model": 2})
    rules = [sharding.rule("l1", P(None, "model")), sharding.rule("l2", P("model", None))]
    base = sharding.place({"l1": {"kernel": normal(KEY, (16, 8))}, "l2": {"kernel": normal(KEY, (8, 16))}}, mesh, rules)
    cfg = jlora.LoraConfig(rank=4, targets=["l1", "l2"])
    nonzero = lambda x: x.replace(b=x.b + 1.0) if isinstance(x, jlora.LoraWeight) else x  # keeps b's sharding
    halves = [jax.tree.map(nonzero, jlora.split(jlora.lora_init(jax.random.key(i), base, cfg))[0],
                           is_leaf=lambda x: isinstance(x, jlora.LoraWeight)) for i in (1, 2)]
    want = sharding.partition_specs(halves[0], mesh, rules)
    mixed = jlora.mix(halves, [0.5, 0.5], rank=rank)
    for name in ("l1", "l2"):
        for part in ("a", "b"):
            got = getattr(mixed[name]["kernel"], part).sharding
            assert got.spec == getattr(want[name]["kernel"], part) and got.mesh == mesh, (name, part, got)
