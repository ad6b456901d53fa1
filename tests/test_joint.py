"""``jlora.joint.joint_dot``: ``x@w + t@b`` as one matmul over stacked operands."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jlora
from jlora.joint import joint_dot
from oracle import normal

KEY = jax.random.key(0)


def operands(w_transposed=False):
    kx, kt, kw, kb = jax.random.split(KEY, 4)
    x, t = normal(kx, (3, 5, 6)), normal(kt, (3, 5, 2))
    w, b = normal(kw, (6, 4)), normal(kb, (2, 4))
    if w_transposed:  # a PyTorch-style (out, in) kernel, contracted on its axis 1
        return x, t, w.T, b.T
    return x, t, w, b


def dot_for(w_axis):
    return functools.partial(lax.dot_general, dimension_numbers=(((2,), (w_axis,)), ((), ())))


@pytest.mark.parametrize("w_axis", [0, 1])
def test_equals_two_matmuls_with_their_derivatives(w_axis):
    x, t, w, b = operands(w_transposed=w_axis == 1)
    dot = dot_for(w_axis)
    joint = lambda x, t, b: jnp.sum(jnp.tanh(joint_dot(x, t, w, b, dot, 2, w_axis)) ** 2)
    plain = lambda x, t, b: jnp.sum(jnp.tanh(dot(x, w) + dot(t, b)) ** 2)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    close(joint(x, t, b), plain(x, t, b))
    jax.tree.map(close, jax.grad(joint, (0, 1, 2))(x, t, b), jax.grad(plain, (0, 1, 2))(x, t, b))
    # derivatives of the gradient: forward over reverse and reverse over reverse
    hvp = lambda f: jax.jvp(jax.grad(f, (0, 1, 2)), (x, t, b), (x, t, b))[1]
    jax.tree.map(close, hvp(joint), hvp(plain))
    penalty = lambda f: jax.grad(lambda *a: sum(jnp.sum(g ** 2) for g in jax.grad(f, (0, 1, 2))(*a)), (0, 1, 2))
    jax.tree.map(close, penalty(joint)(x, t, b), penalty(plain)(x, t, b))


def test_the_backward_keeps_neither_x_nor_the_stacked_weight():
    x, t, w, b = operands()
    _, vjp = jax.vjp(lambda x, t, b: joint_dot(x, t, w, b, dot_for(0), 2, 0), x, t, b)
    shapes = sorted(tuple(r.shape) for r in jax.tree.leaves(vjp) if hasattr(r, "shape"))
    assert x.shape not in shapes and (8, 4) not in shapes
    assert t.shape in shapes and w.shape in shapes


@pytest.mark.parametrize("mapped", ["b", "w", "both"])
def test_a_vmap_stacks_no_copy_of_an_unmapped_weight(mapped):
    """Adapters mapped over one base (served, or trained as a stack) by a vmap that reached the
    stacked matmul unseen, through a jax.jit: [w ; b] would copy w per adapter; the sum copies
    nothing. One adapter over mapped bases stacks, copying only b per base."""
    x, t, w, b = operands()
    ws, bs = jnp.stack([w, 2 * w, -w]), jnp.stack([b, 3 * b, -b])
    w_in, b_in = (ws if mapped in ("w", "both") else w), (bs if mapped in ("b", "both") else b)
    axes = (0, 0, 0 if mapped in ("w", "both") else None, 0 if mapped in ("b", "both") else None)
    xs, ts = jnp.stack([x] * 3), jnp.stack([t, -t, 2 * t])
    joint = jax.vmap(jax.jit(lambda x, t, w, b: joint_dot(x, t, w, b, dot_for(0), 2, 0)), in_axes=axes)
    plain = jax.vmap(lambda x, t, w, b: dot_for(0)(x, w) + dot_for(0)(t, b), in_axes=axes)
    close = lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    close(joint(xs, ts, w_in, b_in), plain(xs, ts, w_in, b_in))
    loss = lambda f: lambda x, t, b: jnp.sum(jnp.tanh(f(x, t, w_in, b)) ** 2)
    jax.tree.map(close, jax.grad(loss(joint), (0, 1, 2))(xs, ts, b_in), jax.grad(loss(plain), (0, 1, 2))(xs, ts, b_in))
    jaxpr = str(jax.make_jaxpr(joint)(xs, ts, w_in, b_in))
    assert ("concatenate" in jaxpr) == (mapped != "b")  # no [w ; b] per adapter over one w


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")
def test_inside_shard_map_with_a_replicated_weight():
    mesh = jlora.sharding.make_mesh({"data": 8})
    kx, kt, kw, kb = jax.random.split(KEY, 4)
    x, t = normal(kx, (8, 6)), normal(kt, (8, 2))
    w, b = normal(kw, (6, 4)), normal(kb, (2, 4))

    def loss(x, t, b, joint):
        def local(x, t, w, b):
            y = joint_dot(x, t, w, b, jnp.matmul, 1, 0) if joint else x @ w + t @ b
            return jax.lax.psum(jnp.sum(y ** 2), "data")
        spec = (P("data"), P("data"), P(), P())
        return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P())(x, t, w, b)

    grads = lambda joint: jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(x, t, b, joint)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5), grads(True), grads(False))


def test_stacking_pays_from_half_as_many_tokens_as_input_features():
    from jlora.joint import joint_pays

    assert joint_pays(jnp.ones((2, 4, 16)), 2)  # 8 tokens, 16 features
    assert not joint_pays(jnp.ones((7, 16)), 1)
    # the contracted axis need not be last
    assert joint_pays(jnp.ones((4, 32)), 0) and not joint_pays(jnp.ones((16, 3)), 0)
