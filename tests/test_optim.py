import fractions

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import jlora
from oracle import normal, perturb

KEY = jax.random.key(0)


def setup():
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)}, "out": {"kernel": jnp.ones((8, 2))}}
    p = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q"], trainable=["q/bias"]))
    fn = jlora.apply(lambda p, x: jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["out"]["kernel"])
    x = jax.random.normal(KEY, (4, 8))
    return perturb(p, KEY), fn, x


def loss_of(fn, x):
    return lambda p: jnp.mean(fn(p, x) ** 2)


@pytest.mark.parametrize("half", [False, True])
def test_frozen_leaves_unchanged_bitwise_and_loss_drops(half):
    p, fn, x = setup()
    p["out"]["kernel"] = p["out"]["kernel"].at[0, 0].set(-0.0)  # bitwise: a -0.0 must stay -0.0
    tx = jlora.optimizer(optax.adam(1e-2), p)
    trainable, frozen = jlora.split(p)

    @jax.jit
    def step(p, state):
        if half:
            t, f = jlora.split(p)
            g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, f)))(t)
            u, state = tx.update(g, state, t)
            return jlora.combine(optax.apply_updates(t, u), f), state
        g = jax.grad(loss_of(fn, x))(p)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    state = tx.init(trainable if half else p)
    start = loss_of(fn, x)(p)
    for _ in range(20):
        p, state = step(p, state)
    assert loss_of(fn, x)(p) < 0.9 * start
    assert np.asarray(p["q"]["kernel"].w).tobytes() == np.asarray(frozen["q"]["kernel"].w).tobytes()
    assert np.asarray(p["out"]["kernel"]).tobytes() == np.asarray(frozen["out"]["kernel"]).tobytes()
    if not half:  # eagerly too, where no compiler folds away an added zero
        u, _ = tx.update(jax.grad(loss_of(fn, x))(p), state, p)
        after = optax.apply_updates(p, u)
        assert np.asarray(after["out"]["kernel"]).tobytes() == np.asarray(frozen["out"]["kernel"]).tobytes()
    assert not np.array_equal(p["q"]["bias"].value, trainable["q"]["bias"].value)


def test_a_frozen_complex_leaf_keeps_its_signed_zeros():
    """A complex leaf's zero update is -0.0 in both parts: +0.0 would turn a -0.0 part into +0.0."""
    p, _, _ = setup()
    p["phase"] = jnp.array([complex(-0.0, 1.0), complex(2.0, -0.0)], jnp.complex64)
    tx = jlora.optimizer(optax.sgd(0.1), p)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    assert np.asarray(optax.apply_updates(p, u)["phase"]).tobytes() == np.asarray(p["phase"]).tobytes()


def test_frozen_leaves_have_no_optimizer_state():
    p, _, _ = setup()
    state = jlora.optimizer(optax.adam(1e-2), p).init(p)
    sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    adapter = (8 * 2 + 2 * 8) + 8  # a, b, bias
    assert sizes == 2 * adapter  # adam's mu and nu, nothing for w or out


def test_lora_plus_scales_b_updates_by_the_ratio():
    p, fn, x = setup()
    g = jax.grad(loss_of(fn, x))(p)
    plain = jlora.optimizer(optax.sgd(0.1), p)
    plus = jlora.optimizer(optax.sgd(0.1), p, b_lr_ratio=16.0)
    u1, _ = plain.update(g, plain.init(p), p)
    u2, _ = plus.update(g, plus.init(p), p)
    np.testing.assert_allclose(u2["q"]["kernel"].b, 16.0 * u1["q"]["kernel"].b, rtol=1e-6)
    np.testing.assert_array_equal(u2["q"]["kernel"].a, u1["q"]["kernel"].a)
    np.testing.assert_array_equal(u2["q"]["bias"].value, u1["q"]["bias"].value)
    as_fraction = jlora.optimizer(optax.sgd(0.1), p, b_lr_ratio=fractions.Fraction(3, 2))  # any real number
    u3, _ = as_fraction.update(g, as_fraction.init(p), p)
    np.testing.assert_allclose(u3["q"]["kernel"].b, 1.5 * u1["q"]["kernel"].b, rtol=1e-6)


def test_optax_flatten_inside_keeps_each_moment_as_one_vector_for_the_same_steps():
    """The README's way to halve the arrays a step takes: ``optax.flatten`` around ``tx``."""
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    loss = lambda t: loss_of(fn, x)(jlora.combine(t, frozen))
    runs = {}
    for name, tx in (("adam", optax.adam(0.1)), ("flat", optax.flatten(optax.adam(0.1)))):
        tx = jlora.optimizer(tx, trainable, b_lr_ratio=4.0)
        t, state = trainable, tx.init(trainable)
        for _ in range(3):
            u, state = tx.update(jax.grad(loss)(t), state, t)
            t = optax.apply_updates(t, u)
        runs[name] = t, state
    # one float32 rounding apart in the first update (the flat vector's ops fuse otherwise, by CPU),
    # which three of Adam's steps at lr 0.1 grow to ~5e-6; a wrong lr or moment would be ~1e-3 apart
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), runs["flat"][0], runs["adam"][0])
    moments = lambda state: [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert len(moments(runs["adam"][1])) == 2 * 3 and len(moments(runs["flat"][1])) == 2  # a, b, bias: mu, nu


def test_clipping_inside_tx_sees_adapter_gradients_only():
    p, fn, x = setup()
    g = jax.grad(loss_of(fn, x))(p)
    g = jax.tree.map(lambda l: l, g)
    huge = {"q": {"kernel": g["q"]["kernel"].replace(w=1e6 * jnp.ones((8, 8))), "bias": g["q"]["bias"]},
            "out": {"kernel": 1e6 * jnp.ones((8, 2))}}
    tx = jlora.optimizer(optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)), p)
    u, _ = tx.update(huge, tx.init(p), p)
    t, _ = jlora.split(g)
    adapter_norm = jnp.sqrt(sum(jnp.sum(l**2) for l in jax.tree.leaves(t)))
    t_u, _ = jlora.split(u)
    expected = jax.tree.map(lambda l: -l * 1e-3 / adapter_norm, t)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), t_u, expected)
    assert float(jnp.abs(u["out"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("init_from", ["full", "trainable"])
@pytest.mark.parametrize("grads_of", ["full", "trainable"])
def test_state_from_either_tree_updates_either_tree(init_from, grads_of):
    """DESIGN.md's program: the state is made from the full tree, the step updates the trainable half."""
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    tx = jlora.optimizer(optax.adam(1e-2), p, b_lr_ratio=4.0)
    state = tx.init(p if init_from == "full" else trainable)
    g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, frozen)))(trainable)
    full_g = jlora.combine(g, jax.tree.map(jnp.zeros_like, frozen))
    u, state = jax.jit(tx.update)(full_g if grads_of == "full" else g, state, p if grads_of == "full" else trainable)
    assert jax.tree.structure(u) == jax.tree.structure(full_g if grads_of == "full" else g)
    # the oracle: plain adam on the adapter leaves (a, b, bias), b's update times the ratio
    leaves = {"a": g["q"]["kernel"].a, "b": g["q"]["kernel"].b, "bias": g["q"]["bias"].value}
    ref, _ = jax.jit(optax.adam(1e-2).update)(leaves, optax.adam(1e-2).init(leaves))
    u_t, u_f = jlora.split(u)
    np.testing.assert_allclose(u_t["q"]["kernel"].a, ref["a"], rtol=1e-6)
    np.testing.assert_allclose(u_t["q"]["kernel"].b, 4.0 * ref["b"], rtol=1e-6)
    np.testing.assert_allclose(u_t["q"]["bias"].value, ref["bias"], rtol=1e-6)
    assert all(float(jnp.abs(l).max()) == 0.0 for l in jax.tree.leaves(u_f))


def test_extra_arguments_multisteps_and_other_keys_reach_tx():
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, frozen)))(trainable)
    plateau = jlora.optimizer(optax.chain(optax.sgd(1.0), optax.contrib.reduce_on_plateau(patience=0)), p)
    state = plateau.init(trainable)
    for loss in (1.0, 2.0, 3.0):  # the loss never improves: the scale drops
        u, state = plateau.update(g, state, trainable, value=jnp.asarray(loss))
    assert float(jnp.abs(u["q"]["kernel"].a).max()) < float(jnp.abs(g["q"]["kernel"].a).max())
    every_2 = jlora.optimizer(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2), p)
    u, _ = every_2.update(g, every_2.init(trainable), trainable)
    assert float(jnp.abs(u["q"]["kernel"].a).max()) == 0.0  # the first of two accumulated steps


def test_bad_input():
    with pytest.raises(ValueError, match="no LoraWeight"):
        jlora.optimizer(optax.sgd(1.0), {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="init: params hold no LoraWeight or Trainable leaf, so nothing would train"):
        jlora.optimizer(optax.sgd(1.0)).init({"w": jnp.ones(3)})  # lora_init forgotten: every update would be 0
    with pytest.raises(ValueError, match="init: params is None; pass the LoRA params"):
        jlora.optimizer(optax.sgd(1.0)).init(None)
    with pytest.raises(ValueError, match="got a float with no LoraWeight or Trainable leaf; a LoRA\\+ ratio goes in b_lr_ratio="):
        jlora.optimizer(optax.sgd(1.0), 16.0)  # the ratio passed where the params go would leave b's rate as it is
    with pytest.raises(TypeError):
        jlora.optimizer(optax.sgd(1.0), None, 16.0)  # keyword-only
    base = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    p = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q/kernel"], trainable=["q/bias"]))
    trainable, frozen = jlora.split(p)  # lorax's init_lora gave (frozen, tunable): that order, trained, never moves
    for make in (lambda: jlora.optimizer(optax.sgd(1.0), frozen), lambda: jlora.optimizer(optax.sgd(1.0)).init(frozen)):
        with pytest.raises(ValueError, match=r"params are the frozen half of jlora.split \(no factors, nothing would "
                                             r"train\): jlora.split returns \(trainable, frozen\)"):
            make()
    jlora.optimizer(optax.sgd(1.0), trainable).init(p)
    for ratio in (0, -1.0, "2"):
        with pytest.raises(ValueError, match="jlora.scale_lora_b: ratio must be a finite number > 0"):
            jlora.scale_lora_b(ratio)
    for ratio in (0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="b_lr_ratio"):
            jlora.optimizer(optax.sgd(1.0), b_lr_ratio=ratio)
    for ratio in (1e300, 1e39, 1e-50):  # inf and 0 in the updates' float32
        with warnings.catch_warnings():  # the refusal alone, not numpy's overflow of comparing it first
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"b_lr_ratio must be a finite number > 0 \(within float32's range"):
                jlora.optimizer(optax.sgd(1.0), b_lr_ratio=ratio)
    with pytest.raises(ValueError, match="tx must be an optax transformation"):
        jlora.optimizer(optax.sgd, b_lr_ratio=2.0)
    jlora.optimizer(optax.sgd(1.0), b_lr_ratio=np.float32(4.0))  # numpy scalars are numbers
    for ratio in (jnp.float32(-1.0), jnp.ones(2)):
        with pytest.raises(ValueError, match="b_lr_ratio"):
            jlora.optimizer(optax.sgd(1.0), b_lr_ratio=ratio)


def test_the_ratio_may_be_an_array_and_scheduled_by_inject_hyperparams():
    p, fn, x = setup()
    trainable, _ = jlora.split(p)
    g = jax.grad(loss_of(fn, x))(p)
    ref = jlora.optimizer(optax.adam(0.1), p, b_lr_ratio=4.0)
    want, _ = ref.update(g, ref.init(p), p)
    scalar = jlora.optimizer(optax.adam(0.1), p, b_lr_ratio=jnp.float32(4.0))
    injected = optax.inject_hyperparams(jlora.optimizer, static_args=("tx",))(optax.adam(0.1), b_lr_ratio=4.0)
    got_scalar, _ = scalar.update(g, scalar.init(trainable), p)
    got_injected, state = jax.jit(injected.update)(g, injected.init(trainable), p)
    for got in (got_scalar, got_injected):
        np.testing.assert_allclose(got["q"]["kernel"].b, want["q"]["kernel"].b, rtol=1e-6)
    state.hyperparams["b_lr_ratio"] = jnp.float32(8.0)  # a new ratio, as a schedule would set
    again, _ = jax.jit(injected.update)(g, state, p)
    np.testing.assert_allclose(again["q"]["kernel"].b, 2 * want["q"]["kernel"].b, rtol=1e-5)
    state.hyperparams["b_lr_ratio"] = jnp.float32(-5.0)  # refused eagerly; traced, it cannot be: NaN, not a sign flip
    with pytest.raises(ValueError, match="b_lr_ratio must be a finite number > 0"):
        injected.update(g, state, p)
    bad, _ = jax.jit(injected.update)(g, state, p)
    assert bool(jnp.isnan(bad["q"]["kernel"].b).all()) and bool(jnp.isfinite(bad["q"]["kernel"].a).all())
    state.hyperparams["b_lr_ratio"] = jnp.float32(0.0)  # a schedule decayed to its end: b stops, a goes on
    stopped, _ = jax.jit(injected.update)(g, state, p)
    assert float(jnp.abs(stopped["q"]["kernel"].b).max()) == 0.0
    eager, _ = injected.update(g, state, p)  # alike eagerly (it was refused as a ratio that is not > 0)
    assert float(jnp.abs(eager["q"]["kernel"].b).max()) == 0.0
    assert bool(jnp.isfinite(stopped["q"]["kernel"].a).all()) and float(jnp.abs(stopped["q"]["kernel"].a).min()) > 0


def test_a_ratio_is_refused_for_a_tx_whose_updates_are_not_steps_of_its_learning_rate():
    """Schedule-free, lookahead, Mechanic, COCOB, MADGRAD and SAM (stepping to its adversarial point and
    back) return differences of iterates; DoG, DoWG and Prodigy step by the distance moved, Momo by
    Polyak's rule: scaling them is not LoRA+ (a ratio above 2 makes b oscillate and grow); a line search checks the step it picks, not b's scaled one (the loss diverges)."""
    p, _, _ = setup()
    scaled = "b_lr_ratio scales b's updates"
    sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05))
    for tx, match in ((optax.contrib.schedule_free_sgd(0.1), scaled), (optax.contrib.mechanize(optax.sgd(0.1)), scaled),
                      (optax.contrib.cocob(), scaled), (optax.lookahead(optax.sgd(0.1), 2, 0.5), "goes around it"),
                      (optax.contrib.dog(), scaled), (optax.contrib.dowg(), scaled), (optax.contrib.prodigy(), scaled),
                      (optax.scale_by_distance_over_gradients(), scaled),  # core optax's DoG
                      (optax.contrib.madgrad(0.01), scaled), (optax.contrib.momo(), scaled),
                      (optax.contrib.momo_adam(), scaled),
                      (sam, "SAMState in transparent mode .*opaque_mode=True is fine")):
        with pytest.raises(ValueError, match=match):
            jlora.optimizer(tx, p, b_lr_ratio=4.0)  # given the params: refused at once
        with pytest.raises(ValueError, match=match):
            jlora.optimizer(tx, b_lr_ratio=4.0).init(p)  # else by init
    with pytest.raises(ValueError, match=r"then evaluate schedule-free's params with "
                                         r"optax.contrib.schedule_free_eval_params of each label's state"):
        jlora.optimizer(optax.contrib.schedule_free_sgd(0.1), p, b_lr_ratio=4.0)
    jlora.optimizer(optax.contrib.schedule_free_sgd(0.1), p).init(p)  # no ratio: fine
    jlora.optimizer(optax.contrib.dog(), p).init(p)
    for make in (lambda: jlora.optimizer(optax.lookahead(optax.sgd(0.1), 2, 0.5), p),  # inside, at any ratio
                 lambda: jlora.optimizer(optax.lookahead(optax.sgd(0.1), 2, 0.5)).init(p)):
        with pytest.raises(ValueError, match="optax.lookahead goes around it, not inside"):
            make()
    jlora.optimizer(optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), opaque_mode=True), p, b_lr_ratio=4.0).init(p)
    with pytest.raises(ValueError, match=r"b_lr_ratio=1.0 \(a Python number: an array, as optax.inject_hyperparams "
                                         r"passes it, scales even at 1\)"):
        jlora.optimizer(optax.contrib.schedule_free_sgd(0.1), p, b_lr_ratio=jnp.float32(1.0))
    # a line search picks the step for tx's own update: b's, scaled after it, is a step it never checked
    search = "its line search picks the step length for tx's update"
    for tx in (optax.lbfgs(), optax.chain(optax.sgd(1.0), optax.scale_by_backtracking_linesearch(max_backtracking_steps=5))):
        with pytest.raises(ValueError, match=f"tx holds a ScaleBy\\w+LinesearchState: {search}"):
            jlora.optimizer(tx, p, b_lr_ratio=4.0)
        jlora.optimizer(tx, p).init(p)  # no ratio: fine
    jlora.optimizer(optax.lbfgs(learning_rate=0.05, linesearch=None), p, b_lr_ratio=4.0).init(p)  # a fixed step
    with pytest.raises(ValueError, match=r"got <function .*\(to schedule it, wrap the optimizer: "
                                         r"optax.inject_hyperparams\(jlora.optimizer, static_args=\('tx',\)\)"):
        jlora.optimizer(optax.sgd(0.1), p, b_lr_ratio=optax.linear_schedule(1.0, 16.0, 100))


def test_dog_with_a_ratio_would_move_a_too():
    """Why DoG is refused with a ratio: its step size grows with the params' distance from their
    start, so a b moved 16 times further raises a's step as well (not LoRA+)."""
    p, fn, x = setup()
    trainable, _ = jlora.split(p)
    g = jax.tree.map(lambda z: jnp.full_like(z, 0.1), trainable)

    def a_step(ratio):  # DoG by hand over the adapters, b's update scaled as a ratio would
        tx, t = optax.contrib.dog(), trainable
        s = tx.init(t)
        for _ in range(3):
            u, s = tx.update(g, s, t)
            u = jax.tree.map(lambda x: x, u)
            u["q"]["kernel"] = u["q"]["kernel"].replace(b=ratio * u["q"]["kernel"].b)
            t = optax.apply_updates(t, u)
        return float(jnp.linalg.norm(u["q"]["kernel"].a))

    assert a_step(16.0) > 2 * a_step(1.0)


def test_optax_masked_around_the_optimizer_takes_a_mask_per_leaf():
    """optax.masked passes a MaskedNode where its mask is False; jlora.optimizer gave it back in
    jlora.combine, which refused the tree. Masked leaves keep their raw updates, the others get tx's."""
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, frozen)))(trainable)
    no_b = jax.tree.map(lambda label: label != "lora_b", jlora.labels(trainable))
    for tree in (trainable, p):
        tx = optax.masked(jlora.optimizer(optax.adam(0.1), trainable), no_b if tree is trainable else
                          jax.tree.map(lambda label: label != "lora_b", jlora.labels(p)))
        grads = g if tree is trainable else jax.grad(loss_of(fn, x))(p)
        u, _ = tx.update(grads, tx.init(tree), tree)
        want, _ = optax.adam(0.1).update(g["q"]["kernel"].a, optax.adam(0.1).init(g["q"]["kernel"].a))
        np.testing.assert_allclose(u["q"]["kernel"].a, want, rtol=1e-6)
        # masked: passed through (the full tree's gradient is a second grad of fn, which runs compiled, so
        # it may differ from the first in the last bit)
        np.testing.assert_allclose(u["q"]["kernel"].b, g["q"]["kernel"].b, rtol=1e-5, atol=1e-6)


def test_a_tx_that_takes_none_for_an_array_is_told_why_init_fails():
    """jlora.optimizer's tx sees the trainable half, with None at frozen leaves; optax.contrib.galore
    maps over None as a leaf and failed deep in optax with "'NoneType' object has no attribute"."""
    p, _, _ = setup()
    with pytest.raises(ValueError, match=r"init: tx's init failed on a None \(AttributeError: 'NoneType' object has "
                                         r"no attribute .*\): .*optax.contrib.galore does") as caught:
        jlora.optimizer(optax.contrib.galore(0.01), p).init(p)
    assert isinstance(caught.value.__cause__, AttributeError)  # its traceback kept: a tx's own bug shows where


def test_update_names_a_frozen_half_or_arguments_in_another_order():
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    tx = jlora.optimizer(optax.adam(0.1), p)
    state = tx.init(p)
    g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, frozen)))(trainable)
    with pytest.raises(ValueError, match=r"update: params are the frozen half of jlora.split"):
        tx.update(g, state, frozen)
    with pytest.raises(ValueError, match=r"update: the gradients are the frozen half of jlora.split"):
        tx.update(frozen, state, trainable)
    with pytest.raises(ValueError, match=r"opt_state holds LoraWeight or Trainable nodes, as params do: update takes "
                                         r"\(grads, opt_state, params\)"):
        tx.update(g, trainable, state)
    with pytest.raises(ValueError, match=r"opt_state was not made by this optimizer's init .* make it with "
                                         r"tx.init\(params\)"):
        tx.update(g, optax.adam(0.1).init(trainable), trainable)  # a plain tx's state, in the right place
    for swapped in ((g, p, state), (g, frozen, trainable)):  # the full params where the state goes: the order
        with pytest.raises(ValueError, match=r"opt_state holds LoraWeight or Trainable nodes, as params do"):
            tx.update(*swapped)


def test_lbfgs_takes_a_full_tree_gradient_as_its_trainable_half():
    """A tree-shaped extra argument (lbfgs's grad=) reaches tx as the trainable half, as the gradients do."""
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    value_fn = lambda t: loss_of(fn, x)(jlora.combine(t, frozen))
    tx = jlora.optimizer(optax.lbfgs(), p)
    value, g = jax.value_and_grad(loss_of(fn, x))(p)
    g_half = jax.grad(value_fn)(trainable)
    got, _ = tx.update(g, tx.init(p), p, value=value, grad=g, value_fn=value_fn)
    want, _ = tx.update(g_half, tx.init(trainable), trainable, value=value, grad=g_half, value_fn=value_fn)
    # g and g_half come from two grads of fn (the second runs compiled): equal to float rounding, which
    # lbfgs's two-loop recursion amplifies
    np.testing.assert_allclose(got["q"]["kernel"].a, want["q"]["kernel"].a, rtol=1e-4)


def test_lookahead_goes_around_the_optimizer_with_a_ratio():
    """Lookahead's slow/fast params do not fit inside a multi_transform; around jlora.optimizer, the
    fast adapters take LoRA+ steps and the slow ones follow them (fast - slow, every 2 steps)."""
    p, fn, x = setup()
    trainable, frozen = jlora.split(p)
    tx = optax.lookahead(jlora.optimizer(optax.sgd(0.1), trainable, b_lr_ratio=4.0), 2, 0.5)
    plain = jlora.optimizer(optax.sgd(0.1), trainable, b_lr_ratio=4.0)
    params = optax.LookaheadParams.init_synced(trainable)
    state = tx.init(params)
    g = jax.grad(lambda t: loss_of(fn, x)(jlora.combine(t, frozen)))(trainable)
    u, state = tx.update(g, state, params)
    want, _ = plain.update(g, plain.init(trainable), trainable)
    jax.tree.map(np.testing.assert_array_equal, u.fast, want)  # the first fast step is the plain one
    params = optax.apply_updates(params, u)
    u, state = tx.update(g, state, params)  # the second: slow moves halfway to fast
    params = optax.apply_updates(params, u)
    moved = jax.tree.map(lambda s, t: s - t, params.slow, trainable)
    np.testing.assert_allclose(moved["q"]["kernel"].b, 0.5 * 2 * want["q"]["kernel"].b, rtol=1e-5)


def test_a_ratio_is_taken_with_frozen_leaves_that_are_not_arrays():
    # an Equinox module's tree holds its activation functions as leaves
    p, _, _ = setup()
    p = {**p, "activation": jax.nn.relu}
    tx = jlora.optimizer(optax.adam(1e-3), p, b_lr_ratio=16.0)
    updates, _ = tx.update(jlora.split(p)[0], tx.init(p))
    assert updates["activation"] is None


def test_schedule_free_eval_params_match_optax_on_the_adapters_alone():
    p, fn, x = setup()
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_adamw(0.1, warmup_steps=2))
    tx = jlora.optimizer(inner, p)
    lw = p["q"]["kernel"]
    plain = {"a": lw.a, "b": lw.b, "bias": p["q"]["bias"].value}  # the oracle: optax on the adapters as a dict
    state, plain_state = tx.init(p), inner.init(plain)
    for _ in range(3):
        g = jax.grad(loss_of(fn, x))(p)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        gk = g["q"]["kernel"]
        pu, plain_state = inner.update({"a": gk.a, "b": gk.b, "bias": g["q"]["bias"].value}, plain_state, plain)
        plain = optax.apply_updates(plain, pu)
    want = optax.contrib.schedule_free_eval_params(plain_state[1], plain)
    for half in (p, jlora.split(p)[0]):  # the full tree or the trainable half
        got = jlora.optim.schedule_free_eval_params(state, half)
        np.testing.assert_allclose(got["q"]["kernel"].a, want["a"], rtol=1e-6)
        np.testing.assert_allclose(got["q"]["kernel"].b, want["b"], rtol=1e-6)
        np.testing.assert_allclose(got["q"]["bias"].value, want["bias"], rtol=1e-6)
        assert not np.allclose(got["q"]["kernel"].b, p["q"]["kernel"].b)  # not the training iterate
    assert got["q"]["kernel"].w is None and got["out"]["kernel"] is None
    full = jlora.optim.schedule_free_eval_params(state, p)
    assert full["out"]["kernel"] is p["out"]["kernel"] and full["q"]["kernel"].w is p["q"]["kernel"].w
    with pytest.raises(ValueError, match="must hold one ScheduleFreeState.*found 0"):
        jlora.optim.schedule_free_eval_params(jlora.optimizer(optax.adam(0.1), p).init(p), p)


def test_multisteps_inside_accumulates_the_adapters_gradients_only():
    p, fn, x = setup()
    tx = jlora.optimizer(optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation(), p)
    state = tx.init(p)
    adapter = (8 * 2 + 2 * 8) + 8  # a, b, bias
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0) == adapter  # sgd has none: the accumulators
    g = jax.grad(loss_of(fn, x))(p)
    first, state = tx.update(g, state, p)
    assert int(optax.tree_utils.tree_get(state, "mini_step")) == 1  # the docstring's has_updated: not yet
    second, state = tx.update(g, state, p)
    assert int(optax.tree_utils.tree_get(state, "mini_step")) == 0  # updated
    assert float(jnp.abs(first["q"]["kernel"].a).max()) == 0.0
    np.testing.assert_allclose(second["q"]["kernel"].a, -g["q"]["kernel"].a, rtol=1e-6)  # the mean of 2 equal grads


def test_gradients_of_another_model_are_refused_by_path():
    base = {"l1": {"kernel": jnp.ones((8, 8))}, "l2": {"kernel": jnp.ones((8, 8))}}
    ours = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=4, alpha=4, targets=["kernel"]))
    # same scale, so the same tree metadata: only the shapes tell the two apart
    other = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, alpha=2, targets=["kernel"]))
    tx = jlora.optimizer(optax.adamw(1e-3), ours)
    trainable, _ = jlora.split(ours)
    state = tx.init(trainable)
    foreign, _ = jlora.split(other)
    with pytest.raises(ValueError, match=r"'l1/kernel/a' is \(8, 2\) in the gradients, \(8, 4\) in the params"):
        jax.jit(tx.update)(foreign, state, trainable)
    one_layer = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=4, alpha=4, targets=["l1"]))
    with pytest.raises(ValueError, match=r"only in the params: \['l2/kernel/a'"):
        tx.update(jlora.split(one_layer)[0], state, jlora.split(one_layer)[0] | {"l2": trainable["l2"]})
    merged_grads = jax.grad(lambda p: jnp.sum(p["l1"]["kernel"] @ p["l2"]["kernel"]))(jlora.merge(ours))
    for params in (None, trainable):  # taken with respect to the merged params: no adapter in them
        with pytest.raises(ValueError, match=r"the gradients hold no adapters .*not the merged or base params"):
            tx.update(merged_grads, state, params)
    tx.update(trainable, state, trainable)  # the right ones pass
    with_head = jlora.split({**ours, "head": {"kernel": jnp.ones((8, 2))}})[0]  # None there: a place all the same
    state = tx.init(with_head)
    with pytest.raises(ValueError, match=r"do not fit the params \(from another model\?\): only in the params: \['head/kernel'\]$"):
        tx.update({k: v for k, v in with_head.items() if k != "head"}, state, with_head)


def test_per_example_gradients_reach_a_tx_that_takes_them():
    base = {"l1": {"kernel": jnp.ones((8, 8))}}
    params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=4, alpha=4, targets=["kernel"]))
    trainable, _ = jlora.split(params)
    tx = jlora.optimizer(optax.contrib.differentially_private_aggregate(1.0, 0.0, 0), trainable)
    per_example = jax.tree.map(lambda x: jnp.stack([x] * 5), trainable)  # DP-SGD: a leading batch axis
    updates, _ = tx.update(per_example, tx.init(trainable), trainable)
    assert updates["l1"]["kernel"].a.shape == (8, 4)
    tx = jlora.optimizer(optax.chain(optax.contrib.differentially_private_aggregate(1.0, 0.0, 0), optax.adam(1e-3)))
    updates, _ = tx.update(per_example, tx.init(trainable))  # without params: the state is checked, its axis allowed
    assert updates["l1"]["kernel"].a.shape == (8, 4)
    stale = jlora.split(jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, alpha=2, targets=["kernel"])))[0]
    with pytest.raises(ValueError, match=r"has shape \(8, 2\), but these adapters need \(5, 8, 4\)"):
        tx.update(per_example, tx.init(stale))  # the axis allowed, not the rank: a stale state still refused


def test_a_state_kept_from_adapters_of_another_rank_is_refused_by_path():
    """Rank 1's moments would broadcast into rank 2's adapters without a word."""
    base = {"q": {"kernel": jnp.ones((8, 8))}}
    of_rank = lambda r: jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=r, alpha=2 * r, targets=["q"])))[0]
    tx = jlora.optimizer(optax.adam(1e-3))
    grads = jax.tree.map(jnp.ones_like, of_rank(2))
    for stale in (1, 4):
        with pytest.raises(ValueError, match=rf"opt_state.*mu\['q'\]\['kernel'\].a has shape \(8, {stale}\), but these "
                                             r"adapters need \(8, 2\)"):
            tx.update(grads, tx.init(of_rank(stale)), of_rank(2))
        with pytest.raises(ValueError, match=rf"mu\['q'\]\['kernel'\].a has shape \(8, {stale}\), but these adapters need"):
            tx.update(grads, tx.init(of_rank(stale)))  # without params (adam's usual call): the gradients' shapes
    rank_4_same_alpha = jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, alpha=4, targets=["q"])))[0]
    with pytest.raises(ValueError, match=r"a has shape \(8, 4\), but these adapters need \(8, 2\): a state kept from "
                                         r"adapters of another rank"):  # its scale differs too: the shapes say why
        tx.update(grads, tx.init(rank_4_same_alpha))
    other_alpha = jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, alpha=8, targets=["q"])))[0]
    with pytest.raises(ValueError, match="opt_state was not made for these adapters: at '.*q/kernel' the state has "
                                         "scale=4.0, these adapters scale=2.0"):
        tx.update(grads, tx.init(other_alpha), of_rank(2))
    with pytest.raises(ValueError, match="opt_state was not made for these adapters: at '.*q/kernel' the state has scale"):
        tx.update(grads, tx.init(other_alpha))
    with pytest.raises(ValueError, match="opt_state was not made for these adapters: at '.*' the state has a "
                                         "FrozenDict, these adapters a dict"):
        tx.update(grads, tx.init(FrozenDict(of_rank(2))), of_rank(2))  # unfrozen after init
    tx.update(grads, tx.init(of_rank(2)), of_rank(2))  # its own state passes
    tx.update(grads, tx.init(of_rank(2)))
    with_ratio = jlora.optimizer(optax.adam(1e-3), b_lr_ratio=16.0)  # LoRA+ turned on at a resume
    with pytest.raises(ValueError, match=r"only in the state .* \(adapters on other params, or a state of another tx "
                                         r"or b_lr_ratio: a ratio of 1 wraps tx in nothing"):
        with_ratio.update(grads, tx.init(of_rank(2)), of_rank(2))



def test_nnx_optimizer_trains_a_lora_module_as_split_and_combine_do():
    """Flax's own loop (``nnx.Optimizer(model, jlora.optimizer(...), wrt=nnx.Param)``, ``nnx.grad``,
    ``optimizer.update``) updates a and b as jlora's split/combine step does, leaves w bitwise as
    it was, and keeps no state of w's shape."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up, self.head = nnx.Linear(4, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.up(x)))

    def make():  # a and b both non-zero: both get gradients from the first step
        cfg = jlora.LoraConfig(rank=2, targets=["up"], trainable=["head"])
        return perturb(jlora.lora_init(jax.random.key(1), MLP(nnx.Rngs(0)), cfg), jax.random.key(2))

    forward = jlora.apply(lambda m, x: m(x))
    loss_fn = lambda m, x, y: jnp.mean((forward(m, x) - y) ** 2)
    x = jax.random.normal(jax.random.key(3), (32, 4))
    y = jnp.sin(x[:, :1])
    tx = lambda params: jlora.optimizer(optax.adamw(1e-2), params, b_lr_ratio=4.0)

    model = make()
    frozen_before = [np.array(leaf) for leaf in jax.tree.leaves(jlora.split(model)[1])]
    opt = nnx.Optimizer(model, tx(nnx.state(model, nnx.Param)), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    losses = [float(nnx_step(model, opt, x, y)) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert (4, 16) not in {np.shape(leaf) for leaf in jax.tree.leaves(nnx.state(opt))}  # no moments of w

    trainable, frozen = jlora.split(make())
    ref_tx = tx(trainable)
    state = ref_tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        grads = jax.grad(lambda t: loss_fn(jlora.combine(t, frozen), x, y))(trainable)
        updates, state = ref_tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(4):
        trainable, state = step(trainable, state)
    for got, want in zip(jax.tree.leaves(jlora.split(model)[0]), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(jax.tree.leaves(jlora.split(model)[1]), frozen_before, strict=True):
        np.testing.assert_array_equal(got, want)

    # called by hand on nnx.state's Params (Variables in the gradients too): updates in their structure
    params, (trainable, frozen) = nnx.state(model, nnx.Param), jlora.split(model)
    grads = nnx.grad(loss_fn)(model, x, y)
    by_hand = tx(params)
    updates, _ = by_hand.update(grads, by_hand.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    grads_split = jax.grad(lambda t: loss_fn(jlora.combine(t, frozen), x, y))(trainable)
    updates_split, _ = ref_tx.update(grads_split, ref_tx.init(trainable), trainable)
    for got, want in zip(jax.tree.leaves(jlora.split(optax.apply_updates(params, updates))[0]),
                         jax.tree.leaves(optax.apply_updates(trainable, updates_split)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_schedule_free_eval_params_of_an_nnx_optimizer_are_the_functional_loops():
    """``nnx.Optimizer`` holds the schedule-free state in its own variables and containers: the
    evaluation params of its model's ``nnx.State`` (and of that state as a pure dict) are those of
    the same training on a plain trainable half, in the structure they were given in."""
    nnx = pytest.importorskip("flax.nnx")
    sf = jlora.optim.schedule_free_eval_params
    make = lambda: perturb(jlora.lora_init(jax.random.key(1), nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                                           jlora.LoraConfig(rank=2, targets=["kernel"], trainable=["bias"])),
                           jax.random.key(2))
    loss_fn = lambda m: jnp.mean((jlora.apply(lambda m, x: m(x))(m, jnp.ones((5, 4))) - 1.0) ** 2)
    tx = lambda params: jlora.optimizer(optax.contrib.schedule_free_adamw(0.1), params)
    model = make()
    opt = nnx.Optimizer(model, tx(nnx.state(model, nnx.Param)), wrt=nnx.Param)
    trainable, frozen = jlora.split(make())
    ref_tx = tx(trainable)
    state = ref_tx.init(trainable)
    for _ in range(3):
        opt.update(model, nnx.grad(loss_fn)(model))
        updates, state = ref_tx.update(jax.grad(lambda t: loss_fn(jlora.combine(t, frozen)))(trainable), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    want = sf(state, trainable)
    params = nnx.state(model, nnx.Param)
    for given in (params, nnx.to_pure_dict(params)):
        got = sf(opt.opt_state, given)
        assert jax.tree.structure(got) == jax.tree.structure(given)
        for g, w in zip(jax.tree.leaves(jlora.split(got)[0]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert not all(np.allclose(w, t) for w, t in zip(jax.tree.leaves(want), jax.tree.leaves(trainable)))  # not the iterate
    with pytest.raises(ValueError, match="params are not those opt_state was made for"):
        sf(opt.opt_state, {"kernel": jlora.lora_init(KEY, {"kernel": jnp.ones((4, 3))}, jlora.LoraConfig(rank=2,
                                                                                                    targets=["kernel"]))})


def test_full_tree_gradients_over_a_lazy_base_update_the_adapter_alone():
    """An adapter's w may be a pytree (a float lazy kind; here an adapter under an adapter): the
    frozen half's zero updates hold it whole where the adapters' updates hold None."""
    inner = jlora.LoraWeight(normal(KEY, (8, 8)), jnp.full((8, 2), 0.1), jnp.full((2, 8), 0.1), scale=1.0, path="q")
    p = {"q": jlora.LoraWeight(inner, jnp.full((8, 2), 0.1), jnp.full((2, 8), 0.1), scale=1.0, path="q")}
    tx = jlora.optimizer(optax.sgd(0.1), p)
    g = jax.grad(lambda p: jlora.apply(lambda p, x: x @ p["q"])(p, jnp.ones((2, 8))).sum())(p)
    u, _ = tx.update(g, tx.init(p), p)
    new = optax.apply_updates(p, u)
    jax.tree.map(np.testing.assert_array_equal, jlora.split(new)[1], jlora.split(p)[1])  # the base as it was
    np.testing.assert_allclose(new["q"].a, p["q"].a - 0.1 * g["q"].a, rtol=1e-6)


def test_an_int8_base_trains_with_full_tree_gradients_taken_with_allow_int():
    """A quantized base's integer parts get float0 gradients (``allow_int=True``; JAX refuses an
    integer input otherwise): their zero updates keep the int8 kernel as it was under
    ``optax.apply_updates`` (float0 has no add), in jax.grad's loop and NNX's alike, and the
    adapters follow the trainable half's step."""
    from quantized import quantize

    nnx = pytest.importorskip("flax.nnx")
    linear = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    linear.kernel = nnx.Param(quantize(linear.kernel[...]))
    model = perturb(jlora.lora_init(KEY, linear, jlora.LoraConfig(rank=2, targets=["kernel"])), KEY)
    forward = jlora.apply(lambda m, x: m(x))
    x = normal(jax.random.key(1), (16, 8))
    loss_fn = lambda m: jnp.mean(forward(m, x) ** 2)
    trainable, frozen = jlora.split(model)
    tx = jlora.optimizer(optax.adam(1e-2), trainable, b_lr_ratio=4.0)
    updates, _ = tx.update(jax.grad(lambda t: loss_fn(jlora.combine(t, frozen)))(trainable), tx.init(trainable), trainable)
    want = optax.apply_updates(trainable, updates)

    got = optax.apply_updates(model, tx.update(jax.grad(loss_fn, allow_int=True)(model), tx.init(model), model)[0])
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    opt.update(model, nnx.grad(loss_fn, allow_int=True)(model))
    int8 = lambda m: [leaf for leaf in jax.tree.leaves(m) if leaf.dtype == jnp.int8]
    assert len(int8(frozen)) == 1
    for new in (got, model):
        np.testing.assert_array_equal(int8(new), int8(frozen))  # the kernel, int8 still
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), jlora.split(new)[0], want)


def test_an_equinox_module_of_gradients_as_an_extra_argument_reaches_tx_as_the_trainable_half():
    """An Equinox module is callable, yet no callback: lbfgs's grad= of one is split like the gradients."""
    eqx = pytest.importorskip("equinox")
    key = jax.random.key(0)
    x = jnp.ones((3, 4))
    run = lambda m, x: jax.vmap(m)(x)
    p = jlora.lora_init(key, eqx.nn.MLP(4, 2, 8, 1, key=key), jlora.LoraConfig(rank=2, targets=["layers"]),
                        infer_layout=lambda m: run(m, x))
    trainable, frozen = jlora.split(p)
    loss = lambda m: jnp.sum(jlora.apply(run)(m, x) ** 2)
    value, g = eqx.filter_value_and_grad(loss)(p)
    value_fn = lambda t: loss(jlora.combine(t, frozen))
    tx = jlora.optimizer(optax.lbfgs(), p)
    got, _ = tx.update(g, tx.init(p), p, value=value, grad=g, value_fn=value_fn)
    g_half = jlora.split(g)[0]
    want, _ = tx.update(g_half, tx.init(trainable), trainable, value=value, grad=g_half, value_fn=value_fn)
    for a, b in zip(jax.tree.leaves(jlora.split(got)[0]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_stack_of_adapters_trained_at_once_under_vmap_follows_each_trained_alone():
    """A sweep: three adapters (seeds, data, learning rates of their own) stacked over one base,
    the whole step vmapped with the optimizer's init and update, global-norm clipping included:
    each follows its own training alone."""
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)}, "out": {"kernel": jnp.ones((8, 2))}}
    config = jlora.LoraConfig(rank=2, targets=["q", "out"], trainable=["q/bias"])
    trees = [perturb(jlora.lora_init(jax.random.key(i), base, config), jax.random.key(10 + i)) for i in range(3)]
    frozen = jlora.split(trees[0])[1]
    fn = jlora.apply(lambda p, x: jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["out"]["kernel"])
    xs = jax.random.normal(KEY, (3, 16, 8))  # rows at least half the input width: the stacked matmul where it pays
    lrs = jnp.array([1e-2, 3e-2, 1e-1])
    tx = lambda lr: jlora.optimizer(optax.chain(optax.clip_by_global_norm(0.05), optax.adam(lr)), trees[0],
                                    b_lr_ratio=4.0)

    def step(trainable, state, x, lr):
        loss = lambda t: jnp.mean((fn(jlora.combine(t, frozen), x) - 1.0) ** 2)
        updates, state = tx(lr).update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    def train(trainable, x, lr, run):
        state = jax.vmap(lambda t, lr: tx(lr).init(t))(trainable, lr) if run is not step else tx(lr).init(trainable)
        for _ in range(4):
            trainable, state = run(trainable, state, x, lr)
        return trainable

    together = train(jlora.stack([jlora.split(t)[0] for t in trees]), xs, lrs, jax.jit(jax.vmap(step)))
    for i, t in enumerate(trees):
        alone = train(jlora.split(t)[0], xs[i], lrs[i], step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6), alone, together)
