"""Independent oracles for tests: the materialised weight, written with numpy einsum."""

from __future__ import annotations

import string
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.layout import Layout
from jlora.weight import LoraWeight, Trainable


def oracle_merge(tree: Any) -> Any:
    """Materialise every LoraWeight as w + Δ in w's dtype (jnp, differentiable in a and b)."""

    def one(x: Any) -> Any:
        if isinstance(x, LoraWeight):
            letters = iter(string.ascii_lowercase)
            w_letters = [next(letters) for _ in range(len(x.w.shape))]
            r = next(letters)
            groups = {role: sorted((k, ax) for ax, (rr, k) in enumerate(x.layout.axes) if rr == role) for role in "bio"}
            ax = {role: [a for _, a in g] for role, g in groups.items()}
            a_sub = "".join(w_letters[i] for i in ax["b"] + ax["i"]) + r
            b_sub = "".join(w_letters[i] for i in ax["b"]) + r + "".join(w_letters[i] for i in ax["o"])
            w = x.w.materialize() if isinstance(x.w, jlora.Lazy) else x.w  # a lazy base's own definition
            wide = jnp.result_type(w, x.a, x.b)  # the product in the widest dtype of the three
            delta = x.scale * jnp.einsum(f"{a_sub},{b_sub}->{''.join(w_letters)}", x.a.astype(wide), x.b.astype(wide),
                                         precision=jax.lax.Precision.HIGHEST)
            return (w + delta).astype(w.dtype)
        if isinstance(x, Trainable):
            return x.value
        return x

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, (LoraWeight, Trainable)))


def normal(key: Any, shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> jax.Array:
    """Standard-normal test data drawn on the host from a JAX key.

    ``jax.random.normal`` compiles once per shape (about 0.15 s on a CPU), which tests of many
    random shapes would pay on every draw.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jnp.asarray(rng.standard_normal(shape), dtype)


def perturb(tree: Any, key: Any, scale: float = 0.1) -> Any:
    """Random non-zero b (and a) so that gradients w.r.t. both factors are non-trivial."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, LoraWeight))
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, LoraWeight):
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            x = x.replace(
                a=scale * normal(ka, x.a.shape, x.a.dtype),
                b=scale * normal(kb, x.b.shape, x.b.dtype),
            )
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def check_against_oracle(fn: Callable, params: Any, *args: Any, rtol: float = 1e-5, atol: float = 1e-5,
                         jit: bool = True, mode: str = "reverse", **apply_options: Any) -> None:
    """apply(fn) == fn on the oracle-merged weight: outputs, and derivatives w.r.t. the trainable
    half, reverse mode (grads) or forward mode (JVPs, for ``while_loop``)."""
    forward = jlora.apply(fn, **apply_options)
    run = jax.jit(forward) if jit else forward
    got = run(params, *args)
    want = fn(oracle_merge(params), *args)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got, want)

    trainable, frozen = jlora.split(params)
    if mode == "forward":
        tangent = jax.tree.map(lambda t: normal(jax.random.key(5), t.shape, t.dtype), trainable)
        lazy_fn = lambda t: forward(jlora.combine(t, frozen), *args)
        ref_fn = lambda t: fn(oracle_merge(jlora.combine(t, frozen)), *args)
        _, t_lazy = jax.jit(lambda t, d: jax.jvp(lazy_fn, (t,), (d,)))(trainable, tangent)
        _, t_ref = jax.jvp(ref_fn, (trainable,), (tangent,))
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), t_lazy, t_ref)
        return
    cot = jax.tree.map(lambda o: normal(jax.random.key(7), o.shape, o.dtype), want)

    def loss(t, f):
        out = f(jlora.combine(t, frozen), *args)
        return sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cot)))

    g_lazy = (jax.jit(jax.grad(loss, argnums=0), static_argnums=1) if jit else jax.grad(loss))(trainable, forward)
    g_ref = jax.grad(lambda t: loss(t, lambda p, *a: fn(oracle_merge(p), *a)))(trainable)
    flat_lazy = jax.tree_util.tree_flatten_with_path(g_lazy)[0]
    flat_ref = jax.tree_util.tree_flatten_with_path(g_ref)[0]
    assert [p for p, _ in flat_lazy] == [p for p, _ in flat_ref]
    # float32 sums in another order: an element that cancels down to a small value keeps the rounding
    # of its larger terms, whose size the largest gradient tells (a 1x1 factor's 0.0037 of terms ~0.1)
    scale = max((float(np.abs(np.asarray(w)).max()) for _, w in flat_ref), default=0.0) or 1.0
    for (path, g), (_, w) in zip(flat_lazy, flat_ref):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


def random_lora(key: Any, shape: tuple[int, ...], layout: Any, rank: int, scale: float = 0.7) -> LoraWeight:
    """A ``LoraWeight`` of random ``w``, ``a`` and ``b`` (``b`` non-zero), scaled for well-conditioned float32."""
    layout = Layout.parse(layout) if isinstance(layout, str) else layout
    kw, ka, kb = jax.random.split(key, 3)
    fan_in = layout.fan_in(shape)  # unit-variance activations keep float32 comparisons well conditioned
    return jlora.LoraWeight(
        normal(kw, shape) / np.sqrt(fan_in),
        normal(ka, layout.a_shape(shape, rank)) / np.sqrt(fan_in),
        normal(kb, layout.b_shape(shape, rank)) / np.sqrt(rank),
        scale=scale, layout=layout, path="w",
    )
