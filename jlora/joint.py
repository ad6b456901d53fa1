"""``x @ w + t @ b`` as one matmul: ``[x | t] @ [w ; b]``, stacked along the contracted axis.

An adapted matmul's output ``x@w + s·(x@a)@b`` is two matmuls and an add. Where that sum is
stored for the backward as itself (see ``jlora.rebuild.kept_for_rebuild``: Llama's ``gate`` and
``up``), the add is a pass of its own over a full-size activation: it reads both terms and writes
the sum. Appending the rank-``r`` factor ``t = s·x@a`` to ``x`` and ``b`` to ``w`` along the
contracted axis gives the sum from the base matmul itself, for the price of copying ``w`` once
(``w`` plus ``r`` rows) instead of two full-size activation passes. That pays wherever there are
at least half as many tokens as input features (``joint_pays``).

A weight sharded along its input axis (rows of ``w``, e.g. ``P("model", None)`` for a 2-D
kernel) makes the stacked weight a reshuffle between devices every step: correct, but slower.
``jlora.sharding``'s Megatron rules shard ``gate``/``up`` along their outputs, and so does its
FSDP rule where a kernel has more outputs than inputs (Llama's ``gate``/``up``); for a weight
sharded along its inputs, ``jlora.apply(fn, recompute=False)`` keeps the plain sum. On a mesh
with Explicit axes, where types show it, such a matmul keeps the plain sum by itself.

The backward is that of the two matmuls (``dx = dy·wᵀ``, ``dt = dy·bᵀ``, ``db = tᵀ·dy``; ``w``
is frozen): it keeps ``t``, ``w`` and ``b``, not the stacked weight. A call that is not
differentiated (serving, an evaluation) stacks too: measured on an H100, a Llama evaluation runs
4% faster than with the plain sum, at the same peak memory (the CPU's scratch is higher).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _compat, explicit

Dot = Callable[[jax.Array, jax.Array], jax.Array]


def joint_pays(x: jax.Array, x_axis: int) -> bool:
    """Whether stacking beats the sum for an input ``x`` contracted along ``x_axis``.

    The stacked weight costs a read and a write of ``w`` (``2·d_in·d_out``); the sum costs
    ``t@b``'s output and the add pass (about ``4·tokens·d_out``). So: ``2·tokens >= d_in``,
    counting the tokens of ``x`` as the function sees it (one example under ``vmap``, one
    device's share under ``shard_map``).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.joint import joint_pays
        >>> joint_pays(jnp.ones((4096, 2048)), 1), joint_pays(jnp.ones((512, 2048)), 1)
        (True, False)
    """
    if _compat.symbolic(x.shape):  # a shape-polymorphic export: unknown, keep the sum
        return False
    d_in = x.shape[x_axis]
    return 2 * (x.size // max(d_in, 1)) >= d_in


def joint_dot(x: jax.Array, t: jax.Array, w: jax.Array, b: jax.Array, dot: Dot,
              x_axis: int, w_axis: int) -> jax.Array:
    """``dot(x, w) + dot(t, b)`` computed as ``dot([x | t], [w ; b])``.

    ``dot`` contracts ``x_axis`` of its first operand with ``w_axis`` of its second; ``t`` is laid
    out like ``x`` and ``b`` like ``w``, except for their size along those axes. ``w`` gets no
    gradient (it is the frozen base weight).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.joint import joint_dot
        >>> x, t, w, b = jnp.ones((5, 4)), jnp.ones((5, 2)), jnp.ones((4, 3)), jnp.ones((2, 3))
        >>> joint_dot(x, t, w, b, jnp.matmul, 1, 0)[0]
        Array([6., 6., 6.], dtype=float32)
    """
    shape, dtype, x_sharding = x.shape, x.dtype, explicit.sharding(x)

    def stacked(x: jax.Array, t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        return dot(jnp.concatenate([x, t], x_axis), jnp.concatenate([w, b], w_axis))

    # mapped by a vmap that the caller could not see (a jax.jit or jax.checkpoint between the vmap
    # and jlora.apply): adapters mapped over one base would stack a copy of w per adapter; the sum
    # copies nothing
    batched = jax.custom_batching.custom_vmap(_compat.unscoped(stacked))

    @batched.def_vmap
    def _(axis_size: int, in_batched: list, x: jax.Array, t: jax.Array, w: jax.Array, b: jax.Array) -> tuple:
        one_base = in_batched[3] and not in_batched[2]
        run = (lambda x, t, w, b: dot(x, w) + dot(t, b)) if one_base else stacked
        axes = tuple(0 if mapped else None for mapped in in_batched)
        return jax.vmap(run, in_axes=axes)(x, t, w, b), True

    # custom_vmap is differentiated by none of JAX's reverse modes: the derivatives of the sum
    # (needed where fwd below is differentiated itself: a gradient's gradient)
    joint = jax.custom_jvp(_compat.unscoped(batched))

    @joint.defjvp
    def _(primals: tuple, tangents: tuple) -> tuple:
        (x, t, w, b), (dx, dt, dw, db) = primals, tangents
        return batched(x, t, w, b), dot(dx, w) + dot(dt, b) + dot(x, dw) + dot(t, db)

    def fwd(x: jax.Array, t: jax.Array, w: jax.Array, b: jax.Array) -> tuple:
        # x's type (with the manual mesh axes it varies over), 1 element; on a mesh with Explicit
        # axes, where a sharded axis cannot be cut to 1, its sharding (kept aside) does that job
        probe = None if x_sharding is not None else lax.slice(x, (0,) * x.ndim, (1,) * x.ndim)
        return joint(x, t, w, b), (probe, t, w, b)

    def bwd(res: tuple, dy: jax.Array) -> tuple:
        probe, t, w, b = res
        # dot is linear in x: the vjp reads x's type, never its value
        like_x = (jnp.broadcast_to(probe, shape) if x_sharding is None
                  else _compat.reshard(jnp.zeros(shape, dtype), x_sharding))
        _, vjp = jax.vjp(lambda x, t, b: dot(x, lax.stop_gradient(w)) + dot(t, b), like_x, t, b)
        dx, dt, db = vjp(dy)
        return dx, dt, None, db

    project = jax.custom_vjp(joint)  # undifferentiated too: one pass, faster on the GPU than the sum (RESULTS.md)
    project.defvjp(fwd, bwd)
    return project(x, t, w, b)
