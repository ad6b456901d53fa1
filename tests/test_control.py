"""Higher-order primitives with lazy inputs: the body is interpreted, the result is exact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora.lazy import MaterializeWarning
from oracle import check_against_oracle, normal, oracle_merge, perturb, random_lora


@pytest.fixture
def params():
    key = jax.random.key(0)
    return {
        "w": random_lora(key, (6, 6), "io", 2),
        "stack": random_lora(jax.random.fold_in(key, 1), (3, 6, 6), "bio", 2),
    }


X = normal(jax.random.key(9), (4, 6))


def test_nested_jit(params):
    @jax.jit
    def inner(w, x):
        return jnp.tanh(x @ w.T) @ w

    check_against_oracle(lambda p, x: jax.jit(lambda p, x: inner(p["w"], x))(p, x), params, X)


def test_scan_over_stacked_weights_and_closure(params):
    def fn(p, x):
        def body(h, w_i):
            return jnp.tanh(h @ w_i + h @ p["w"]), h.sum()

        h, ys = lax.scan(body, x, p["stack"])
        return h, ys

    check_against_oracle(fn, params, X)


def test_scan_reverse_unrolled(params):
    def fn(p, x):
        return lax.scan(lambda h, w_i: (jnp.sin(h @ w_i), None), x, p["stack"], reverse=True, unroll=2)[0]

    check_against_oracle(fn, params, X)


def test_an_ensemble_of_stacks_scanned_under_vmap_stays_factored():
    """vmap of a scan over stacked layers moves the scanned axis first (a transpose): the factors'
    batch axis for it moves with it, and the stack is sliced factored, not merged whole."""
    members = random_lora(jax.random.key(3), (2, 3, 6, 6), "bbio", 2)  # (members, layers, in, out)

    def fn(p, x):
        layers = lambda w, x: lax.scan(lambda h, w_i: (jnp.tanh(h @ w_i), None), x, w)[0]
        return jax.vmap(layers)(p["members"], x)

    check_against_oracle(fn, {"members": members}, normal(jax.random.key(4), (2, 4, 6)))


def test_scan_over_stacked_adapters_whose_base_is_lazy():
    """Sliced for the body, an adapter over an adapter stays factored, and a quantized base that
    cannot slice itself is materialised (with a warning), never sliced as a plain pytree; the
    adapter over it stays factored (its a and b sliced)."""
    from quantized import Int8Weight

    k = jax.random.split(jax.random.key(2), 6)
    inner = jlora.LoraWeight(normal(k[0], (3, 6, 6)), normal(k[1], (3, 6, 2)),
                             normal(k[2], (3, 2, 6)), scale=0.5, layout="bio", path="inner")
    outer = lambda base: jlora.LoraWeight(base, normal(k[3], (3, 6, 2)), normal(k[4], (3, 2, 6)),
                                          scale=0.3, layout="bio", path="layers/w")
    fn = lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    check_against_oracle(fn, {"w": outer(inner)}, X)  # no warning: every MaterializeWarning is an error here

    int8 = Int8Weight(jax.random.randint(k[5], (3, 6, 6), -127, 128).astype(jnp.int8), jnp.full((6,), 0.01))
    with pytest.warns(MaterializeWarning) as seen:
        check_against_oracle(fn, {"w": outer(int8)}, X)
    assert [re.sub(r" in .*?\(.*?\)", "", str(w.message)).split(". ")[0] for w in seen] == [
        "jlora: Int8Weight (the base of 'layers/w') materialised at 'scan': cannot slice its leading axis lazily "
        "(an unstack() of Int8Weight that returns its children keeps it lazy under scan)"]


def test_a_kinds_faulty_unstack_is_named():
    from quantized import Int8Weight

    @jax.tree_util.register_pytree_node_class
    class TransposedLayers(Int8Weight):  # gives each layer transposed
        def unstack(self):
            return (self.q, self.column_scale), lambda parts: Int8Weight(parts[0].T, parts[1])

    @jax.tree_util.register_pytree_node_class
    class ShortScales(Int8Weight):  # its scales shared by the layers, yet handed to the scan to slice
        def unstack(self):
            return (self.q, self.column_scale), lambda parts: Int8Weight(*parts)

    q = jax.random.randint(jax.random.key(0), (3, 6, 4), -127, 128).astype(jnp.int8)
    fn = lambda p, x: lax.scan(lambda h, w: (h @ w @ w.T, None), x, p["w"])[0]
    with pytest.raises(ValueError, match=r"TransposedLayers.unstack\(\): its rebuild gave a float32\[4, 6\] layer of "
                                         r"the float32\[3, 6, 4\] stack; a layer is float32\[6, 4\]"):
        jlora.apply(fn)({"w": TransposedLayers(q, jnp.full((3, 1, 4), 0.01))}, X)
    with pytest.raises(ValueError, match=r"ShortScales.unstack\(\): its child 1 has shape \(4,\), but lax.scan slices "
                                         r"3 layers off the \(3, 6, 4\) stack"):
        jlora.apply(fn)({"w": ShortScales(q, jnp.full((4,), 0.01))}, X)


def test_a_loop_carrying_a_typed_prng_key_stays_factored(params):
    """A sampling loop (HF's generate with do_sample) carries a jax.random.key, whose dtype is no
    numpy dtype; the adapter stays factored through it."""
    def fn(p, x, key):
        def body(c):
            i, key, h = c
            key, sub = jax.random.split(key)
            return i + 1, key, jnp.tanh(h @ p["w"]) + 0.1 * jax.random.normal(sub, h.shape)
        return lax.while_loop(lambda c: c[0] < 3, body, (0, key, x))[2]

    for key in (jax.random.key(1), jax.random.PRNGKey(1)):  # typed, legacy
        got = jlora.apply(fn)(params, X, key)
        np.testing.assert_allclose(got, fn(jlora.merge(params), X, key), rtol=1e-5, atol=1e-6)


def test_while_loop(params):
    def fn(p, x):
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])), (0, x))[1]

    check_against_oracle(fn, params, X, mode="forward")


def test_vmap_of_a_while_loop_that_stops_per_example(params):
    """vmap makes the condition one flag per example (the body leaves finished ones as they are)."""
    def loop(p, x):
        def one(x_i):
            return lax.while_loop(lambda c: c[0] < 2 + (x_i.sum() > 0), lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"])),
                                  (0, x_i))
        return jax.vmap(one)(x)

    steps, _ = jlora.apply(loop)(params, X)
    np.testing.assert_array_equal(steps, loop(jlora.merge(params), X)[0])
    assert len(set(np.asarray(steps).tolist())) == 2  # the examples stop at different steps
    check_against_oracle(lambda p, x: loop(p, x)[1], params, X, mode="forward")


def test_fori_loop_indexing_a_stacked_weight(params):
    def fn(p, x):
        n = (x[0, 0] > -100).astype(jnp.int32) * 3  # traced bound: a while loop
        return lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ p["stack"][i]), x)

    check_against_oracle(fn, params, X, mode="forward")


def test_cond_and_switch(params):
    def fn(p, x):
        y = lax.cond(x.sum() > 0, lambda: x @ p["w"], lambda: -(x @ p["w"].T))
        return lax.switch(2, [lambda h: h, lambda h: h @ p["w"], lambda h: jnp.sin(h @ p["w"])], y)

    check_against_oracle(fn, params, X)
    check_against_oracle(fn, params, -X)


def test_platform_dependent_lowers_only_the_branch_of_the_platform(params):
    tpu_only = jax.extend.core.Primitive("tpu_only_sin")  # as a TPU kernel library's op: no CPU/GPU lowering
    tpu_only.def_abstract_eval(lambda h: jax.core.ShapedArray(h.shape, h.dtype))
    jax.interpreters.mlir.register_lowering(tpu_only, jax.interpreters.mlir.lower_fun(jnp.sin, multiple_results=False),
                                            platform="tpu")
    jax.interpreters.ad.defjvp(tpu_only, lambda tangent, h: tangent * jnp.cos(h))

    def fn(p, x):
        return lax.platform_dependent(x, tpu=lambda x: tpu_only.bind(x @ p["w"]), default=lambda x: jnp.sin(x @ p["w"]))

    check_against_oracle(fn, params, X)


def test_a_scan_of_symbolic_length_exports(params):
    fn = lambda p, xs: lax.scan(lambda c, x: (c, jnp.tanh(x @ p["w"])), 0.0, xs)[1]
    steps, = jax.export.symbolic_shape("steps")
    exported = jax.export.export(jax.jit(jlora.apply(fn)))(params, jax.ShapeDtypeStruct((steps, 4, 6), X.dtype))
    xs = jnp.stack([X, -X, 2 * X])
    np.testing.assert_allclose(exported.call(params, xs), fn(oracle_merge(params), xs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable,
                                    jax.checkpoint_policies.dots_with_no_batch_dims_saveable])
def test_checkpoint(params, policy):
    def fn(p, x):
        return jax.checkpoint(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"], policy=policy)(p, x)

    check_against_oracle(fn, params, X)


def test_params_a_body_returns_as_they_came_pass_through_unmerged(params):
    def fn(p, x):  # as nnx.remat returns the module's state, and nnx.scan each layer's
        def layer(h, w):
            h, w = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), w))(h, w)
            return h, w
        h, ws = lax.scan(layer, x, p["stack"])
        return h, ws

    check_against_oracle(lambda p, x: fn(p, x)[0], params, X)  # no MaterializeWarning (an error here)
    h, ws = jax.jit(jlora.apply(fn))(params, X)
    assert isinstance(ws, jlora.LoraWeight)  # the stack itself, not merged
    jax.tree.map(np.testing.assert_array_equal, ws, params["stack"])


def test_an_nnx_remat_scan_model_stays_factored():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 6, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.dense(x))

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(nnx.Rngs(key))

    graphdef, state = nnx.split(make(jax.random.split(jax.random.key(0), 3)))

    def fn(state, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def step(h, block):
            return block(h)

        return step(x, nnx.merge(graphdef, state))

    cfg = jlora.LoraConfig(rank=2, targets=["dense"], layouts={"kernel": "bio"})
    params = jlora.lora_init(jax.random.key(1), state, cfg)
    params = jax.tree.map(lambda v: v.replace(b=normal(jax.random.key(2), v.b.shape)) if isinstance(v, jlora.LoraWeight)
                          else v, params, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))
    check_against_oracle(fn, params, X)  # no MaterializeWarning (an error here): nnx.remat returns the params


def test_custom_jvp_with_lazy_input_keeps_the_rule(params):
    @jax.custom_jvp
    def f(x, w):
        return jnp.tanh(x @ w)

    @f.defjvp
    def f_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        y = jnp.tanh(x @ w)
        return y, 2.0 * (1 - y**2) * (dx @ w + x @ dw)  # deliberately 2x: the custom rule must be used

    fn = lambda p, x: f(x, p["w"])
    with pytest.warns(MaterializeWarning, match="'w' materialised at 'custom_jvp_call' in .*: its JVP rule"):
        check_against_oracle(fn, params, X)


def test_custom_vjp_with_lazy_input_keeps_the_rule(params):
    @jax.custom_vjp
    def f(x, w):
        return x @ w

    def fwd(x, w):
        return x @ w, (x, w)

    def bwd(res, ct):
        x, w = res
        return ct @ w.T, 3.0 * (x.T @ ct)  # deliberately 3x on w's cotangent

    f.defvjp(fwd, bwd)
    jlora.apply(lambda p, x: f(x, p["w"]))(params, X)  # no derivative, no materialisation: no warning
    with pytest.warns(MaterializeWarning, match="'w' materialised at 'custom_vjp_call' in .*: its fwd and bwd"):
        check_against_oracle(lambda p, x: f(x, p["w"]), params, X)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="notes on exceptions: Python 3.11+")
def test_a_custom_jvp_closing_over_a_traced_value_says_to_pass_it_as_an_argument(params):
    """JAX cannot differentiate such a rule once traced (jax.grad(jax.jit(f)) fails alike): the note says why."""
    def closing(p, x):
        @jax.custom_jvp
        def act(y):
            return y * x[0, 0]  # x: the function's traced argument, closed over
        act.defjvp(lambda primals, tangents: (act(*primals), tangents[0] * x[0, 0]))
        return act(x @ p["w"])

    trainable, frozen = jlora.split(params)
    loss = lambda t, fn: jlora.apply(fn)(jlora.combine(t, frozen), X).sum()
    with pytest.raises(jax.errors.UnexpectedTracerError) as err:
        jax.grad(loss)(trainable, closing)
    assert "a jax.custom_jvp or custom_vjp function in it that closes over a traced value" in "".join(err.value.__notes__)

    def passing(p, x):  # as the note says
        @jax.custom_jvp
        def act(y, s):
            return y * s
        act.defjvp(lambda primals, tangents: (act(*primals), tangents[0] * primals[1] + primals[0] * tangents[1]))
        return act(x @ p["w"], x[0, 0])

    merged = lambda w: passing({"w": w}, X).sum()
    lw = params["w"]
    got = jax.grad(loss)(trainable, passing)["w"]
    want = jax.grad(merged)(jlora.merge(params)["w"])
    np.testing.assert_allclose(got.b, lw.scale * lw.a.T @ want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
def test_dropout_is_left_out_inside_a_custom_derivative_alike_with_and_without_grad(kind):
    """Differentiated, such a function takes the weight whole, where no low-rank path can drop: the
    loss must not change when its gradient is taken, and a warning says dropout is off there."""
    k = jax.random.split(jax.random.key(0), 4)
    lw = jlora.LoraWeight(normal(k[0], (4, 3)), normal(k[1], (4, 2)),
                          normal(k[2], (2, 3)), scale=0.7, path="w", dropout=0.5)
    x = normal(k[3], (5, 4))
    if kind == "custom_jvp":
        layer = jax.custom_jvp(lambda w, x: jnp.tanh(x @ w))
        layer.defjvp(lambda p, t: (layer(*p), (1 - layer(*p) ** 2) * (p[1] @ t[0] + t[1] @ p[0])))
    else:
        layer = jax.custom_vjp(lambda w, x: jnp.tanh(x @ w))
        layer.defvjp(lambda w, x: (jnp.tanh(x @ w), (w, x, jnp.tanh(x @ w))),
                     lambda r, ct: ((r[1].T @ (ct * (1 - r[2] ** 2))), (ct * (1 - r[2] ** 2)) @ r[0].T))
    trainable, frozen = jlora.split({"w": lw})
    loss = lambda t: jnp.sum(jlora.apply(lambda p, x: layer(p["w"], x))(jlora.combine(t, frozen), x,
                                                                       lora_rng=jax.random.key(3)))
    undropped = float(jnp.sum(jnp.tanh(x @ lw.materialize())))
    with pytest.warns(MaterializeWarning, match=f"'w' materialised at '{kind}_call'.*LoRA dropout is NOT applied"):
        value = float(loss(trainable))
    grad_value, grads = jax.value_and_grad(loss)(trainable)
    np.testing.assert_allclose([value, float(grad_value)], [undropped, undropped], rtol=1e-5)
    oracle = jax.grad(lambda t: jnp.sum(jnp.tanh(x @ jlora.combine(t, frozen)["w"].materialize())))(trainable)
    np.testing.assert_allclose(grads["w"].a, oracle["w"].a, rtol=1e-5, atol=1e-6)


def test_dropout_inside_while_loop_differs_per_iteration():
    p = jlora.lora_init(jax.random.key(0), {"w": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets=["w"], dropout=0.5))
    p = {"w": p["w"].replace(b=jnp.ones_like(p["w"].b))}
    x = jnp.ones((1, 8))

    def fn(p, x):  # row i of the result: the adapted matmul in iteration i
        def body(c):
            i, rows = c
            return i + 1, rows.at[i].set((x @ p["w"])[0])
        return lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros((3, 8))))[1]

    rows = jlora.apply(fn)(p, x, lora_rng=jax.random.key(1))
    assert not np.allclose(rows[0], rows[1]) and not np.allclose(rows[1], rows[2])
    same = jlora.apply(fn)(p, x)  # no key: deterministic, every iteration alike
    np.testing.assert_allclose(same[0], same[2])


def test_members_of_a_stack_reading_one_input_share_its_dropout_mask():
    """As the README says: ``jax.vmap`` over a stack's members with the input unbatched (an
    ``nn.vmap`` ensemble, ``in_axes=None``) is one matmul of that input, so one mask for all."""
    members, d = 3, 8
    one = random_lora(jax.random.key(2), (d, d), "io", 2)
    stack = jlora.LoraWeight(jnp.zeros((members, d, d)), jnp.broadcast_to(one.a, (members, *one.a.shape)),
                             jnp.broadcast_to(one.b + 1.0, (members, *one.b.shape)), scale=1.0, layout="bio",
                             dropout=0.5)
    fn = lambda p, x: jax.vmap(lambda w: x @ w)(p["stack"])
    x = normal(jax.random.key(3), (4, d))
    ys = jlora.apply(fn)({"stack": stack}, x, lora_rng=jax.random.key(1))
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-6)  # alike members: alike outputs under dropout
    assert not np.allclose(ys[0], jlora.apply(fn)({"stack": stack}, x)[0])  # dropout did act


def test_dropout_inside_scan_differs_per_step(params):
    p = {"stack": params["stack"].replace(dropout=0.5)}

    def fn(p, x):
        return lax.scan(lambda h, w_i: (h, h @ w_i), x, p["stack"])[1]

    ys = jlora.apply(fn)(p, X, lora_rng=jax.random.key(1))
    base = jnp.einsum("ni,lio->lno", X, p["stack"].w)
    low = ys - base
    # steps use different masks: the ratio of low-rank parts to the no-dropout ones differs
    ref = jlora.apply(fn)(p, X) - base
    r = (low / ref).reshape(3, -1)
    assert not np.allclose(r[0], r[1])


def test_a_while_loop_draws_a_dropout_key_of_its_own():
    """The loop's context (``forward_mode``) shares the site counter: its key is not the one the
    function's first dropout site drew."""
    ctx = jlora.lazy.Context(jax.random.key(1))
    first, in_loop = ctx.next_key(), ctx.forward_mode().next_key()
    assert not np.array_equal(jax.random.key_data(first), jax.random.key_data(in_loop))


def test_a_per_layer_function_mapped_over_stacked_params_outside_apply():
    """``jlora.apply(layer)`` under a ``lax.scan``, ``vmap`` or ``lax.map`` over the stack: each slice
    carries the stack's layout 'bio' and is one layer's adapter, also where the rank equals the width
    (read as a batch axis, that gave wrong numbers under a warning that called them exact)."""
    stack = random_lora(jax.random.key(0), (3, 4, 4), "bio", 4)
    layer = lambda w, h: jnp.tanh(h @ w)
    step, x = jlora.apply(layer), normal(jax.random.key(1), (2, 4))
    lazy = lambda s: lax.scan(lambda h, w: (step(w, h), None), x, s)[0]
    plain = lambda s: lax.scan(lambda h, w: (layer(w, h), None), x, oracle_merge({"s": s})["s"])[0]
    np.testing.assert_allclose(lazy(stack), plain(stack), rtol=1e-5, atol=1e-5)
    g, g_ref = jax.grad(lambda s: lazy(s).sum())(stack), jax.grad(lambda s: plain(s).sum())(stack)
    np.testing.assert_allclose(g.a, g_ref.a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b, g_ref.b, rtol=1e-5, atol=1e-5)
    merged = oracle_merge({"s": stack})["s"]
    np.testing.assert_allclose(jax.vmap(step, in_axes=(0, None))(stack, x), jax.vmap(layer, in_axes=(0, None))(merged, x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lax.map(jlora.merge, stack), merged, rtol=1e-6, atol=1e-6)


def test_an_ensemble_made_by_vmap_of_lora_init_has_an_adapter_per_member():
    """``jax.vmap(lora_init)`` gives each node leading axes its 'io' layout does not name: inside
    ``apply`` (vmapped over, in an einsum, indexed), in ``merge`` and ``unmerge`` they are batch axes,
    a member's own adapter each; ``unmerge`` gives the nodes back as they were."""
    base = {"k": normal(jax.random.key(1), (6, 5))}
    init = lambda key: jlora.lora_init(key, base, jlora.LoraConfig(rank=2, targets=["k"]))
    ens = perturb(jax.vmap(init)(jax.random.split(jax.random.key(0), 3)), jax.random.key(2))
    x, f = normal(jax.random.key(9), (4, 6)), lambda p, x: jnp.tanh(x @ p["k"])
    want = jax.vmap(lambda e: f(oracle_merge(e), x))(ens)
    for inside in (lambda e, x: jax.vmap(f, in_axes=(0, None))(e, x),
                   lambda e, x: jnp.tanh(jnp.einsum("bi,eio->ebo", x, e["k"])),
                   lambda e, x: jnp.stack([f({"k": e["k"][i]}, x) for i in range(3)])):
        np.testing.assert_allclose(jlora.apply(inside)(ens, x), want, rtol=1e-5, atol=1e-5)
    merged = jlora.merge(ens)
    np.testing.assert_allclose(merged["k"], jax.vmap(oracle_merge)(ens)["k"], rtol=1e-6, atol=1e-6)
    back = jlora.unmerge(merged, ens)
    assert jax.tree.structure(back) == jax.tree.structure(ens)
    np.testing.assert_allclose(back["k"].w, ens["k"].w, rtol=1e-5, atol=1e-5)
